//! The App Store and Google Play side of `bench/run.sh`: notifications
//! signed as the stores sign them (Apple's test chain, a local OIDC key),
//! the configuration that makes the server trust exactly those, and a local
//! Play Developer API answering in Google's shapes (Play notifications carry
//! only a token, so the server always reads the purchase back).
//!
//! Event files hold one delivery per line, `<auth header value>\t<body>`,
//! every event id distinct, alternately a one-time purchase (a new purchase
//! each time) and a renewal of the customer's subscription.
//!
//! The catalog product ids below are the ones `bench/run.sh` configures.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use anyhow::{Context, bail};
use axum::{Json, Router, extract::Path as UrlPath, routing::get, routing::post};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use p256::{
    ecdsa::{Signature, SigningKey, signature::Signer},
    pkcs8::DecodePrivateKey,
};
use serde_json::{Value, json};

const APPLE_BUNDLE: &str = "com.example";
const APPLE_APP_ID: i64 = 1234;
const APPLE_MONTHLY: &str = "com.example.pro.monthly";
const APPLE_LIFETIME: &str = "com.example.pro.lifetime";

const PLAY_PACKAGE: &str = "com.example.app";
const PLAY_SUB: &str = "pro_sub";
const PLAY_BASE_PLAN: &str = "monthly";
const PLAY_LIFETIME: &str = "pro_lifetime";
const PUSH_AUDIENCE: &str = "https://entitle.bench/webhooks/google";
const PUSHER: &str = "rtdn-push@bench-project.iam.gserviceaccount.com";
const SA_EMAIL: &str = "entitle@bench-project.iam.gserviceaccount.com";
const PUSH_KID: &str = "bench-key-1";

const DAY_MS: i64 = 86_400_000;

const USAGE: &str = "usage:
  bench-events config <apple certs dir> <rsa key pem> <play fake url>
  bench-events apple <apple certs dir> <apple leaf key pem> <out> <count> <customers>
  bench-events google <rsa key pem> <out> <count> <customers>
  bench-events play-fake <rsa key pem> <port>";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["config", certs, key, fake] => config(Path::new(certs), Path::new(key), fake),
        ["apple", certs, leaf, out, count, customers] => apple(
            Path::new(certs),
            Path::new(leaf),
            Path::new(out),
            count.parse()?,
            customers.parse()?,
        ),
        ["google", key, out, count, customers] => google(
            Path::new(key),
            Path::new(out),
            count.parse()?,
            customers.parse()?,
        ),
        ["play-fake", key, port] => play_fake(Path::new(key), port.parse()?),
        _ => bail!("{USAGE}"),
    }
}

fn read(p: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| p.display().to_string())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn customer(n: u64, customers: u64) -> String {
    format!("dev-{}", n % customers)
}

/// A TOML basic string: JSON's escapes are a subset of TOML's.
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// The `[apple]` and `[google]` sections trusting exactly what this tool signs.
fn config(certs: &Path, key: &Path, fake: &str) -> anyhow::Result<()> {
    let root = std::path::absolute(certs.join("testCA.der"))?;
    let account = json!({
        "type": "service_account",
        "project_id": "bench-project",
        "private_key_id": "bench-sa-key",
        "private_key": read(key)?,
        "client_email": SA_EMAIL,
        "token_uri": format!("{fake}/token"),
    });
    println!(
        "[apple]
bundle_id = {bundle}
app_apple_id = {APPLE_APP_ID}
environment = \"production\"
# Apple's test root in place of Apple Root CA - G3. No API key: each
# notification is applied from its verified payload, as the Stripe scenario.
root_certificates = [{root}]

[google]
package_name = {package}
service_account = {account}
api_base = {api}
token_uri = {token}
pubsub_audience = {aud}
pubsub_service_account = {pusher}
jwks_uri = {jwks}
",
        bundle = toml_str(APPLE_BUNDLE),
        root = toml_str(&root.to_string_lossy()),
        package = toml_str(PLAY_PACKAGE),
        account = toml_str(&account.to_string()),
        api = toml_str(&format!("{fake}/")),
        token = toml_str(&format!("{fake}/token")),
        aud = toml_str(PUSH_AUDIENCE),
        pusher = toml_str(PUSHER),
        jwks = toml_str(&format!("{fake}/jwks")),
    );
    Ok(())
}

