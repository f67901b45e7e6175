//! Apple test material: Apple's test chain signs our own payloads; the
//! App Store Server API is faked in Apple's response shapes.
#![allow(dead_code)]

use std::path::PathBuf;

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use chrono::{DateTime, Utc};
use entitle::config::{AppleConfig, AppleEnvironment, Config, Secret};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

pub const BUNDLE: &str = "com.example";
pub const APP_APPLE_ID: i64 = 1234;
pub const MONTHLY: &str = "com.example.pro.monthly";
pub const LIFETIME: &str = "com.example.pro.lifetime";

pub fn vector(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/vectors/apple")
        .join(rel)
}

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/apple")
        .join(rel)
}

pub fn read(p: PathBuf) -> String {
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A certificate (PEM file) as an `x5c` entry: standard base64 of the DER.
pub fn x5c_entry(p: PathBuf) -> String {
    let text = read(p);
    text.lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect()
}

pub fn der_entry(p: PathBuf) -> String {
    STANDARD.encode(std::fs::read(p).unwrap())
}

/// Apple's test chain: leaf, intermediate, root.
pub fn test_chain() -> Vec<String> {
    vec![
        x5c_entry(vector("certs/testLeaf.pem")),
        x5c_entry(vector("certs/testIntermediate.pem")),
        der_entry(vector("certs/testCA.der")),
    ]
}

pub fn test_key() -> EncodingKey {
    EncodingKey::from_ec_pem(read(fixture("testLeaf.pk8.pem")).as_bytes()).unwrap()
}

/// A compact JWS over `payload` with any header, signed ES256 with `key`.
pub fn jws_with(header: Value, payload: &Value, key: &EncodingKey) -> String {
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let p = URL_SAFE_NO_PAD.encode(payload.to_string());
    let sig =
        jsonwebtoken::crypto::sign(format!("{h}.{p}").as_bytes(), key, Algorithm::ES256).unwrap();
    format!("{h}.{p}.{sig}")
}

/// Signed as the App Store signs: ES256, `x5c` = Apple's test chain.
pub fn sign(payload: &Value) -> String {
    jws_with(
        json!({ "alg": "ES256", "x5c": test_chain() }),
        payload,
        &test_key(),
    )
}

pub fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// Points the app at Apple's test root, as a production deployment.
pub fn configure(c: &mut Config, env: AppleEnvironment, api_base: Option<&str>) {
    c.apple = Some(AppleConfig {
        bundle_id: BUNDLE.into(),
        app_apple_id: Some(APP_APPLE_ID),
        environment: env,
        root_certificates: vec![vector("certs/testCA.der")],
        issuer_id: api_base.map(|_| "57246542-96fe-1a63-e053-0824d011072a".into()),
        key_id: api_base.map(|_| "ABCDEFGHIJ".into()),
        private_key: api_base.map(|_| Secret::new(read(vector("certs/testSigningKey.p8")))),
        api_base: api_base.map(str::to_string),
    });
}

/// One subscription (or lifetime purchase) as the tests drive it.
#[derive(Clone)]
pub struct Sub {
    pub original: String,
    pub product: String,
    pub token: String,
    pub env: &'static str,
    pub started: DateTime<Utc>,
}

impl Sub {
    pub fn new(original: &str, product: &str, token: &str, started: DateTime<Utc>) -> Sub {
        Sub {
            original: original.into(),
            product: product.into(),
            token: token.into(),
            env: "Production",
            started,
        }
    }

    /// A transaction payload; `expires` None is a lifetime (non-consumable).
    pub fn tx(
        &self,
        id: &str,
        purchased: DateTime<Utc>,
        expires: Option<DateTime<Utc>>,
        signed: DateTime<Utc>,
    ) -> Value {
        let mut v = json!({
            "transactionId": id,
            "originalTransactionId": self.original,
            "bundleId": BUNDLE,
            "productId": self.product,
            "purchaseDate": ms(purchased),
            "originalPurchaseDate": ms(self.started),
            "quantity": 1,
            "type": if expires.is_some() { "Auto-Renewable Subscription" } else { "Non-Consumable" },
            "appAccountToken": self.token,
            "inAppOwnershipType": "PURCHASED",
            "signedDate": ms(signed),
            "environment": self.env,
            "transactionReason": "PURCHASE",
            "storefront": "USA",
            "storefrontId": "143441",
            "price": 4990,
            "currency": "USD",
        });
        if let Some(e) = expires {
            v["expiresDate"] = json!(ms(e));
            v["webOrderLineItemId"] = json!(format!("{id}0"));
            v["subscriptionGroupIdentifier"] = json!("21000000");
        }
        v
    }

    pub fn renewal(
        &self,
        auto_renew: bool,
        retry: bool,
        grace: Option<DateTime<Utc>>,
        signed: DateTime<Utc>,
    ) -> Value {
        let mut v = json!({
            "originalTransactionId": self.original,
            "autoRenewProductId": self.product,
            "productId": self.product,
            "autoRenewStatus": if auto_renew { 1 } else { 0 },
            "isInBillingRetryPeriod": retry,
            "signedDate": ms(signed),
            "environment": self.env,
            "recentSubscriptionStartDate": ms(self.started),
            "appAccountToken": self.token,
        });
        if let Some(g) = grace {
            v["gracePeriodExpiresDate"] = json!(ms(g));
        }
        if !auto_renew {
            v["expirationIntent"] = json!(1);
        }
        v
    }
}

/// A signed App Store Server Notification v2 body.
#[allow(clippy::too_many_arguments)]
pub fn notification(
    kind: &str,
    subtype: Option<&str>,
    uuid: &str,
    env: &str,
    signed: DateTime<Utc>,
    tx: Option<&Value>,
    renewal: Option<&Value>,
    status: Option<i64>,
) -> String {
    let mut data = json!({
        "appAppleId": APP_APPLE_ID,
        "bundleId": BUNDLE,
        "bundleVersion": "1.0",
        "environment": env,
    });
    if let Some(t) = tx {
        data["signedTransactionInfo"] = json!(sign(t));
    }
    if let Some(r) = renewal {
        data["signedRenewalInfo"] = json!(sign(r));
    }
    if let Some(s) = status {
        data["status"] = json!(s);
    }
    let mut n = json!({
        "notificationType": kind,
        "notificationUUID": uuid,
        "data": data,
        "version": "2.0",
        "signedDate": ms(signed),
    });
    if let Some(s) = subtype {
        n["subtype"] = json!(s);
    }
    sign(&n)
}
