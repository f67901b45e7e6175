//! Offline entitlement tokens and signed live answers: the signing keys
//! (private halves encrypted in the database), the JWKS, and a cache that
//! signs a customer's token once per state and time bucket.
//!
//! Key life cycle. The first start creates a key. `rotate` inserts a new key
//! that becomes current one refresh period later, so every replica publishes
//! it in its JWKS before anyone signs with it; the old key is retired at that
//! instant. A process signs with a key only within a lease it first records
//! as `verify_until` = lease end + `offline_secs`: no token of the key can
//! expire later, so the key leaves the JWKS exactly when that passes.

use std::{
    collections::HashMap,
    fmt,
    hash::{BuildHasher, RandomState},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock, atomic::AtomicU64, atomic::Ordering},
};

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use chrono::{DateTime, Duration, Utc};
use entities::signing_keys;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{
    clock::Clock,
    config::{Config, Secret, TokenAlgorithm, TokensConfig},
    db::{self, Db},
    domain::{Snapshot, TokenState},
    error::{AppError, AppResult},
};

/// `typ` of the detached signature over a live answer, so it can never be
/// taken for an entitlement token (or the other way round).
pub const ANSWER_TYP: &str = "entitle-answer+jws";

/// The key that encrypts signing keys at rest.
pub struct EncryptionKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}

/// 32 bytes as 64 hex digits or base64. The error never repeats the input.
pub fn parse_encryption_key(s: &Secret) -> Result<EncryptionKey, &'static str> {
    crate::keys::encryption_key_bytes(s.expose()).map(EncryptionKey)
}

/// Where the encryption key came from, for the startup message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Configured,
    File(PathBuf),
    Ephemeral,
}

/// The database file of a SQLite URL; `None` for an in-memory database.
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || query.split('&').any(|p| p == "mode=memory") {
        return None;
    }
    Some(PathBuf::from(path))
}

