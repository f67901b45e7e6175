//! Integration-test harness: the real server on port 0 against a fresh,
//! migrated database per test (SQLite always; PostgreSQL when
//! `ENTITLE_TEST_POSTGRES_URL` is set).
#![allow(dead_code)]

use std::sync::Arc;

use entitle::{
    app::{self, AppState},
    clock::OffsetClock,
    config::Config,
    domain::{ApiKeyRole, EntitlementDef, ProductDef, ProductKind, TrialPolicy},
};
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::{Value, json};

#[derive(Clone, Debug)]
pub enum Backend {
    Sqlite,
    Postgres(String),
}

impl Backend {
    pub fn postgres() -> Option<Backend> {
        std::env::var("ENTITLE_TEST_POSTGRES_URL")
            .ok()
            .filter(|s| !s.is_empty())
            .map(Backend::Postgres)
    }
}

/// Declares one test per backend for each named `async fn(Backend)`.
#[macro_export]
macro_rules! on_all_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name(super::common::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    match super::common::Backend::postgres() {
                        Some(b) => super::$name(b).await,
                        None => eprintln!("ENTITLE_TEST_POSTGRES_URL not set: PostgreSQL variant not run"),
                    }
                }
            }
        )*
    };
}

/// The configuration every test starts from: a `pro` entitlement, a 7-day
/// trial, two products, a payment link, no stores.
pub fn test_config() -> Config {
    let mut c = Config::default();
    c.bind = "127.0.0.1:0".parse().unwrap();
    c.database_max_connections = Some(8);
    c.catalog.entitlements = vec![
        EntitlementDef {
            key: "pro".into(),
            description: Some("Pro features".into()),
        },
        EntitlementDef {
            key: "maps".into(),
            description: None,
        },
    ];
    c.catalog.products = vec![
        ProductDef {
            id: "pro_monthly".into(),
            entitlements: vec!["pro".into()],
            kind: ProductKind::Subscription,
            display_name: Some("Pro monthly".into()),
            stripe_price_id: Some("price_pro_monthly".into()),
            stripe_payment_link: None,
            app_store_product_id: Some("com.example.pro.monthly".into()),
            play_store_product_id: Some("pro_sub".into()),
        },
        ProductDef {
            id: "pro_lifetime".into(),
            entitlements: vec!["pro".into(), "maps".into()],
            kind: ProductKind::Lifetime,
            display_name: None,
            stripe_price_id: Some("price_pro_lifetime".into()),
            stripe_payment_link: None,
            app_store_product_id: Some("com.example.pro.lifetime".into()),
            play_store_product_id: Some("pro_lifetime".into()),
        },
    ];
    c.trial = Some(TrialPolicy {
        days: 7,
        entitlement: "pro".into(),
    });
    c.stripe = Some(entitle::config::StripeConfig {
        secret_key: None,
        webhook_secret: None,
        api_base: None,
        payment_link: Some("https://buy.stripe.com/test_123".into()),
        grace_period_days: None,
        api_timeout_secs: None,
        customer_metadata_keys: vec!["customer_id".into(), "user_id".into()],
    });
    c
}

/// 32 bytes, base64: the token-signing keys' encryption key on PostgreSQL.
pub const TEST_ENCRYPTION_KEY: &str = "dGVzdC1vbmx5LWVuY3J5cHRpb24ta2V5LTMyLWJ5dGU=";

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub state: AppState,
    pub clock: OffsetClock,
    pub database_url: String,
    _dir: tempfile::TempDir,
}

pub async fn fresh_database(backend: &Backend, dir: &tempfile::TempDir) -> String {
    match backend {
        Backend::Sqlite => format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("entitle.db").display()
        ),
        Backend::Postgres(admin_url) => {
            let name = format!("entitle_t_{}", hex_id());
            let admin = Database::connect(admin_url.as_str())
                .await
                .expect("connect to ENTITLE_TEST_POSTGRES_URL");
            admin
                .execute_raw(Statement::from_string(
                    admin.get_database_backend(),
                    format!("CREATE DATABASE {name}"),
                ))
                .await
                .expect("create test database");
            admin.close().await.ok();
            let mut url = url::Url::parse(admin_url).expect("ENTITLE_TEST_POSTGRES_URL is a URL");
            url.set_path(&format!("/{name}"));
            url.to_string()
        }
    }
}

fn hex_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

pub async fn spawn(backend: Backend) -> TestApp {
    spawn_with(backend, |_| {}).await
}

pub async fn spawn_with(backend: Backend, customize: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.database_url = entitle::config::Secret::new(fresh_database(&backend, &dir).await);
    if matches!(backend, Backend::Postgres(_)) {
        // PostgreSQL requires a configured key; SQLite runs keep theirs in a
        // file beside the database, as a development set-up does.
        config.tokens.encryption_key = Some(entitle::config::Secret::new(TEST_ENCRYPTION_KEY));
    }
    customize(&mut config);
    let database_url = config.database_url.expose().to_string();
    let clock = OffsetClock::default();
    let running = app::start(config, Arc::new(clock.clone()), std::future::pending())
        .await
        .expect("server starts");
    TestApp {
        base: format!("http://{}", running.addr),
        client: reqwest::Client::new(),
        state: running.state,
        clock,
        database_url,
        _dir: dir,
    }
}

