//! Claiming a store notification in the webhook log (`webhook_events`), so
//! each is applied once.

use chrono::{DateTime, Utc};
use entities::webhook_events;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, sea_query::Expr};

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
    let backend = txn.get_database_backend();
    // The payload is bound as its text, printed straight from the parsed
    // event: binding it as JSON took a copy of the whole tree first.
    let sql = match backend {
        sea_orm::DbBackend::Postgres => {
            r#"INSERT INTO "webhook_events" ("source", "event_id", "received_at", "payload", "outcome", "processed_at", "customer_id") VALUES ($1, $2, $3, $4::json, $5, $6, $7) ON CONFLICT ("source", "event_id") DO NOTHING RETURNING "id""#
        }
        _ => {
            r#"INSERT INTO "webhook_events" ("source", "event_id", "received_at", "payload", "outcome", "processed_at", "customer_id") VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT ("source", "event_id") DO NOTHING RETURNING "id""#
        }
    };
    let payload = serde_json::to_string(claim.payload)
        .map_err(|e| crate::error::AppError::Internal(e.into()))?;
    let stmt = sea_orm::Statement::from_sql_and_values(
        backend,
        sql,
        [
            claim.source.into(),
            claim.event_id.into(),
            claim.at.into(),
            payload.into(),
            claim.outcome.into(),
            Some(claim.at).into(),
            claim.customer_id.map(str::to_string).into(),
        ],
    );
    // A row back is the claim made; none, the notification's row was there.
    // Sent with the change-log rows the claimed work deferred: a claim is
    // the last statement of a notification's work but for its commit.
    Ok(!txn.query_last(stmt).await?.is_empty())
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