/// The configured key; on SQLite without one, a random key kept in a file
/// beside the database (created once, readable by the owner only), so a
/// development set-up works out of the box and the CLI finds the same key.
/// PostgreSQL serves replicas: they must share a configured key.
pub fn resolve_encryption_key(config: &Config) -> anyhow::Result<(EncryptionKey, KeySource)> {
    if let Some(k) = &config.tokens.encryption_key {
        let key = parse_encryption_key(k)
            .map_err(|e| anyhow::anyhow!("invalid configuration: tokens.encryption_key {e}"))?;
        return Ok((key, KeySource::Configured));
    }
    if config.is_postgres() {
        anyhow::bail!(
            "tokens.encryption_key must be set with PostgreSQL (32 random bytes in base64, e.g. \
             from `openssl rand -base64 32`, in entitle.toml or ENTITLE_TOKENS__ENCRYPTION_KEY): \
             every replica must decrypt the same signing keys"
        );
    }
    let Some(db_file) = sqlite_file(config.database_url.expose()) else {
        return Ok((
            EncryptionKey(Zeroizing::new(rand::random())),
            KeySource::Ephemeral,
        ));
    };
    let mut name = db_file.clone().into_os_string();
    name.push(".token-key");
    let path = PathBuf::from(name);
    let fresh = Zeroizing::new(STANDARD.encode(rand::random::<[u8; 32]>()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    match opts.open(&path) {
        Ok(mut f) => {
            use std::io::Write;
            f.write_all(fresh.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => anyhow::bail!("cannot create {}: {e}", path.display()),
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
    );
    let key = parse_encryption_key(&Secret::new(text.as_str()))
        .map_err(|e| anyhow::anyhow!("{} {e}", path.display()))?;
    Ok((key, KeySource::File(path)))
}

impl EncryptionKey {
    /// `base64(nonce || ciphertext)`, bound to the key's id.
    fn seal(&self, kid: &str, secret: &[u8]) -> String {
        let cipher = Aes256Gcm::new(self.0.as_slice().into());
        let nonce: [u8; 12] = rand::random();
        let ct = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: secret,
                    aad: kid.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of 32 bytes cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        STANDARD.encode(out)
    }

    fn open(&self, kid: &str, sealed: &str) -> Option<Zeroizing<Vec<u8>>> {
        let raw = STANDARD.decode(sealed).ok()?;
        if raw.len() < 12 {
            return None;
        }
        let (nonce, ct) = raw.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().ok()?;
        let cipher = Aes256Gcm::new(self.0.as_slice().into());
        cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ct,
                    aad: kid.as_bytes(),
                },
            )
            .ok()
            .map(Zeroizing::new)
    }
}

enum KeyPair {
    Es256(p256::ecdsa::SigningKey),
    EdDsa(ed25519_dalek::SigningKey),
}

/// A private signing key. Its `Debug` shows only the id and algorithm.
pub struct Signer {
    kid: String,
    alg: TokenAlgorithm,
    key: KeyPair,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl Signer {
    fn generate(alg: TokenAlgorithm) -> Signer {
        loop {
            let bytes = Zeroizing::new(rand::random::<[u8; 32]>());
            if let Ok(s) = Signer::from_secret(alg, bytes.as_slice()) {
                return s;
            }
            // A P-256 scalar of zero or >= n: astronomically rare, draw again.
        }
    }

    fn from_secret(alg: TokenAlgorithm, secret: &[u8]) -> Result<Signer, ()> {
        let key = match alg {
            TokenAlgorithm::ES256 => {
                KeyPair::Es256(p256::ecdsa::SigningKey::from_slice(secret).map_err(|_| ())?)
            }
            TokenAlgorithm::EdDSA => {
                let arr: &[u8; 32] = secret.try_into().map_err(|_| ())?;
                KeyPair::EdDsa(ed25519_dalek::SigningKey::from_bytes(arr))
            }
        };
        let mut s = Signer {
            kid: String::new(),
            alg,
            key,
        };
        s.kid = s.thumbprint();
        Ok(s)
    }

    fn secret(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(match &self.key {
            KeyPair::Es256(k) => k.to_bytes().to_vec(),
            KeyPair::EdDsa(k) => k.to_bytes().to_vec(),
        })
    }

    /// The public key's members, in RFC 7638's lexicographic order.
    fn public_members(&self) -> Vec<(&'static str, String)> {
        match &self.key {
            KeyPair::Es256(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                vec![
                    ("crv", "P-256".into()),
                    ("kty", "EC".into()),
                    ("x", b64(p.x().expect("uncompressed point"))),
                    ("y", b64(p.y().expect("uncompressed point"))),
                ]
            }
            KeyPair::EdDsa(k) => vec![
                ("crv", "Ed25519".into()),
                ("kty", "OKP".into()),
                ("x", b64(k.verifying_key().as_bytes())),
            ],
        }
    }

    /// RFC 7638 JWK thumbprint: the key id is a function of the key.
    fn thumbprint(&self) -> String {
        let canonical: serde_json::Map<String, Value> = self
            .public_members()
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::String(v)))
            .collect();
        b64(&Sha256::digest(Value::Object(canonical).to_string()))
    }

    pub fn public_jwk(&self) -> Value {
        let mut m: serde_json::Map<String, Value> = self
            .public_members()
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::String(v)))
            .collect();
        m.insert("kid".into(), Value::String(self.kid.clone()));
        m.insert("alg".into(), Value::String(self.alg.as_str().into()));
        m.insert("use".into(), Value::String("sig".into()));
        Value::Object(m)
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    fn sign(&self, input: &[u8]) -> Vec<u8> {
        match &self.key {
            KeyPair::Es256(k) => {
                use p256::ecdsa::signature::Signer as _;
                let sig: p256::ecdsa::Signature = k.sign(input);
                sig.to_bytes().to_vec()
            }
            KeyPair::EdDsa(k) => {
                use ed25519_dalek::Signer as _;
                k.sign(input).to_bytes().to_vec()
            }
        }
    }

    fn header(&self, typ: &str) -> String {
        b64(
            json!({ "alg": self.alg.as_str(), "kid": self.kid, "typ": typ })
                .to_string()
                .as_bytes(),
        )
    }

    /// A compact JWS over `payload`.
    pub fn compact(&self, typ: &str, payload: &[u8]) -> String {
        let input = format!("{}.{}", self.header(typ), b64(payload));
        let sig = b64(&self.sign(input.as_bytes()));
        format!("{input}.{sig}")
    }

    /// A detached JWS (RFC 7515 appendix F): the compact form with the
    /// payload left out, `header..signature`.
    pub fn detached(&self, typ: &str, payload: &[u8]) -> String {
        let header = self.header(typ);
        let input = format!("{header}.{}", b64(payload));
        format!("{header}..{}", b64(&self.sign(input.as_bytes())))
    }
}

