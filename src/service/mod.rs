//! Use cases. Each state change is one transaction that writes the change
//! and its change-log rows together.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use entities::customers as customer_rows;

use crate::{
    clock::Clock,
    config::Config,
    db::{self, CachedCustomer, Conn, Db},
    domain::{Catalog, PurchaseFacts, Snapshot, TransferPolicy, TrialPolicy, compute, diff},
    error::AppResult,
};

pub mod api_keys;
pub mod apple;
pub mod customers;
pub mod google;
pub mod outbound;
pub mod pairing;
pub mod purchases;
pub mod refresh;
pub mod stripe;
pub mod tokens;
pub mod webhooks;

/// What every use case reads: the database, the clock, and the rules that
/// turn purchase facts into entitlements. Kept inside `service`: callers
/// reach a use case, never the state behind it.
struct Ctx {
    db: Db,
    clock: Arc<dyn Clock>,
    catalog: Catalog,
    accept_sandbox: bool,
}

pub struct Core {
    ctx: Arc<Ctx>,
    pub trial: Option<TrialPolicy>,
    pub transfer_policy: TransferPolicy,
    /// Present when a `[stripe]` section is configured.
    pub stripe: Option<Arc<crate::providers::stripe::StripeProvider>>,
    /// Present when an `[apple]` section is configured.
    pub apple: Option<Arc<crate::providers::apple::Apple>>,
    pub google: Option<Arc<crate::providers::google::GooglePlay>>,
    /// Change-log rows as they commit, for GraphQL subscribers.
    pub feed: crate::events::feed::Feed,
    pub receipts: crate::config::ReceiptsConfig,
    /// Signing keys, entitlement tokens and signed answers.
    pub tokens: Arc<tokens::Tokens>,
    /// Device check-ins waiting to be written.
    pub seen: customers::SeenBuffer,
}

