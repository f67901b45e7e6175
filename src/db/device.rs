//! Device rows and the pairing codes a device hands out (`pairing_codes`).

use chrono::{DateTime, Utc};
use entities::{devices, pairing_codes};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    QueryFilter, TryInsertResult, sea_query::Expr,
};

use crate::error::AppResult;

/// A device at its first sight.
#[derive(Clone, Debug)]
pub struct NewDevice<'a> {
    pub platform: &'a str,
    pub device_id: &'a str,
    pub customer_id: &'a str,
    pub seen_at: DateTime<Utc>,
    pub secret_hash: Option<String>,
}

/// Writes the device's row unless it exists; `true` when this call wrote it.
pub async fn insert_if_new(c: &impl ConnectionTrait, d: NewDevice<'_>) -> AppResult<bool> {
    let res = devices::Entity::insert(devices::ActiveModel {
        platform: Set(d.platform.to_string()),
        device_id: Set(d.device_id.to_string()),
        customer_id: Set(d.customer_id.to_string()),
        first_seen_at: Set(d.seen_at),
        last_seen_at: Set(d.seen_at),
        secret_hash: Set(d.secret_hash),
        ..Default::default()
    })
    .on_conflict_do_nothing_on([devices::Column::Platform, devices::Column::DeviceId])
    .exec_without_returning(c)
    .await?;
    Ok(matches!(res, TryInsertResult::Inserted(n) if n > 0))
}

/// Moves a device's check-in time forward to `at` (never back); returns
/// the rows written.
pub async fn advance_last_seen(
    c: &impl ConnectionTrait,
    device_row: i64,
    at: DateTime<Utc>,
) -> AppResult<u64> {
    let r = devices::Entity::update_many()
        .col_expr(devices::Column::LastSeenAt, Expr::value(at))
        .filter(devices::Column::Id.eq(device_row))
        .filter(devices::Column::LastSeenAt.lt(at))
        .exec(c)
        .await?;
    Ok(r.rows_affected)
}

/// A check-in that writes the row: its time, and the customer it moves to.
pub async fn check_in(
    c: &impl ConnectionTrait,
    device: devices::Model,
    at: DateTime<Utc>,
    move_to: Option<String>,
) -> AppResult<devices::Model> {
    let mut am = device.into_active_model();
    am.last_seen_at = Set(at);
    if let Some(customer) = move_to {
        am.customer_id = Set(customer);
    }
    Ok(am.update(c).await?)
}

/// Stores a device's secret (as its hash) unless it has one; `true` when
/// this call stored it.
pub async fn set_secret_if_missing(
    c: &impl ConnectionTrait,
    device_row: i64,
    secret_hash: String,
) -> AppResult<bool> {
    let res = devices::Entity::update_many()
        .col_expr(devices::Column::SecretHash, Expr::value(secret_hash))
        .filter(devices::Column::Id.eq(device_row))
        .filter(devices::Column::SecretHash.is_null())
        .exec(c)
        .await?;
    Ok(res.rows_affected == 1)
}

/// Gives every device of `from` to `into`.
pub async fn move_all(c: &impl ConnectionTrait, from: &str, into: &str) -> AppResult<()> {
    devices::Entity::update_many()
        .col_expr(devices::Column::CustomerId, Expr::value(into))
        .filter(devices::Column::CustomerId.eq(from))
        .exec(c)
        .await?;
    Ok(())
}

/// Drops every pairing code of a device.
pub async fn drop_pairing_codes(
    c: &impl ConnectionTrait,
    platform: &str,
    device_id: &str,
) -> AppResult<()> {
    pairing_codes::Entity::delete_many()
        .filter(pairing_codes::Column::Platform.eq(platform))
        .filter(pairing_codes::Column::DeviceId.eq(device_id))
        .exec(c)
        .await?;
    Ok(())
}

/// Stores a new, unused pairing code (as its hash).
pub async fn add_pairing_code(
    c: &impl ConnectionTrait,
    code_hash: String,
    device: &devices::Model,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> AppResult<()> {
    pairing_codes::ActiveModel {
        code_hash: Set(code_hash),
        platform: Set(device.platform.clone()),
        device_id: Set(device.device_id.clone()),
        created_at: Set(created_at),
        expires_at: Set(expires_at),
        used_at: Set(None),
    }
    .insert(c)
    .await?;
    Ok(())
}

pub async fn find_pairing_code(
    c: &impl ConnectionTrait,
    code_hash: &str,
) -> AppResult<Option<pairing_codes::Model>> {
    Ok(pairing_codes::Entity::find_by_id(code_hash.to_string())
        .one(c)
        .await?)
}

/// Marks a pairing code used unless it was; `true` when this call did.
pub async fn use_pairing_code(
    c: &impl ConnectionTrait,
    code_hash: &str,
    at: DateTime<Utc>,
) -> AppResult<bool> {
    let used = pairing_codes::Entity::update_many()
        .col_expr(pairing_codes::Column::UsedAt, Expr::value(at))
        .filter(pairing_codes::Column::CodeHash.eq(code_hash))
        .filter(pairing_codes::Column::UsedAt.is_null())
        .exec(c)
        .await?;
    Ok(used.rows_affected == 1)
}
