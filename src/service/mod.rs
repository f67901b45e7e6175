//! Use cases. Each state change is one transaction that writes the change
//! and its change-log rows together.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::ConnectionTrait;

use crate::{
    clock::Clock,
    config::Config,
    db::{self, Db},
    domain::{Catalog, Snapshot, TransferPolicy, TrialPolicy, compute, diff},
    error::AppResult,
};

pub mod api_keys;
pub mod apple;
pub mod customers;
pub mod google;
pub mod purchases;
pub mod stripe;

/// What every use case needs: the database, the catalog and the clock.
pub struct Core {
    pub db: Db,
    pub catalog: Catalog,
    pub clock: Arc<dyn Clock>,
    pub accept_sandbox: bool,
    pub trial: Option<TrialPolicy>,
    pub transfer_policy: TransferPolicy,
    /// Present when a `[stripe]` section is configured.
    pub stripe: Option<Arc<crate::providers::stripe::StripeProvider>>,
    /// Present when an `[apple]` section is configured.
    pub apple: Option<Arc<crate::providers::apple::Apple>>,
    pub google: Option<Arc<crate::providers::google::GooglePlay>>,
}

impl Core {
    pub fn new(config: &Config, db: Db, clock: Arc<dyn Clock>) -> anyhow::Result<Core> {
        Ok(Core {
            db,
            catalog: config.catalog()?,
            clock: clock.clone(),
            accept_sandbox: config.accept_sandbox,
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
        })
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// The customer's entitlements at `now`, read through `c` (a transaction
    /// when the caller is about to change them).
    pub async fn snapshot_in(
        &self,
        c: &impl ConnectionTrait,
        customer_id: &str,
        now: DateTime<Utc>,
    ) -> AppResult<Snapshot> {
        let facts = db::purchase_facts_of(c, customer_id).await?;
        Ok(compute(&self.catalog, &facts, now, self.accept_sandbox))
    }

    pub async fn snapshot(&self, customer_id: &str) -> AppResult<Snapshot> {
        self.snapshot_in(&self.db.conn, customer_id, self.now())
            .await
    }

    /// Writes one change-log row per entitlement that moved between `before`
    /// and the state now visible in `c`; returns the new state.
    pub async fn record_transition(
        &self,
        c: &impl ConnectionTrait,
        customer_id: &str,
        before: &Snapshot,
        now: DateTime<Utc>,
    ) -> AppResult<Snapshot> {
        let after = self.snapshot_in(c, customer_id, now).await?;
        db::record_changes(c, customer_id, &diff(before, &after), now).await?;
        Ok(after)
    }
}
