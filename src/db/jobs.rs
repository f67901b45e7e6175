//! Queries of the background jobs: their leases and cursors, and what the
//! expiry sweep, the refresh scheduler and retention read and write.

use chrono::{DateTime, Utc};
use entities::{job_cursors, job_leases, purchase_checks, purchases, receipts, webhook_events};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::{Expr, ExprTrait, OnConflict, Query},
};

use crate::{
    domain::{PurchaseStatus, Store},
    error::AppResult,
};

/// Takes or renews the lease on `name` for `holder` until `until`; false
/// when another holder's lease is still live at `now`.
pub async fn try_take_lease(
    c: &impl ConnectionTrait,
    name: &str,
    holder: &str,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
) -> AppResult<bool> {
    job_leases::Entity::insert(job_leases::ActiveModel {
        name: Set(name.to_string()),
        holder: Set(String::new()),
        expires_at: Set(DateTime::<Utc>::UNIX_EPOCH),
    })
    .on_conflict_do_nothing_on([job_leases::Column::Name])
    .exec_without_returning(c)
    .await?;
    // One conditional UPDATE: PostgreSQL re-checks the condition against
    // a concurrent winner's row, SQLite has one writer; either way at
    // most one caller sees a row changed.
    let res = job_leases::Entity::update_many()
        .col_expr(job_leases::Column::Holder, Expr::value(holder.to_string()))
        .col_expr(job_leases::Column::ExpiresAt, Expr::value(until))
        .filter(job_leases::Column::Name.eq(name))
        .filter(
            Condition::any()
                .add(job_leases::Column::Holder.eq(holder.to_string()))
                .add(job_leases::Column::ExpiresAt.lt(now)),
        )
        .exec(c)
        .await?;
    Ok(res.rows_affected == 1)
}

/// Ends `holder`'s lease on `name` at once.
pub async fn release_lease(c: &impl ConnectionTrait, name: &str, holder: &str) -> AppResult<()> {
    job_leases::Entity::update_many()
        .col_expr(
            job_leases::Column::ExpiresAt,
            Expr::value(DateTime::<Utc>::UNIX_EPOCH),
        )
        .filter(job_leases::Column::Name.eq(name))
        .filter(job_leases::Column::Holder.eq(holder.to_string()))
        .exec(c)
        .await?;
    Ok(())
}

/// A job's saved position, `None` before its first run.
pub async fn read_cursor(c: &impl ConnectionTrait, name: &str) -> AppResult<Option<String>> {
    Ok(job_cursors::Entity::find_by_id(name.to_string())
        .one(c)
        .await?
        .map(|m| m.value))
}

pub async fn write_cursor(
    c: &impl ConnectionTrait,
    name: &str,
    value: &str,
    now: DateTime<Utc>,
) -> AppResult<()> {
    job_cursors::Entity::insert(job_cursors::ActiveModel {
        name: Set(name.to_string()),
        value: Set(value.to_string()),
        updated_at: Set(now),
    })
    .on_conflict(
        OnConflict::column(job_cursors::Column::Name)
            .update_columns([job_cursors::Column::Value, job_cursors::Column::UpdatedAt])
            .to_owned(),
    )
    .exec_without_returning(c)
    .await?;
    Ok(())
}

/// Customers with a purchase whose period, grace or revocation ended in
/// (`since`, `until`].
pub async fn customers_with_ends_between(
    c: &impl ConnectionTrait,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> AppResult<Vec<String>> {
    let ended_between = |col: purchases::Column| col.gt(since).and(col.lte(until));
    Ok(purchases::Entity::find()
        .select_only()
        .column(purchases::Column::CustomerId)
        .distinct()
        .filter(
            Condition::any()
                .add(ended_between(purchases::Column::ExpiresAt))
                .add(ended_between(purchases::Column::GraceExpiresAt))
                .add(ended_between(purchases::Column::RevokedAt)),
        )
        .into_tuple()
        .all(c)
        .await?)
}

/// Which purchases the refresh scheduler asks its store about.
pub struct RefreshDue<'a> {
    pub stores: &'a [Store],
    /// Statuses asked about while their period (or grace) ends in
    /// [`ends_from`, `ends_until`].
    pub by_period_end: &'a [PurchaseStatus],
    pub ends_from: DateTime<Utc>,
    pub ends_until: DateTime<Utc>,
    /// Statuses asked about while their period ended after `settle_from`.
    pub until_settled: &'a [PurchaseStatus],
    pub settle_from: DateTime<Utc>,
    /// Purchases checked after this are left alone.
    pub checked_since: DateTime<Utc>,
}

