//! Service-account access tokens: an RS256 JWT assertion signed with the
//! key from the service-account JSON, exchanged at the token URI, cached
//! until shortly before it expires.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::GoogleError;

const SCOPE: &str = "https://www.googleapis.com/auth/androidpublisher";
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// Assertions live for an hour at most (Google's limit).
const ASSERTION_SECS: u64 = 3600;
/// A cached token is renewed this long before Google says it expires.
const EARLY_REFRESH: Duration = Duration::from_secs(120);

#[derive(Deserialize)]
struct ServiceAccountKey {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
}

#[derive(Serialize)]
struct Assertion<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

struct Cached {
    token: String,
    refresh_at: Instant,
}

pub(super) struct TokenSource {
    email: String,
    key: EncodingKey,
    key_id: Option<String>,
    token_uri: String,
    http: reqwest::Client,
    cached: Mutex<Option<Cached>>,
}

impl TokenSource {
    /// `json_or_path` is the service-account JSON, or the path of its file.
    pub(super) fn from_config(
        json_or_path: &str,
        token_uri: Option<&str>,
        http: &reqwest::Client,
    ) -> anyhow::Result<TokenSource> {
        let json = if json_or_path.trim_start().starts_with('{') {
            json_or_path.to_string()
        } else {
            std::fs::read_to_string(json_or_path).map_err(|e| {
                anyhow::anyhow!("invalid configuration: google.service_account file: {e}")
            })?
        };
        // The parse error could quote the key; say only what is wrong.
        let sa: ServiceAccountKey = serde_json::from_str(&json).map_err(|_| {
            anyhow::anyhow!(
                "invalid configuration: google.service_account is not a service-account key (client_email, private_key)"
            )
        })?;
        let key = EncodingKey::from_rsa_pem(sa.private_key.as_bytes()).map_err(|_| {
            anyhow::anyhow!(
                "invalid configuration: google.service_account private_key is not an RSA PEM key"
            )
        })?;
        Ok(TokenSource {
            email: sa.client_email,
            key,
            key_id: sa.private_key_id,
            token_uri: token_uri
                .map(str::to_string)
                .or(sa.token_uri)
                .unwrap_or_else(|| DEFAULT_TOKEN_URI.into()),
            http: http.clone(),
            cached: Mutex::new(None),
        })
    }

    /// A valid access token, from the cache when it has time left.
    pub(super) async fn token(&self) -> Result<String, GoogleError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(c.token.clone());
        }
        let fresh = self.exchange().await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// Forgets `token` after Google refused it, unless another request
    /// already replaced it.
    pub(super) async fn invalidate(&self, token: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| c.token == token) {
            *cached = None;
        }
    }

    async fn exchange(&self) -> Result<Cached, GoogleError> {
        // Google checks iat/exp against real time, so this is the wall
        // clock, not the server's (testable) business clock.
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| GoogleError::Malformed(e.to_string()))?
            .as_secs();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.key_id.clone();
        let assertion = jsonwebtoken::encode(
            &header,
            &Assertion {
                iss: &self.email,
                scope: SCOPE,
                aud: &self.token_uri,
                iat,
                exp: iat + ASSERTION_SECS,
            },
            &self.key,
        )
        .map_err(|e| {
            GoogleError::Malformed(format!("signing the service-account assertion: {e}"))
        })?;
        let started = Instant::now();
        let resp = self
            .http
            .post(&self.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|e| GoogleError::Unavailable(format!("token endpoint: {e}")))?;
        let status = resp.status();
        if !status.is_success() {
            // 4xx here means our key or clock is wrong: the operator must
            // act, and the purchase itself is not at fault.
            return Err(GoogleError::Unavailable(format!(
                "token endpoint answered {status}"
            )));
        }
        let body: TokenResponse = resp
            .json()
            .await
            .map_err(|e| GoogleError::Unavailable(format!("token endpoint answer: {e}")))?;
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(3600));
        Ok(Cached {
            token: body.access_token,
            refresh_at: started + lifetime.saturating_sub(EARLY_REFRESH),
        })
    }
}
