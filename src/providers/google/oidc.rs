//! Pub/Sub push authentication: the `Authorization: Bearer` token is an
//! OIDC ID token Google signs (RS256) for the push subscription's service
//! account and audience. Google's keys come from a JWKS, cached, refetched
//! once when a token names a key we do not hold.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::GoogleError;

const ISSUERS: [&str; 2] = ["accounts.google.com", "https://accounts.google.com"];
/// Google rotates its keys over days; an hour keeps us close.
const KEYS_TTL: Duration = Duration::from_secs(3600);
/// Unknown `kid`s cannot make us fetch more often than this.
const MIN_REFETCH: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
struct PushClaims {
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<bool>,
}

struct Keys {
    by_kid: HashMap<String, DecodingKey>,
    fetched_at: Instant,
    /// When an unknown `kid` last made us refetch.
    unknown_refetch_at: Option<Instant>,
}

pub(super) struct PushVerifier {
    http: reqwest::Client,
    jwks_uri: String,
    audience: String,
    email: String,
    keys: Mutex<Option<Keys>>,
}

impl PushVerifier {
    pub(super) fn new(
        http: reqwest::Client,
        jwks_uri: String,
        audience: String,
        email: String,
    ) -> Self {
        PushVerifier {
            http,
            jwks_uri,
            audience,
            email,
            keys: Mutex::new(None),
        }
    }

    pub(super) async fn verify(&self, token: &str) -> Result<(), GoogleError> {
        // `alg: none` and every algorithm but RS256 fail here or below.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| GoogleError::PushRejected("malformed push token"))?;
        if header.alg != Algorithm::RS256 {
            return Err(GoogleError::PushRejected(
                "push token not signed with RS256",
            ));
        }
        let kid = header
            .kid
            .ok_or(GoogleError::PushRejected("push token names no key"))?;
        let key = self.key(&kid).await?;
        let mut v = Validation::new(Algorithm::RS256);
        v.set_audience(&[&self.audience]);
        v.set_issuer(&ISSUERS);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.validate_nbf = true;
        let data = jsonwebtoken::decode::<PushClaims>(token, &key, &v)
            .map_err(|_| GoogleError::PushRejected("push token does not verify"))?;
        if data.claims.email.as_deref() != Some(self.email.as_str()) {
            return Err(GoogleError::PushRejected(
                "push token is not from the configured service account",
            ));
        }
        if data.claims.email_verified != Some(true) {
            return Err(GoogleError::PushRejected(
                "push token email is not verified",
            ));
        }
        Ok(())
    }

    async fn key(&self, kid: &str) -> Result<DecodingKey, GoogleError> {
        let mut keys = self.keys.lock().await;
        let fresh = keys
            .as_ref()
            .is_some_and(|k| k.fetched_at.elapsed() < KEYS_TTL);
        if fresh {
            if let Some(k) = keys.as_ref().and_then(|k| k.by_kid.get(kid)) {
                return Ok(k.clone());
            }
            if keys
                .as_ref()
                .and_then(|k| k.unknown_refetch_at)
                .is_some_and(|t| t.elapsed() < MIN_REFETCH)
            {
                return Err(GoogleError::PushRejected(
                    "push token signed by an unknown key",
                ));
            }
        }
        let mut fetched = self.fetch().await?;
        if fresh {
            fetched.unknown_refetch_at = Some(Instant::now());
        }
        let found = fetched.by_kid.get(kid).cloned();
        *keys = Some(fetched);
        found.ok_or(GoogleError::PushRejected(
            "push token signed by an unknown key",
        ))
    }

    async fn fetch(&self) -> Result<Keys, GoogleError> {
        let resp = self
            .http
            .get(&self.jwks_uri)
            .send()
            .await
            .map_err(|e| GoogleError::Unavailable(format!("JWKS: {e}")))?;
        if !resp.status().is_success() {
            return Err(GoogleError::Unavailable(format!(
                "JWKS answered {}",
                resp.status()
            )));
        }
        let set: JwkSet = resp
            .json()
            .await
            .map_err(|e| GoogleError::Unavailable(format!("JWKS answer: {e}")))?;
        let by_kid = set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                DecodingKey::from_jwk(jwk).ok().map(|k| (kid, k))
            })
            .collect();
        Ok(Keys {
            by_kid,
            fetched_at: Instant::now(),
            unknown_refetch_at: None,
        })
    }
}
