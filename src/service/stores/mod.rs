//! Store purchases and their ingestion: a customer's submission
//! (`verifyPurchase`), the stores' webhooks, refresh, reconciliation, replay
//! and Play acknowledgements, with the store connectors they talk to. Every
//! source ends in one ingest path per store, which claims the notification's
//! row in the transaction that applies it.

pub mod apple;
pub mod google;
mod refresh;
pub mod stripe;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use entities::webhook_events;
use serde_json::Value;

use super::{Ctx, Purchases, Reads, purchases::Submitter};
use crate::{
    config::Config,
    db::{self, WriteTxn},
    domain::{Store, webhook_log::WebhookOutcome},
    error::{AppError, AppResult},
    providers::{apple::Apple, google::GooglePlay, stripe::StripeProvider},
};

/// The stores' ingest paths and the connectors they call.
pub struct Stores {
    ctx: Arc<Ctx>,
    reads: Reads,
    purchases: Arc<Purchases>,
    /// Present when a `[stripe]` section is configured.
    stripe: Option<Arc<StripeProvider>>,
    /// Present when an `[apple]` section is configured.
    apple: Option<Arc<Apple>>,
    google: Option<Arc<GooglePlay>>,
}

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

impl Stores {
    pub(super) fn new(
        config: &Config,
        ctx: Arc<Ctx>,
        reads: Reads,
        purchases: Arc<Purchases>,
    ) -> anyhow::Result<Stores> {
        Ok(Stores {
            stripe: config
                .stripe
                .as_ref()
                .map(StripeProvider::from_config)
                .transpose()?
                .map(Arc::new),
            apple: config
                .apple
                .as_ref()
                .map(|a| Apple::new(a, config.accept_sandbox, ctx.clock.clone()))
                .transpose()?
                .map(Arc::new),
            google: config
                .google
                .as_ref()
                .map(GooglePlay::new)
                .transpose()?
                .map(Arc::new),
            ctx,
            reads,
            purchases,
        })
    }

    /// Runs a stored, verified notification of `source` again through its
    /// store's ingest path (the operator's replay). `false`: not run, as a
    /// concurrent replay or delivery had it first.
    pub(in crate::service) async fn replay(
        &self,
        source: Store,
        row: &webhook_events::Model,
    ) -> AppResult<bool> {
        let claim = Claim::Replay {
            id: row.id,
            outcome: row.outcome.clone(),
        };
        match source {
            Store::Stripe => self.replay_stored::<StripeProvider>(row, claim).await,
            Store::AppStore => self.replay_stored::<Apple>(row, claim).await,
            Store::PlayStore => self.replay_stored::<GooglePlay>(row, claim).await,
            _ => Err(AppError::bad_input("not a store notification")),
        }
    }

    /// A verified notification, live (a store's delivery, or one listed by
    /// its API): applied once per event id whichever way it arrives. A
    /// redelivery costs one read rather than a store call; a notification
    /// that failed because the store could not be asked is kept, so the
    /// operator sees it, and the store's own redelivery takes it over.
    pub async fn receive<S: Ingest>(&self, n: &S::Notification) -> AppResult<WebhookOutcome> {
        let connector = S::connector(self)?;
        if self
            .webhook_seen(S::STORE, S::event_id(n), connector.calls_store())
            .await?
        {
            return Ok(WebhookOutcome::Duplicate);
        }
        match connector.apply(self, n, &Claim::Live).await {
            Err(e) => {
                self.record_failed_event(S::STORE, S::event_id(n), S::payload(n), None, &e)
                    .await?;
                Err(e)
            }
            ok => ok,
        }
    }

    /// Runs a stored, verified notification again (a replay); `false` when
    /// a concurrent replay or delivery had it first.
    async fn replay_stored<S: Ingest>(
        &self,
        row: &webhook_events::Model,
        claim: Claim,
    ) -> AppResult<bool> {
        let connector = S::connector(self)?;
        let n = crate::providers::Connector::read_stored(connector, row)?;
        Ok(connector.apply(self, &n, &claim).await? != WebhookOutcome::Duplicate)
    }

