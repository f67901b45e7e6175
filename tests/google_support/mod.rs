//! A local fake of Google (token endpoint, Play Developer API, JWKS)
//! answering in the shapes of the androidpublisher v3 discovery document,
//! with the configuration and requests the Play tests share.
#![allow(dead_code)]

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, LazyLock, Mutex},
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use entitle::{
    config::{Config, GoogleConfig, Secret},
    domain::{EntitlementDef, ProductDef, ProductKind},
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use rsa::{
    RsaPrivateKey, RsaPublicKey,
    pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding},
    traits::PublicKeyParts,
};
use serde_json::{Value, json};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers::any};

use crate::common::{Auth, Backend, TestApp, spawn_with};

pub const PACKAGE: &str = "com.example.app";
pub const AUDIENCE: &str = "https://entitle.test/webhooks/google";
pub const PUSHER: &str = "rtdn-push@example-project.iam.gserviceaccount.com";
pub const SA_EMAIL: &str = "entitle@example-project.iam.gserviceaccount.com";
pub const GOOGLE_KID: &str = "google-key-1";

/// Google's key (service account, push tokens, licensing) and a stranger's,
/// generated once per test binary.
pub struct Keys {
    pub google: RsaPrivateKey,
    pub google_pem: String,
    pub stranger_pem: String,
}

pub static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let mut rng = rsa::rand_core::OsRng;
    let google = RsaPrivateKey::new(&mut rng, 2048).unwrap();
    let stranger = RsaPrivateKey::new(&mut rng, 2048).unwrap();
    Keys {
        google_pem: google.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
        stranger_pem: stranger.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
        google,
    }
});

pub fn jwk(key: &RsaPublicKey, kid: &str) -> Value {
    json!({
        "kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
        "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
    })
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

// ---------------------------------------------------------------- the fake

#[derive(Default)]
pub struct FakeState {
    /// Purchase token -> SubscriptionPurchaseV2 / ProductPurchase, or an error status.
    pub purchases: HashMap<String, Result<Value, u16>>,
    pub acks: Vec<String>,
    /// Every Play API call answers 503.
    pub down: bool,
    /// Acknowledge calls answer 503.
    pub ack_down: bool,
    pub tokens_issued: u32,
    pub revoked_tokens: HashSet<String>,
    pub jwks: Vec<Value>,
    pub jwks_fetches: u32,
    pub jwks_down: bool,
    /// The keys endpoint takes a minute to answer.
    pub jwks_hang: bool,
}

#[derive(Clone, Default)]
pub struct Fake(pub Arc<Mutex<FakeState>>);

impl Fake {
    pub fn set(&self, token: &str, body: Value) {
        self.0
            .lock()
            .unwrap()
            .purchases
            .insert(token.into(), Ok(body));
    }
    pub fn fail(&self, token: &str, status: u16) {
        self.0
            .lock()
            .unwrap()
            .purchases
            .insert(token.into(), Err(status));
    }
    pub fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }
    pub fn ack_state(&self, token: &str) -> Value {
        self.with(|s| match &s.purchases[token] {
            Ok(v) => v["acknowledgementState"].clone(),
            Err(_) => Value::Null,
        })
    }
}

