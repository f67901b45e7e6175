//! Claiming a store notification in the webhook log (`webhook_events`), so
//! each is applied once.

use chrono::{DateTime, Utc};
use entities::webhook_events;
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryTrait,
    sea_query::{Expr, OnConflict},
};

use crate::{domain::webhook_log::WebhookOutcome, error::AppResult};

/// One notification's row as its delivery writes it.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    pub source: &'a str,
    pub event_id: &'a str,
    pub payload: &'a serde_json::Value,
    pub outcome: &'a str,
    pub customer_id: Option<&'a str>,
    pub at: DateTime<Utc>,
}

/// Writes the row unless one exists for the notification; `true` when
/// this call wrote it.
pub async fn insert_new(txn: &crate::db::WriteTxn, claim: Claim<'_>) -> AppResult<bool> {
    let mut stmt = webhook_events::Entity::insert(webhook_events::ActiveModel {
        source: Set(claim.source.into()),
        event_id: Set(claim.event_id.to_string()),
        received_at: Set(claim.at),
        payload: Set(claim.payload.clone()),
        outcome: Set(claim.outcome.to_string()),
        processed_at: Set(Some(claim.at)),
        customer_id: Set(claim.customer_id.map(str::to_string)),
        ..Default::default()
    })
    .on_conflict(
        OnConflict::columns([
            webhook_events::Column::Source,
            webhook_events::Column::EventId,
        ])
        .do_nothing()
        .to_owned(),
    )
    .build(txn.get_database_backend());
    // A row back is the claim made; none, the notification's row was there.
    // Sent with the change-log rows the claimed work deferred: a claim is
    // the last statement of a notification's work but for its commit.
    stmt.sql.push_str(r#" RETURNING "id""#);
    Ok(!txn.query_after_deferred(stmt).await?.is_empty())
}

/// Takes over the row of the notification when its earlier delivery
/// failed; `true` when it did. Conditional, so only one delivery does.
pub async fn take_over_failed(c: &impl ConnectionTrait, claim: Claim<'_>) -> AppResult<bool> {
    let mut q = webhook_events::Entity::update_many();
    if let Some(customer) = claim.customer_id {
        q = q.col_expr(webhook_events::Column::CustomerId, Expr::value(customer));
    }
    let res = q
        .col_expr(webhook_events::Column::Outcome, Expr::value(claim.outcome))
        .col_expr(
            webhook_events::Column::Payload,
            Expr::value(claim.payload.clone()),
        )
        .col_expr(webhook_events::Column::ProcessedAt, Expr::value(claim.at))
        .col_expr(
            webhook_events::Column::Error,
            Expr::value(Option::<String>::None),
        )
        .filter(webhook_events::Column::Source.eq(claim.source))
        .filter(webhook_events::Column::EventId.eq(claim.event_id))
        .filter(webhook_events::Column::Outcome.eq(WebhookOutcome::Failed.as_str()))
        .exec(c)
        .await?;
    Ok(res.rows_affected > 0)
}