/// What one process signs with and publishes, until `next_refresh`.
struct Keyring {
    current: Arc<Signer>,
    /// The served JWKS document.
    jwks: Arc<str>,
    kids: Vec<String>,
    /// Never sign after this without recording a longer lease.
    sign_until: DateTime<Utc>,
    next_refresh: DateTime<Utc>,
}

#[derive(Clone)]
struct CachedToken {
    fingerprint: u64,
    bucket: i64,
    kid: String,
    token: Arc<str>,
}

const SHARDS: usize = 16;
const SHARD_CAPACITY: usize = 8192;

/// The last token signed per (customer, device).
struct TokenCache {
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<String, CachedToken>>>,
}

impl TokenCache {
    fn new() -> Self {
        TokenCache {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, k: &str) -> &Mutex<HashMap<String, CachedToken>> {
        &self.shards[self.hasher.hash_one(k) as usize % SHARDS]
    }

    fn get(&self, k: &str) -> Option<CachedToken> {
        self.shard(k).lock().expect("token cache").get(k).cloned()
    }

    fn put(&self, k: String, v: CachedToken) {
        let mut s = self.shard(&k).lock().expect("token cache");
        if s.len() >= SHARD_CAPACITY && !s.contains_key(&k) {
            s.clear();
        }
        s.insert(k, v);
    }
}

/// A row of `entitle signing-key list`.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub kid: String,
    pub algorithm: String,
    pub created_at: DateTime<Utc>,
    pub retired_at: Option<DateTime<Utc>>,
    pub verify_until: Option<DateTime<Utc>>,
}

impl From<&signing_keys::Model> for KeyInfo {
    fn from(m: &signing_keys::Model) -> Self {
        KeyInfo {
            kid: m.kid.clone(),
            algorithm: m.algorithm.clone(),
            created_at: m.created_at,
            retired_at: m.retired_at,
            verify_until: m.verify_until,
        }
    }
}

pub struct Tokens {
    cfg: TokensConfig,
    enc: EncryptionKey,
    pub key_source: KeySource,
    db: Db,
    clock: Arc<dyn Clock>,
    ring: RwLock<Option<Arc<Keyring>>>,
    refresh: tokio::sync::Mutex<()>,
    /// Decrypted keys by id, so a refresh does not decrypt again.
    signers: Mutex<HashMap<String, Arc<Signer>>>,
    cache: TokenCache,
    signed: AtomicU64,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("key_source", &self.key_source)
            .finish_non_exhaustive()
    }
}

/// Whether `k` is the one signing at `now`, or one of several to choose from.
fn signs_at(k: &signing_keys::Model, now: DateTime<Utc>) -> bool {
    k.created_at <= now && k.retired_at.is_none_or(|r| r > now)
}

fn parse_alg(s: &str) -> Option<TokenAlgorithm> {
    match s {
        "ES256" => Some(TokenAlgorithm::ES256),
        "EdDSA" => Some(TokenAlgorithm::EdDSA),
        _ => None,
    }
}

