//! Keys published as a JWKS (Google's Pub/Sub OIDC keys, an identity
//! provider's keys for customer tokens), cached for every request.
//!
//! A request whose key is cached never waits for the network: a stale set is
//! refreshed in the background while the cached keys keep answering. Only a
//! token naming a key we do not hold waits, and then for one shared fetch,
//! bounded by a timeout; after any fetch, unknown `kid`s fail at once for
//! `min_refetch`, and after a failed fetch for `failure_backoff`, so a flood
//! of made-up `kid`s or a dead endpoint costs one request to the endpoint,
//! not one per token.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{JwkSet, PublicKeyUse},
};

#[derive(Clone, Copy, Debug)]
pub struct JwksPolicy {
    /// How long a fetched set is fresh.
    pub ttl: Duration,
    /// Unknown `kid`s cannot make us fetch more often than this.
    pub min_refetch: Duration,
    /// After a failed fetch, wait this long before trying again.
    pub failure_backoff: Duration,
    /// One fetch may take this long.
    pub fetch_timeout: Duration,
}

impl Default for JwksPolicy {
    fn default() -> Self {
        JwksPolicy {
            ttl: Duration::from_secs(3600),
            min_refetch: Duration::from_secs(10),
            failure_backoff: Duration::from_secs(5),
            fetch_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwksError {
    /// The token names a key the set does not have (after a fetch, or while
    /// refetching is held back).
    #[error("token signed by an unknown key")]
    UnknownKey,
    /// The endpoint could not be read; no cached key could answer.
    #[error("key set unavailable: {0}")]
    Unavailable(String),
}

#[derive(Default)]
struct State {
    keys: HashMap<String, (Option<Algorithm>, DecodingKey)>,
    fetched_at: Option<Instant>,
    /// The last fetch attempt, successful or not.
    attempted_at: Option<Instant>,
    failed: Option<String>,
    /// When a token naming a key we did not hold last made us refetch.
    unknown_refetch_at: Option<Instant>,
}

pub struct JwksCache {
    http: reqwest::Client,
    url: String,
    policy: JwksPolicy,
    state: RwLock<State>,
    /// Held only by the request doing the fetch; readers of cached keys never take it.
    fetch: tokio::sync::Mutex<()>,
    refreshing: AtomicBool,
}

impl JwksCache {
    pub fn new(http: reqwest::Client, url: String, policy: JwksPolicy) -> Arc<JwksCache> {
        Arc::new(JwksCache {
            http,
            url,
            policy,
            state: RwLock::new(State::default()),
            fetch: tokio::sync::Mutex::new(()),
            refreshing: AtomicBool::new(false),
        })
    }

    /// The key a token's header names, for a token signed with `alg`. A key
    /// whose JWK states another algorithm does not verify it.
    pub async fn key(
        self: &Arc<Self>,
        kid: &str,
        alg: Algorithm,
    ) -> Result<DecodingKey, JwksError> {
        let (cached, stale) = self.cached(kid);
        if let Some((key_alg, key)) = cached {
            if stale {
                self.refresh_in_background();
            }
            return match key_alg {
                Some(a) if a != alg => Err(JwksError::UnknownKey),
                _ => Ok(key),
            };
        }
        self.held_back(true)?;
        // One fetch for everyone asking at once; the others find its result.
        let _fetching = self.fetch.lock().await;
        if let (Some((key_alg, key)), _) = self.cached(kid) {
            return match key_alg {
                Some(a) if a != alg => Err(JwksError::UnknownKey),
                _ => Ok(key),
            };
        }
        self.held_back(true)?;
        {
            let mut s = self.state.write().expect("jwks state");
            if s.fetched_at.is_some() {
                s.unknown_refetch_at = Some(Instant::now());
            }
        }
        self.fetch_now().await?;
        match self.cached(kid).0 {
            Some((Some(a), _)) if a != alg => Err(JwksError::UnknownKey),
            Some((_, key)) => Ok(key),
            None => Err(JwksError::UnknownKey),
        }
    }

    #[allow(clippy::type_complexity)]
    fn cached(&self, kid: &str) -> (Option<(Option<Algorithm>, DecodingKey)>, bool) {
        let s = self.state.read().expect("jwks state");
        let stale = s.fetched_at.is_none_or(|t| t.elapsed() >= self.policy.ttl);
        (s.keys.get(kid).cloned(), stale)
    }

    /// Whether a fetch must not happen yet: shortly after a failed one, or,
    /// for a `kid` missing from a set we hold, shortly after another such
    /// refetch (a key rotated in is fetched on first sight; a flood of
    /// made-up ones is not).
    fn held_back(&self, unknown_kid: bool) -> Result<(), JwksError> {
        let s = self.state.read().expect("jwks state");
        if let (Some(at), Some(why)) = (s.attempted_at, &s.failed)
            && at.elapsed() < self.policy.failure_backoff
        {
            return Err(JwksError::Unavailable(why.clone()));
        }
        if unknown_kid
            && s.unknown_refetch_at
                .is_some_and(|at| at.elapsed() < self.policy.min_refetch)
        {
            return Err(JwksError::UnknownKey);
        }
        Ok(())
    }

    fn refresh_in_background(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Ok(_fetching) = this.fetch.try_lock()
                && this.held_back(false).is_ok()
            {
                // A failure keeps the old keys; a later stale read retries
                // once the backoff has passed.
                let _ = this.fetch_now().await;
            }
            this.refreshing.store(false, Ordering::Release);
        });
    }

    async fn fetch_now(&self) -> Result<(), JwksError> {
        let result = tokio::time::timeout(self.policy.fetch_timeout, self.download())
            .await
            .unwrap_or_else(|_| Err(JwksError::Unavailable("timed out".into())));
        let mut s = self.state.write().expect("jwks state");
        s.attempted_at = Some(Instant::now());
        match result {
            Ok(keys) => {
                s.keys = keys;
                s.fetched_at = Some(Instant::now());
                s.failed = None;
                Ok(())
            }
            Err(e) => {
                s.failed = Some(match &e {
                    JwksError::Unavailable(why) => why.clone(),
                    JwksError::UnknownKey => "no usable keys".into(),
                });
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    async fn download(
        &self,
    ) -> Result<HashMap<String, (Option<Algorithm>, DecodingKey)>, JwksError> {
        let resp = self
            .http
            .get(&self.url)
            .send()
            .await
            .map_err(|e| JwksError::Unavailable(e.without_url().to_string()))?;
        if !resp.status().is_success() {
            return Err(JwksError::Unavailable(format!(
                "answered {}",
                resp.status()
            )));
        }
        let set: JwkSet = resp
            .json()
            .await
            .map_err(|_| JwksError::Unavailable("answer is not a JWKS".into()))?;
        Ok(set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                // A key stated for encryption, or for an algorithm that does
                // not sign, verifies nothing.
                if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
                    return None;
                }
                let alg = match jwk.common.key_algorithm {
                    Some(a) => Some(Algorithm::try_from(a).ok()?),
                    None => None,
                };
                DecodingKey::from_jwk(jwk).ok().map(|k| (kid, (alg, k)))
            })
            .collect())
    }
}
