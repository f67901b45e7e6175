//! One typed configuration, layered: built-in defaults, then `entitle.toml`
//! (or `--config`), then `ENTITLE_*` environment variables (`__` nests).

use std::{fmt, net::SocketAddr, path::Path};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

use crate::domain::{Catalog, EntitlementDef, ProductDef, TransferPolicy, TrialPolicy};

/// A secret string: deserialises from config like a plain string but never
/// shows itself in `Debug` output, logs or error messages; serialised by
/// [`redacted_value`] it reads `<redacted>`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

/// What a `Secret` reads as in [`redacted_value`].
pub const REDACTED: &str = "<redacted>";

thread_local! {
    static REDACTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if REDACTING.with(std::cell::Cell::get) {
            s.serialize_str(REDACTED)
        } else {
            s.serialize_str(&self.0)
        }
    }
}

/// `value` as JSON with every `Secret` in it (wherever it sits, whatever its
/// name) replaced by `<redacted>`. Serialisation is synchronous, so the
/// flag is this thread's for exactly that long.
pub fn redacted_value<T: Serialize>(value: &T) -> serde_json::Result<serde_json::Value> {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            REDACTING.with(|r| r.set(false));
        }
    }
    REDACTING.with(|r| r.set(true));
    let _reset = Reset;
    serde_json::to_value(value)
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `sqlite://…` (default) or `postgres://…`. `DATABASE_URL` is honoured too.
    pub database_url: Secret,
    pub bind: SocketAddr,
    /// Connections in the pool: on SQLite the readers (the one writer has
    /// its own), on PostgreSQL readers and writers alike. Unset: see
    /// [`Config::max_connections`].
    pub database_max_connections: Option<u32>,
    /// How long (ms) a customer's purchases may be served from memory.
    /// Writes through any server invalidate at once (on PostgreSQL other
    /// replicas hear of them when they commit); this bounds how late writes
    /// made behind every server's back are seen. 0 turns the cache off.
    /// Unset: 60 s.
    pub cache_ttl_ms: Option<u64>,
    /// How many of the most recent customers (and devices) are read into
    /// the cache at start, in the background, so a restart under load does
    /// not send every first request to the database (on PostgreSQL, each
    /// time the replica's cache comes on). 0: none.
    pub cache_warm: u64,
    /// Log filter in `tracing` syntax.
    pub log: String,
    /// Whether sandbox/test-store purchases grant access.
    pub accept_sandbox: bool,
    /// What happens when a store purchase bound to one customer is submitted by another.
    pub transfer_policy: TransferPolicy,
    pub http: HttpConfig,
    pub graphql: GraphqlConfig,
    pub auth: AuthConfig,
    pub trial: Option<TrialPolicy>,
    pub catalog: CatalogConfig,
    pub stripe: Option<StripeConfig>,
    pub apple: Option<AppleConfig>,
    pub google: Option<GoogleConfig>,
    /// Redis for the entitlement event stream. Unset: the relay is off and
    /// events stay in the change log (and still reach GraphQL subscribers).
    pub redis_url: Option<Secret>,
    pub events: EventsConfig,
    pub jobs: JobsConfig,
    /// Stores whose missed notifications are recovered by reconciliation.
    pub reconcile: ReconcileConfig,
    /// Standard Webhooks POSTs of every change-log row; none by default.
    pub outbound: OutboundConfig,
    /// Write limits per credential and per client address.
    pub rate_limit: RateLimitConfig,
    /// Bounds on stored purchase submissions.
    pub receipts: ReceiptsConfig,
    /// What is deleted, and after how long.
    pub retention: RetentionConfig,
    /// Signed entitlement tokens and signed live answers.
    pub tokens: TokensConfig,
}

/// Longest `tokens.offline_secs` accepted: a token outliving a refund by
/// more than this is not worth the convenience.
pub const MAX_OFFLINE_SECS: u64 = 30 * 86_400;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenAlgorithm {
    /// ECDSA P-256 with SHA-256: verifiable by WebCrypto, CryptoKit,
    /// Android Keystore and every JOSE library.
    ES256,
    /// Ed25519.
    EdDSA,
}

impl TokenAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenAlgorithm::ES256 => "ES256",
            TokenAlgorithm::EdDSA => "EdDSA",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokensConfig {
    /// `iss` of every token.
    pub issuer: String,
    /// `aud` of every token.
    pub audience: String,
    /// How long a token lets a client work offline (`exp` = issue + this);
    /// at most 30 days.
    pub offline_secs: u64,
    /// The algorithm of keys created from now on (first start, rotation).
    pub algorithm: TokenAlgorithm,
    /// 32 bytes, base64 or hex, that encrypt the private keys in the
    /// database (AES-256-GCM). Required with PostgreSQL. Unset on SQLite: a
    /// random key is kept in a file beside the database (`<db>.token-key`,
    /// mode 0600), or in memory for an in-memory database.
    pub encryption_key: Option<Secret>,
    /// A customer's token is signed at most once per this many seconds
    /// while its entitlements stay the same; 0 signs every time.
    pub cache_secs: u64,
    /// How often (s) a process re-reads the keys (rotation by another
    /// process is picked up within this).
    pub key_refresh_secs: u64,
}

