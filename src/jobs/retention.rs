//! Retention: invalid (and abandoned pending) purchase submissions are
//! deleted, and processed store notifications lose their payload, after the
//! configured number of days. Notification rows themselves stay: their
//! (source, event id) is what recognises a store's late redelivery.

use chrono::Duration;
use entities::{receipts, webhook_events};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, sea_query::Expr};

use crate::{config::RetentionConfig, error::AppResult, service::Core};

pub const JOB: &str = "retention";

/// What one run removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub receipts_deleted: u64,
    pub webhook_payloads_cleared: u64,
}

/// The payload a processed notification keeps.
fn cleared() -> serde_json::Value {
    serde_json::json!({ "cleared": true })
}

pub async fn run(core: &Core, cfg: &RetentionConfig) -> AppResult<Swept> {
    let now = core.now();
    let mut swept = Swept::default();
    if cfg.invalid_receipt_days > 0 {
        let cutoff = now - Duration::days(i64::from(cfg.invalid_receipt_days));
        swept.receipts_deleted = receipts::Entity::delete_many()
            .filter(receipts::Column::Outcome.is_in(["invalid", "pending"]))
            .filter(receipts::Column::ReceivedAt.lt(cutoff))
            .exec(&core.db.conn)
            .await?
            .rows_affected;
    }
    if cfg.webhook_payload_days > 0 {
        let cutoff = now - Duration::days(i64::from(cfg.webhook_payload_days));
        // Only rows past the previous run's cutoff: payloads cannot be
        // compared in SQL on every backend, and this keeps each row to one
        // rewrite.
        let since = super::read_cursor(&core.db.conn, JOB)
            .await?
            .and_then(|v| chrono::DateTime::parse_from_rfc3339(&v).ok())
            .map(|t| t.with_timezone(&chrono::Utc));
        let mut q = webhook_events::Entity::update_many()
            .col_expr(webhook_events::Column::Payload, Expr::value(cleared()))
            .filter(webhook_events::Column::ProcessedAt.lt(cutoff));
        if let Some(since) = since {
            q = q.filter(webhook_events::Column::ProcessedAt.gte(since));
        }
        swept.webhook_payloads_cleared = q.exec(&core.db.conn).await?.rows_affected;
        super::write_cursor(&core.db.conn, JOB, &cutoff.to_rfc3339(), now).await?;
    }
    if swept != Swept::default() {
        tracing::info!(
            receipts = swept.receipts_deleted,
            webhook_payloads = swept.webhook_payloads_cleared,
            "retention removed old data"
        );
    }
    Ok(swept)
}
