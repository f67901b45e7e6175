//! Pub/Sub push authentication: the `Authorization: Bearer` token is an
//! OIDC ID token Google signs (RS256) for the push subscription's service
//! account and audience. Google's keys come from a JWKS, cached (`crate::jwks`).

use std::sync::Arc;

use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use super::GoogleError;
use crate::jwks::{JwksCache, JwksError, JwksPolicy};

const ISSUERS: [&str; 2] = ["accounts.google.com", "https://accounts.google.com"];

#[derive(Deserialize)]
struct PushClaims {
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<bool>,
}

pub(super) struct PushVerifier {
    audience: String,
    email: String,
    keys: Arc<JwksCache>,
}

impl PushVerifier {
    pub(super) fn new(
        http: reqwest::Client,
        jwks_uri: String,
        failure_backoff: std::time::Duration,
        audience: String,
        email: String,
    ) -> Self {
        PushVerifier {
            // Google rotates its keys over days; the default hour keeps us close.
            keys: JwksCache::new(
                http,
                jwks_uri,
                JwksPolicy {
                    failure_backoff,
                    ..JwksPolicy::default()
                },
            ),
            audience,
            email,
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

    async fn key(&self, kid: &str) -> Result<jsonwebtoken::DecodingKey, GoogleError> {
        self.keys
            .key(kid, Algorithm::RS256)
            .await
            .map_err(|e| match e {
                JwksError::UnknownKey => {
                    GoogleError::PushRejected("push token signed by an unknown key")
                }
                JwksError::Unavailable(why) => GoogleError::Unavailable(format!("JWKS: {why}")),
            })
    }
}
