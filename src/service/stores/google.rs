//! Google Play use cases: an app submits a purchase (token or legacy
//! receipt), and Google pushes real-time developer notifications.
//!
//! Acknowledgement: Google refunds a purchase nobody acknowledged within
//! three days. We acknowledge after the purchase is committed. When that
//! call fails the purchase stays granted, and the stored `raw` (Google's
//! own answer) still says `acknowledgementState` pending: that is the
//! reminder. Every later read of the purchase (a notification, a
//! resubmission) acknowledges again, and a periodic sweep
//! ([`Stores::retry_play_acknowledgements`]) retries the ones still pending
//! within the three days. A successful acknowledgement marks `raw` so.

use serde_json::json;

use super::{Claim, Stores};
use crate::service::purchases::{Applied, StoreApplied, Submitter};
use crate::{
    db::{self, WriteTxn, store_purchases},
    domain::rules,
    domain::{ProductDef, ProductKind, PurchaseStatus, Store, webhook_log::WebhookOutcome},
    error::{AppError, AppResult},
    providers::VerifiedPurchase,
    providers::google::{
        self as play, Fetched, GoogleError, GooglePlay, PlayKind,
        rtdn::{self, DeveloperNotification},
    },
};

/// What an app submits for Google Play.
#[derive(Clone, Debug)]
pub enum PlaySubmission {
    /// A Play Billing purchase token.
    Token {
        package_name: String,
        product_id: String,
        purchase_token: String,
    },
    /// A legacy signed receipt: `INAPP_PURCHASE_DATA` and `INAPP_DATA_SIGNATURE`.
    Receipt {
        signed_data: String,
        signature: String,
    },
}

impl PlaySubmission {
    fn audit_payload(&self) -> serde_json::Value {
        match self {
            PlaySubmission::Token {
                package_name,
                product_id,
                purchase_token,
            } => json!({
                "packageName": package_name,
                "productId": product_id,
                "purchaseToken": purchase_token,
            }),
            PlaySubmission::Receipt {
                signed_data,
                signature,
            } => json!({ "signedData": signed_data, "signature": signature }),
        }
    }
}

fn bare(product_id: &str) -> &str {
    product_id.split(':').next().unwrap_or(product_id)
}

impl Stores {
    /// The Google Play connector, when configured.
    pub fn google(&self) -> AppResult<&GooglePlay> {
        self.google
            .as_deref()
            .ok_or(AppError::NotConfigured("Google Play"))
    }

    /// The catalog product a Play product id (bare or `product:basePlan`) names.
    fn play_product(&self, product_id: &str) -> Option<&ProductDef> {
        let products = self.ctx.catalog.products();
        products
            .iter()
            .find(|p| p.play_store_product_id.as_deref() == Some(product_id))
            .or_else(|| {
                products.iter().find(|p| {
                    p.play_store_product_id
                        .as_deref()
                        .is_some_and(|id| bare(id) == bare(product_id))
                })
            })
    }

    async fn fetch_play(
        &self,
        google: &GooglePlay,
        kind: ProductKind,
        product_id: &str,
        token: &str,
    ) -> Result<Fetched, GoogleError> {
        let now = self.ctx.now();
        match kind {
            ProductKind::Subscription => {
                google
                    .fetch_subscription(token, Some(product_id), now)
                    .await
            }
            ProductKind::Lifetime => google.fetch_product(bare(product_id), token, now).await,
        }
    }

    /// Google never reinstates a refunded or revoked token (a new purchase
    /// gets a new token), so once we hold one as such, later reads keep
    /// that status and its time, whatever else they update. That includes a
    /// later read of the same refund: the voided-purchase notification and
    /// the voided-purchases list report one void under different times (the
    /// notification's own, the void's), and the second must not move it.
    pub(super) async fn keep_play_refund(
        &self,
        txn: &WriteTxn,
        purchase: VerifiedPurchase,
    ) -> AppResult<VerifiedPurchase> {
        let token = purchase.store_purchase_id.as_str();
        let stored = store_purchases::store_purchase(&**txn, Store::PlayStore, token).await?;
        let stored = match stored {
            Some(s) => Some((s.status, s.revoked_at)),
            None => store_purchases::held_purchase(&**txn, Store::PlayStore, token)
                .await?
                .and_then(|h| play::held_final(&h.state)),
        };
        Ok(match stored {
            Some((status, revoked_at)) => match status.parse::<PurchaseStatus>() {
                Ok(st) if rules::is_final(st) => {
                    let incoming = rules::Version {
                        status: purchase.status,
                        source_updated_at: purchase.source_updated_at,
                        revoked_at: purchase.revoked_at,
                    };
                    let revoked_at = rules::kept_revocation(revoked_at, incoming);
                    play::keep_final(purchase, st, revoked_at)
                }
                _ => purchase,
            },
            None => purchase,
        })
    }

