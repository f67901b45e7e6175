//! API key rows: the hash of each key, never the key.

use chrono::{DateTime, Utc};
use entities::api_keys;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait,
    IntoActiveModel, QueryFilter,
};

use crate::error::AppResult;

pub async fn insert(c: &impl ConnectionTrait, row: api_keys::Model) -> AppResult<()> {
    api_keys::ActiveModel {
        id: Set(row.id),
        name: Set(row.name),
        role: Set(row.role),
        prefix: Set(row.prefix),
        hash: Set(row.hash),
        created_at: Set(row.created_at),
        revoked_at: Set(row.revoked_at),
    }
    .insert(c)
    .await?;
    Ok(())
}

/// The key whose id or clear prefix is `id_or_prefix`.
pub async fn find_by_id_or_prefix(
    c: &impl ConnectionTrait,
    id_or_prefix: &str,
) -> AppResult<Option<api_keys::Model>> {
    Ok(api_keys::Entity::find()
        .filter(
            Condition::any()
                .add(api_keys::Column::Id.eq(id_or_prefix))
                .add(api_keys::Column::Prefix.eq(id_or_prefix)),
        )
        .one(c)
        .await?)
}

pub async fn find_by_prefix(
    c: &impl ConnectionTrait,
    prefix: &str,
) -> AppResult<Option<api_keys::Model>> {
    Ok(api_keys::Entity::find()
        .filter(api_keys::Column::Prefix.eq(prefix))
        .one(c)
        .await?)
}

pub async fn mark_revoked(
    c: &impl ConnectionTrait,
    row: api_keys::Model,
    at: DateTime<Utc>,
) -> AppResult<api_keys::Model> {
    let mut am = row.into_active_model();
    am.revoked_at = Set(Some(at));
    Ok(am.update(c).await?)
}
