//! Use cases. Each state change is one transaction that writes the change
//! and its change-log rows together.
//!
//! One type per use case, each holding only the parts it works with;
//! [`Core`] builds them and hands them out. A use case that needs
//! another's work calls that one's methods, never its state.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::{
    clock::Clock,
    config::Config,
    db::{self, Conn, Db},
    domain::{Catalog, PurchaseFacts, Snapshot, compute, diff},
    error::AppResult,
};

pub mod api_keys;
pub mod customers;
pub mod outbound;
pub mod pairing;
pub mod purchases;
pub mod reads;
pub mod stores;
pub mod tokens;
pub mod webhooks;

pub use api_keys::ApiKeys;
pub use customers::Customers;
pub use outbound::Outbound;
pub use pairing::Pairing;
pub use purchases::Purchases;
pub use reads::Reads;
pub use stores::Stores;
pub use tokens::Tokens;
pub use webhooks::Operator;

/// What every use case reads: the database, the clock, and the rules that
/// turn purchase facts into entitlements. Kept inside `service`: callers
/// reach a use case, never the state behind it.
struct Ctx {
    db: Db,
    clock: Arc<dyn Clock>,
    catalog: Catalog,
    accept_sandbox: bool,
}

/// The composition root: builds every use case from the configuration,
/// once, and hands each out. Use cases that need another's work hold it
/// themselves, so nothing reaches across through shared fields.
pub struct Core {
    ctx: Arc<Ctx>,
    reads: Reads,
    purchases: Arc<Purchases>,
    customers: Arc<Customers>,
    pairing: Pairing,
    stores: Arc<Stores>,
    operator: Operator,
    api_keys: ApiKeys,
    outbound: Outbound,
    /// Signing keys, entitlement tokens and signed answers.
    tokens: Arc<Tokens>,
    /// Change-log rows as they commit, for GraphQL subscribers.
    feed: crate::events::feed::Feed,
}

impl Core {
    pub fn new(config: &Config, db: Db, clock: Arc<dyn Clock>) -> anyhow::Result<Core> {
        let tokens = Arc::new(Tokens::new(config, db.clone(), clock.clone())?);
        let ctx = Arc::new(Ctx {
            db: db.clone(),
            catalog: config.catalog()?,
            clock: clock.clone(),
            accept_sandbox: config.accept_sandbox,
        });
        let reads = Reads::new(ctx.clone());
        let purchases = Arc::new(Purchases::new(
            ctx.clone(),
            reads.clone(),
            config.transfer_policy,
            config.receipts.clone(),
        ));
        let stores = Arc::new(Stores::new(
            config,
            ctx.clone(),
            reads.clone(),
            purchases.clone(),
        )?);
        let customers = Arc::new(Customers::new(
            ctx.clone(),
            reads.clone(),
            purchases.clone(),
            config.trial.clone(),
        ));
        Ok(Core {
            pairing: Pairing::new(ctx.clone(), customers.clone()),
            operator: Operator::new(ctx.clone(), stores.clone()),
            api_keys: ApiKeys::new(db.clone(), clock.clone()),
            outbound: Outbound::new(db, clock),
            customers,
            purchases,
            stores,
            reads,
            ctx,
            tokens,
            feed: crate::events::feed::Feed::new(),
        })
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.ctx.now()
    }

    /// The database handle, for the process's wiring (readiness, the event
    /// relay, job leases and cursors) rather than for use cases.
    pub fn db(&self) -> &Db {
        &self.ctx.db
    }