    /// True when acknowledged (and so marked in the stored purchase).
    pub(super) async fn acknowledge_play(
        &self,
        google: &GooglePlay,
        kind: &PlayKind,
        token: &str,
    ) -> bool {
        if let Err(e) = google.acknowledge(kind, token).await {
            tracing::warn!(
                error = ?e,
                "Play acknowledgement failed; it is retried later"
            );
            return false;
        }
        if let Err(e) = self.mark_play_acknowledged(token).await {
            tracing::warn!(
                error = e.for_log(),
                "could not record a Play acknowledgement"
            );
        }
        true
    }

    /// Notes in the stored payload that Google has the acknowledgement, so
    /// the sweep skips it. `raw` is audit data: no change-log row.
    async fn mark_play_acknowledged(&self, token: &str) -> AppResult<()> {
        let txn = self.ctx.db.write().await?;
        let row = store_purchases::store_purchase(&*txn, Store::PlayStore, token).await?;
        if let Some(row) = row
            && let Some(mut raw) = row.raw.clone()
            && let Some(obj) = raw.as_object_mut()
        {
            let acked = if obj
                .get("acknowledgementState")
                .is_some_and(|v| v.is_number())
            {
                json!(1)
            } else {
                json!("ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED")
            };
            obj.insert("acknowledgementState".into(), acked);
            store_purchases::replace_raw(&*txn, row, raw).await?;
        }
        txn.commit().await
    }

    /// Acknowledges the Play purchases of the last three days whose stored
    /// state says Google still waits for it (Google was down when they were
    /// verified). Returns how many it acknowledged.
    pub async fn retry_play_acknowledgements(&self) -> AppResult<usize> {
        let Some(google) = self.google.as_deref() else {
            return Ok(0);
        };
        let since = self.ctx.now() - chrono::Duration::days(3);
        let rows = store_purchases::purchases_since(
            &self.ctx.db.conn,
            Store::PlayStore,
            since,
            &[
                PurchaseStatus::Active,
                PurchaseStatus::Trialing,
                PurchaseStatus::Canceled,
                PurchaseStatus::InGracePeriod,
            ],
        )
        .await?;
        let mut done = 0;
        for p in rows.iter().filter(|p| {
            p.raw.as_ref().is_some_and(|r| {
                r["acknowledgementState"] == "ACKNOWLEDGEMENT_STATE_PENDING"
                    || r["acknowledgementState"] == 0
            })
        }) {
            let Some(kind) = self.play_product(&p.product_id).map(|d| d.kind) else {
                continue;
            };
            match self
                .fetch_play(google, kind, &p.product_id, &p.store_purchase_id)
                .await
            {
                Ok(f) if f.needs_ack => {
                    if self
                        .acknowledge_play(google, &f.kind, &p.store_purchase_id)
                        .await
                    {
                        done += 1;
                    }
                }
                // Acknowledged meanwhile, or no longer to be acknowledged.
                Ok(_) => self.mark_play_acknowledged(&p.store_purchase_id).await?,
                Err(e) => tracing::warn!(error = ?e, "Play acknowledgement retry: read failed"),
            }
        }
        Ok(done)
    }

    /// `verifyPurchase` for Google Play: records the submission, reads the
    /// purchase from the Play API, gives it to `customer_id` (subject to the
    /// transfer policy), and acknowledges it.
    pub async fn verify_play_purchase(
        &self,
        customer_id: &str,
        submission: PlaySubmission,
    ) -> AppResult<Applied> {
        let google = self.google()?;
        let receipt_id = self
            .purchases
            .record_receipt(customer_id, Store::PlayStore, submission.audit_payload())
            .await?;
        let result = self
            .verify_play_inner(google, customer_id, &submission, receipt_id)
            .await;
        if let Err(e) = &result {
            self.purchases
                .fail_receipt(receipt_id, customer_id, &e.message())
                .await?;
        }
        result
    }

