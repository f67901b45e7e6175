//! Purchases kept aside until a customer here owns them (`held_purchases`).

use chrono::{DateTime, Utc};
use entities::held_purchases;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    QueryFilter,
};

use crate::error::AppResult;

/// What a held purchase stands at: the columns a newer store message updates.
#[derive(Clone, Debug)]
pub struct HeldState {
    pub bound_key: Option<String>,
    pub replaces: Option<String>,
    pub state: serde_json::Value,
    pub source_updated_at: DateTime<Utc>,
}

pub async fn find(
    c: &impl ConnectionTrait,
    store: &str,
    store_purchase_id: &str,
) -> AppResult<Option<held_purchases::Model>> {
    Ok(held_purchases::Entity::find()
        .filter(held_purchases::Column::Store.eq(store))
        .filter(held_purchases::Column::StorePurchaseId.eq(store_purchase_id))
        .one(c)
        .await?)
}

/// Held purchases whose binding is one of `keys`.
pub async fn bound_to_any(
    c: &impl ConnectionTrait,
    keys: Vec<String>,
) -> AppResult<Vec<held_purchases::Model>> {
    Ok(held_purchases::Entity::find()
        .filter(held_purchases::Column::BoundKey.is_in(keys))
        .all(c)
        .await?)
}

/// The held purchase that says it replaces `store_purchase_id`.
pub async fn successor_of(
    c: &impl ConnectionTrait,
    store: &str,
    store_purchase_id: &str,
) -> AppResult<Option<held_purchases::Model>> {
    Ok(held_purchases::Entity::find()
        .filter(held_purchases::Column::Store.eq(store))
        .filter(held_purchases::Column::Replaces.eq(store_purchase_id))
        .one(c)
        .await?)
}

pub async fn insert(
    c: &impl ConnectionTrait,
    store: &str,
    store_purchase_id: &str,
    s: HeldState,
    held_at: DateTime<Utc>,
) -> AppResult<()> {
    held_purchases::ActiveModel {
        store: Set(store.into()),
        store_purchase_id: Set(store_purchase_id.to_string()),
        bound_key: Set(s.bound_key),
        replaces: Set(s.replaces),
        state: Set(s.state),
        source_updated_at: Set(s.source_updated_at),
        held_at: Set(held_at),
        ..Default::default()
    }
    .insert(c)
    .await?;
    Ok(())
}

/// Replaces what a held purchase stands at.
pub async fn overwrite(
    c: &impl ConnectionTrait,
    row: held_purchases::Model,
    s: HeldState,
) -> AppResult<()> {
    let mut am = row.into_active_model();
    am.state = Set(s.state);
    am.bound_key = Set(s.bound_key);
    am.replaces = Set(s.replaces);
    am.source_updated_at = Set(s.source_updated_at);
    am.update(c).await?;
    Ok(())
}

/// Lets go of a held purchase (it has an owner now, or was superseded).
pub async fn release(c: &impl ConnectionTrait, id: i64) -> AppResult<()> {
    held_purchases::Entity::delete_by_id(id).exec(c).await?;
    Ok(())
}

/// Lets go of the held purchase a store id names, if any.
pub async fn release_store_id(
    c: &impl ConnectionTrait,
    store: &str,
    store_purchase_id: &str,
) -> AppResult<()> {
    held_purchases::Entity::delete_many()
        .filter(held_purchases::Column::Store.eq(store))
        .filter(held_purchases::Column::StorePurchaseId.eq(store_purchase_id))
        .exec(c)
        .await?;
    Ok(())
}
