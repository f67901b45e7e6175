//! API keys: random, shown once, stored as SHA-256 only, compared in
//! constant time.

use entities::api_keys;
use rand::RngCore;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, Condition, EntityTrait, IntoActiveModel,
    QueryFilter,
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Core;
use crate::{
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

impl Core {
    pub async fn create_api_key(&self, name: &str, role: ApiKeyRole) -> AppResult<CreatedKey> {
        if name.trim().is_empty() || name.len() > 256 {
            return Err(AppError::bad_input("name must be 1 to 256 bytes"));
        }
        let key = format!("{KEY_PREFIX}{}", random_hex(32));
        let prefix = key[..PREFIX_LEN].to_string();
        let id = format!("key_{}", random_hex(8));
        api_keys::ActiveModel {
            id: Set(id.clone()),
            name: Set(name.to_string()),
            role: Set(role.as_str().into()),
            prefix: Set(prefix.clone()),
            hash: Set(hash_key(&key)),
            created_at: Set(self.now()),
            revoked_at: Set(None),
        }
        .insert(&self.db.conn)
        .await?;
        Ok(CreatedKey { id, key, prefix })
    }

    /// Revokes by id or prefix; revoking twice is not an error.
    pub async fn revoke_api_key(&self, id_or_prefix: &str) -> AppResult<api_keys::Model> {
        let row = api_keys::Entity::find()
            .filter(
                Condition::any()
                    .add(api_keys::Column::Id.eq(id_or_prefix))
                    .add(api_keys::Column::Prefix.eq(id_or_prefix)),
            )
            .one(&self.db.conn)
            .await?
            .ok_or(AppError::NotFound("api key"))?;
        if row.revoked_at.is_some() {
            return Ok(row);
        }
        let mut am = row.into_active_model();
        am.revoked_at = Set(Some(self.now()));
        Ok(am.update(&self.db.conn).await?)
    }

    /// The key's identity, or `None` for an unknown, malformed or revoked key.
    pub async fn lookup_api_key(&self, key: &str) -> AppResult<Option<(KeyIdentity, String)>> {
        let Some(prefix) = key_prefix(key) else {
            return Ok(None);
        };
        let Some(row) = api_keys::Entity::find()
            .filter(api_keys::Column::Prefix.eq(prefix))
            .one(&self.db.conn)
            .await?
        else {
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