    async fn verify_play_inner(
        &self,
        google: &GooglePlay,
        customer_id: &str,
        submission: &PlaySubmission,
        receipt_id: i64,
    ) -> AppResult<Applied> {
        let (package_name, product_id, token) = match submission {
            PlaySubmission::Token {
                package_name,
                product_id,
                purchase_token,
            } => (
                package_name.clone(),
                product_id.clone(),
                purchase_token.clone(),
            ),
            PlaySubmission::Receipt {
                signed_data,
                signature,
            } => {
                let p = google.verify_legacy(signed_data, signature)?;
                (p.package_name, p.product_id, p.purchase_token)
            }
        };
        google.check_package(&package_name)?;
        if token.is_empty() {
            return Err(AppError::bad_input("purchaseToken is empty"));
        }
        let kind = self
            .play_product(&product_id)
            .ok_or_else(|| AppError::bad_input("productId is not a Play product of the catalog"))?
            .kind;
        let fetched = self.fetch_play(google, kind, &product_id, &token).await?;

        let txn = self.ctx.db.write().await?;
        let now = self.ctx.now();
        let purchase = self.keep_play_refund(&txn, fetched.purchase).await?;
        let applied = self
            .purchases
            .apply_purchase_in(&txn, &purchase, Submitter::Customer(customer_id), now)
            .await?;
        self.purchases
            .finish_receipt(&*txn, receipt_id, Ok(applied.purchase_id))
            .await?;
        txn.commit().await?;

        if fetched.needs_ack {
            self.acknowledge_play(google, &fetched.kind, &token).await;
        }
        Ok(applied)
    }

    pub(super) async fn ingest_play_notification(
        &self,
        google: &GooglePlay,
        push: &play::VerifiedPush,
        claim: &Claim,
    ) -> AppResult<WebhookOutcome> {
        let n = &push.notification;
        let fetched = match self.read_notified(google, n, push.event_time).await {
            Ok(f) => f,
            Err(AppError::InvalidReceipt(_)) => Err(WebhookOutcome::UnknownPurchase),
            Err(e) => return Err(e),
        };

        let txn = self.ctx.db.write().await?;
        let now = self.ctx.now();
        let (fetched, ack) = match fetched {
            Ok(f) => {
                let ack = (f.needs_ack, f.kind);
                (
                    Ok(self.keep_play_refund(&txn, f.purchase).await?),
                    Some(ack),
                )
            }
            Err(o) => (Err(o), None),
        };
        let (outcome, customer) = match &fetched {
            Err(o) => (*o, None),
            Ok(purchase) if self.is_unknown_product(&txn, purchase).await? => {
                (WebhookOutcome::UnknownProduct, None)
            }
            Ok(purchase) => {
                let applied = self.purchases.apply_store_in(&txn, purchase, now).await?;
                let customer = match &applied {
                    StoreApplied::Applied(a) => Some(a.customer_id.clone()),
                    StoreApplied::Held { .. } => None,
                };
                (store_outcome(applied), customer)
            }
        };
        if !self
            .claim_and_commit::<GooglePlay>(txn, push, outcome, customer.as_deref(), claim)
            .await?
        {
            return Ok(WebhookOutcome::Duplicate);
        }

        if let (Ok(purchase), Some((true, kind))) = (&fetched, &ack)
            && matches!(outcome, WebhookOutcome::Applied | WebhookOutcome::Stale)
        {
            self.acknowledge_play(google, kind, &purchase.store_purchase_id)
                .await;
        }
        Ok(outcome)
    }

    /// Re-reads the purchase a notification is about. `Err(outcome)` when
    /// there is nothing to apply.
    async fn read_notified(
        &self,
        google: &GooglePlay,
        n: &DeveloperNotification,
        event_time: chrono::DateTime<chrono::Utc>,
    ) -> AppResult<Result<Fetched, WebhookOutcome>> {
        if let Some(s) = &n.subscription_notification {
            let now = self.ctx.now();
            let f = google
                .fetch_subscription(&s.purchase_token, None, now)
                .await?;
            let f = play::stamped(f, event_time);
            return Ok(Ok(if s.notification_type == rtdn::SUBSCRIPTION_REVOKED {
                play::revoked(f, event_time)
            } else {
                f
            }));
        }
        if let Some(o) = &n.one_time_product_notification {
            let f = google
                .fetch_product(&o.sku, &o.purchase_token, self.ctx.now())
                .await?;
            return Ok(Ok(play::stamped(f, event_time)));
        }
        if let Some(v) = &n.voided_purchase_notification {
            return self
                .read_voided(
                    google,
                    &v.purchase_token,
                    v.product_type,
                    v.refund_type,
                    event_time,
                )
                .await;
        }
        if n.test_notification.is_some() {
            return Ok(Err(WebhookOutcome::Test));
        }
        Ok(Err(WebhookOutcome::Ignored))
    }

