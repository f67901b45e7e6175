//! API keys: random, shown once, stored as SHA-256 only, compared in
//! constant time.

use std::sync::Arc;

use entities::api_keys;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    clock::Clock,
    db::{self, Db},
    domain::ApiKeyRole,
    error::{AppError, AppResult},
};

/// Characters of the key kept in clear to find its row; the rest is secret.
const PREFIX_LEN: usize = 12;
const KEY_PREFIX: &str = "ent_";

pub struct CreatedKey {
    pub id: String,
    /// The only time the key exists outside its holder's hands.
    pub key: String,
    pub prefix: String,
}

#[derive(Clone, Debug)]
pub struct KeyIdentity {
    pub id: String,
    pub role: ApiKeyRole,
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

pub fn key_prefix(key: &str) -> Option<&str> {
    (key.starts_with(KEY_PREFIX) && key.len() > PREFIX_LEN && key.is_ascii())
        .then(|| &key[..PREFIX_LEN])
}

/// Creating, revoking and recognising API keys: a table of their own, so
/// only the database and the clock.
pub struct ApiKeys {
    db: Db,
    clock: Arc<dyn Clock>,
}

impl ApiKeys {
    pub(super) fn new(db: Db, clock: Arc<dyn Clock>) -> ApiKeys {
        ApiKeys { db, clock }
    }

    pub async fn create_api_key(&self, name: &str, role: ApiKeyRole) -> AppResult<CreatedKey> {
        if name.trim().is_empty() || name.len() > 256 {
            return Err(AppError::bad_input("name must be 1 to 256 bytes"));
        }
        let key = format!("{KEY_PREFIX}{}", random_hex(32));
        let prefix = key[..PREFIX_LEN].to_string();
        let id = format!("key_{}", random_hex(8));
        let row = api_keys::Model {
            id: id.clone(),
            name: name.to_string(),
            role: role.as_str().into(),
            prefix: prefix.clone(),
            hash: hash_key(&key),
            created_at: self.clock.now(),
            revoked_at: None,
        };
        db::api_key::insert(&self.db.conn, row).await?;
        Ok(CreatedKey { id, key, prefix })
    }

    /// Revokes by id or prefix; revoking twice is not an error.
    pub async fn revoke_api_key(&self, id_or_prefix: &str) -> AppResult<api_keys::Model> {
        let row = db::api_key::find_by_id_or_prefix(&self.db.conn, id_or_prefix)
            .await?
            .ok_or(AppError::NotFound("api key"))?;
        if row.revoked_at.is_some() {
            return Ok(row);
        }
        db::api_key::mark_revoked(&self.db.conn, row, self.clock.now()).await
    }

    /// The key's identity, or `None` for an unknown, malformed or revoked key.
    pub async fn lookup_api_key(&self, key: &str) -> AppResult<Option<(KeyIdentity, String)>> {
        let Some(prefix) = key_prefix(key) else {
            return Ok(None);
        };
        let Some(row) = db::api_key::find_by_prefix(&self.db.conn, prefix).await? else {
            return Ok(None);
        };
        let presented = hash_key(key);
        if !bool::from(presented.as_bytes().ct_eq(row.hash.as_bytes())) || row.revoked_at.is_some()
        {
            return Ok(None);
        }
        let role = row
            .role
            .parse()
            .map_err(|e| AppError::Internal(anyhow::anyhow!("api key {}: {e}", row.id)))?;
        Ok(Some((KeyIdentity { id: row.id, role }, presented)))
    }
}