impl Default for TokensConfig {
    fn default() -> Self {
        TokensConfig {
            issuer: "entitle".into(),
            audience: "entitle-clients".into(),
            offline_secs: 3 * 86_400,
            algorithm: TokenAlgorithm::ES256,
            encryption_key: None,
            cache_secs: 60,
            key_refresh_secs: 10,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub enabled: bool,
    /// Writes (mutations, first sightings on `POST /user`) per minute for one
    /// API key or customer token. A client key is shared by every install of
    /// an app, so this is sized for the whole app's sign-ups.
    pub per_key_per_minute: u32,
    /// Writes a key may make at once before the per-minute rate applies.
    pub per_key_burst: u32,
    /// Writes per minute from one client address.
    pub per_ip_per_minute: u32,
    pub per_ip_burst: u32,
    /// A header holding the client address set by a proxy you trust (for
    /// example `x-forwarded-for`; its first entry is used). Unset: the peer
    /// address of the connection. Set it only behind such a proxy, or any
    /// client can pick its own address.
    pub trusted_proxy_header: Option<String>,
    /// Keys (credentials or addresses) tracked at once; past this the
    /// oldest idle ones are forgotten first.
    pub max_tracked_keys: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            enabled: true,
            per_key_per_minute: 6_000,
            per_key_burst: 1_000,
            per_ip_per_minute: 600,
            per_ip_burst: 300,
            trusted_proxy_header: None,
            max_tracked_keys: 100_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiptsConfig {
    /// A submission's stored audit copy is kept whole up to this many bytes;
    /// a larger one is stored as its length and SHA-256 only.
    pub max_payload_bytes: usize,
    /// Pending and invalid submissions kept per customer; older invalid ones
    /// are dropped to make room, and when all are pending new ones are refused.
    pub max_unverified_per_customer: u64,
}

impl Default for ReceiptsConfig {
    fn default() -> Self {
        ReceiptsConfig {
            max_payload_bytes: 16 * 1024,
            max_unverified_per_customer: 50,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Invalid (and abandoned pending) purchase submissions are deleted this
    /// many days after they arrived; 0 keeps them.
    pub invalid_receipt_days: u32,
    /// Store notifications keep their payload this many days after they were
    /// processed; the row itself (source and event id) stays, so a store's
    /// late redelivery is still recognised. 0 keeps payloads.
    pub webhook_payload_days: u32,
    /// How often (s) the retention job runs.
    pub interval_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            invalid_receipt_days: 30,
            webhook_payload_days: 30,
            interval_secs: 3_600,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Stream key; the field is `event`, holding the event's JSON.
    pub stream_key: String,
    /// Approximate cap on the stream's length (`XADD MAXLEN ~`); 0: no cap.
    pub stream_max_len: u64,
    /// How often (ms) the relay looks for rows it was not told about
    /// (written by another replica, or left by a crash).
    pub relay_poll_ms: u64,
    /// Rows published per Redis round trip.
    pub relay_batch: u64,
    /// How often (ms) GraphQL subscribers' feed reads the change log.
    pub feed_poll_ms: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            stream_key: "billing:events".into(),
            stream_max_len: 1_000_000,
            relay_poll_ms: 500,
            relay_batch: 500,
            feed_poll_ms: 250,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Interval (ms) of the sweep that writes `expired` rows for periods
    /// that ran out with no store message.
    pub expiry_interval_ms: u64,
    /// Interval (ms) of the scheduler that re-reads purchases near renewal.
    pub refresh_interval_ms: u64,
    /// A purchase is re-read from its store once its period ends within
    /// this many seconds (and again at most every `refresh_every_secs`
    /// while the store has not settled it).
    pub refresh_ahead_secs: u64,
    pub refresh_every_secs: u64,
    /// Interval (s) of Play acknowledgement retries.
    pub acknowledge_interval_secs: u64,
    /// Interval (s) of store reconciliation; 0 runs it only from the CLI.
    pub reconcile_interval_secs: u64,
    /// Interval (ms) of outbound webhook delivery attempts.
    pub outbound_interval_ms: u64,
    /// Whether this process runs the background jobs at all (the relay and
    /// the subscription feed always run).
    pub enabled: bool,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            expiry_interval_ms: 10_000,
            refresh_interval_ms: 60_000,
            refresh_ahead_secs: 300,
            refresh_every_secs: 3_600,
            acknowledge_interval_secs: 900,
            reconcile_interval_secs: 3_600,
            outbound_interval_ms: 1_000,
            enabled: true,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// Stripe events with `delivery_success=false` (needs `stripe.secret_key`).
    pub stripe: bool,
    /// App Store notification history (needs the App Store Server API key).
    pub apple: bool,
    /// Play voided purchases (needs the service account).
    pub google: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    pub endpoints: Vec<OutboundEndpoint>,
    /// An endpoint that has failed every attempt for this many days is
    /// disabled; its undelivered rows stay in the database.
    pub disable_after_days: u32,
    /// Per-request time limit, seconds.
    pub timeout_secs: u64,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            endpoints: Vec::new(),
            disable_after_days: 5,
            timeout_secs: 15,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundEndpoint {
    pub url: String,
    /// `whsec_` followed by base64 of the signing key, as Standard Webhooks defines.
    pub secret: Secret,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Largest accepted request body in bytes; larger ones get 413.
    pub body_limit_bytes: usize,
    /// Whole-request time limit in seconds; slower requests get 408.
    pub request_timeout_secs: u64,
    /// A request's headers must arrive within this many seconds of its
    /// first byte (or of the connection opening), else the connection closes.
    #[serde(default = "HttpConfig::default_header_read_timeout")]
    pub header_read_timeout_secs: u64,
    /// A connection that sends and receives nothing for this long is closed.
    /// Keep it above `request_timeout_secs` and above the WebSocket ping interval.
    #[serde(default = "HttpConfig::default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// On shutdown, in-flight requests get this long to finish; then the
    /// remaining connections are dropped.
    #[serde(default = "HttpConfig::default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
    /// Whether `GET /api/subscriptions/check/{id}` needs a service key.
    /// Turn off only where the route is reachable from a private network
    /// alone; a key that is presented is still checked.
    #[serde(default = "default_true")]
    pub check_requires_key: bool,
    /// Store notifications processed at once; more wait their turn, their
    /// bodies still unread, within `request_timeout_secs`. Each one in
    /// processing holds its parsed payload until its write commits, so this
    /// bounds what a burst of deliveries costs in memory.
    #[serde(default = "HttpConfig::default_webhooks_in_flight")]
    pub webhooks_in_flight: usize,
}

impl HttpConfig {
    fn default_webhooks_in_flight() -> usize {
        32
    }
    fn default_header_read_timeout() -> u64 {
        10
    }
    fn default_idle_timeout() -> u64 {
        60
    }
    fn default_shutdown_grace() -> u64 {
        10
    }
}

fn default_true() -> bool {
    true
}

fn default_customer_metadata_keys() -> Vec<String> {
    vec!["customer_id".into(), "user_id".into()]
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphqlConfig {
    pub introspection: bool,
    pub graphiql: bool,
    pub max_depth: usize,
    /// Each field counts 1, and a list field counts its `limit` / `first`
    /// times its selection, so this bounds the rows one request may ask for.
    pub max_complexity: usize,
    /// A response that would serialise larger than this is replaced by a
    /// `RESPONSE_TOO_LARGE` error.
    #[serde(default = "GraphqlConfig::default_max_response")]
    pub max_response_bytes: usize,
    /// `/graphql/ws`: seconds a socket may stay without an accepted
    /// `connection_init`.
    #[serde(default = "GraphqlConfig::default_ws_init")]
    pub ws_init_timeout_secs: u64,
    /// Subscriptions one socket may hold at once.
    #[serde(default = "GraphqlConfig::default_ws_subs")]
    pub ws_max_subscriptions: usize,
    /// Seconds between the server's pings; a socket that has not answered the
    /// previous ping by the next one is closed.
    #[serde(default = "GraphqlConfig::default_ws_ping")]
    pub ws_ping_interval_secs: u64,
}

impl GraphqlConfig {
    fn default_max_response() -> usize {
        4 * 1024 * 1024
    }
    fn default_ws_init() -> u64 {
        10
    }
    fn default_ws_subs() -> usize {
        100
    }
    fn default_ws_ping() -> u64 {
        20
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub jwt: Option<JwtConfig>,
    /// Seconds a looked-up API key is trusted before it is read again
    /// (bounds how long a revoked key keeps working on other replicas).
    pub api_key_cache_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The only algorithm accepted; tokens with any other `alg` are rejected.
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret.
    pub secret: Option<Secret>,
    /// RS256/ES256 public key, PEM.
    pub public_key_pem: Option<String>,
    /// RS256/ES256: an identity provider's JWKS (Auth0, Clerk, Cognito,
    /// Keycloak, ...) instead of a fixed key; tokens pick the key by `kid`,
    /// and a `kid` first seen makes one refetch (key rotation).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// RS256/ES256 private key, PEM; only `entitle token` (development) uses it.
    pub private_key_pem: Option<Secret>,
    pub issuer: String,
    pub audience: String,
    /// Claim whose value `admin_value` makes the bearer an admin.
    #[serde(default = "JwtConfig::default_admin_claim")]
    pub admin_claim: String,
    #[serde(default = "JwtConfig::default_admin_value")]
    pub admin_value: String,
    /// Clock skew tolerated on `exp`/`nbf`, seconds.
    #[serde(default = "JwtConfig::default_leeway_secs")]
    pub leeway_secs: u64,
    /// Longest accepted token life: `exp` minus `iat`, or minus now for a
    /// token without `iat`. A longer-lived token is refused.
    #[serde(default = "JwtConfig::default_max_lifetime")]
    pub max_lifetime_secs: u64,
}

impl JwtConfig {
    pub fn default_max_lifetime() -> u64 {
        86_400
    }
}

impl JwtConfig {
    // The README's documented defaults: a minimal `[auth.jwt]` names only the
    // algorithm, its key, the issuer and the audience.
    fn default_admin_claim() -> String {
        "role".into()
    }
    fn default_admin_value() -> String {
        "admin".into()
    }
    fn default_leeway_secs() -> u64 {
        30
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    #[serde(default)]
    pub entitlements: Vec<EntitlementDef>,
    #[serde(default)]
    pub products: Vec<ProductDef>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeConfig {
    pub secret_key: Option<Secret>,
    pub webhook_secret: Option<Secret>,
    pub api_base: Option<String>,
    /// The Stripe Payment Link the Garmin shim hands out.
    pub payment_link: Option<String>,
    /// Days of continued access after a failed renewal (`past_due`); absent
    /// or 0 means no access while Stripe retries the payment.
    #[serde(default)]
    pub grace_period_days: Option<u32>,
    /// Per-request time limit for calls to the Stripe API, seconds.
    #[serde(default)]
    pub api_timeout_secs: Option<u64>,
    /// Metadata keys naming our customer on Stripe sessions, subscriptions,
    /// invoices and charges, tried in order after `client_reference_id`.
    #[serde(default = "default_customer_metadata_keys")]
    pub customer_metadata_keys: Vec<String>,
}

/// Google Play: the Play Developer API (service account), Pub/Sub push
/// (real-time developer notifications) and legacy signed receipts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoogleConfig {
    /// The app's package name; purchases and notifications for any other are refused.
    pub package_name: String,
    /// The service-account key: the JSON itself, or the path of the JSON file.
    pub service_account: Option<Secret>,
    #[serde(default = "google_api_base")]
    pub api_base: String,
    /// Where the service-account assertion is exchanged; defaults to the
    /// key file's `token_uri`, else Google's.
    #[serde(default)]
    pub token_uri: Option<String>,
    /// The `aud` of the Pub/Sub push OIDC token (set on the push subscription).
    #[serde(default)]
    pub pubsub_audience: Option<String>,
    /// The service account Pub/Sub signs push tokens as (`email` claim).
    #[serde(default)]
    pub pubsub_service_account: Option<String>,
    #[serde(default = "google_jwks_uri")]
    pub jwks_uri: String,
    /// After a failed fetch of Google's keys, pushes whose key is not cached
    /// are answered 503 at once for this long instead of each waiting on the
    /// endpoint (Pub/Sub delivers them again).
    #[serde(default = "google_jwks_failure_backoff_ms")]
    pub jwks_failure_backoff_ms: u64,
    /// The app's base64 RSA public key (Play Console, "Licensing"), for
    /// legacy `INAPP_PURCHASE_DATA` receipts.
    #[serde(default)]
    pub license_public_key: Option<String>,
}

fn google_api_base() -> String {
    "https://androidpublisher.googleapis.com/".into()
}

fn google_jwks_failure_backoff_ms() -> u64 {
    2000
}

fn google_jwks_uri() -> String {
    "https://www.googleapis.com/oauth2/v3/certs".into()
}

impl GoogleConfig {
    pub fn new(package_name: impl Into<String>) -> Self {
        GoogleConfig {
            package_name: package_name.into(),
            service_account: None,
            api_base: google_api_base(),
            token_uri: None,
            pubsub_audience: None,
            pubsub_service_account: None,
            jwks_uri: google_jwks_uri(),
            jwks_failure_backoff_ms: google_jwks_failure_backoff_ms(),
            license_public_key: None,
        }
    }
}

/// Which App Store environment a deployment verifies as its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppleEnvironment {
    Production,
    Sandbox,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppleConfig {
    pub bundle_id: String,
    /// The app's Apple ID; required in production, where it is checked on
    /// every notification.
    pub app_apple_id: Option<i64>,
    /// `production` also accepts Sandbox data (stored as sandbox) when
    /// `accept_sandbox` is on; a Sandbox payload is never taken for production.
    #[serde(default = "AppleConfig::default_environment")]
    pub environment: AppleEnvironment,
    /// Trusted roots, DER or PEM files. Empty: the embedded Apple Root CA - G3.
    /// The root sent inside `x5c` is never trusted.
    #[serde(default)]
    pub root_certificates: Vec<std::path::PathBuf>,
    /// App Store Server API credentials (App Store Connect > Users and Access >
    /// Integrations > In-App Purchase). Without them nothing is re-read from Apple
    /// and `transactionId` / `appReceipt` submissions are refused.
    pub issuer_id: Option<String>,
    pub key_id: Option<String>,
    /// The `.p8` key's PEM text.
    pub private_key: Option<Secret>,
    /// Defaults to Apple's production or sandbox host for `environment`.
    pub api_base: Option<String>,
}

impl AppleConfig {
    fn default_environment() -> AppleEnvironment {
        AppleEnvironment::Production
    }

    /// Whether the App Store Server API can be called.
    pub fn api_configured(&self) -> bool {
        self.issuer_id.is_some() && self.key_id.is_some() && self.private_key.is_some()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: Secret::new("sqlite://entitle.db?mode=rwc"),
            bind: "127.0.0.1:8088".parse().expect("static address"),
            database_max_connections: None,
            cache_ttl_ms: None,
            cache_warm: 20_000,
            log: "info".into(),
            accept_sandbox: true,
            transfer_policy: TransferPolicy::Transfer,
            http: HttpConfig {
                body_limit_bytes: 64 * 1024,
                request_timeout_secs: 30,
                header_read_timeout_secs: HttpConfig::default_header_read_timeout(),
                idle_timeout_secs: HttpConfig::default_idle_timeout(),
                shutdown_grace_secs: HttpConfig::default_shutdown_grace(),
                check_requires_key: true,
                webhooks_in_flight: HttpConfig::default_webhooks_in_flight(),
            },
            graphql: GraphqlConfig {
                introspection: true,
                graphiql: true,
                max_depth: 16,
                max_complexity: 500,
                max_response_bytes: GraphqlConfig::default_max_response(),
                ws_init_timeout_secs: GraphqlConfig::default_ws_init(),
                ws_max_subscriptions: GraphqlConfig::default_ws_subs(),
                ws_ping_interval_secs: GraphqlConfig::default_ws_ping(),
            },
            auth: AuthConfig {
                jwt: None,
                api_key_cache_secs: 10,
            },
            trial: None,
            catalog: CatalogConfig::default(),
            stripe: None,
            apple: None,
            google: None,
            redis_url: None,
            events: EventsConfig::default(),
            jobs: JobsConfig::default(),
            reconcile: ReconcileConfig::default(),
            outbound: OutboundConfig::default(),
            rate_limit: RateLimitConfig::default(),
            receipts: ReceiptsConfig::default(),
            retention: RetentionConfig::default(),
            tokens: TokensConfig::default(),
        }
    }
}

impl Config {
    /// Loads defaults, then the TOML file (`path`, or `entitle.toml` when it
    /// exists), then the environment. The error names the offending key.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(p) => {
                if !p.exists() {
                    anyhow::bail!("config file {} does not exist", p.display());
                }
                fig = fig.merge(Toml::file(p));
            }
            None => fig = fig.merge(Toml::file("entitle.toml")),
        }
        fig = fig
            .merge(Env::raw().only(&["DATABASE_URL"]))
            // ENTITLE_TEST_* belongs to the test harness, not to the server;
            // ENTITLE_CONFIG names the file (the command line reads it).
            .merge(
                Env::prefixed("ENTITLE_")
                    .filter(|k| {
                        let k = k.as_str().to_ascii_lowercase();
                        !k.starts_with("test_") && k != "config"
                    })
                    .split("__"),
            );
        Self::from_figment(fig)
    }

    pub fn from_figment(fig: Figment) -> anyhow::Result<Config> {
        let cfg: Config = fig.extract().map_err(|e| {
            // figment's message names the key path and the source; join all of them.
            let msgs: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
            anyhow::anyhow!("invalid configuration: {}", msgs.join("; "))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let url = self.database_url.expose();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            anyhow::bail!(
                "invalid configuration: database_url must start with sqlite:, postgres:// or postgresql://"
            );
        }
        // A malformed URL is refused here, before a driver's error could echo
        // it (and its password) back.
        if self.is_postgres() && url::Url::parse(url).is_err() {
            anyhow::bail!("invalid configuration: database_url is not a valid URL");
        }
        if self.rate_limit.enabled
            && [
                self.rate_limit.per_key_per_minute,
                self.rate_limit.per_key_burst,
                self.rate_limit.per_ip_per_minute,
                self.rate_limit.per_ip_burst,
            ]
            .contains(&0)
        {
            anyhow::bail!(
                "invalid configuration: rate_limit rates and bursts must be greater than 0 (or set rate_limit.enabled = false)"
            );
        }
        if self.graphql.ws_max_subscriptions == 0 || self.graphql.ws_ping_interval_secs == 0 {
            anyhow::bail!(
                "invalid configuration: graphql.ws_max_subscriptions and graphql.ws_ping_interval_secs must be greater than 0"
            );
        }
        if self.http.body_limit_bytes == 0 {
            anyhow::bail!("invalid configuration: http.body_limit_bytes must be greater than 0");
        }
        if let Some(jwt) = &self.auth.jwt {
            match jwt.algorithm {
                JwtAlgorithm::HS256 => {
                    if jwt.secret.as_ref().is_none_or(|s| s.expose().len() < 32) {
                        anyhow::bail!(
                            "invalid configuration: auth.jwt.secret must be set and at least 32 bytes for HS256"
                        );
                    }
                }
                JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                    match (&jwt.public_key_pem, &jwt.jwks_url) {
                        (None, None) => anyhow::bail!(
                            "invalid configuration: auth.jwt.public_key_pem or auth.jwt.jwks_url must be set for {:?}",
                            jwt.algorithm
                        ),
                        (Some(_), Some(_)) => anyhow::bail!(
                            "invalid configuration: auth.jwt.public_key_pem and auth.jwt.jwks_url are exclusive"
                        ),
                        (None, Some(url)) => {
                            let ok = url::Url::parse(url)
                                .is_ok_and(|u| matches!(u.scheme(), "https" | "http"));
                            if !ok {
                                anyhow::bail!(
                                    "invalid configuration: auth.jwt.jwks_url must be an http(s) URL"
                                );
                            }
                        }
                        (Some(_), None) => {}
                    }
                }
            }
            if jwt.algorithm == JwtAlgorithm::HS256 && jwt.jwks_url.is_some() {
                anyhow::bail!(
                    "invalid configuration: auth.jwt.jwks_url needs algorithm RS256 or ES256"
                );
            }
        }
        if let Some(trial) = &self.trial {
            if trial.days == 0 {
                anyhow::bail!("invalid configuration: trial.days must be at least 1");
            }
            if !self
                .catalog
                .entitlements
                .iter()
                .any(|e| e.key == trial.entitlement)
            {
                anyhow::bail!(
                    "invalid configuration: trial.entitlement `{}` is not in catalog.entitlements",
                    trial.entitlement
                );
            }
        }
        if let Some(base) = self.stripe.as_ref().and_then(|s| s.api_base.as_deref())
            && (!base.ends_with('/') || url::Url::parse(base).is_err())
        {
            anyhow::bail!(
                "invalid configuration: stripe.api_base must be an absolute URL ending with `/`"
            );
        }
        if let Some(apple) = &self.apple {
            if apple.bundle_id.is_empty() {
                anyhow::bail!("invalid configuration: apple.bundle_id must be set");
            }
            if apple.environment == AppleEnvironment::Production && apple.app_apple_id.is_none() {
                anyhow::bail!(
                    "invalid configuration: apple.app_apple_id must be set in the production environment"
                );
            }
            let api = [
                apple.issuer_id.is_some(),
                apple.key_id.is_some(),
                apple.private_key.is_some(),
            ];
            if api.iter().any(|x| *x) && !api.iter().all(|x| *x) {
                anyhow::bail!(
                    "invalid configuration: apple.issuer_id, apple.key_id and apple.private_key go together"
                );
            }
        }
        for (i, e) in self.outbound.endpoints.iter().enumerate() {
            if url::Url::parse(&e.url).is_err() {
                anyhow::bail!("invalid configuration: outbound.endpoints[{i}].url is not a URL");
            }
            if self.outbound.endpoints[..i].iter().any(|o| o.url == e.url) {
                // Deliveries are kept per URL: one URL has one key.
                anyhow::bail!("invalid configuration: outbound.endpoints[{i}].url is listed twice");
            }
            if crate::keys::webhook_signing_key(e.secret.expose()).is_none() {
                anyhow::bail!(
                    "invalid configuration: outbound.endpoints[{i}].secret must be `whsec_` followed by base64"
                );
            }
        }
        if let Some(r) = &self.redis_url
            && url::Url::parse(r.expose()).is_err()
        {
            // The URL may carry a password: do not echo it.
            anyhow::bail!("invalid configuration: redis_url is not a URL");
        }
        let t = &self.tokens;
        if t.offline_secs == 0 || t.offline_secs > MAX_OFFLINE_SECS {
            anyhow::bail!(
                "invalid configuration: tokens.offline_secs must be between 1 and {MAX_OFFLINE_SECS} (30 days)"
            );
        }
        if t.issuer.is_empty() || t.audience.is_empty() {
            anyhow::bail!(
                "invalid configuration: tokens.issuer and tokens.audience must not be empty"
            );
        }
        if t.key_refresh_secs == 0 {
            anyhow::bail!("invalid configuration: tokens.key_refresh_secs must be at least 1");
        }
        if let Some(k) = &t.encryption_key {
            // Never echo the value: it is the key to every signing key.
            crate::keys::encryption_key_bytes(k.expose())
                .map_err(|e| anyhow::anyhow!("invalid configuration: tokens.encryption_key {e}"))?;
        }
        self.catalog()?;
        Ok(())
    }

    pub fn catalog(&self) -> anyhow::Result<Catalog> {
        Catalog::new(
            self.catalog.entitlements.clone(),
            self.catalog.products.clone(),
        )
        .map_err(|e| anyhow::anyhow!("invalid configuration: catalog: {e}"))
    }

    pub fn cache_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.cache_ttl_ms.unwrap_or(60_000))
    }

    /// The pool's size. By default, on SQLite, two readers per core, 4 to
    /// 8: a read is CPU work on this machine, and each connection keeps its
    /// own page and statement caches (four more readers held ~7 MB more at
    /// the benchmark's peak for no more reads). On PostgreSQL, 8; replicas
    /// under write load want more.
    pub fn max_connections(&self) -> u32 {
        if let Some(n) = self.database_max_connections {
            return n;
        }
        if self.is_postgres() {
            return 8;
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        u32::try_from(cores * 2).unwrap_or(u32::MAX).clamp(4, 8)
    }

    pub fn is_postgres(&self) -> bool {
        !self.database_url.expose().starts_with("sqlite:")
    }

    /// The URL connections are opened with. A PostgreSQL server on this
    /// machine's loopback is reached without TLS unless the URL asks for it
    /// (`sslmode`): loopback traffic never leaves the machine, and the
    /// driver's default (`prefer`) would otherwise negotiate TLS on every
    /// connection, at ~100 ms each to open and CPU on both ends for every
    /// statement. Any other host keeps the driver's default.
    pub fn database_connect_url(&self) -> String {
        let raw = self.database_url.expose();
        if !self.is_postgres() {
            return raw.to_string();
        }
        let Ok(mut url) = url::Url::parse(raw) else {
            return raw.to_string();
        };
        // A `postgres:` URL's host is opaque to the parser: an address
        // arrives as a name.
        let loopback = match url.host() {
            Some(url::Host::Domain(d)) => {
                d.eq_ignore_ascii_case("localhost")
                    || d.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        };
        let names_sslmode = url
            .query_pairs()
            .any(|(k, _)| k == "sslmode" || k == "host" || k == "hostaddr");
        if !loopback || names_sslmode {
            return raw.to_string();
        }
        url.query_pairs_mut().append_pair("sslmode", "disable");
        url.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_defaults_to_two_sqlite_readers_per_core_and_8_on_postgres() {
        let mut cfg = Config::default();
        let cores = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(cfg.max_connections(), (cores * 2).clamp(4, 8));
        cfg.database_url = Secret::new("postgres://127.0.0.1/db");
        assert_eq!(cfg.max_connections(), 8);
        for url in ["postgres://127.0.0.1/db", "sqlite://x.db?mode=rwc"] {
            cfg.database_url = Secret::new(url);
            cfg.database_max_connections = Some(3);
            assert_eq!(cfg.max_connections(), 3);
        }
    }

    #[test]
    fn loopback_postgres_connects_without_tls_unless_asked() {
        let with = |url: &str| {
            let mut cfg = Config::default();
            cfg.database_url = Secret::new(url.to_string());
            cfg.database_connect_url()
        };
        assert_eq!(
            with("postgres://u:p@127.0.0.1:5432/db"),
            "postgres://u:p@127.0.0.1:5432/db?sslmode=disable"
        );
        assert_eq!(
            with("postgresql://localhost/db?application_name=x"),
            "postgresql://localhost/db?application_name=x&sslmode=disable"
        );
        assert_eq!(
            with("postgres://[::1]:5432/db"),
            "postgres://[::1]:5432/db?sslmode=disable"
        );
        // Asked for, or another machine: the URL as given.
        for kept in [
            "postgres://127.0.0.1/db?sslmode=require",
            "postgres://db.internal:5432/db",
            "postgres://10.0.0.5/db",
            "sqlite://entitle.db?mode=rwc",
            // Not a URL the parser reads: handed on untouched, for the
            // driver to refuse with its own message.
            "postgres://127.0.0.1:notaport/db",
        ] {
            assert_eq!(with(kept), kept);
        }
    }

    #[test]
    fn defaults_serve_out_of_the_box() {
        let cfg =
            Config::from_figment(Figment::from(Serialized::defaults(Config::default()))).unwrap();
        assert_eq!(cfg.database_url.expose(), "sqlite://entitle.db?mode=rwc");
        assert_eq!(cfg.bind.to_string(), "127.0.0.1:8088");
        assert!(cfg.stripe.is_none());
        assert!(cfg.http.check_requires_key);
    }

    #[test]
    fn stripe_section_defaults_its_binding_keys() {
        let fig = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[stripe]\nwebhook_secret = \"whsec_x\"\n"));
        let cfg = Config::from_figment(fig).unwrap();
        assert_eq!(
            cfg.stripe.unwrap().customer_metadata_keys,
            vec!["customer_id", "user_id"]
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let cfg = Config {
            database_url: Secret::new("postgres://user:hunter2@db/entitle"),
            stripe: Some(StripeConfig {
                secret_key: Some(Secret::new("sk_test_supersecret")),
                webhook_secret: Some(Secret::new("whsec_supersecret")),
                api_base: None,
                payment_link: None,
                grace_period_days: None,
                api_timeout_secs: None,
                customer_metadata_keys: vec!["customer_id".into()],
            }),
            tokens: TokensConfig {
                encryption_key: Some(Secret::new("c3VwZXJzZWNyZXQtdG9rZW4ta2V5LTMyLWJ5dGVzISE=")),
                ..TokensConfig::default()
            },
            ..Config::default()
        };
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("c3VwZXJzZWNyZXQt"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(!dbg.contains("supersecret"), "{dbg}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let fig = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[http]\nbody_limit_bytes = \"lots\"\n"));
        let err = Config::from_figment(fig).unwrap_err().to_string();
        assert!(err.contains("body_limit_bytes"), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let fig = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("bnid = \"x\"\n"));
        let err = Config::from_figment(fig).unwrap_err().to_string();
        assert!(err.contains("bnid"), "{err}");
    }

    #[test]
    fn apple_production_needs_app_apple_id() {
        let fig = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[apple]\nbundle_id = \"com.example\"\n"));
        let err = Config::from_figment(fig).unwrap_err().to_string();
        assert!(err.contains("apple.app_apple_id"), "{err}");
        let fig = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(
            "[apple]\nbundle_id = \"com.example\"\nenvironment = \"sandbox\"\nkey_id = \"K\"\n",
        ));
        let err = Config::from_figment(fig).unwrap_err().to_string();
        assert!(err.contains("go together"), "{err}");
    }

    #[test]
    fn example_config_is_valid_and_serves_the_garmin_flow() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/entitle.example.toml"));
        let cfg = Config::from_figment(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::file(path)),
        )
        .unwrap();
        assert_eq!(
            cfg.trial.as_ref().map(|t| t.entitlement.as_str()),
            Some("pro")
        );
        assert!(
            cfg.stripe
                .as_ref()
                .and_then(|s| s.payment_link.as_ref())
                .is_some()
        );
        assert_eq!(cfg.catalog().unwrap().products().len(), 2);
    }