    /// The clock every use case reads, for workers that keep their own time.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.ctx.clock
    }

    /// Reading access: snapshots, customer reads, explanations, caches.
    pub fn reads(&self) -> &Reads {
        &self.reads
    }

    /// Applying verified store state, and the audit trail of submissions.
    pub fn purchases(&self) -> &Purchases {
        &self.purchases
    }

    /// Customers and devices: registration, check-ins, grants, merges.
    pub fn customers(&self) -> &Customers {
        &self.customers
    }

    /// Pairing a device to an account with a code it showed.
    pub fn pairing(&self) -> &Pairing {
        &self.pairing
    }

    /// Store purchases and their ingestion, with the store connectors.
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// The webhook log, replays and the overview.
    pub fn operator(&self) -> &Operator {
        &self.operator
    }

    pub fn api_keys(&self) -> &ApiKeys {
        &self.api_keys
    }

    /// Outbound webhook endpoints, as the operator sees them.
    pub fn outbound(&self) -> &Outbound {
        &self.outbound
    }

    /// Signing keys, entitlement tokens and signed answers.
    pub fn tokens(&self) -> &Arc<Tokens> {
        &self.tokens
    }

    /// Change-log rows as they commit, for GraphQL subscribers.
    pub fn feed(&self) -> &crate::events::feed::Feed {
        &self.feed
    }
}

impl Ctx {
    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// The customer's entitlements at `now`, read through `c` (a transaction
    /// when the caller is about to change them).
    async fn snapshot_in(
        &self,
        c: &impl Conn,
        customer_id: &str,
        now: DateTime<Utc>,
    ) -> AppResult<Snapshot> {
        let facts = db::purchase_facts_of(c, customer_id).await?;
        Ok(compute(&self.catalog, &facts, now, self.accept_sandbox))
    }

    /// The customer's entitlements at `now` as a write (holding the
    /// customer's lock) starts from. Lapses that happened by time since the
    /// change log last spoke are logged first, dated when access ended, so
    /// the log never skips an `expired` whether the sweep or a write notices
    /// first. Returns how many such rows were written.
    async fn state_before_write(
        &self,
        c: &impl Conn,
        customer_id: &str,
        now: DateTime<Utc>,
    ) -> AppResult<(Snapshot, usize)> {
        let (snapshot, _, written) = self.facts_before_write(c, customer_id, now, None).await?;
        Ok((snapshot, written))
    }

    /// [`Self::state_before_write`], with the purchase facts it was
    /// computed from, for a write that can tell what it changes in them.
    /// `prefetched`: those facts, read in this transaction with nothing
    /// written since (see [`db::TxnConn::take_prefetched_facts`]).
    async fn facts_before_write(
        &self,
        c: &impl Conn,
        customer_id: &str,
        now: DateTime<Utc>,
        prefetched: Option<Vec<PurchaseFacts>>,
    ) -> AppResult<(Snapshot, Vec<PurchaseFacts>, usize)> {
        let facts = match prefetched {
            Some(facts) => {
                if cfg!(debug_assertions) {
                    // Development and test builds check them against a read.
                    let read = db::purchase_facts_of(c, customer_id).await?;
                    assert_eq!(facts, read, "prefetched purchase facts");
                }
                facts
            }
            None => db::purchase_facts_of(c, customer_id).await?,
        };
        let snapshot = compute(&self.catalog, &facts, now, self.accept_sandbox);
        let mut logged = std::collections::HashMap::new();
        // Only lapsed entitlements can owe a row: active ones cost no query.
        for e in snapshot
            .entitlements
            .iter()
            .filter(|e| !e.is_active && e.status.is_some())
        {
            logged.insert(
                e.key.clone(),
                db::last_logged_status(c, customer_id, &e.key).await?,
            );
        }
        let rows =
            crate::domain::lapses(&snapshot, &facts, |k| logged.get(k).cloned().flatten(), now);
        db::record_dated_changes(c, customer_id, &rows).await?;
        Ok((snapshot, facts, rows.len()))
    }

    /// Writes one change-log row per entitlement that moved between `before`
    /// and the state now visible in `c`; returns the new state.
    async fn record_transition(
        &self,
        c: &impl Conn,
        customer_id: &str,
        before: &Snapshot,
        now: DateTime<Utc>,
    ) -> AppResult<Snapshot> {
        let after = self.snapshot_in(c, customer_id, now).await?;
        db::record_changes(c, customer_id, &diff(before, &after), now).await?;
        Ok(after)
    }
}