// ------------------------------------------------------------------ Apple

/// The DER inside a one-block PEM text.
fn pem_body(pem: &str) -> anyhow::Result<Vec<u8>> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    Ok(STANDARD.decode(b64)?)
}

/// A certificate as an `x5c` entry: standard base64 of its DER.
fn x5c_of_pem(p: &Path) -> anyhow::Result<String> {
    Ok(read(p)?
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect())
}

struct AppleSigner {
    header: String,
    key: SigningKey,
}

impl AppleSigner {
    fn new(certs: &Path, leaf_key: &Path) -> anyhow::Result<Self> {
        let chain = [
            x5c_of_pem(&certs.join("testLeaf.pem"))?,
            x5c_of_pem(&certs.join("testIntermediate.pem"))?,
            STANDARD.encode(std::fs::read(certs.join("testCA.der"))?),
        ];
        Ok(AppleSigner {
            header: URL_SAFE_NO_PAD.encode(json!({ "alg": "ES256", "x5c": chain }).to_string()),
            key: SigningKey::from_pkcs8_der(&pem_body(&read(leaf_key)?)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", leaf_key.display()))?,
        })
    }

    /// ES256 as JWS has it: the signature is r and s, 32 bytes each.
    fn sign(&self, payload: &Value) -> String {
        let msg = format!(
            "{}.{}",
            self.header,
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let sig: Signature = self.key.sign(msg.as_bytes());
        format!("{msg}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }
}

/// Even events: ONE_TIME_CHARGE of the lifetime product (a new purchase);
/// odd: DID_RENEW of the customer's subscription with a new transaction.
/// Signed dates rise by a millisecond per event, so none is stale.
fn apple(
    certs: &Path,
    leaf_key: &Path,
    out: &Path,
    count: u64,
    customers: u64,
) -> anyhow::Result<()> {
    let signer = AppleSigner::new(certs, leaf_key)?;
    let now = now_ms();
    let base = now - count as i64;
    write_lines(out, count, |n| apple_line(&signer, now, base, n, customers))
}

/// Lines `0..count` in order, made on every core: signing is most of the work.
fn write_lines(out: &Path, count: u64, line: impl Fn(u64) -> String + Sync) -> anyhow::Result<()> {
    const BLOCK: u64 = 4096;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let mut f = BufWriter::new(File::create(out)?);
    for start in (0..count).step_by(BLOCK as usize) {
        let end = (start + BLOCK).min(count);
        let parts: Vec<Vec<String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let line = &line;
                    s.spawn(move || {
                        (start..end)
                            .skip(w as usize)
                            .step_by(workers as usize)
                            .map(line)
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a generator thread panicked"))
                .collect()
        });
        for i in 0..(end - start) {
            let part = &parts[(i % workers) as usize];
            writeln!(f, "{}", part[(i / workers) as usize])?;
        }
    }
    f.flush()?;
    Ok(())
}

fn apple_line(signer: &AppleSigner, now: i64, base: i64, n: u64, customers: u64) -> String {
    let c = customer(n, customers);
    let signed = base + n as i64;
    let token = entitle::domain::tokens::account_token(&c).to_string();
    let id = format!("{}", 2_000_000_000 + n);
    let mut tx = json!({
        "transactionId": id,
        "bundleId": APPLE_BUNDLE,
        "purchaseDate": now - 3_600_000,
        "quantity": 1,
        "appAccountToken": token,
        "inAppOwnershipType": "PURCHASED",
        "signedDate": signed,
        "environment": "Production",
        "transactionReason": "PURCHASE",
        "storefront": "USA",
        "storefrontId": "143441",
        "price": 4990,
        "currency": "USD",
    });
    let mut data = json!({
        "appAppleId": APPLE_APP_ID,
        "bundleId": APPLE_BUNDLE,
        "bundleVersion": "1.0",
        "environment": "Production",
    });
    let kind = if n.is_multiple_of(2) {
        tx["originalTransactionId"] = json!(id);
        tx["originalPurchaseDate"] = json!(now - 3_600_000);
        tx["productId"] = json!(APPLE_LIFETIME);
        tx["type"] = json!("Non-Consumable");
        "ONE_TIME_CHARGE"
    } else {
        let original = format!("{}", 1_000_000_000 + n % customers);
        tx["originalTransactionId"] = json!(original);
        tx["originalPurchaseDate"] = json!(now - 30 * DAY_MS);
        tx["productId"] = json!(APPLE_MONTHLY);
        tx["type"] = json!("Auto-Renewable Subscription");
        tx["expiresDate"] = json!(now + 30 * DAY_MS);
        tx["webOrderLineItemId"] = json!(format!("{id}0"));
        tx["subscriptionGroupIdentifier"] = json!("21000000");
        tx["transactionReason"] = json!("RENEWAL");
        let renewal = json!({
            "originalTransactionId": original,
            "autoRenewProductId": APPLE_MONTHLY,
            "productId": APPLE_MONTHLY,
            "autoRenewStatus": 1,
            "isInBillingRetryPeriod": false,
            "signedDate": signed,
            "environment": "Production",
            "recentSubscriptionStartDate": now - 30 * DAY_MS,
            "appAccountToken": token,
        });
        data["signedRenewalInfo"] = json!(signer.sign(&renewal));
        data["status"] = json!(1);
        "DID_RENEW"
    };
    data["signedTransactionInfo"] = json!(signer.sign(&tx));
    let notification = json!({
        "notificationType": kind,
        "notificationUUID": format!("00000000-0000-4000-8000-{n:012}"),
        "data": data,
        "version": "2.0",
        "signedDate": signed,
    });
    let body = json!({ "signedPayload": signer.sign(&notification) });
    format!("\t{body}")
}

// ------------------------------------------------------------ Google Play

/// Even events: ONE_TIME_PRODUCT_PURCHASED with a new token; odd:
/// SUBSCRIPTION_RENEWED of the customer's one subscription token. The
/// tokens name the customer, so the fake can answer for them. Pub/Sub
/// reuses a push token for its lifetime, so one token signs the whole file.
fn google(key: &Path, out: &Path, count: u64, customers: u64) -> anyhow::Result<()> {
    let key = EncodingKey::from_rsa_pem(read(key)?.as_bytes())?;
    let now = now_ms();
    let secs = now / 1000;
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(PUSH_KID.into());
    let bearer = jsonwebtoken::encode(
        &header,
        &json!({
            "aud": PUSH_AUDIENCE, "azp": "1234567890", "email": PUSHER,
            "email_verified": true, "exp": secs + 3600, "iat": secs,
            "iss": "https://accounts.google.com", "sub": "1234567890",
        }),
        &key,
    )?;
    let base = now - count as i64;
    let mut f = BufWriter::new(File::create(out)?);
    for n in 0..count {
        let c = customer(n, customers);
        let at = (base + n as i64).to_string();
        let note = if n.is_multiple_of(2) {
            json!({
                "version": "1.0", "packageName": PLAY_PACKAGE, "eventTimeMillis": at,
                "oneTimeProductNotification": { "version": "1.0", "notificationType": 1,
                    "purchaseToken": format!("otp.{n}.{c}"), "sku": PLAY_LIFETIME }
            })
        } else {
            json!({
                "version": "1.0", "packageName": PLAY_PACKAGE, "eventTimeMillis": at,
                "subscriptionNotification": { "version": "1.0", "notificationType": 2,
                    "purchaseToken": format!("sub.0.{c}"), "subscriptionId": PLAY_SUB }
            })
        };
        let envelope = json!({
            "message": {
                "attributes": {},
                "data": STANDARD.encode(note.to_string()),
                "messageId": format!("bench-{n}"),
                "publishTime": "2026-01-01T00:00:00.000Z"
            },
            "subscription": "projects/bench-project/subscriptions/play-rtdn"
        });
        writeln!(f, "Bearer {bearer}\t{envelope}")?;
    }
    f.flush()?;
    Ok(())
}

/// The customer a token generated above names (`<kind>.<n>.<customer>`).
fn owner(token: &str) -> String {
    token.splitn(3, '.').nth(2).unwrap_or_default().to_string()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Google's side for the server: the OAuth token exchange, the push keys and
/// the two purchase reads, in the androidpublisher v3 shapes. Purchases come
/// back acknowledged, so the server makes no acknowledge call.
fn play_fake(key: &Path, port: u16) -> anyhow::Result<()> {
    let key = EncodingKey::from_rsa_pem(read(key)?.as_bytes())?;
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256)?;
    jwk.common.key_id = Some(PUSH_KID.into());
    let jwks = json!({ "keys": [jwk] });
    let prefix = format!("/androidpublisher/v3/applications/{PLAY_PACKAGE}/purchases");
    let app = Router::new()
        .route(
            "/token",
            post(|| async {
                Json(json!({
                    "access_token": "ya29.bench", "expires_in": 3599, "token_type": "Bearer"
                }))
            }),
        )
        .route("/jwks", get(move || async move { Json(jwks.clone()) }))
        .route(
            &format!("{prefix}/subscriptionsv2/tokens/{{token}}"),
            get(subscription),
        )
        .route(
            &format!("{prefix}/products/{{product}}/tokens/{{token}}"),
            get(product).post(acknowledged),
        )
        .route(
            &format!("{prefix}/subscriptions/{{product}}/tokens/{{token}}"),
            post(acknowledged),
        );
    // One thread: it shares the machine with the server under test.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
            axum::serve(listener, app).await?;
            Ok(())
        })
}

async fn subscription(UrlPath(token): UrlPath<String>) -> Json<Value> {
    let now = now_ms();
    let who = owner(&token);
    Json(json!({
        "kind": "androidpublisher#subscriptionPurchaseV2",
        "regionCode": "US",
        "startTime": rfc3339(now - 30 * DAY_MS),
        "subscriptionState": "SUBSCRIPTION_STATE_ACTIVE",
        "acknowledgementState": "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED",
        "externalAccountIdentifiers": { "obfuscatedExternalAccountId": who },
        "lineItems": [{
            "productId": PLAY_SUB,
            "expiryTime": rfc3339(now + 30 * DAY_MS),
            "autoRenewingPlan": { "autoRenewEnabled": true },
            "offerDetails": { "basePlanId": PLAY_BASE_PLAN, "offerTags": [] },
            "latestSuccessfulOrderId": format!("GPA.3345-0000-0000-{}..1", who.trim_start_matches("dev-")),
        }],
    }))
}

async fn product(UrlPath((_, token)): UrlPath<(String, String)>) -> Json<Value> {
    let n = token.split('.').nth(1).unwrap_or_default().to_string();
    Json(json!({
        "kind": "androidpublisher#productPurchase",
        "purchaseTimeMillis": (now_ms() - 60_000).to_string(),
        "purchaseState": 0,
        "consumptionState": 0,
        "orderId": format!("GPA.1234-0000-0000-{n}"),
        "acknowledgementState": 1,
        "regionCode": "US",
        "obfuscatedExternalAccountId": owner(&token),
    }))
}

async fn acknowledged() -> &'static str {
    ""
}