impl Respond for Fake {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let path = req.url.path().to_string();
        if path == "/token" {
            let form: HashMap<String, String> = url::form_urlencoded::parse(&req.body)
                .into_owned()
                .collect();
            if form.get("grant_type").map(String::as_str)
                != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
            {
                return ResponseTemplate::new(400)
                    .set_body_json(json!({"error": "unsupported_grant_type"}));
            }
            // The assertion must be ours, for this endpoint and scope.
            let key = jsonwebtoken::DecodingKey::from_rsa_pem(
                KEYS.google
                    .to_public_key()
                    .to_public_key_pem(LineEnding::LF)
                    .unwrap()
                    .as_bytes(),
            )
            .unwrap();
            let mut v = jsonwebtoken::Validation::new(Algorithm::RS256);
            // The audience is the token URI as configured, which the fake
            // sees only by its path.
            v.validate_aud = false;
            v.set_issuer(&[SA_EMAIL]);
            let ok = form.get("assertion").is_some_and(|a| {
                jsonwebtoken::decode::<Value>(a, &key, &v).is_ok_and(|d| {
                    d.claims["scope"] == "https://www.googleapis.com/auth/androidpublisher"
                        && d.claims["aud"]
                            .as_str()
                            .is_some_and(|a| a.starts_with("http") && a.ends_with("/token"))
                })
            });
            if !ok {
                return ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_grant"}));
            }
            s.tokens_issued += 1;
            return ResponseTemplate::new(200).set_body_json(json!({
                "access_token": format!("ya29.fake-{}", s.tokens_issued),
                "expires_in": 3599,
                "token_type": "Bearer"
            }));
        }
        if path == "/jwks" {
            if s.jwks_hang {
                s.jwks_fetches += 1;
                return ResponseTemplate::new(200)
                    .set_body_json(json!({ "keys": s.jwks }))
                    .set_delay(std::time::Duration::from_secs(60));
            }
            if s.jwks_down {
                return ResponseTemplate::new(502);
            }
            s.jwks_fetches += 1;
            return ResponseTemplate::new(200).set_body_json(json!({ "keys": s.jwks }));
        }
        let prefix = format!("/androidpublisher/v3/applications/{PACKAGE}/purchases/");
        let Some(rest) = path.strip_prefix(&prefix) else {
            return ResponseTemplate::new(404);
        };
        let bearer = req
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_string();
        if !bearer.starts_with("ya29.fake-") || s.revoked_tokens.contains(&bearer) {
            return ResponseTemplate::new(401).set_body_json(json!({"error": {"code": 401}}));
        }
        if s.down {
            return ResponseTemplate::new(503).set_body_json(json!({"error": {"code": 503}}));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        // subscriptionsv2/tokens/{t} | products/{p}/tokens/{t}[:acknowledge] |
        // subscriptions/{p}/tokens/{t}:acknowledge
        let (token, ack) = match parts.as_slice() {
            ["subscriptionsv2", "tokens", t] => (t.to_string(), false),
            ["products" | "subscriptions", _, "tokens", t] => {
                match t.strip_suffix(":acknowledge") {
                    Some(t) => (t.to_string(), true),
                    None => (t.to_string(), false),
                }
            }
            _ => return ResponseTemplate::new(404),
        };
        let token = percent_decode(&token);
        if ack {
            if req.method != "POST" {
                return ResponseTemplate::new(405);
            }
            if s.ack_down {
                return ResponseTemplate::new(503);
            }
            let is_sub = parts[0] == "subscriptions";
            match s.purchases.get_mut(&token) {
                Some(Ok(p)) => {
                    p["acknowledgementState"] = if is_sub {
                        json!("ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED")
                    } else {
                        json!(1)
                    };
                }
                _ => return ResponseTemplate::new(404),
            }
            s.acks.push(token);
            return ResponseTemplate::new(200).set_body_string("");
        }
        match s.purchases.get(&token) {
            Some(Ok(p)) => ResponseTemplate::new(200).set_body_json(p),
            Some(Err(code)) => ResponseTemplate::new(*code)
                .set_body_json(json!({"error": {"code": code, "message": "fake"}})),
            None => ResponseTemplate::new(404).set_body_json(json!({"error": {"code": 404}})),
        }
    }
}

pub fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

pub struct Google {
    pub server: MockServer,
    pub fake: Fake,
}

pub async fn fake_google() -> Google {
    let server = MockServer::start().await;
    let fake = Fake::default();
    fake.with(|s| s.jwks = vec![jwk(&KEYS.google.to_public_key(), GOOGLE_KID)]);
    Mock::given(any())
        .respond_with(fake.clone())
        .mount(&server)
        .await;
    Google { server, fake }
}

pub fn license_key_b64() -> String {
    STANDARD.encode(
        KEYS.google
            .to_public_key()
            .to_public_key_der()
            .unwrap()
            .as_bytes(),
    )
}