    /// Takes the notification's row in `txn` with its final outcome and the
    /// customer it touched, as the last statement of the transaction that
    /// applied it (one claim order for every store and source), then
    /// commits. `false`: another delivery or replay has it, so this one's
    /// effect is undone, and the answer waits for the first one's commit. A
    /// concurrent duplicate meets the row's unique key (PostgreSQL waits
    /// for the first to commit) or the single writer (SQLite), so exactly
    /// one of them commits.
    async fn claim_and_commit<S: Ingest>(
        &self,
        txn: WriteTxn,
        n: &S::Notification,
        outcome: WebhookOutcome,
        customer: Option<&str>,
        claim: &Claim,
    ) -> AppResult<bool> {
        // The transaction's own instant: the caller's clock, read now.
        let now = self.ctx.now();
        let (id, recorded) = (S::event_id(n), outcome.as_str());
        let claimed = match claim {
            Claim::Live => {
                self.purchases
                    .claim_webhook(&txn, S::STORE, id, S::payload(n), recorded, customer, now)
                    .await?
            }
            Claim::Replay { id, outcome: was } => {
                // The customer is kept when this run names none.
                db::webhook_log::claim_for_replay(&*txn, *id, was, recorded, customer, now).await?
            }
        };
        if !claimed {
            txn.abandon().await?;
            return Ok(false);
        }
        txn.commit().await?;
        Ok(true)
    }