/// A second server on `app`'s database, as after a restart with a changed
/// configuration (the test config, `customize`d). Keep `app` alive: it owns
/// the SQLite file.
pub async fn respawn(app: &TestApp, customize: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.database_url = entitle::config::Secret::new(app.database_url.clone());
    if app.database_url.starts_with("postgres") {
        config.tokens.encryption_key = Some(entitle::config::Secret::new(TEST_ENCRYPTION_KEY));
    } else {
        // The first server's signing-key file sits beside the database.
        config.tokens = app.state.config.tokens.clone();
    }
    customize(&mut config);
    let clock = OffsetClock::default();
    let running = app::start(config, Arc::new(clock.clone()), std::future::pending())
        .await
        .expect("server starts");
    TestApp {
        base: format!("http://{}", running.addr),
        client: reqwest::Client::new(),
        state: running.state,
        clock,
        database_url: app.database_url.clone(),
        _dir: dir,
    }
}

/// How a request authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    None,
    Key(String),
    Bearer(String),
}

impl Auth {
    pub fn apply(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Auth::None => rb,
            Auth::Key(k) => rb.header("api-key", k),
            Auth::Bearer(t) => rb.bearer_auth(t),
        }
    }
}

impl TestApp {
    /// `GET /metrics` as Prometheus text.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `POST /webhooks/apple` with `signedPayload`: the status and the JSON
    /// answer (`null` when there is none).
    pub async fn apple_notification(&self, jws: &str) -> (StatusCode, Value) {
        let resp = self
            .client
            .post(self.url("/webhooks/apple"))
            .json(&json!({ "signedPayload": jws }))
            .send()
            .await
            .unwrap();
        let s = resp.status();
        (s, resp.json().await.unwrap_or(Value::Null))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn key(&self, role: ApiKeyRole) -> Auth {
        let k = self
            .state
            .core
            .api_keys()
            .create_api_key("test", role)
            .await
            .map_err(anyhow::Error::from)
            .unwrap();
        Auth::Key(k.key)
    }

    /// POSTs a GraphQL operation; returns the HTTP status and JSON body.
    pub async fn gql(&self, auth: &Auth, query: &str, variables: Value) -> (StatusCode, Value) {
        let rb = self
            .client
            .post(self.url("/graphql"))
            .json(&json!({ "query": query, "variables": variables }));
        let resp = auth.apply(rb).send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `POST /user` with a JSON body `{"id": id}`.
    pub async fn post_user(&self, auth: &Auth, id: &str) -> (StatusCode, Value) {
        let resp = auth
            .apply(
                self.client
                    .post(self.url("/user"))
                    .json(&json!({ "id": id })),
            )
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `customer` exists (an account from before any purchase, with no
    /// trial), so its account tokens are indexed before any store message.
    pub async fn sign_up(&self, customer: &str) {
        let core = &self.state.core;
        let txn = core.db().write().await.unwrap();
        core.purchases()
            .ensure_customer_in(&txn, customer, core.now())
            .await
            .map_err(anyhow::Error::from)
            .unwrap();
        txn.commit().await.map_err(anyhow::Error::from).unwrap();
    }

    /// Rows in `table`, for "nothing was written" assertions.
    pub async fn count(&self, table: &str) -> i64 {
        let db = &self.state.core.db().conn;
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                format!("SELECT COUNT(*) AS n FROM {table}"),
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get::<i64>("", "n").unwrap()
    }

    /// Row counts of every state table, to compare before and after a bad request.
    pub async fn counts(&self) -> Vec<(&'static str, i64)> {
        let mut out = Vec::new();
        for t in [
            "customers",
            "devices",
            "purchases",
            "receipts",
            "webhook_events",
            "entitlement_events",
            "api_keys",
            "held_purchases",
        ] {
            out.push((t, self.count(t).await));
        }
        out
    }
}

/// The first GraphQL error's `extensions.code`.
pub fn error_code(body: &Value) -> Option<&str> {
    body["errors"][0]["extensions"]["code"].as_str()
}

/// The HS256 secret of `hs_config`.
pub const HS_SECRET: &str = "test-secret-that-is-at-least-32-bytes-long";

/// JWT verification with a shared secret, issuer `https://auth.test/`,
/// audience `entitle`, admins by `role = admin`.
pub fn hs_config() -> entitle::config::JwtConfig {
    use entitle::config::{JwtAlgorithm, JwtConfig, Secret};
    JwtConfig {
        jwks_url: None,
        algorithm: JwtAlgorithm::HS256,
        secret: Some(Secret::new(HS_SECRET)),
        public_key_pem: None,
        private_key_pem: None,
        issuer: "https://auth.test/".into(),
        audience: "entitle".into(),
        admin_claim: "role".into(),
        admin_value: "admin".into(),
        leeway_secs: 0,
        max_lifetime_secs: 86_400,
    }
}

pub fn sign_hs(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(HS_SECRET.as_bytes()),
    )
    .unwrap()
}

/// What a receipt keeps of a payload it may not store whole: its size and
/// SHA-256 over its JSON text.
pub fn digest_of(payload: &Value) -> Value {
    use sha2::Digest;
    let text = payload.to_string();
    json!({
        "truncated": true,
        "bytes": text.len(),
        "sha256": hex::encode(sha2::Sha256::digest(text.as_bytes())),
    })
}