pub fn google_config(uri: &str) -> GoogleConfig {
    let mut g = GoogleConfig::new(PACKAGE);
    g.service_account = Some(Secret::new(
        json!({
            "type": "service_account",
            "project_id": "example-project",
            "private_key_id": "sa-key-1",
            "private_key": KEYS.google_pem,
            "client_email": SA_EMAIL,
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string(),
    ));
    g.api_base = format!("{uri}/");
    g.token_uri = Some(format!("{uri}/token"));
    g.pubsub_audience = Some(AUDIENCE.into());
    g.pubsub_service_account = Some(PUSHER.into());
    g.jwks_uri = format!("{uri}/jwks");
    // Tests flip the fake's keys endpoint down and up within milliseconds.
    g.jwks_failure_backoff_ms = 0;
    g.license_public_key = Some(license_key_b64());
    g
}

/// Adds a `maps`-only lifetime product, so the subscription (`pro`) and
/// the one-time product (`maps`) can be told apart.
pub fn with_google(c: &mut Config, uri: &str) {
    c.google = Some(google_config(uri));
    c.catalog.products.push(ProductDef {
        id: "maps_forever".into(),
        entitlements: vec!["maps".into()],
        kind: ProductKind::Lifetime,
        display_name: None,
        stripe_price_id: None,
        stripe_payment_link: None,
        app_store_product_id: None,
        play_store_product_id: Some("maps_forever".into()),
    });
    assert!(c.catalog.entitlements.contains(&EntitlementDef {
        key: "maps".into(),
        description: None
    }));
}

pub async fn setup(b: Backend) -> (TestApp, Google) {
    setup_with(b, |_| {}).await
}

pub async fn setup_with(b: Backend, f: impl FnOnce(&mut Config)) -> (TestApp, Google) {
    let google = fake_google().await;
    let uri = google.server.uri();
    let app = spawn_with(b, |c| {
        with_google(c, &uri);
        f(c)
    })
    .await;
    (app, google)
}

// ------------------------------------------------------- Google's shapes

pub struct Sub<'a> {
    pub state: &'a str,
    pub expiry: DateTime<Utc>,
    pub auto_renew: bool,
    pub acknowledged: bool,
    pub account: Option<&'a str>,
    pub linked: Option<&'a str>,
    pub start: DateTime<Utc>,
}

impl<'a> Sub<'a> {
    pub fn active(now: DateTime<Utc>) -> Self {
        Sub {
            state: "SUBSCRIPTION_STATE_ACTIVE",
            expiry: now + Duration::days(30),
            auto_renew: true,
            acknowledged: false,
            account: None,
            linked: None,
            start: now - Duration::minutes(1),
        }
    }
    pub fn json(&self) -> Value {
        let mut v = json!({
            "kind": "androidpublisher#subscriptionPurchaseV2",
            "regionCode": "US",
            "startTime": rfc3339(self.start),
            "subscriptionState": self.state,
            "acknowledgementState": if self.acknowledged {
                "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED"
            } else {
                "ACKNOWLEDGEMENT_STATE_PENDING"
            },
            "lineItems": [{
                "productId": "pro_sub",
                "expiryTime": rfc3339(self.expiry),
                "autoRenewingPlan": { "autoRenewEnabled": self.auto_renew },
                "offerDetails": { "basePlanId": "monthly", "offerTags": [] },
                "latestSuccessfulOrderId": "GPA.1234-5678-9012-34567"
            }],
            "testPurchase": {}
        });
        if let Some(a) = self.account {
            v["externalAccountIdentifiers"] = json!({ "obfuscatedExternalAccountId": a });
        }
        if let Some(l) = self.linked {
            v["linkedPurchaseToken"] = json!(l);
        }
        if self.state == "SUBSCRIPTION_STATE_CANCELED" || self.state == "SUBSCRIPTION_STATE_EXPIRED"
        {
            v["canceledStateContext"] = json!({
                "userInitiatedCancellation": { "cancelTime": rfc3339(self.start + Duration::days(1)) }
            });
        }
        v
    }
}

pub fn product_purchase(
    state: i64,
    acknowledged: bool,
    account: Option<&str>,
    at: DateTime<Utc>,
) -> Value {
    let mut v = json!({
        "kind": "androidpublisher#productPurchase",
        "purchaseTimeMillis": at.timestamp_millis().to_string(),
        "purchaseState": state,
        "consumptionState": 0,
        "orderId": "GPA.3333-4444-5555-66666",
        "acknowledgementState": if acknowledged { 1 } else { 0 },
        "purchaseType": 0,
        "regionCode": "US"
    });
    if let Some(a) = account {
        v["obfuscatedExternalAccountId"] = json!(a);
    }
    v
}

// ------------------------------------------------------------ requests

pub const VERIFY: &str = "mutation($input: VerifyPurchaseInput!, $c: ID) {
  verifyPurchase(input: $input, customerId: $c) {
    customer { id entitlements { key isActive status store productId expiresAt willRenew } }
    purchase { productId status environment autoRenew }
  } }";