impl Tokens {
    pub fn new(config: &Config, db: Db, clock: Arc<dyn Clock>) -> anyhow::Result<Tokens> {
        let (enc, key_source) = resolve_encryption_key(config)?;
        Ok(Tokens {
            cfg: config.tokens.clone(),
            enc,
            key_source,
            db,
            clock,
            ring: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
            signers: Mutex::new(HashMap::new()),
            cache: TokenCache::new(),
            signed: AtomicU64::new(0),
        })
    }

    /// Tokens signed by this process (the cache's misses).
    pub fn signed_count(&self) -> u64 {
        self.signed.load(Ordering::Relaxed)
    }

    fn refresh_period(&self) -> Duration {
        Duration::seconds(i64::try_from(self.cfg.key_refresh_secs.max(1)).unwrap_or(3600))
    }

    /// A signing lease outlives a few refreshes, so a slow database does not
    /// stop signing.
    fn lease(&self) -> Duration {
        self.refresh_period() * 3
    }

    fn offline(&self) -> Duration {
        Duration::seconds(i64::try_from(self.cfg.offline_secs).unwrap_or(i64::MAX / 2))
    }

    fn loaded(&self) -> Option<Arc<Keyring>> {
        self.ring.read().expect("keyring").clone()
    }

    async fn keyring(&self) -> AppResult<Arc<Keyring>> {
        let fresh = |r: &Option<Arc<Keyring>>| {
            r.as_ref()
                .filter(|r| self.clock.now() < r.next_refresh)
                .cloned()
        };
        if let Some(r) = fresh(&self.loaded()) {
            return Ok(r);
        }
        let _one = self.refresh.lock().await;
        if let Some(r) = fresh(&self.loaded()) {
            return Ok(r);
        }
        match self.load().await {
            Ok(r) => {
                *self.ring.write().expect("keyring") = Some(r.clone());
                Ok(r)
            }
            Err(e) => match self.loaded() {
                Some(r) if self.clock.now() < r.sign_until => {
                    tracing::warn!(
                        error = e.for_log(),
                        "signing keys not refreshed; still leased"
                    );
                    Ok(r)
                }
                _ => Err(e),
            },
        }
    }

    /// Loads (on first start creates) the keys; fails when the configured
    /// encryption key does not open them.
    pub async fn start(&self) -> AppResult<()> {
        let _one = self.refresh.lock().await;
        let r = self.load().await?;
        *self.ring.write().expect("keyring") = Some(r);
        Ok(())
    }

    fn signer(&self, row: &signing_keys::Model) -> AppResult<Arc<Signer>> {
        if let Some(s) = self.signers.lock().expect("signers").get(&row.kid) {
            return Ok(s.clone());
        }
        let alg = parse_alg(&row.algorithm).ok_or_else(|| {
            AppError::Internal(anyhow::anyhow!(
                "signing key {} has unknown algorithm {}",
                row.kid,
                row.algorithm
            ))
        })?;
        let secret = self.enc.open(&row.kid, &row.private_key).ok_or_else(|| {
            AppError::Internal(anyhow::anyhow!(
                "signing key {} cannot be decrypted: tokens.encryption_key is not the key it was stored with",
                row.kid
            ))
        })?;
        let signer = Signer::from_secret(alg, &secret)
            .ok()
            .filter(|s| s.kid == row.kid)
            .ok_or_else(|| {
                AppError::Internal(anyhow::anyhow!(
                    "signing key {} does not match its id",
                    row.kid
                ))
            })?;
        let signer = Arc::new(signer);
        self.signers
            .lock()
            .expect("signers")
            .insert(row.kid.clone(), signer.clone());
        Ok(signer)
    }

    fn new_row(&self, alg: TokenAlgorithm, active_from: DateTime<Utc>) -> signing_keys::Model {
        let signer = Signer::generate(alg);
        let sealed = self.enc.seal(&signer.kid, &signer.secret());
        signing_keys::Model {
            kid: signer.kid.clone(),
            algorithm: alg.as_str().into(),
            public_jwk: signer.public_jwk().to_string(),
            private_key: sealed,
            created_at: active_from,
            retired_at: None,
            verify_until: None,
        }
    }

