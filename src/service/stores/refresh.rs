//! Refresh: a purchase we hold is re-read from its store and what the store
//! says is applied, by one path for every store. A store supplies only the
//! re-read ([`Connector::reread_purchase`]) and its rules for applying it
//! ([`Ingest::apply_reread`]); reading outside the transaction, the one
//! transaction, and the store calls after commit are this path's.
//!
//! [`Connector::reread_purchase`]: crate::providers::Connector::reread_purchase

use entities::purchases;

use super::{Ingest, Stores};
use crate::{
    domain::{Environment, Store, webhook_log::WebhookOutcome},
    error::{AppError, AppResult},
    providers::{PurchaseRef, apple::Apple, google::GooglePlay, stripe::StripeProvider},
};

impl Stores {
    /// Re-reads a purchase we hold from its store's API and applies it; the
    /// outcome to record.
    pub async fn refresh_purchase(&self, p: &purchases::Model) -> AppResult<WebhookOutcome> {
        let purchase = PurchaseRef {
            store_purchase_id: &p.store_purchase_id,
            environment: p
                .environment
                .parse::<Environment>()
                .unwrap_or(Environment::Production),
        };
        match p.store.parse::<Store>() {
            Ok(Store::Stripe) => self.refresh::<StripeProvider>(purchase).await,
            Ok(Store::AppStore) => self.refresh::<Apple>(purchase).await,
            Ok(Store::PlayStore) => self.refresh::<GooglePlay>(purchase).await,
            _ => Err(AppError::Internal(anyhow::anyhow!(
                "purchase of store {} cannot be refreshed",
                p.store
            ))),
        }
    }

    /// [`Stores::refresh_purchase`] for a purchase of the store `S`.
    async fn refresh<S: Ingest>(&self, purchase: PurchaseRef<'_>) -> AppResult<WebhookOutcome> {
        let store = S::connector(self)?;
        // Asked before the transaction opens: a slow store must not hold
        // the writer.
        let Some(state) = store.reread_purchase(purchase, self.ctx.now()).await? else {
            return Ok(WebhookOutcome::UnknownStatus);
        };
        let txn = self.ctx.db.write().await?;
        let now = self.ctx.now();
        let (outcome, then) = store.apply_reread(self, &txn, state, now).await?;
        txn.commit().await?;
        store.after_commit(self, then).await;
        Ok(outcome)
    }
}
