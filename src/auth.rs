//! Who is calling: a customer (JWT `sub`), an API key with a role, or an
//! admin. Resolved once per request from the headers.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::{
    config::{JwtAlgorithm, JwtConfig},
    domain::{ApiKeyRole, ExternalId},
    error::{AppError, AppResult},
    jwks::{JwksCache, JwksError, JwksPolicy},
    service::{Core, api_keys::KeyIdentity},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    /// A signed-in end user; may read only itself.
    Customer(String),
    /// A bearer token carrying the admin claim.
    AdminToken(String),
    ApiKey {
        id: String,
        role: ApiKeyRole,
    },
}

impl Principal {
    /// The customer a token signs in as (an admin token's `sub` included);
    /// API keys act for no customer of their own. What any principal may
    /// do is `policy`'s to say.
    pub fn customer_id(&self) -> Option<&str> {
        match self {
            Principal::Customer(sub) | Principal::AdminToken(sub) => Some(sub),
            Principal::Anonymous | Principal::ApiKey { .. } => None,
        }
    }
}

/// Where a customer token's verifying key comes from.
enum JwtKey {
    Fixed(DecodingKey),
    /// An identity provider's published keys, chosen by the token's `kid`.
    Jwks(Arc<JwksCache>, Algorithm),
}

struct JwtVerifier {
    key: JwtKey,
    validation: Validation,
    admin_claim: String,
    admin_value: String,
    max_lifetime: i64,
    leeway: i64,
}

fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
    }
}

impl JwtVerifier {
    fn new(cfg: &JwtConfig) -> anyhow::Result<Self> {
        let pem = || cfg.public_key_pem.as_deref().unwrap_or_default().as_bytes();
        let key = match (cfg.algorithm, &cfg.jwks_url) {
            (JwtAlgorithm::RS256 | JwtAlgorithm::ES256, Some(url)) => {
                let http = reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| anyhow::anyhow!("HTTP client for auth.jwt.jwks_url: {e}"))?;
                // Identity providers rotate over days; an hour keeps us
                // close, and a new `kid` is fetched on first sight anyway.
                JwtKey::Jwks(
                    JwksCache::new(http, url.clone(), JwksPolicy::default()),
                    algorithm(cfg.algorithm),
                )
            }
            (JwtAlgorithm::HS256, _) => JwtKey::Fixed(DecodingKey::from_secret(
                cfg.secret
                    .as_ref()
                    .map(|s| s.expose().as_bytes())
                    .unwrap_or_default(),
            )),
            (JwtAlgorithm::RS256, None) => {
                JwtKey::Fixed(DecodingKey::from_rsa_pem(pem()).map_err(|e| {
                    anyhow::anyhow!("invalid configuration: auth.jwt.public_key_pem: {e}")
                })?)
            }
            (JwtAlgorithm::ES256, None) => {
                JwtKey::Fixed(DecodingKey::from_ec_pem(pem()).map_err(|e| {
                    anyhow::anyhow!("invalid configuration: auth.jwt.public_key_pem: {e}")
                })?)
            }
        };
        // One algorithm only: this is what stops `alg: none` and HS/RS confusion.
        let mut validation = Validation::new(algorithm(cfg.algorithm));
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[&cfg.issuer]);
        validation.set_audience(&[&cfg.audience]);
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.leeway = cfg.leeway_secs;
        Ok(JwtVerifier {
            key,
            validation,
            admin_claim: cfg.admin_claim.clone(),
            admin_value: cfg.admin_value.clone(),
            max_lifetime: i64::try_from(cfg.max_lifetime_secs).unwrap_or(i64::MAX),
            leeway: i64::try_from(cfg.leeway_secs).unwrap_or(i64::MAX),
        })
    }

    async fn verify(&self, token: &str) -> Option<Principal> {
        let jwks_key;
        let key = match &self.key {
            JwtKey::Fixed(k) => k,
            JwtKey::Jwks(cache, alg) => {
                // The header is read before anything verifies it: only its
                // `kid` is used, to pick among the provider's keys, and the
                // pinned algorithm is what the signature is checked with.
                let kid = jsonwebtoken::decode_header(token).ok()?.kid?;
                jwks_key = match cache.key(&kid, *alg).await {
                    Ok(k) => k,
                    Err(JwksError::Unavailable(why)) => {
                        tracing::warn!(%why, "customer token keys (auth.jwt.jwks_url) unavailable");
                        return None;
                    }
                    Err(JwksError::UnknownKey) => return None,
                };
                &jwks_key
            }
        };
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation).ok()?;
        if !self.lifetime_ok(&data.claims, chrono::Utc::now().timestamp()) {
            return None;
        }
        let sub = data.claims.get("sub")?.as_str()?;
        let sub = ExternalId::parse(sub).ok()?.into_string();
        let admin = match data.claims.get(&self.admin_claim) {
            Some(Value::String(s)) => *s == self.admin_value,
            Some(Value::Array(a)) => a
                .iter()
                .any(|v| v.as_str() == Some(self.admin_value.as_str())),
            _ => false,
        };
        Some(if admin {
            Principal::AdminToken(sub)
        } else {
            Principal::Customer(sub)
        })
    }
}

