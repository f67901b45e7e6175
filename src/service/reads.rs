//! Reading access: what a customer may use now and why, their records, and
//! the read caches that spare the database the common reads.

use std::sync::Arc;

use entities::{customers, devices, entitlement_events, purchases, receipts};

use super::Ctx;
use crate::{
    db::{self, CachedCustomer, store_purchases},
    domain::{EntitlementState, ProductDef, PurchaseFacts, Snapshot, compute},
    error::AppResult,
};

#[derive(Clone)]
pub struct Reads {
    ctx: Arc<Ctx>,
}

impl Reads {
    pub(super) fn new(ctx: Arc<Ctx>) -> Reads {
        Reads { ctx }
    }

    /// The customer's entitlements now, for a read-only answer: served from
    /// the read cache when fresh. Decisions inside a write use `snapshot_in`
    /// with their transaction instead.
    pub async fn snapshot(&self, customer_id: &str) -> AppResult<Snapshot> {
        let cached = self.cached_customer(customer_id).await?;
        Ok(compute(
            &self.ctx.catalog,
            &cached.facts,
            self.ctx.now(),
            self.ctx.accept_sandbox,
        ))
    }

    /// The customer row and its entitlements now, for a read-only answer;
    /// `None` when there is no such customer.
    pub async fn read_customer(
        &self,
        customer_id: &str,
    ) -> AppResult<Option<(customers::Model, Snapshot)>> {
        let cached = self.cached_customer(customer_id).await?;
        let snapshot = compute(
            &self.ctx.catalog,
            &cached.facts,
            self.ctx.now(),
            self.ctx.accept_sandbox,
        );
        Ok(cached.customer.map(|c| (c, snapshot)))
    }

    /// The plain sentence behind one entitlement of the customer's snapshot.
    pub async fn explain(&self, customer_id: &str, state: &EntitlementState) -> AppResult<String> {
        let cached = self.cached_customer(customer_id).await?;
        Ok(crate::domain::explain(
            &self.ctx.catalog,
            &cached.facts,
            state,
            self.ctx.now(),
            self.ctx.accept_sandbox,
        ))
    }

    /// The plain sentence behind one purchase: what it grants now, or why
    /// it grants nothing.
    pub fn explain_purchase(&self, purchase: &PurchaseFacts) -> String {
        crate::domain::explain_purchase(
            &self.ctx.catalog,
            purchase,
            self.ctx.now(),
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
            let mut rows: std::collections::HashMap<String, customers::Model> =
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

    /// The customer an id names, following a merge to the account.
    pub async fn find_customer(&self, id: &str) -> AppResult<Option<customers::Model>> {
        let id = db::resolve_customer(&self.ctx.db.conn, id).await?;
        db::customer::find(&self.ctx.db.conn, &id).await
    }

    /// The catalog's products, for paywalls.
    pub fn products(&self) -> &[ProductDef] {
        self.ctx.catalog.products()
    }

    /// Customers ordered by id, after the id `after`, matching `search`;
    /// and whether more follow.
    pub async fn customers_page(
        &self,
        search: Option<&str>,
        after: Option<&str>,
        first: u64,
    ) -> AppResult<(Vec<customers::Model>, bool)> {
        db::customers_page(&self.ctx.db.conn, search, after, first).await
    }

    pub async fn devices_of(&self, customer_id: &str) -> AppResult<Vec<devices::Model>> {
        db::devices_of(&self.ctx.db.conn, customer_id).await
    }

    pub async fn purchases_of(&self, customer_id: &str) -> AppResult<Vec<purchases::Model>> {
        db::purchases_of(&self.ctx.db.conn, customer_id).await
    }

    pub async fn purchase(&self, id: i64) -> AppResult<Option<purchases::Model>> {
        store_purchases::purchase(&self.ctx.db.conn, id).await
    }

    /// Purchase submissions, newest first.
    pub async fn receipts_of(
        &self,
        customer_id: &str,
        limit: u64,
    ) -> AppResult<Vec<receipts::Model>> {
        db::receipts_of(&self.ctx.db.conn, customer_id, limit).await
    }

    /// The entitlement change log, newest first.
    pub async fn events_of(
        &self,
        customer_id: &str,
        limit: u64,
    ) -> AppResult<Vec<entitlement_events::Model>> {
        db::events_of(&self.ctx.db.conn, customer_id, limit).await
    }
}