/// Purchases due for a re-read from their store, soonest period end first.
pub async fn due_for_refresh(
    c: &impl ConnectionTrait,
    due: &RefreshDue<'_>,
    limit: u64,
) -> AppResult<Vec<purchases::Model>> {
    let ends_in_window =
        |col: purchases::Column| col.gte(due.ends_from).and(col.lte(due.ends_until));
    let statuses = |s: &[PurchaseStatus]| s.iter().map(|s| s.as_str()).collect::<Vec<_>>();
    Ok(purchases::Entity::find()
        .filter(purchases::Column::Store.is_in(due.stores.iter().map(|s| s.as_str())))
        .filter(
            Condition::any()
                .add(
                    Condition::all()
                        .add(purchases::Column::Status.is_in(statuses(due.by_period_end)))
                        .add(
                            Condition::any()
                                .add(ends_in_window(purchases::Column::ExpiresAt))
                                .add(ends_in_window(purchases::Column::GraceExpiresAt)),
                        ),
                )
                .add(
                    Condition::all()
                        .add(purchases::Column::Status.is_in(statuses(due.until_settled)))
                        .add(purchases::Column::ExpiresAt.gte(due.settle_from)),
                ),
        )
        .filter(
            purchases::Column::Id.not_in_subquery(
                Query::select()
                    .column(purchase_checks::Column::PurchaseId)
                    .from(purchase_checks::Entity)
                    .and_where(purchase_checks::Column::CheckedAt.gt(due.checked_since))
                    .to_owned(),
            ),
        )
        .order_by_asc(purchases::Column::ExpiresAt)
        .limit(limit)
        .all(c)
        .await?)
}

/// Records when a purchase was last re-read and what came of it.
pub async fn record_check(
    c: &impl ConnectionTrait,
    purchase_id: i64,
    outcome: &str,
    now: DateTime<Utc>,
) -> AppResult<()> {
    purchase_checks::Entity::insert(purchase_checks::ActiveModel {
        purchase_id: Set(purchase_id),
        checked_at: Set(now),
        outcome: Set(outcome.chars().take(256).collect()),
    })
    .on_conflict(
        OnConflict::column(purchase_checks::Column::PurchaseId)
            .update_columns([
                purchase_checks::Column::CheckedAt,
                purchase_checks::Column::Outcome,
            ])
            .to_owned(),
    )
    .exec_without_returning(c)
    .await?;
    Ok(())
}

/// Deletes invalid and abandoned pending submissions received before
/// `cutoff`; returns how many.
pub async fn delete_unused_receipts(
    c: &impl ConnectionTrait,
    cutoff: DateTime<Utc>,
) -> AppResult<u64> {
    Ok(receipts::Entity::delete_many()
        .filter(receipts::Column::Outcome.is_in(["invalid", "pending"]))
        .filter(receipts::Column::ReceivedAt.lt(cutoff))
        .exec(c)
        .await?
        .rows_affected)
}

/// Replaces with `cleared` the payload of notifications processed before
/// `cutoff` (and, when given, not before `since`); returns how many.
pub async fn clear_webhook_payloads(
    c: &impl ConnectionTrait,
    cleared: serde_json::Value,
    since: Option<DateTime<Utc>>,
    cutoff: DateTime<Utc>,
) -> AppResult<u64> {
    let mut q = webhook_events::Entity::update_many()
        .col_expr(webhook_events::Column::Payload, Expr::value(cleared))
        .filter(webhook_events::Column::ProcessedAt.lt(cutoff));
    if let Some(since) = since {
        q = q.filter(webhook_events::Column::ProcessedAt.gte(since));
    }
    Ok(q.exec(c).await?.rows_affected)
}
