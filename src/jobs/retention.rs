//! Retention: invalid (and abandoned pending) purchase submissions are
//! deleted, and processed store notifications lose their payload, after the
//! configured number of days. Notification rows themselves stay: their
//! (source, event id) is what recognises a store's late redelivery.

use chrono::Duration;

use crate::{config::RetentionConfig, db, error::AppResult, service::Core};

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
        swept.receipts_deleted = db::jobs::delete_unused_receipts(&core.db().conn, cutoff).await?;
    }
    if cfg.webhook_payload_days > 0 {
        let cutoff = now - Duration::days(i64::from(cfg.webhook_payload_days));
        // Only rows past the previous run's cutoff: payloads cannot be
        // compared in SQL on every backend, and this keeps each row to one
        // rewrite.
        let since = super::read_cursor(&core.db().conn, JOB)
            .await?
            .and_then(|v| chrono::DateTime::parse_from_rfc3339(&v).ok())
            .map(|t| t.with_timezone(&chrono::Utc));
        swept.webhook_payloads_cleared =
            db::jobs::clear_webhook_payloads(&core.db().conn, cleared(), since, cutoff).await?;
        super::write_cursor(&core.db().conn, JOB, &cutoff.to_rfc3339(), now).await?;
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