    /// Re-reads a voided purchase we hold and turns it into a refund as of
    /// `voided_at`. `product_type` is 1 (subscription) or 2 (one-time) when
    /// the caller knows; `refund_type` 2 is a partial, quantity-based refund.
    async fn read_voided(
        &self,
        google: &GooglePlay,
        token: &str,
        product_type: Option<i32>,
        refund_type: Option<i32>,
        voided_at: chrono::DateTime<chrono::Utc>,
    ) -> AppResult<Result<Fetched, WebhookOutcome>> {
        let now = self.ctx.now();
        // What we know of it: a stored purchase, or one held for its owner.
        let stored =
            match store_purchases::store_purchase(&self.ctx.db.conn, Store::PlayStore, token)
                .await?
            {
                Some(p) => Some((p.product_id, p.expires_at.is_some())),
                None => store_purchases::held_purchase(&self.ctx.db.conn, Store::PlayStore, token)
                    .await?
                    .and_then(|h| {
                        let product = h.state.get("product_id")?.as_str()?.to_string();
                        let is_sub = h.state.get("expires_at").is_some_and(|e| !e.is_null());
                        Some((product, is_sub))
                    }),
            };
        let is_sub = match (product_type, &stored) {
            (Some(1), _) => true,
            (Some(2), _) => false,
            (_, Some((_, is_sub))) => *is_sub,
            // A refund of a purchase nobody here ever had, of a kind we
            // cannot tell.
            (_, None) => return Ok(Err(WebhookOutcome::Unattributed)),
        };
        let f = match (is_sub, &stored) {
            // Google still tells whose it is: held for them if need be.
            (true, _) => google.fetch_subscription(token, None, now).await?,
            (false, Some((product_id, _))) => {
                google.fetch_product(bare(product_id), token, now).await?
            }
            // A one-time product is read by its id, which the refund omits.
            (false, None) => return Ok(Err(WebhookOutcome::Unattributed)),
        };
        let f = play::stamped(f, voided_at);
        // A partial refund of a multi-quantity product leaves the rest.
        Ok(Ok(if refund_type == Some(2) && !is_sub {
            f
        } else {
            play::voided(f, voided_at)
        }))
    }

    /// Applies one entry of the Play voided-purchases list (reconciliation),
    /// once per voided order.
    pub async fn apply_play_voided(
        &self,
        google: &GooglePlay,
        v: &play::VoidedPurchase,
    ) -> AppResult<WebhookOutcome> {
        let event_id = voided_event_id(v);
        let seen = db::webhook_log::webhook_event_by_source(
            &self.ctx.db.conn,
            Store::PlayStore,
            &event_id,
        )
        .await?;
        if seen.is_some() {
            return Ok(WebhookOutcome::Duplicate);
        }
        let fetched = match self
            .read_voided(google, &v.purchase_token, None, v.refund_type, v.voided_at)
            .await
        {
            Ok(Ok(f)) => f,
            // Not ours, or Google no longer knows it: nothing to record, so
            // a later run may still apply it once the purchase is submitted.
            Ok(Err(o)) => return Ok(o),
            Err(AppError::InvalidReceipt(_)) => return Ok(WebhookOutcome::UnknownPurchase),
            Err(e) => return Err(e),
        };
        let txn = self.ctx.db.write().await?;
        let now = self.ctx.now();
        let purchase = self.keep_play_refund(&txn, fetched.purchase).await?;
        let applied = self.purchases.apply_store_in(&txn, &purchase, now).await?;
        let customer = match &applied {
            StoreApplied::Applied(a) => Some(a.customer_id.clone()),
            StoreApplied::Held { .. } => None,
        };
        let outcome = store_outcome(applied);
        let payload = json!({
            "voidedPurchase": {
                "purchaseToken": v.purchase_token,
                "orderId": v.order_id,
                "voidedTimeMillis": v.voided_at.timestamp_millis().to_string(),
                "voidedReason": v.voided_reason,
                "refundType": v.refund_type,
            }
        });
        if !self
            .purchases
            .claim_webhook(
                &txn,
                Store::PlayStore,
                &event_id,
                &payload,
                outcome.as_str(),
                customer.as_deref(),
                now,
            )
            .await?
        {
            txn.abandon().await?;
            return Ok(WebhookOutcome::Duplicate);
        }
        txn.commit().await?;
        Ok(outcome)
    }
}

fn store_outcome(a: StoreApplied) -> WebhookOutcome {
    match a {
        StoreApplied::Applied(a) if a.stale => WebhookOutcome::Stale,
        StoreApplied::Applied(_) => WebhookOutcome::Applied,
        StoreApplied::Held { stale: true } => WebhookOutcome::Stale,
        StoreApplied::Held { stale: false } => WebhookOutcome::Held,
    }
}

/// A voided order's dedupe key: tokens are long, so it is hashed to fit.
fn voided_event_id(v: &play::VoidedPurchase) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        v.purchase_token.as_str(),
        v.order_id.as_deref().unwrap_or_default(),
        &v.voided_at.timestamp_millis().to_string(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    format!("voided:{}", hex::encode(&h.finalize()[..16]))
}