impl Core {
    pub fn new(config: &Config, db: Db, clock: Arc<dyn Clock>) -> anyhow::Result<Core> {
        let tokens = Arc::new(tokens::Tokens::new(config, db.clone(), clock.clone())?);
        Ok(Core {
            tokens,
            ctx: Arc::new(Ctx {
                db,
                catalog: config.catalog()?,
                clock: clock.clone(),
                accept_sandbox: config.accept_sandbox,
            }),
            trial: config.trial.clone(),
            transfer_policy: config.transfer_policy,
            stripe: config
                .stripe
                .as_ref()
                .map(crate::providers::stripe::StripeProvider::from_config)
                .transpose()?
                .map(Arc::new),
            apple: config
                .apple
                .as_ref()
                .map(|a| {
                    crate::providers::apple::Apple::new(a, config.accept_sandbox, clock.clone())
                })
                .transpose()?
                .map(Arc::new),
            google: config
                .google
                .as_ref()
                .map(crate::providers::google::GooglePlay::new)
                .transpose()?
                .map(Arc::new),
            feed: crate::events::feed::Feed::new(),
            receipts: config.receipts.clone(),
            seen: customers::SeenBuffer::default(),
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

    pub fn catalog(&self) -> &Catalog {
        &self.ctx.catalog
    }

    /// The customer's entitlements now, for a read-only answer: served from
    /// the read cache when fresh. Decisions inside a write use `snapshot_in`
    /// with their transaction instead.
    pub async fn snapshot(&self, customer_id: &str) -> AppResult<Snapshot> {
        let cached = self.cached_customer(customer_id).await?;
        Ok(compute(
            &self.ctx.catalog,
            &cached.facts,
            self.now(),
            self.ctx.accept_sandbox,
        ))
    }

    /// The customer row and its entitlements now, for a read-only answer;
    /// `None` when there is no such customer.
    pub async fn read_customer(
        &self,
        customer_id: &str,
    ) -> AppResult<Option<(customer_rows::Model, Snapshot)>> {
        let cached = self.cached_customer(customer_id).await?;
        let snapshot = compute(
            &self.ctx.catalog,
            &cached.facts,
            self.now(),
            self.ctx.accept_sandbox,
        );
        Ok(cached.customer.map(|c| (c, snapshot)))
    }

    /// The plain sentence behind one entitlement of the customer's snapshot.
    pub async fn explain(
        &self,
        customer_id: &str,
        state: &crate::domain::EntitlementState,
    ) -> AppResult<String> {
        let cached = self.cached_customer(customer_id).await?;
        Ok(crate::domain::explain(
            &self.ctx.catalog,
            &cached.facts,
            state,
            self.now(),
            self.ctx.accept_sandbox,
        ))
    }

    /// The plain sentence behind one purchase: what it grants now, or why
    /// it grants nothing.
    pub fn explain_purchase(&self, purchase: &PurchaseFacts) -> String {
        crate::domain::explain_purchase(
            &self.ctx.catalog,
            purchase,
            self.now(),
            self.ctx.accept_sandbox,
        )
    }

    async fn cached_customer(&self, customer_id: &str) -> AppResult<CachedCustomer> {
        if let Some(c) = self.ctx.db.cache.get(customer_id) {
            return Ok(c);
        }
        let epoch = self.ctx.db.cache.epoch(customer_id);
        // Entries are kept under the customer's own id only: a merge then
        // invalidates the old id, and the account's writes the account's.
        let customer = db::resolved_customer_row(&self.ctx.db.conn, customer_id).await?;
        let (customer, epoch) = match customer {
            Some(c) if c.id != customer_id => {
                // A merged-away id: start again from the account, whose
                // shard the epoch above does not cover.
                if let Some(cached) = self.ctx.db.cache.get(&c.id) {
                    return Ok(cached);
                }
                let epoch = self.ctx.db.cache.epoch(&c.id);
                let again = db::customer::find(&self.ctx.db.conn, &c.id).await?;
                (again, epoch)
            }
            other => (other, epoch),
        };
        let id = customer.as_ref().map_or(customer_id, |c| c.id.as_str());
        let facts = match &customer {
            Some(_) => db::purchase_facts_of(&self.ctx.db.conn, id).await?,
            None => Vec::new(),
        };
        let id = id.to_string();
        let cached = CachedCustomer {
            customer,
            facts: Arc::new(facts),
        };
        self.ctx.db.cache.fill(&id, epoch, cached.clone());
        Ok(cached)
    }

    /// Fills the read caches with the most recent `limit` customers and
    /// devices, so the first request for each after a restart does not pay
    /// a database read (on SQLite a read is a round trip to a worker
    /// thread; a restart under load would pay one or two per caller).
    /// Pages of ids are read first and their epochs taken before their rows
    /// are, so a write that commits meanwhile keeps its entry out.
    pub async fn warm_caches(&self, limit: u64) -> AppResult<(usize, usize)> {
        const PAGE: usize = 500;
        let conn = &self.ctx.db.conn;
        let mut customers = 0;
        for ids in db::recent_customer_ids(conn, limit).await?.chunks(PAGE) {
            let epochs: Vec<_> = ids.iter().map(|id| self.ctx.db.cache.epoch(id)).collect();
            let rows = db::customers_by_ids(conn, ids).await?;
            let mut facts = db::purchase_facts_of_many(conn, ids).await?;
            let mut rows: std::collections::HashMap<String, customer_rows::Model> =
                rows.into_iter().map(|r| (r.id.clone(), r)).collect();
            for (id, epoch) in ids.iter().zip(epochs) {
                let Some(row) = rows.remove(id) else { continue };
                let cached = CachedCustomer {
                    customer: Some(row),
                    facts: Arc::new(facts.remove(id).unwrap_or_default()),
                };
                self.ctx.db.cache.fill(id, epoch, cached);
                customers += 1;
            }
        }
        let mut devices = 0;
        for rows in db::recent_device_rows(conn, limit).await?.chunks(PAGE) {
            // Device rows are keyed by (platform, device id), known only
            // once read: take every shard's epoch for the page first.
            let epochs = self.ctx.db.device_cache.all_epochs();
            let found = db::devices_by_rows(conn, rows).await?;
            for d in found {
                let key = db::device_key(&d.platform, &d.device_id);
                let epoch = self.ctx.db.device_cache.epoch_from(&epochs, &key);
                self.ctx.db.device_cache.fill(&key, epoch, d);
                devices += 1;
            }
        }
        Ok((customers, devices))
    }
}

impl Ctx {
    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// The customer's entitlements at `now`, read through `c` (a transaction
    /// when the caller is about to change them).
    pub async fn snapshot_in(
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
    pub async fn state_before_write(
        &self,
        c: &impl Conn,
        customer_id: &str,
        now: DateTime<Utc>,
    ) -> AppResult<(Snapshot, usize)> {
        let (snapshot, _, written) = self.facts_before_write(c, customer_id, now).await?;
        Ok((snapshot, written))
    }

    /// [`Self::state_before_write`], with the purchase facts it was
    /// computed from, for a write that can tell what it changes in them.
    pub async fn facts_before_write(
        &self,
        c: &impl Conn,
        customer_id: &str,
        now: DateTime<Utc>,
    ) -> AppResult<(Snapshot, Vec<PurchaseFacts>, usize)> {
        let facts = db::purchase_facts_of(c, customer_id).await?;
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
    pub async fn record_transition(
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