pub async fn verify(
    app: &TestApp,
    key: &Auth,
    customer: &str,
    product: &str,
    token: &str,
) -> Value {
    let (s, body) = app
        .gql(
            key,
            VERIFY,
            json!({ "c": customer, "input": { "playStore": {
                "packageName": PACKAGE, "productId": product, "purchaseToken": token } } }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

/// The entitlement as `key` reads it, and the customer's purchases as the
/// database holds them (purchase tokens are not readable with a client key).
pub async fn entitlement(app: &TestApp, key: &Auth, customer: &str, ent: &str) -> Value {
    let (_, body) = app
        .gql(
            key,
            "query($id: ID!, $e: String!) { customer(id: $id) {
               entitlement(key: $e) { isActive status willRenew expiresAt gracePeriodExpiresAt } } }",
            json!({ "id": customer, "e": ent }),
        )
        .await;
    let mut c = body["data"]["customer"].clone();
    let rows = entitle::db::purchases_of(&app.state.core.db().conn, customer)
        .await
        .map_err(anyhow::Error::from)
        .unwrap();
    if c.is_object() {
        c["purchases"] = rows
            .iter()
            .map(|p| json!({ "storePurchaseId": p.store_purchase_id, "status": p.status.to_uppercase() }))
            .collect();
    }
    c
}

pub fn is_active(c: &Value) -> bool {
    c["entitlement"]["isActive"].as_bool().unwrap_or(false)
}

pub fn purchase_status(c: &Value, token: &str) -> String {
    c["purchases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["storePurchaseId"] == token)
        .map(|p| p["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

#[derive(Clone)]
pub struct Oidc {
    pub aud: String,
    pub email: String,
    pub email_verified: Value,
    pub exp_offset: i64,
    pub kid: String,
    pub signer_pem: String,
    pub iss: String,
}

impl Default for Oidc {
    fn default() -> Self {
        Oidc {
            aud: AUDIENCE.into(),
            email: PUSHER.into(),
            email_verified: json!(true),
            exp_offset: 3600,
            kid: GOOGLE_KID.into(),
            signer_pem: KEYS.google_pem.clone(),
            iss: "https://accounts.google.com".into(),
        }
    }
}

impl Oidc {
    pub fn token(&self) -> String {
        let now = Utc::now().timestamp();
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(
            &h,
            &json!({
                "aud": self.aud, "azp": "1234567890", "email": self.email,
                "email_verified": self.email_verified, "exp": now + self.exp_offset,
                "iat": now + self.exp_offset - 3600, "iss": self.iss, "sub": "1234567890"
            }),
            &EncodingKey::from_rsa_pem(self.signer_pem.as_bytes()).unwrap(),
        )
        .unwrap()
    }
}

pub fn envelope(message_id: &str, notification: &Value) -> Value {
    json!({
        "message": {
            "attributes": {},
            "data": STANDARD.encode(notification.to_string()),
            "messageId": message_id,
            "publishTime": "2026-01-01T00:00:00.000Z"
        },
        "subscription": "projects/example-project/subscriptions/play-rtdn"
    })
}

pub fn sub_note(kind: i32, token: &str, at: DateTime<Utc>) -> Value {
    json!({
        "version": "1.0", "packageName": PACKAGE, "eventTimeMillis": at.timestamp_millis().to_string(),
        "subscriptionNotification": { "version": "1.0", "notificationType": kind,
            "purchaseToken": token, "subscriptionId": "pro_sub" }
    })
}

pub fn voided_note(token: &str, product_type: i32, at: DateTime<Utc>) -> Value {
    json!({
        "version": "1.0", "packageName": PACKAGE, "eventTimeMillis": at.timestamp_millis().to_string(),
        "voidedPurchaseNotification": { "purchaseToken": token, "orderId": "GPA.3333-4444-5555-66666",
            "productType": product_type, "refundType": 1 }
    })
}

pub async fn push_raw(app: &TestApp, bearer: Option<&str>, body: String) -> (StatusCode, Value) {
    let mut rb = app
        .client
        .post(app.url("/webhooks/google"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(b) = bearer {
        rb = rb.bearer_auth(b);
    }
    let resp = rb.send().await.unwrap();
    let s = resp.status();
    (s, resp.json().await.unwrap_or(Value::Null))
}

pub async fn push(app: &TestApp, message_id: &str, notification: &Value) -> (StatusCode, Value) {
    push_raw(
        app,
        Some(&Oidc::default().token()),
        envelope(message_id, notification).to_string(),
    )
    .await
}