    /// Adds a key and retires the others from the instant it takes over.
    async fn insert_key(
        &self,
        alg: TokenAlgorithm,
        active_from: DateTime<Utc>,
    ) -> AppResult<signing_keys::Model> {
        let row = self.new_row(alg, active_from);
        let txn = self.db.write().await?;
        let kid = row.kid.clone();
        db::signing_key::retire_all_from(&*txn, active_from).await?;
        db::signing_key::insert(&*txn, row).await?;
        let model = db::signing_key::find(&*txn, &kid)
            .await?
            .ok_or_else(|| AppError::Internal(anyhow::anyhow!("signing key vanished")))?;
        txn.commit().await?;
        Ok(model)
    }

    /// A key that signs from now, unless another process made one since
    /// the caller looked: the check and the insert hold the lock that
    /// serialises every first key.
    async fn create_first_key(&self) -> AppResult<()> {
        let txn = self.db.write().await?;
        db::signing_key::lock(&*txn).await?;
        // Taken once the lock is held: a key another process committed
        // before that was made at an earlier instant, so it signs by now.
        let now = self.clock.now();
        let rows = db::signing_key::all(&*txn).await?;
        if !rows.iter().any(|k| signs_at(k, now)) {
            db::signing_key::retire_all_from(&*txn, now).await?;
            db::signing_key::insert(&*txn, self.new_row(self.cfg.algorithm, now)).await?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// `entitle signing-key rotate`: a new key, published now and current
    /// one refresh period from now (every replica has re-read the keys by
    /// then); the current key signs until that instant.
    pub async fn rotate(&self, alg: Option<TokenAlgorithm>) -> AppResult<signing_keys::Model> {
        let active_from = self.clock.now() + self.refresh_period();
        let model = self
            .insert_key(alg.unwrap_or(self.cfg.algorithm), active_from)
            .await?;
        let _one = self.refresh.lock().await;
        let r = self.load().await?;
        *self.ring.write().expect("keyring") = Some(r);
        Ok(model)
    }

    pub async fn list(&self) -> AppResult<Vec<KeyInfo>> {
        let mut rows = db::signing_key::all(&self.db.conn).await?;
        rows.sort_by_key(|r| r.created_at);
        Ok(rows.iter().map(KeyInfo::from).collect())
    }

    async fn load(&self) -> AppResult<Arc<Keyring>> {
        for _ in 0..4 {
            let now = self.clock.now();
            let rows = db::signing_key::all(&self.db.conn).await?;
            let signs_at = |k: &signing_keys::Model| signs_at(k, now);
            let Some(current) = rows
                .iter()
                .filter(|k| signs_at(k))
                .max_by(|a, b| (a.created_at, &a.kid).cmp(&(b.created_at, &b.kid)))
                .cloned()
            else {
                self.create_first_key().await?;
                continue;
            };
            // Two replicas that created a first key at once: the newer wins,
            // the other stops signing (its tokens stay verifiable).
            let losers: Vec<String> = rows
                .iter()
                .filter(|k| signs_at(k) && k.kid != current.kid && k.retired_at.is_none())
                .map(|k| k.kid.clone())
                .collect();
            if !losers.is_empty() {
                let txn = self.db.write().await?;
                db::signing_key::retire(&*txn, losers, now).await?;
                txn.commit().await?;
                continue;
            }
            let next_key = rows.iter().map(|k| k.created_at).filter(|t| *t > now).min();
            let sign_until = [Some(now + self.lease()), next_key, current.retired_at]
                .into_iter()
                .flatten()
                .min()
                .expect("lease end is always there");
            // Whole seconds: `exp` is `iat` (rounded down) plus offline_secs.
            let verify_until = sign_until + self.offline() + Duration::seconds(1);
            if current.verify_until.is_none_or(|v| v < verify_until) {
                let txn = self.db.write().await?;
                let extended =
                    db::signing_key::extend_verify_until(&*txn, &current.kid, now, verify_until)
                        .await?;
                txn.commit().await?;
                if extended == 0 {
                    // Retired meanwhile (a longer lease by another replica
                    // counts as extended): read again and decide on what is
                    // there.
                    continue;
                }
            }
            let signer = self.signer(&current)?;
            let published: Vec<&signing_keys::Model> = rows
                .iter()
                .filter(|k| {
                    k.retired_at.is_none_or(|r| r > now) || k.verify_until.is_some_and(|v| v > now)
                })
                .collect();
            let mut keys: Vec<Value> = Vec::with_capacity(published.len());
            let mut kids = Vec::with_capacity(published.len());
            for k in &published {
                let jwk: Value = serde_json::from_str(&k.public_jwk).map_err(|e| {
                    AppError::Internal(anyhow::anyhow!("signing key {}: bad JWK: {e}", k.kid))
                })?;
                kids.push(k.kid.clone());
                keys.push(jwk);
            }
            // Something changes in the JWKS at each of these instants.
            let changes = published.iter().flat_map(|k| {
                [
                    Some(k.created_at),
                    k.retired_at,
                    k.verify_until.filter(|_| k.retired_at.is_some()),
                ]
            });
            let next_refresh = changes
                .flatten()
                .filter(|t| *t > now)
                .chain([now + self.refresh_period(), sign_until])
                .min()
                .expect("refresh period is always there");
            return Ok(Arc::new(Keyring {
                current: signer,
                jwks: Arc::from(json!({ "keys": keys }).to_string()),
                kids,
                sign_until,
                next_refresh,
            }));
        }
        Err(AppError::Internal(anyhow::anyhow!(
            "signing keys kept changing while being read"
        )))
    }

    /// The JWKS document as served now.
    pub async fn jwks(&self) -> AppResult<Arc<str>> {
        Ok(self.keyring().await?.jwks.clone())
    }

    /// Ids in the JWKS served now, and the current one.
    pub async fn published_kids(&self) -> AppResult<(Vec<String>, String)> {
        let r = self.keyring().await?;
        Ok((r.kids.clone(), r.current.kid.clone()))
    }

    /// The customer's entitlement token for `snapshot` (its state now):
    /// the cached one while the state, the time bucket and the key are the
    /// same, else a freshly signed one.
    pub async fn entitlement_token(
        &self,
        customer_id: &str,
        device_id: Option<&str>,
        snapshot: &Snapshot,
    ) -> AppResult<String> {
        let ring = self.keyring().await?;
        let now = self.clock.now();
        let state = TokenState::of(snapshot);
        let fingerprint = state.fingerprint();
        let bucket = i64::try_from(self.cfg.cache_secs)
            .ok()
            .filter(|s| *s > 0)
            .map(|s| now.timestamp().div_euclid(s));
        let key = match device_id {
            Some(d) => format!("{customer_id}\0{d}"),
            None => customer_id.to_string(),
        };
        if let Some(b) = bucket
            && let Some(c) = self.cache.get(&key)
            && c.fingerprint == fingerprint
            && c.bucket == b
            && c.kid == ring.current.kid
        {
            return Ok(c.token.to_string());
        }
        let claims = state.claims(
            &self.cfg.issuer,
            &self.cfg.audience,
            customer_id,
            device_id,
            now,
            self.cfg.offline_secs,
        );
        let payload = serde_json::to_vec(&claims).map_err(|e| AppError::Internal(e.into()))?;
        let token: Arc<str> = Arc::from(ring.current.compact("JWT", &payload));
        self.signed.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = bucket {
            self.cache.put(
                key,
                CachedToken {
                    fingerprint,
                    bucket: b,
                    kid: ring.current.kid.clone(),
                    token: token.clone(),
                },
            );
        }
        Ok(token.to_string())
    }

    /// `X-Entitle-Signature` for an answer: a detached JWS whose payload is
    /// `nonce LF path LF body` (see the README).
    pub async fn sign_answer(&self, nonce: &str, path: &str, body: &[u8]) -> AppResult<String> {
        let ring = self.keyring().await?;
        let mut payload = Vec::with_capacity(nonce.len() + path.len() + body.len() + 2);
        payload.extend_from_slice(nonce.as_bytes());
        payload.push(b'\n');
        payload.extend_from_slice(path.as_bytes());
        payload.push(b'\n');
        payload.extend_from_slice(body);
        Ok(ring.current.detached(ANSWER_TYP, &payload))
    }
}

/// Checks an `X-Entitle-Nonce`: 16 to 64 characters a client can put in a
/// header and that cannot be confused with the separators of the signed input.
pub fn check_nonce(nonce: &str) -> AppResult<()> {
    let ok_len = (16..=64).contains(&nonce.len());
    let ok_chars = nonce
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=".contains(&b));
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(AppError::bad_input(
            "X-Entitle-Nonce must be 16 to 64 characters of A-Z a-z 0-9 - _ . ~ + / =",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> EncryptionKey {
        parse_encryption_key(&Secret::new(s)).unwrap()
    }

    #[test]
    fn encryption_keys_parse_from_base64_or_hex_and_errors_hide_the_value() {
        let b = STANDARD.encode([7u8; 32]);
        assert_eq!(*key(&b).0, [7u8; 32]);
        assert_eq!(*key(&hex::encode([9u8; 32])).0, [9u8; 32]);
        let short = STANDARD.encode([1u8; 16]);
        let err = parse_encryption_key(&Secret::new(&short)).unwrap_err();
        assert!(!err.contains(&short));
        assert!(parse_encryption_key(&Secret::new("not base64 at all!")).is_err());
        assert_eq!(format!("{:?}", key(&b)), "EncryptionKey(<redacted>)");
    }

    #[test]
    fn sealed_keys_open_only_with_the_same_key_and_id() {
        let k = key(&STANDARD.encode([3u8; 32]));
        let sealed = k.seal("kid1", b"secret scalar bytes............!");
        assert!(!sealed.contains("secret"));
        assert_eq!(
            k.open("kid1", &sealed).unwrap().as_slice(),
            b"secret scalar bytes............!"
        );
        assert!(k.open("kid2", &sealed).is_none(), "bound to its id");
        let other = key(&STANDARD.encode([4u8; 32]));
        assert!(other.open("kid1", &sealed).is_none());
    }

    fn verify(signer: &Signer, jws: &str) -> bool {
        let (input, sig) = jws.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        let jwk = signer.public_jwk();
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        match signer.alg {
            TokenAlgorithm::ES256 => {
                use p256::ecdsa::signature::Verifier as _;
                let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
                let mut sec1 = vec![4u8];
                sec1.extend(x);
                sec1.extend(y);
                let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).unwrap();
                let sig = p256::ecdsa::Signature::from_slice(&sig).unwrap();
                vk.verify(input.as_bytes(), &sig).is_ok()
            }
            TokenAlgorithm::EdDSA => {
                let vk = ed25519_dalek::VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap();
                let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
                vk.verify_strict(input.as_bytes(), &sig).is_ok()
            }
        }
    }

    #[test]
    fn both_algorithms_sign_what_their_published_jwk_verifies() {
        for alg in [TokenAlgorithm::ES256, TokenAlgorithm::EdDSA] {
            let s = Signer::generate(alg);
            let jwk = s.public_jwk();
            assert_eq!(jwk["kid"], s.kid);
            assert_eq!(jwk["alg"], alg.as_str());
            assert!(jwk.get("d").is_none(), "no private member");
            let token = s.compact("JWT", br#"{"sub":"a"}"#);
            assert!(verify(&s, &token), "{alg:?}");
            let tampered = token.replacen('.', ".e30", 1);
            assert!(!verify(&s, &tampered));
            // Detached: the payload is put back by the verifier.
            let det = s.detached(ANSWER_TYP, b"n\n/p\nbody");
            let (h, sig) = det.split_once("..").unwrap();
            assert!(verify(&s, &format!("{h}.{}.{sig}", b64(b"n\n/p\nbody"))));
            assert!(!verify(&s, &format!("{h}.{}.{sig}", b64(b"n\n/p\nbodz"))));
            // The key survives the round trip through its stored secret.
            let again = Signer::from_secret(alg, &s.secret()).unwrap();
            assert_eq!(again.kid, s.kid);
            let dbg = format!("{s:?}");
            let secret_hex = hex::encode(s.secret().as_slice());
            assert!(!dbg.contains(&secret_hex) && !dbg.contains(&b64(&s.secret())));
        }
    }

    #[test]
    fn thumbprint_matches_rfc7638() {
        // RFC 7638 section 3.1 is RSA; for EC the canonical form is
        // {"crv","kty","x","y"} with no whitespace, hashed with SHA-256.
        let s = Signer::generate(TokenAlgorithm::ES256);
        let jwk = s.public_jwk();
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            jwk["x"].as_str().unwrap(),
            jwk["y"].as_str().unwrap()
        );
        assert_eq!(s.kid, b64(&Sha256::digest(canonical)));
    }

    #[test]
    fn nonces_are_bounded() {
        assert!(check_nonce(&"a".repeat(16)).is_ok());
        assert!(check_nonce(&"a".repeat(64)).is_ok());
        assert!(check_nonce(&"a".repeat(15)).is_err());
        assert!(check_nonce(&"a".repeat(65)).is_err());
        assert!(check_nonce("0123456789abcdef\n").is_err());
        assert!(check_nonce("0123456789 abcdef").is_err());
        assert!(check_nonce("dGhpcyBpcyBhIG5vbmNl+/=").is_ok());
    }

    #[test]
    fn sqlite_files_are_found_in_urls() {
        assert_eq!(
            sqlite_file("sqlite://data/e.db?mode=rwc"),
            Some(PathBuf::from("data/e.db"))
        );
        assert_eq!(sqlite_file("sqlite:e.db"), Some(PathBuf::from("e.db")));
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("sqlite://x.db?mode=memory"), None);
        assert_eq!(sqlite_file("postgres://h/db"), None);
    }

    /// Replicas started together on a fresh database each create a first
    /// key, retire the others' and lease the survivor at once; every one
    /// comes up signing with a key that all of them publish.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_loading_keys_together_all_come_up_on_one_key() {
        const REPLICAS: usize = 8;
        let dir = tempfile::tempdir().unwrap();
        for url in crate::db::fresh_test_database_urls(dir.path()).await {
            let mut config = Config::default();
            config.database_url = Secret::new(url);
            config.database_max_connections = Some(2);
            config.tokens.encryption_key = Some(Secret::new(STANDARD.encode([5u8; 32])));
            Db::migrate_only(&config).await.unwrap();
            let mut replicas = Vec::new();
            for _ in 0..REPLICAS {
                let db = Db::connect_only(&config).await.unwrap();
                let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
                replicas.push(Arc::new(Tokens::new(&config, db, clock).unwrap()));
            }
            let start = Arc::new(tokio::sync::Barrier::new(REPLICAS));
            let loads: Vec<_> = replicas
                .iter()
                .map(|t| {
                    let (t, start) = (t.clone(), start.clone());
                    tokio::spawn(async move {
                        start.wait().await;
                        t.load().await
                    })
                })
                .collect();
            let mut first = Vec::new();
            for l in loads {
                let ring = l.await.unwrap().unwrap_or_else(|e| panic!("{e:?}"));
                first.push(ring.current.kid.clone());
            }
            // Read again once all are up: one key signs, and every key any
            // replica came up with is still published.
            let mut current = Vec::new();
            for t in &replicas {
                let ring = t.load().await.unwrap();
                for kid in &first {
                    assert!(ring.kids.contains(kid), "{kid} is no longer published");
                }
                current.push(ring.current.kid.clone());
            }
            current.dedup();
            assert_eq!(current.len(), 1, "replicas sign with different keys");
            let keys = db::signing_key::all(&replicas[0].db.conn).await.unwrap();
            assert_eq!(keys.len(), 1, "each replica made a first key of its own");
        }
    }
}