    #[test]
    fn outbound_endpoints_need_a_whsec_secret_and_distinct_urls() {
        let endpoint = |url: &str, secret: &str| {
            format!("[[outbound.endpoints]]\nurl = \"{url}\"\nsecret = \"{secret}\"\n")
        };
        let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let load = |toml: String| {
            Config::from_figment(
                Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(&toml)),
            )
        };
        let cfg = load(endpoint("https://a.example.com/in", good)).unwrap();
        assert_eq!(cfg.outbound.endpoints.len(), 1);
        let err = load(endpoint("https://a.example.com/in", "plain-secret"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("outbound.endpoints[0].secret"), "{err}");
        assert!(!err.contains("plain-secret"), "{err}");
        let twice = endpoint("https://a.example.com/in", good)
            + &endpoint("https://a.example.com/in", good);
        let err = load(twice).unwrap_err().to_string();
        assert!(err.contains("outbound.endpoints[1].url"), "{err}");
    }

    #[test]
    fn token_settings_are_bounded_and_the_key_never_echoed() {
        let load = |toml: &str| {
            Config::from_figment(
                Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml)),
            )
        };
        let cfg = load("").unwrap();
        assert_eq!(cfg.tokens.offline_secs, 3 * 86_400);
        assert_eq!(cfg.tokens.audience, "entitle-clients");
        assert_eq!(cfg.tokens.algorithm, TokenAlgorithm::ES256);
        assert!(load("[tokens]\noffline_secs = 2592000\nalgorithm = \"EdDSA\"\n").is_ok());
        let err = load("[tokens]\noffline_secs = 2592001\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokens.offline_secs"), "{err}");
        let err = load("[tokens]\nencryption_key = \"dG9vLXNob3J0LWtleQ==\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokens.encryption_key"), "{err}");
        assert!(!err.contains("dG9vLXNob3J0LWtleQ"), "{err}");
    }

    #[test]
    fn trial_entitlement_must_exist() {
        let fig = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[trial]\ndays = 7\nentitlement = \"pro\"\n"));
        let err = Config::from_figment(fig).unwrap_err().to_string();
        assert!(err.contains("trial.entitlement"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn env_overrides_file_with_nesting() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "entitle.toml",
                "bind = \"127.0.0.1:9000\"\n[http]\nbody_limit_bytes = 1000\n",
            )?;
            jail.set_env("ENTITLE_HTTP__BODY_LIMIT_BYTES", "2000");
            jail.set_env("DATABASE_URL", "postgres://localhost/x");
            // The test harness's own variable is not a server setting.
            jail.set_env("ENTITLE_TEST_POSTGRES_URL", "postgres://localhost/y");
            let cfg = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(cfg.bind.port(), 9000);
            assert_eq!(cfg.http.body_limit_bytes, 2000);
            assert!(cfg.is_postgres());
            Ok(())
        });
    }
}
