//! The webhook log: every verified store notification is recorded with
//! what became of it, the customer it touched and, when the store's API
//! failed, why. Notifications that matched nothing can be replayed once the
//! configuration is fixed: the stored verified event runs again through the
//! same ingest path as a live delivery, once.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use entities::webhook_events;

use super::{Ctx, Stores};
use crate::{
    db::{
        self,
        webhook_log::{DayCounts, NowCounts, WebhookFilter},
    },
    domain::{
        Store,
        webhook_log::{self as log, WebhookOutcome},
    },
    error::{AppError, AppResult},
};

/// What a replay did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replayed {
    pub id: i64,
    /// The row's outcome before the replay.
    pub previous: String,
    /// Its outcome now.
    pub outcome: String,
    /// True when this replay ran the event (false: it was not replayable,
    /// or a concurrent replay took it first).
    pub ran: bool,
}

/// What `entitle webhooks replay` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    pub considered: u64,
    /// Now applied (or otherwise no longer replayable).
    pub resolved: u64,
    /// Ran again and still matched nothing.
    pub unchanged: u64,
    /// The store was still unavailable.
    pub failed: u64,
    /// Payload cleared by retention, or a source not configured.
    pub skipped: u64,
}

/// The overview: now, and the change log per day.
#[derive(Clone, Debug)]
pub struct Overview {
    pub now: NowCounts,
    pub days: Vec<DayCounts>,
}

/// The operator's work on store notifications: the webhook log, replaying
/// what matched nothing (through the stores' own ingest paths), and the
/// overview.
pub struct Operator {
    ctx: Arc<Ctx>,
    stores: Arc<Stores>,
}

impl Operator {
    pub(super) fn new(ctx: Arc<Ctx>, stores: Arc<Stores>) -> Operator {
        Operator { ctx, stores }
    }

    pub async fn webhook_event(&self, id: i64) -> AppResult<webhook_events::Model> {
        db::webhook_log::webhook_event(&self.ctx.db.conn, id)
            .await?
            .ok_or(AppError::NotFound("webhook event"))
    }

    /// A page of the webhook log, newest first.
    pub async fn webhook_events_page(
        &self,
        filter: &WebhookFilter,
        first: u64,
    ) -> AppResult<(Vec<webhook_events::Model>, bool)> {
        db::webhook_log::webhook_events_page(&self.ctx.db.conn, filter, first).await
    }

    /// The store notifications that touched a customer, newest first.
    pub async fn webhook_events_of(
        &self,
        customer_id: &str,
        limit: u64,
    ) -> AppResult<Vec<webhook_events::Model>> {
        db::webhook_log::webhook_events_of(&self.ctx.db.conn, customer_id, limit).await
    }

    /// Runs a stored notification again through its store's ingest path.
    /// An event that already applied (any outcome but the replayable ones)
    /// changes nothing; two concurrent replays apply it once.
    pub async fn replay_webhook_event(&self, id: i64) -> AppResult<Replayed> {
        let row = db::webhook_log::webhook_event(&self.ctx.db.conn, id)
            .await?
            .ok_or(AppError::NotFound("webhook event"))?;
        let unchanged = |row: &webhook_events::Model| Replayed {
            id,
            previous: row.outcome.clone(),
            outcome: row.outcome.clone(),
            ran: false,
        };
        if !log::is_replayable(&row.outcome) {
            return Ok(unchanged(&row));
        }
        if !log::payload_kept(&row.payload) {
            return Err(AppError::bad_input(
                "this event's payload was removed by retention; it cannot be replayed",
            ));
        }
        let source: Store = row
            .source
            .parse()
            .map_err(|e| AppError::Internal(anyhow::Error::new(e)))?;
        let ran = match self.stores.replay(source, &row).await {
            Ok(ran) => ran,
            Err(e @ AppError::StoreUnavailable(_)) => {
                self.stores
                    .record_failed_event(
                        source,
                        &row.event_id,
                        &row.payload,
                        row.customer_id.as_deref(),
                        &e,
                    )
                    .await?;
                // Whatever it matched before, it now waits on the store.
                self.mark_failed(id, &row.outcome, &e).await?;
                false
            }
            Err(e) => return Err(e),
        };
        let now_row = db::webhook_log::webhook_event(&self.ctx.db.conn, id)
            .await?
            .ok_or(AppError::NotFound("webhook event"))?;
        Ok(Replayed {
            id,
            previous: row.outcome,
            outcome: now_row.outcome,
            ran,
        })
    }

    async fn mark_failed(&self, id: i64, outcome: &str, err: &AppError) -> AppResult<()> {
        let txn = self.ctx.db.write().await?;
        db::webhook_log::mark_replay_failed(&*txn, id, outcome, &err.message(), self.ctx.now())
            .await?;
        txn.commit().await
    }

    /// Replays every replayable stored notification with one of `outcomes`
    /// (all replayable ones when empty) received since `since`, oldest
    /// first, so later events of one purchase apply after earlier ones.
    pub async fn replay_webhook_events(
        &self,
        outcomes: &[String],
        since: Option<DateTime<Utc>>,
    ) -> AppResult<ReplaySummary> {
        let wanted: Vec<String> = if outcomes.is_empty() {
            log::replayable_names().map(str::to_string).collect()
        } else {
            for o in outcomes {
                if !log::is_replayable(o) {
                    return Err(AppError::bad_input(format!(
                        "`{o}` is not a replayable outcome (replayable: {})",
                        log::replayable_names().collect::<Vec<_>>().join(", ")
                    )));
                }
            }
            outcomes.to_vec()
        };
        let mut ids = Vec::new();
        let mut filter = WebhookFilter {
            outcomes: wanted,
            since,
            ..Default::default()
        };
        loop {
            let (rows, more) = self.webhook_events_page(&filter, 500).await?;
            filter.before_id = rows.last().map(|r| r.id);
            ids.extend(rows.into_iter().map(|r| r.id));
            if !more {
                break;
            }
        }
        ids.reverse();
        let mut s = ReplaySummary::default();
        for id in ids {
            s.considered += 1;
            match self.replay_webhook_event(id).await {
                Ok(r) if r.outcome == WebhookOutcome::Failed.as_str() => s.failed += 1,
                Ok(r) if !r.ran => s.skipped += 1,
                Ok(r) if log::is_replayable(&r.outcome) => s.unchanged += 1,
                Ok(_) => s.resolved += 1,
                Err(AppError::BadInput(_) | AppError::NotConfigured(_)) => s.skipped += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(s)
    }

    /// Customers with access now, and the change log of the last `days`
    /// days (today included), one entry per day.
    pub async fn overview(&self, days: i32) -> AppResult<Overview> {
        let days = days.clamp(1, log::OVERVIEW_MAX_DAYS);
        let now = self.ctx.now();
        let start = (now - Duration::days(i64::from(days - 1)))
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc();
        let counted = db::webhook_log::daily_counts(&self.ctx.db.conn, start).await?;
        let mut out = Vec::with_capacity(days as usize);
        for i in 0..days {
            let day = (start + Duration::days(i64::from(i)))
                .format("%Y-%m-%d")
                .to_string();
            out.push(
                counted
                    .iter()
                    .find(|d| d.day == day)
                    .cloned()
                    .unwrap_or(DayCounts {
                        day,
                        ..Default::default()
                    }),
            );
        }
        Ok(Overview {
            now: db::webhook_log::now_counts(&self.ctx.db.conn, now, self.ctx.accept_sandbox)
                .await?,
            days: out,
        })
    }
}