    /// Seen and processed (a row whose delivery failed is processed again):
    /// checked before a store API call, so a redelivery costs one read
    /// instead. When processing calls no store API (`store_call` false) the
    /// read saves nothing: the claim in the applying transaction finds the
    /// duplicate all the same and undoes its effect, so it is skipped.
    async fn webhook_seen(
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
    pub(in crate::service) async fn record_failed_event(
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
        let now = self.ctx.now();
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

    /// A store purchase of a product the catalog does not map, which we do
    /// not already hold (a purchase we hold keeps being updated even when
    /// its product has left the catalog).
    async fn is_unknown_product(
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
/// one generic path over it too ([`Stores::refresh_purchase`]): the connector re-reads
/// the purchase, and the store's rules apply what it read.
pub trait Ingest: crate::providers::Connector {
    /// What is left to do once an applied re-read has committed.
    type AfterCommit: Send;

    /// This store's connector, when configured.
    fn connector(stores: &Stores) -> AppResult<&Self>;
    /// The notification's id in the webhook log.
    fn event_id(n: &Self::Notification) -> &str;
    /// The notification as the webhook log keeps it.
    fn payload(n: &Self::Notification) -> &serde_json::Value;
    /// Whether applying a notification calls the store (so a redelivery
    /// is worth a read first).
    fn calls_store(&self) -> bool;
    /// Applies a verified notification under this store's rules, claimed
    /// as `claim` says, in one transaction; the outcome as recorded.
    fn apply(
        &self,
        stores: &Stores,
        n: &Self::Notification,
        claim: &Claim,
    ) -> impl std::future::Future<Output = AppResult<WebhookOutcome>> + Send;

    /// Applies in `txn` what [`Connector::reread_purchase`] read, under
    /// this store's rules; the outcome to record, and what to do after.
    ///
    /// [`Connector::reread_purchase`]: crate::providers::Connector::reread_purchase
    fn apply_reread(
        &self,
        stores: &Stores,
        txn: &WriteTxn,
        state: Self::Reread,
        now: DateTime<Utc>,
    ) -> impl std::future::Future<Output = AppResult<(WebhookOutcome, Self::AfterCommit)>> + Send;

    /// Store calls that must not run for a write that may still roll back.
    fn after_commit(
        &self,
        stores: &Stores,
        then: Self::AfterCommit,
    ) -> impl std::future::Future<Output = ()> + Send;
}

impl Ingest for StripeProvider {
    type AfterCommit = ();

    fn connector(stores: &Stores) -> AppResult<&Self> {
        stores.stripe().map(|p| &**p)
    }
    fn event_id(ev: &Self::Notification) -> &str {
        &ev.id
    }
    fn payload(ev: &Self::Notification) -> &serde_json::Value {
        &ev.payload
    }
    fn calls_store(&self) -> bool {
        self.api().is_some()
    }
    async fn apply(
        &self,
        stores: &Stores,
        ev: &Self::Notification,
        claim: &Claim,
    ) -> AppResult<WebhookOutcome> {
        stores.ingest_stripe_event(self, ev, claim).await
    }
    async fn apply_reread(
        &self,
        stores: &Stores,
        txn: &WriteTxn,
        state: Self::Reread,
        now: DateTime<Utc>,
    ) -> AppResult<(WebhookOutcome, ())> {
        let (outcome, _) = stores.apply_stripe_state(txn, state, None, now).await?;
        Ok((outcome, ()))
    }
    async fn after_commit(&self, _: &Stores, (): ()) {}
}

impl Ingest for Apple {
    type AfterCommit = ();

    fn connector(stores: &Stores) -> AppResult<&Self> {
        stores.apple()
    }
    fn event_id(n: &Self::Notification) -> &str {
        &n.uuid
    }
    fn payload(n: &Self::Notification) -> &serde_json::Value {
        &n.raw
    }
    fn calls_store(&self) -> bool {
        self.api().is_some()
    }
    async fn apply(
        &self,
        stores: &Stores,
        n: &Self::Notification,
        claim: &Claim,
    ) -> AppResult<WebhookOutcome> {
        stores.ingest_apple_notification(self, n, claim).await
    }
    async fn apply_reread(
        &self,
        stores: &Stores,
        txn: &WriteTxn,
        vp: Self::Reread,
        now: DateTime<Utc>,
    ) -> AppResult<(WebhookOutcome, ())> {
        let applied = stores
            .purchases
            .apply_purchase_in(txn, &vp, Submitter::Store, now)
            .await?;
        Ok((WebhookOutcome::applied(applied.stale), ()))
    }
    async fn after_commit(&self, _: &Stores, (): ()) {}
}

impl Ingest for GooglePlay {
    /// The token to acknowledge, when Google still waits for it.
    type AfterCommit = Option<(crate::providers::google::PlayKind, String)>;

    fn connector(stores: &Stores) -> AppResult<&Self> {
        stores.google()
    }
    fn event_id(push: &Self::Notification) -> &str {
        &push.message_id
    }
    fn payload(push: &Self::Notification) -> &serde_json::Value {
        &push.payload
    }
    // Every notification is read back from Play: it carries only a token.
    fn calls_store(&self) -> bool {
        true
    }
    async fn apply(
        &self,
        stores: &Stores,
        push: &Self::Notification,
        claim: &Claim,
    ) -> AppResult<WebhookOutcome> {
        stores.ingest_play_notification(self, push, claim).await
    }
    async fn apply_reread(
        &self,
        stores: &Stores,
        txn: &WriteTxn,
        fetched: Self::Reread,
        now: DateTime<Utc>,
    ) -> AppResult<(WebhookOutcome, Self::AfterCommit)> {
        let ack = fetched
            .needs_ack
            .then(|| (fetched.kind, fetched.purchase.store_purchase_id.clone()));
        let purchase = stores.keep_play_refund(txn, fetched.purchase).await?;
        let applied = stores
            .purchases
            .apply_purchase_in(txn, &purchase, Submitter::Store, now)
            .await?;
        Ok((WebhookOutcome::applied(applied.stale), ack))
    }
    async fn after_commit(&self, stores: &Stores, ack: Self::AfterCommit) {
        if let Some((kind, token)) = ack {
            stores.acknowledge_play(self, &kind, &token).await;
        }
    }
}
