//! App Store use cases: a customer submits a purchase, Apple notifies us.

use entities::purchases;
use serde_json::json;

use super::{Claim, Stores};
use crate::service::purchases::{Applied, StoreApplied, Submitter};
use crate::{
    db::store_purchases,
    domain::{Store, webhook_log::WebhookOutcome},
    error::{AppError, AppResult},
    providers::{
        VerifiedPurchase,
        apple::{self, Apple, Notification, Verified},
    },
};

/// What an app may submit to prove an App Store purchase.
#[derive(Clone, Debug)]
pub enum AppStoreSubmission {
    /// StoreKit 2 `Transaction.jwsRepresentation`.
    SignedTransaction(String),
    /// Any transaction id of the purchase, resolved through the App Store Server API.
    TransactionId(String),
    /// A legacy (StoreKit 1) app receipt, base64.
    AppReceipt(String),
}

impl AppStoreSubmission {
    fn audit(&self) -> serde_json::Value {
        match self {
            AppStoreSubmission::SignedTransaction(s) => json!({ "signedTransaction": s }),
            AppStoreSubmission::TransactionId(s) => json!({ "transactionId": s }),
            AppStoreSubmission::AppReceipt(s) => json!({ "appReceipt": s }),
        }
    }
}

impl Stores {
    /// The App Store connector, when configured.
    pub fn apple(&self) -> AppResult<&Apple> {
        self.apple
            .as_deref()
            .ok_or(AppError::NotConfigured("App Store"))
    }

    async fn resolve_app_store(
        &self,
        apple: &Apple,
        submission: &AppStoreSubmission,
    ) -> AppResult<VerifiedPurchase> {
        let verified = match submission {
            AppStoreSubmission::SignedTransaction(jws) => {
                let tx = apple.verify_transaction(jws.trim())?;
                let signed_date = tx.signed_date.ok_or_else(|| {
                    AppError::InvalidReceipt("transaction has no signedDate".into())
                })?;
                let env = apple::environment(&tx);
                let reread = match (apple.api(), tx.transaction_id.as_deref()) {
                    (Some(_), Some(id)) => match apple.reread(id, Some(env)).await {
                        Ok(v) => Some(v),
                        // The submission carries Apple's own signature: when
                        // Apple cannot be asked, it is the best truth we have.
                        Err(e @ (AppError::StoreUnavailable(_) | AppError::InvalidReceipt(_))) => {
                            tracing::warn!(
                                error = e.message(),
                                "App Store re-read failed; using the signed transaction"
                            );
                            None
                        }
                        Err(e) => return Err(e),
                    },
                    _ => None,
                };
                reread.unwrap_or(Verified {
                    transaction: tx,
                    renewal: None,
                    status: None,
                    notification: None,
                    signed_date,
                })
            }
            AppStoreSubmission::TransactionId(id) => apple.reread(id.trim(), None).await?,
            AppStoreSubmission::AppReceipt(receipt) => {
                let id = apple::transaction_id_from_receipt(receipt)?;
                apple.reread(&id, None).await?
            }
        };
        apple.purchase(&verified)
    }

    /// `verifyPurchase` for the App Store: records the submission, verifies
    /// it (re-reading Apple's API when configured), binds it to the customer
    /// under the transfer policy and applies it.
    pub async fn verify_app_store(
        &self,
        apple: &Apple,
        customer_id: &str,
        submission: AppStoreSubmission,
    ) -> AppResult<(Applied, purchases::Model)> {
        let receipt_id = self
            .purchases
            .record_receipt(customer_id, Store::AppStore, submission.audit())
            .await?;
        let result: AppResult<(Applied, purchases::Model)> = async {
            let vp = self.resolve_app_store(apple, &submission).await?;
            let txn = self.ctx.db.write().await?;
            let applied = self
                .purchases
                .apply_purchase_in(&txn, &vp, Submitter::Customer(customer_id), self.ctx.now())
                .await?;
            self.purchases
                .finish_receipt(&*txn, receipt_id, Ok(applied.purchase_id))
                .await?;
            let model = store_purchases::purchase(&*txn, applied.purchase_id)
                .await?
                .ok_or(AppError::NotFound("purchase"))?;
            txn.commit().await?;
            Ok((applied, model))
        }
        .await;
        if let Err(e) = &result {
            let reason = match e {
                AppError::Internal(_) => "internal error".to_string(),
                e => e.message(),
            };
            self.purchases
                .fail_receipt(receipt_id, customer_id, &reason)
                .await?;
        }
        result
    }

    /// Verifies and applies one notification's `signedPayload` from
    /// Apple's notification history, once per notificationUUID.
    pub async fn apple_signed_payload(
        &self,
        apple: &Apple,
        signed_payload: &str,
    ) -> AppResult<WebhookOutcome> {
        let n = apple.verify_notification(signed_payload.trim())?;
        self.receive::<Apple>(&n).await
    }

    pub(super) async fn ingest_apple_notification(
        &self,
        apple: &Apple,
        n: &Notification,
        claim: &Claim,
    ) -> AppResult<WebhookOutcome> {
        let verified = match n.verified().filter(|_| n.is_handled()) {
            None => None,
            Some(v) => match (apple.api(), v.transaction.transaction_id.clone()) {
                (Some(_), Some(id)) => {
                    let env = apple::environment(&v.transaction);
                    match apple.reread(&id, Some(env)).await {
                        Ok(mut fresh) => {
                            fresh.notification = v.notification.clone();
                            Some(fresh)
                        }
                        // Apple answering "unknown" to its own signed
                        // notification: apply what it signed.
                        Err(AppError::InvalidReceipt(_)) => Some(v),
                        // Down: fail, so Apple delivers again later.
                        Err(e) => return Err(e),
                    }
                }
                _ => Some(v),
            },
        };
        let vp = verified.map(|v| apple.purchase(&v)).transpose()?;

        let now = self.ctx.now();
        let txn = self.ctx.db.write().await?;
        let unknown = match &vp {
            Some(vp) => self.is_unknown_product(&txn, vp).await?,
            None => false,
        };
        let (outcome, customer) = match &vp {
            _ if unknown => (WebhookOutcome::UnknownProduct, None),
            None => (WebhookOutcome::Ignored, None),
            Some(vp) => match self.purchases.apply_store_in(&txn, vp, now).await? {
                StoreApplied::Applied(a) if a.stale => (WebhookOutcome::Stale, Some(a.customer_id)),
                StoreApplied::Applied(a) => (WebhookOutcome::Applied, Some(a.customer_id)),
                StoreApplied::Held { stale: true } => (WebhookOutcome::Stale, None),
                StoreApplied::Held { stale: false } => (WebhookOutcome::Held, None),
            },
        };
        if !self
            .claim_and_commit::<Apple>(txn, n, outcome, customer.as_deref(), claim)
            .await?
        {
            return Ok(WebhookOutcome::Duplicate);
        }
        tracing::info!(
            notification = %n.kind,
            outcome = outcome.as_str(),
            "App Store notification"
        );
        Ok(outcome)
    }
}
