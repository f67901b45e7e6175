//! The audit trail of purchase submissions (`receipts`).

use chrono::{DateTime, Utc};
use entities::receipts;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, sea_query::Expr,
};

use crate::error::AppResult;

/// A customer's submissions not (or not successfully) verified, as
/// (id, outcome), newest first.
pub async fn unverified_of(
    c: &impl ConnectionTrait,
    customer_id: &str,
) -> AppResult<Vec<(i64, String)>> {
    Ok(receipts::Entity::find()
        .select_only()
        .column(receipts::Column::Id)
        .column(receipts::Column::Outcome)
        .filter(receipts::Column::CustomerId.eq(customer_id))
        .filter(receipts::Column::Outcome.is_in(["pending", "invalid"]))
        .order_by_desc(receipts::Column::Id)
        .into_tuple()
        .all(c)
        .await?)
}

pub async fn delete(c: &impl ConnectionTrait, ids: Vec<i64>) -> AppResult<()> {
    receipts::Entity::delete_many()
        .filter(receipts::Column::Id.is_in(ids))
        .exec(c)
        .await?;
    Ok(())
}

/// Stores a submission awaiting verification; returns its id.
pub async fn insert_pending(
    c: &impl ConnectionTrait,
    customer_id: String,
    store: &str,
    payload: serde_json::Value,
    received_at: DateTime<Utc>,
) -> AppResult<i64> {
    let row = receipts::ActiveModel {
        customer_id: Set(customer_id),
        store: Set(store.into()),
        payload: Set(payload),
        received_at: Set(received_at),
        outcome: Set("pending".into()),
        error: Set(None),
        purchase_id: Set(None),
        ..Default::default()
    }
    .insert(c)
    .await?;
    Ok(row.id)
}

pub async fn find(c: &impl ConnectionTrait, id: i64) -> AppResult<Option<receipts::Model>> {
    Ok(receipts::Entity::find_by_id(id).one(c).await?)
}

/// Replaces the stored copy of a submission.
pub async fn replace_payload(
    c: &impl ConnectionTrait,
    id: i64,
    payload: serde_json::Value,
) -> AppResult<()> {
    receipts::ActiveModel {
        id: Set(id),
        payload: Set(payload),
        ..Default::default()
    }
    .update(c)
    .await?;
    Ok(())
}

/// Records how a submission's verification ended.
pub async fn finish(
    c: &impl ConnectionTrait,
    id: i64,
    outcome: &str,
    error: Option<String>,
    purchase_id: Option<i64>,
) -> AppResult<()> {
    receipts::ActiveModel {
        id: Set(id),
        outcome: Set(outcome.into()),
        error: Set(error),
        purchase_id: Set(purchase_id),
        ..Default::default()
    }
    .update(c)
    .await?;
    Ok(())
}

/// Gives every submission of `from` to `into`.
pub async fn move_all(c: &impl ConnectionTrait, from: &str, into: &str) -> AppResult<()> {
    receipts::Entity::update_many()
        .col_expr(receipts::Column::CustomerId, Expr::value(into))
        .filter(receipts::Column::CustomerId.eq(from))
        .exec(c)
        .await?;
    Ok(())
}