impl JwtVerifier {
    /// A stolen long-lived token would work for its whole life: `exp` may be
    /// at most `max_lifetime` past `iat`, or past now when there is no `iat`.
    fn lifetime_ok(&self, claims: &Map<String, Value>, now: i64) -> bool {
        let Some(exp) = claims.get("exp").and_then(Value::as_f64) else {
            return false;
        };
        let from = match claims.get("iat") {
            None => now as f64,
            Some(v) => match v.as_f64() {
                // An `iat` in the future cannot stretch the window past now.
                Some(iat) => iat.min(now as f64 + self.leeway as f64),
                None => return false,
            },
        };
        exp - from <= self.max_lifetime.saturating_add(self.leeway) as f64
    }
}

/// Mints a token with the configured key (development and tests only).
pub fn mint_token(
    cfg: &JwtConfig,
    sub: &str,
    admin: bool,
    ttl: Duration,
) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp();
    let mut claims = serde_json::json!({
        "sub": sub,
        "iss": cfg.issuer,
        "aud": cfg.audience,
        "iat": now,
        "nbf": now,
        "exp": now + ttl.as_secs() as i64,
    });
    if admin {
        claims[&cfg.admin_claim] = Value::String(cfg.admin_value.clone());
    }
    let key = match cfg.algorithm {
        JwtAlgorithm::HS256 => EncodingKey::from_secret(
            cfg.secret
                .as_ref()
                .map(|s| s.expose().as_bytes())
                .unwrap_or_default(),
        ),
        JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
            let pem = cfg.private_key_pem.as_ref().ok_or_else(|| {
                anyhow::anyhow!(
                    "auth.jwt.private_key_pem is needed to mint {:?} tokens",
                    cfg.algorithm
                )
            })?;
            if cfg.algorithm == JwtAlgorithm::RS256 {
                EncodingKey::from_rsa_pem(pem.expose().as_bytes())?
            } else {
                EncodingKey::from_ec_pem(pem.expose().as_bytes())?
            }
        }
    };
    Ok(jsonwebtoken::encode(
        &Header::new(algorithm(cfg.algorithm)),
        &claims,
        &key,
    )?)
}

pub struct Authenticator {
    jwt: Option<JwtVerifier>,
    key_ttl: Duration,
    /// SHA-256 of a presented key -> who it is, and when we last checked.
    key_cache: RwLock<HashMap<String, (KeyIdentity, Instant)>>,
}

impl Authenticator {
    pub fn new(jwt: Option<&JwtConfig>, key_ttl: Duration) -> anyhow::Result<Self> {
        Ok(Authenticator {
            jwt: jwt.map(JwtVerifier::new).transpose()?,
            key_ttl,
            key_cache: RwLock::new(HashMap::new()),
        })
    }

    /// `Anonymous` when no credential is presented; an error when one is
    /// presented and is not valid (never silently downgraded).
    pub async fn principal(&self, core: &Arc<Core>, headers: &HeaderMap) -> AppResult<Principal> {
        if let Some(auth) = headers.get(axum::http::header::AUTHORIZATION) {
            let token = auth
                .to_str()
                .ok()
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .ok_or(AppError::Unauthenticated)?;
            let jwt = self.jwt.as_ref().ok_or(AppError::Unauthenticated)?;
            return jwt
                .verify(token.trim())
                .await
                .ok_or(AppError::Unauthenticated);
        }
        let key = headers.get("api-key").or_else(|| headers.get("x-api-key"));
        match key {
            None => Ok(Principal::Anonymous),
            Some(v) => {
                let key = v.to_str().map_err(|_| AppError::Unauthenticated)?;
                let id = self
                    .api_key(core, key)
                    .await?
                    .ok_or(AppError::Unauthenticated)?;
                Ok(Principal::ApiKey {
                    id: id.id,
                    role: id.role,
                })
            }
        }
    }

    async fn api_key(&self, core: &Arc<Core>, key: &str) -> AppResult<Option<KeyIdentity>> {
        let hash = crate::service::api_keys::hash_key(key);
        if let Some((id, at)) = self.key_cache.read().expect("key cache").get(&hash)
            && at.elapsed() < self.key_ttl
        {
            return Ok(Some(id.clone()));
        }
        let found = core.api_keys().lookup_api_key(key).await?;
        let mut cache = self.key_cache.write().expect("key cache");
        match found {
            Some((id, hash)) => {
                if cache.len() > 10_000 {
                    cache.retain(|_, (_, at)| at.elapsed() < self.key_ttl);
                }
                cache.insert(hash, (id.clone(), Instant::now()));
                Ok(Some(id))
            }
            None => {
                cache.remove(&hash);
                Ok(None)
            }
        }
    }
}
