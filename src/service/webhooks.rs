//! The webhook log: every verified store notification is recorded with
//! what became of it, the customer it touched and, when the store's API
//! failed, why. Notifications that matched nothing can be replayed once the
//! configuration is fixed: the stored verified event runs again through the
//! same ingest path as a live delivery, once.

use chrono::{DateTime, Duration, Utc};
use entities::webhook_events;
use serde_json::Value;

use super::{Core, purchases::Submitter};
use crate::{
    db::{
        self, WriteTxn,
        webhook_log::{DayCounts, NowCounts, WebhookFilter},
    },
    domain::{
        Store,
        webhook_log::{self as log, WebhookOutcome},
    },
    error::{AppError, AppResult},
};

/// How an ingest run may take a notification's row.
#[derive(Clone, Debug)]
pub enum Claim {
    /// A delivery from the store: a new row, or one whose earlier delivery
    /// failed.
    Live,
    /// A replay of the stored row `id`, which had `outcome`: taken only if
    /// it still has it, so two concurrent replays apply once.
    Replay { id: i64, outcome: String },
}

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

impl Core {
    /// Takes the notification's row in `txn` with its final outcome and the
    /// customer it touched, as the last statement of the transaction that
    /// applied it: one claim order for every store and source. `false`:
    /// another delivery or replay has it, and the caller drops the
    /// transaction, undoing its effect. A concurrent duplicate meets this
    /// row's unique key (PostgreSQL waits for the first to commit) or the
    /// single writer (SQLite), so exactly one of them commits.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn claim_event(
        &self,
        txn: &WriteTxn,
        source: Store,
        event_id: &str,
        payload: &Value,
        outcome: WebhookOutcome,
        customer: Option<&str>,
        claim: &Claim,
    ) -> AppResult<bool> {
        // The transaction's own instant: the caller's clock, read now.
        let now = self.now();
        let outcome = outcome.as_str();
        match claim {
            Claim::Live => {
                self.purchases
                    .claim_webhook(txn, source, event_id, payload, outcome, customer, now)
                    .await
            }
            Claim::Replay { id, outcome: was } => {
                // The customer is kept when this run names none.
                db::webhook_log::claim_for_replay(&**txn, *id, was, outcome, customer, now).await
            }
        }
    }

    /// Seen and processed (a row whose delivery failed is processed again):
    /// checked before a store API call, so a redelivery costs one read
    /// instead. When processing calls no store API (`store_call` false) the
    /// read saves nothing: the claim in the applying transaction finds the
    /// duplicate all the same and undoes its effect, so it is skipped.
    pub(crate) async fn webhook_seen(
        &self,
        source: Store,
        event_id: &str,
        store_call: bool,
    ) -> AppResult<bool> {
        if !store_call {
            return Ok(false);
        }
        Ok(
            db::webhook_log::outcome_of(&self.ctx.db.conn, source, event_id)
                .await?
                .is_some_and(|o| o != WebhookOutcome::Failed.as_str()),
        )
    }

    /// A verified notification whose processing failed because the store
    /// could not be asked: kept as `failed` with the reason (a message safe
    /// for clients: no secret, no internal cause), so the operator sees it
    /// and can replay it; the store's own redelivery takes the row over.
    pub(crate) async fn record_failed_event(
        &self,
        source: Store,
        event_id: &str,
        payload: &Value,
        customer: Option<&str>,
        err: &AppError,
    ) -> AppResult<()> {
        if !matches!(err, AppError::StoreUnavailable(_)) {
            return Ok(());
        }
        let now = self.now();
        let txn = self.ctx.db.write().await?;
        db::webhook_log::record_failed(
            &*txn,
            source,
            event_id,
            payload,
            customer,
            &err.message(),
            now,
        )
        .await?;
        txn.commit().await?;
        Ok(())
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
        let claim = Claim::Replay {
            id,
            outcome: row.outcome.clone(),
        };
        let result = match source {
            Store::Stripe => self.replay_stripe(&row, claim).await,
            Store::AppStore => self.replay_apple(&row, claim).await,
            Store::PlayStore => self.replay_play(&row, claim).await,
            _ => return Err(AppError::bad_input("not a store notification")),
        };
        let ran = match result {
            Ok(ran) => ran,
            Err(e @ AppError::StoreUnavailable(_)) => {
                self.record_failed_event(
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
        db::webhook_log::mark_replay_failed(&*txn, id, outcome, &err.message(), self.now()).await?;
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
        let now = self.now();
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

impl Core {
    /// A store purchase of a product the catalog does not map, which we do
    /// not already hold (a purchase we hold keeps being updated even when
    /// its product has left the catalog).
    pub(crate) async fn is_unknown_product(
        &self,
        txn: &WriteTxn,
        vp: &crate::providers::VerifiedPurchase,
    ) -> AppResult<bool> {
        if !self
            .ctx
            .catalog
            .entitlements_for(vp.store, &vp.product_id)
            .is_empty()
        {
            return Ok(false);
        }
        let held = db::store_purchases::store_purchase(&**txn, vp.store, &vp.store_purchase_id)
            .await?
            .is_some()
            || db::store_purchases::held_purchase(&**txn, vp.store, &vp.store_purchase_id)
                .await?
                .is_some();
        Ok(!held)
    }
}

/// A store whose verified notifications the service applies. Every store's
/// webhook route is one generic handler over this: the store's connector
/// verifies the delivery, then `ingest` applies it through the store's one
/// ingest path (the same one reconciliation and replay take). A refresh is
/// one generic path over it too ([`Core::refresh`]): the connector re-reads
/// the purchase, and the store's rules apply what it read.
pub trait Ingest: crate::providers::Connector {
    /// What is left to do once an applied re-read has committed.
    type AfterCommit: Send;

    /// This store's connector, when configured.
    fn connector(core: &Core) -> AppResult<&Self>;
    /// Applies a verified notification once; the outcome as recorded.
    fn ingest(
        core: &Core,
        n: &Self::Notification,
    ) -> impl std::future::Future<Output = AppResult<WebhookOutcome>> + Send;

    /// Applies in `txn` what [`Connector::reread_purchase`] read, under
    /// this store's rules; the outcome to record, and what to do after.
    ///
    /// [`Connector::reread_purchase`]: crate::providers::Connector::reread_purchase
    fn apply_reread(
        &self,
        core: &Core,
        txn: &WriteTxn,
        state: Self::Reread,
        now: DateTime<Utc>,
    ) -> impl std::future::Future<Output = AppResult<(WebhookOutcome, Self::AfterCommit)>> + Send;

    /// Store calls that must not run for a write that may still roll back.
    fn after_commit(
        &self,
        core: &Core,
        then: Self::AfterCommit,
    ) -> impl std::future::Future<Output = ()> + Send;
}

impl Ingest for crate::providers::stripe::StripeProvider {
    type AfterCommit = ();

    fn connector(core: &Core) -> AppResult<&Self> {
        core.stripe().map(|p| &**p)
    }
    async fn ingest(core: &Core, ev: &Self::Notification) -> AppResult<WebhookOutcome> {
        core.stripe_webhook(ev).await
    }
    async fn apply_reread(
        &self,
        core: &Core,
        txn: &WriteTxn,
        state: Self::Reread,
        now: DateTime<Utc>,
    ) -> AppResult<(WebhookOutcome, ())> {
        let (outcome, _) = core.apply_stripe_state(txn, state, None, now).await?;
        Ok((outcome, ()))
    }
    async fn after_commit(&self, _: &Core, (): ()) {}
}

impl Ingest for crate::providers::apple::Apple {
    type AfterCommit = ();

    fn connector(core: &Core) -> AppResult<&Self> {
        core.apple()
    }
    async fn ingest(core: &Core, n: &Self::Notification) -> AppResult<WebhookOutcome> {
        core.apple_webhook(core.apple()?, n).await
    }
    async fn apply_reread(
        &self,
        core: &Core,
        txn: &WriteTxn,
        vp: Self::Reread,
        now: DateTime<Utc>,
    ) -> AppResult<(WebhookOutcome, ())> {
        let applied = core
            .purchases
            .apply_purchase_in(txn, &vp, Submitter::Store, now)
            .await?;
        Ok((WebhookOutcome::applied(applied.stale), ()))
    }
    async fn after_commit(&self, _: &Core, (): ()) {}
}

impl Ingest for crate::providers::google::GooglePlay {
    /// The token to acknowledge, when Google still waits for it.
    type AfterCommit = Option<(crate::providers::google::PlayKind, String)>;

    fn connector(core: &Core) -> AppResult<&Self> {
        core.google()
    }
    async fn ingest(core: &Core, push: &Self::Notification) -> AppResult<WebhookOutcome> {
        core.play_webhook(push).await
    }
    async fn apply_reread(
        &self,
        core: &Core,
        txn: &WriteTxn,
        fetched: Self::Reread,
        now: DateTime<Utc>,
    ) -> AppResult<(WebhookOutcome, Self::AfterCommit)> {
        let ack = fetched
            .needs_ack
            .then(|| (fetched.kind, fetched.purchase.store_purchase_id.clone()));
        let purchase = core.keep_play_refund(txn, fetched.purchase).await?;
        let applied = core
            .purchases
            .apply_purchase_in(txn, &purchase, Submitter::Store, now)
            .await?;
        Ok((WebhookOutcome::applied(applied.stale), ack))
    }
    async fn after_commit(&self, core: &Core, ack: Self::AfterCommit) {
        if let Some((kind, token)) = ack {
            core.acknowledge_play(self, &kind, &token).await;
        }
    }
}
