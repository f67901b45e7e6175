//! Stripe use cases: applying a signed webhook, and starting Checkout or the
//! billing portal for a customer.
//!
//! A webhook is processed as: verify the signature, skip a known event id,
//! read the truth from the Stripe API (outside any transaction), then in one
//! transaction claim the event id and apply its effect. A failure before
//! commit leaves no `webhook_events` row, so Stripe's retry is processed.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use stripe_shared::{CheckoutSessionMode, CheckoutSessionPaymentStatus};

use super::{Claim, Stores};
use crate::service::purchases::Submitter;
use crate::{
    db::{self, WriteTxn, store_purchases},
    domain::{ExternalId, ProductKind, PurchaseStatus, Store, webhook_log::WebhookOutcome},
    error::{AppError, AppResult},
    providers::stripe::{
        self as provider, CheckoutRequest, StripeProvider, StripeState, VerifiedEvent,
    },
};

/// Key in `customers.attributes` holding the customer's Stripe customer id.
pub const STRIPE_CUSTOMER_ATTR: &str = "stripe_customer_id";

/// What a verified event asks of the database.
enum Plan {
    /// Apply this state. `customer` is who the event names (checked id);
    /// otherwise the purchase's owner, or the Stripe customer on file.
    Apply {
        state: Box<StripeState>,
        customer: Option<String>,
        /// A paid renewal invoice of this subscription: one more renewal.
        renewal_of: Option<String>,
    },
    /// A paid renewal invoice, learnt without the API: count it on the
    /// subscription we hold; the subscription events carry the state.
    CountRenewal { subscription: String },
    /// A chargeback opened or closed on a charge of ours.
    Dispute(Box<DisputeFacts>),
    /// Remember which Stripe customer `customer` is; nothing to apply.
    Bind {
        customer: String,
        stripe_customer: String,
        email: Option<String>,
    },
    Refund {
        charge: Value,
        refunded_at: DateTime<Utc>,
    },
    /// Recorded and acknowledged with this outcome; no state change.
    Record(WebhookOutcome),
    /// A paid event we could not attribute (`unknown_product`,
    /// `no_customer`), with the customer it names if any; kept for a replay.
    Unmatched {
        outcome: WebhookOutcome,
        customer: Option<String>,
    },
}

/// What a dispute event says and how to find the purchase it disputes.
struct DisputeFacts {
    dispute: Value,
    /// `won`, `lost`, or an open status (`needs_response`, ...).
    status: String,
    /// The event kind was `charge.dispute.closed`.
    closed: bool,
    at: DateTime<Utc>,
    payment_intent: Option<String>,
    invoice: Option<String>,
    subscription: Option<String>,
}

/// Outcomes that acknowledge a paid event we could not attribute: kept with
/// the verified payload for a replay, and logged.
fn unattributed(outcome: WebhookOutcome) -> bool {
    matches!(
        outcome,
        WebhookOutcome::Unmatched
            | WebhookOutcome::UnmatchedRefund
            | WebhookOutcome::UnmatchedDispute
            | WebhookOutcome::UnknownProduct
            | WebhookOutcome::NoCustomer
    )
}

fn checked_customer(raw: Option<String>, what: &str) -> AppResult<Option<String>> {
    match raw.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => ExternalId::parse(&s)
            .map(|id| Some(id.as_str().to_string()))
            .map_err(|e| AppError::bad_input(format!("invalid {what}: {e}"))),
    }
}

impl Stores {
    /// The Stripe connector, when configured.
    pub fn stripe(&self) -> AppResult<&Arc<StripeProvider>> {
        self.stripe
            .as_ref()
            .ok_or(AppError::NotConfigured("Stripe"))
    }

    /// The one ingest path of a Stripe event: plan (reading the API outside
    /// any transaction), then claim its row and apply in one transaction.
    pub(super) async fn ingest_stripe_event(
        &self,
        p: &StripeProvider,
        ev: &VerifiedEvent,
        claim: &Claim,
    ) -> AppResult<WebhookOutcome> {
        let plan = self.plan_stripe_event(p, ev).await?;

        let now = self.ctx.now();
        let txn = self.ctx.db.write().await?;
        let (outcome, customer) = match plan {
            Plan::Record(o) => (o, None),
            Plan::Unmatched { outcome, customer } => (outcome, customer),
            Plan::Bind {
                customer,
                stripe_customer,
                email,
            } => {
                let customer = db::lock_resolved_customer(&txn, &customer).await?;
                self.purchases
                    .ensure_customer_in(&txn, &customer, now)
                    .await?;
                remember_stripe_customer(&txn, &customer, &stripe_customer, email.as_deref())
                    .await?;
                (WebhookOutcome::Bound, Some(customer))
            }
            Plan::Apply {
                state,
                customer,
                renewal_of,
            } => {
                let (o, who) = self.apply_stripe_state(&txn, *state, customer, now).await?;
                match renewal_of {
                    Some(sub) if count_renewal(&txn, &sub).await?.is_some() => (o, who),
                    Some(_) => (WebhookOutcome::Unmatched, who),
                    None => (o, who),
                }
            }
            Plan::CountRenewal { subscription } => {
                match count_renewal(&txn, &subscription).await? {
                    Some(who) => (WebhookOutcome::RenewalCounted, Some(who)),
                    None => (WebhookOutcome::Unmatched, None),
                }
            }
            Plan::Dispute(d) => self.apply_dispute(&txn, p, &d, now).await?,
            Plan::Refund {
                charge,
                refunded_at,
            } => {
                self.apply_refund(&txn, p, &charge, refunded_at, now)
                    .await?
            }
        };
        if !self
            .claim_and_commit::<StripeProvider>(txn, ev, outcome, customer.as_deref(), claim)
            .await?
        {
            return Ok(WebhookOutcome::Duplicate);
        }
        if unattributed(outcome) {
            tracing::warn!(
                event = %ev.id,
                kind = %ev.kind,
                outcome = outcome.as_str(),
                "Stripe event names no purchase, product or customer we know; recorded for replay"
            );
        } else {
            tracing::debug!(event = %ev.id, kind = %ev.kind, source = ?ev.source(), outcome = outcome.as_str(), "stripe event");
        }
        Ok(outcome)
    }

    async fn plan_stripe_event(&self, p: &StripeProvider, ev: &VerifiedEvent) -> AppResult<Plan> {
        let now = self.ctx.now();
        match ev.kind.as_str() {
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
                let session = provider::parse_session(ev.object())?;
                let customer = checked_customer(
                    session
                        .client_reference_id
                        .clone()
                        .or_else(|| p.metadata_customer(session.metadata.as_ref())),
                    "client_reference_id",
                )?;
                if matches!(session.payment_status, CheckoutSessionPaymentStatus::Unpaid) {
                    // An asynchronous payment; `async_payment_succeeded` follows.
                    return Ok(Plan::Record(WebhookOutcome::AwaitingPayment));
                }
                let stripe_customer = session.customer.as_ref().map(|c| c.id().to_string());
                match session.mode {
                    CheckoutSessionMode::Subscription => {
                        let Some(sub_id) =
                            session.subscription.as_ref().map(|s| s.id().to_string())
                        else {
                            return Ok(Plan::Record(WebhookOutcome::NoSubscription));
                        };
                        match p.subscription_state(&sub_id, None, now).await? {
                            Some(mut state) => {
                                state.email = provider::session_email(&session);
                                Ok(Plan::Apply {
                                    state: Box::new(state),
                                    customer,
                                    renewal_of: None,
                                })
                            }
                            // Without the API the subscription events carry the
                            // state; this event tells whose it is.
                            None => Ok(match (customer, stripe_customer) {
                                (Some(customer), Some(stripe_customer)) => Plan::Bind {
                                    customer,
                                    stripe_customer,
                                    email: provider::session_email(&session),
                                },
                                _ => Plan::Record(WebhookOutcome::Unmatched),
                            }),
                        }
                    }
                    CheckoutSessionMode::Payment => {
                        let price = match p.api() {
                            Some(api) => api.session_price(session.id.as_str()).await?,
                            None => None,
                        };
                        let Some((kind, product_key)) =
                            self.stripe_session_product(&session, price.as_deref(), p)
                        else {
                            return Ok(Plan::Unmatched {
                                outcome: WebhookOutcome::UnknownProduct,
                                customer,
                            });
                        };
                        if kind == ProductKind::Subscription {
                            return Ok(Plan::Record(WebhookOutcome::NotLifetime));
                        }
                        let customer = match customer {
                            Some(c) => Some(c),
                            None => match &stripe_customer {
                                Some(sc) => self.customer_by_stripe_id(sc).await?,
                                None => None,
                            },
                        };
                        let Some(customer) = customer else {
                            return Ok(Plan::Unmatched {
                                outcome: WebhookOutcome::NoCustomer,
                                customer: None,
                            });
                        };
                        Ok(Plan::Apply {
                            state: Box::new(p.lifetime_state(
                                &session,
                                &product_key,
                                customer.clone(),
                                ev.created,
                            )),
                            customer: Some(customer),
                            renewal_of: None,
                        })
                    }
                    _ => Ok(Plan::Record(WebhookOutcome::Ignored)),
                }
            }
            "checkout.session.async_payment_failed" => {
                Ok(Plan::Record(WebhookOutcome::PaymentFailed))
            }
            "customer.subscription.created"
            | "customer.subscription.updated"
            | "customer.subscription.deleted"
            | "customer.subscription.paused"
            | "customer.subscription.resumed" => {
                let sub = provider::parse_subscription(ev.object())?;
                let customer = p.metadata_customer(Some(&sub.metadata));
                match p
                    .subscription_state(sub.id.as_str(), Some((&sub, ev.created)), now)
                    .await?
                {
                    Some(state) => Ok(Plan::Apply {
                        state: Box::new(state),
                        customer,
                        renewal_of: None,
                    }),
                    None => Ok(Plan::Record(WebhookOutcome::UnknownStatus)),
                }
            }
            "invoice.paid" | "invoice.payment_failed" => {
                let Some(sub_id) = provider::invoice_subscription(ev.object()) else {
                    return Ok(Plan::Record(WebhookOutcome::NotSubscription));
                };
                // A renewal is a paid invoice of a new billing cycle; the
                // first invoice is the purchase itself.
                let renewal = ev.kind == "invoice.paid"
                    && ev.object().get("billing_reason").and_then(Value::as_str)
                        == Some("subscription_cycle");
                if p.api().is_none() {
                    // The subscription events that follow carry the state.
                    return Ok(if renewal {
                        Plan::CountRenewal {
                            subscription: sub_id,
                        }
                    } else {
                        Plan::Record(WebhookOutcome::HintWithoutApi)
                    });
                }
                match p.subscription_state(&sub_id, None, now).await? {
                    Some(state) => Ok(Plan::Apply {
                        customer: p.json_metadata_customer(ev.object()),
                        state: Box::new(state),
                        renewal_of: renewal.then_some(sub_id),
                    }),
                    None => Ok(Plan::Record(WebhookOutcome::UnknownStatus)),
                }
            }
            "charge.dispute.created" | "charge.dispute.closed" => {
                let closed = ev.kind == "charge.dispute.closed";
                let mut dispute = ev.object().clone();
                let id = dispute
                    .get("id")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| AppError::bad_input("malformed Stripe dispute"))?;
                let at = if closed {
                    ev.created
                } else {
                    dispute
                        .get("created")
                        .and_then(Value::as_i64)
                        .map(provider::map::ts)
                        .unwrap_or(ev.created)
                };
                let mut invoice = None;
                let mut subscription = None;
                if let Some(api) = p.api() {
                    // The event is a hint: Stripe's current word on the
                    // dispute decides, and names what it disputes.
                    let current = api.dispute(&id).await?;
                    if current.get("status").and_then(Value::as_str).is_some() {
                        dispute = current;
                    }
                    if let Some(pi) = provider::id_of(dispute.get("payment_intent"))
                        && !self.has_purchase_with(&pi).await?
                        && let Some(inv) = api.invoice_of_payment_intent(&pi).await?
                    {
                        subscription = provider::invoice_subscription(&api.invoice(&inv).await?);
                        invoice = Some(inv);
                    }
                }
                let status = dispute
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                Ok(Plan::Dispute(Box::new(DisputeFacts {
                    payment_intent: provider::id_of(dispute.get("payment_intent")),
                    status,
                    closed,
                    at,
                    invoice,
                    subscription,
                    dispute,
                })))
            }
            "charge.refunded" => {
                if ev.object().get("refunded").and_then(Value::as_bool) != Some(true) {
                    return Ok(Plan::Record(WebhookOutcome::PartialRefund));
                }
                let refunded_at = ev
                    .object()
                    .pointer("/refunds/data")
                    .and_then(Value::as_array)
                    .and_then(|r| r.iter().filter_map(|r| r.get("created")?.as_i64()).max())
                    .map(provider::map::ts)
                    .unwrap_or(ev.created);
                let mut charge = ev.object().clone();
                // Newer API versions dropped `charge.invoice`; find it from
                // the PaymentIntent when we can, before the transaction.
                if provider::id_of(charge.get("invoice")).is_none()
                    && let (Some(api), Some(pi)) =
                        (p.api(), provider::id_of(charge.get("payment_intent")))
                    && !self.has_purchase_with(&pi).await?
                    && let Some(inv) = api.invoice_of_payment_intent(&pi).await?
                    && let Some(o) = charge.as_object_mut()
                {
                    o.insert("invoice".into(), Value::String(inv));
                }
                Ok(Plan::Refund {
                    charge,
                    refunded_at,
                })
            }
            _ => Ok(Plan::Record(WebhookOutcome::Ignored)),
        }
    }

    /// Applies a subscription's state under Stripe's own rules: who owns
    /// it, and which earlier states it must not undo.
    pub(super) async fn apply_stripe_state(
        &self,
        txn: &WriteTxn,
        state: StripeState,
        customer: Option<String>,
        now: DateTime<Utc>,
    ) -> AppResult<(WebhookOutcome, Option<String>)> {
        // Two events about one new subscription (checkout completed and
        // subscription created arrive together) would both insert it; holding
        // the named customer's lock first makes the second see the first.
        // The purchase is locked before it is read, so the application
        // below can take this read as its own.
        let (store, id) = (Store::Stripe.as_str(), &state.state().store_purchase_id);
        match customer
            .as_deref()
            .or(state.state().bound_customer.as_deref())
        {
            Some(c) => {
                self.purchases.ensure_customer_in(txn, c, now).await?;
                db::hold_customer_and_store_purchase(txn, c, store, id).await?;
            }
            None => db::lock_store_purchase(txn, store, id).await?,
        }
        let lookup = db::lookup_store_id_in(
            txn,
            Store::Stripe.as_str(),
            &state.state().store_purchase_id,
            state
                .state()
                .bound_customer
                .as_deref()
                .or(customer.as_deref()),
        )
        .await?;
        let existing = lookup.row.clone();
        // A refund or a chargeback stands until Stripe reports a period
        // paid after it.
        if let Some(e) = &existing
            && e.status.parse().is_ok_and(|st| {
                crate::domain::rules::refund_stands(st, e.expires_at, state.state().expires_at)
            })
        {
            return Ok((WebhookOutcome::RefundStands, Some(e.customer_id.clone())));
        }
        // A Stripe subscription never comes back once it has ended, so an
        // ended one ignores other states even with an equal (one-second)
        // timestamp, as events read without the API have.
        let ended = |raw: Option<&Value>| {
            matches!(
                raw.and_then(|r| r.get("status")).and_then(Value::as_str),
                Some("canceled" | "incomplete_expired")
            )
        };
        if let Some(e) = &existing
            && ended(e.raw.as_ref())
            && !ended(Some(&state.state().raw))
        {
            return Ok((WebhookOutcome::AlreadyEnded, Some(e.customer_id.clone())));
        }
        let customer = match customer {
            Some(c) => Some(c),
            None if existing.is_none() && state.state().bound_customer.is_none() => {
                match &state.stripe_customer {
                    Some(sc) => store_purchases::customer_of_stripe_customer(&**txn, sc).await?,
                    None => None,
                }
            }
            None => None,
        };
        if existing.is_none() && customer.is_none() && state.state().bound_customer.is_none() {
            // Whose it is arrives with `checkout.session.completed`, which
            // re-reads the subscription.
            return Ok((WebhookOutcome::Unmatched, None));
        }
        let stripe_customer = state.stripe_customer.clone();
        let email = state.email.clone();
        let vp = state.bind(customer);
        let applied = self
            .purchases
            .apply_prefetched_in(txn, &vp, Submitter::Store, Some(lookup), now)
            .await?;
        if let Some(sc) = stripe_customer {
            remember_stripe_customer(txn, &applied.customer_id, &sc, email.as_deref()).await?;
        }
        let outcome = WebhookOutcome::applied(applied.stale);
        Ok((outcome, Some(applied.customer_id)))
    }

    async fn apply_refund(
        &self,
        txn: &WriteTxn,
        p: &StripeProvider,
        charge: &Value,
        refunded_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> AppResult<(WebhookOutcome, Option<String>)> {
        let mut found = None;
        for (key, value) in [
            (
                "payment_intent",
                provider::id_of(charge.get("payment_intent")),
            ),
            ("latest_invoice", provider::id_of(charge.get("invoice"))),
        ] {
            if let Some(v) = value {
                found = store_purchases::stripe_purchase_by_raw(&**txn, key, &v).await?;
                if found.is_some() {
                    break;
                }
            }
        }
        let Some(purchase) = found else {
            return Ok((WebhookOutcome::UnmatchedRefund, None));
        };
        let who = Some(purchase.customer_id.clone());
        if purchase.status == PurchaseStatus::Refunded.as_str() {
            return Ok((WebhookOutcome::AlreadyRefunded, who));
        }
        let Some(vp) = p.refunded(&purchase, refunded_at, charge) else {
            return Ok((WebhookOutcome::UnmatchedRefund, who));
        };
        self.purchases
            .apply_purchase_in(txn, &vp, Submitter::Store, now)
            .await?;
        Ok((WebhookOutcome::Refunded, who))
    }

    /// A chargeback: opened, access goes; won, it comes back as it was;
    /// lost, it stays gone. Each change writes its change-log row.
    async fn apply_dispute(
        &self,
        txn: &WriteTxn,
        p: &StripeProvider,
        d: &DisputeFacts,
        now: DateTime<Utc>,
    ) -> AppResult<(WebhookOutcome, Option<String>)> {
        let mut found = None;
        for (key, value) in [
            ("payment_intent", &d.payment_intent),
            ("latest_invoice", &d.invoice),
        ] {
            if let Some(v) = value {
                found = store_purchases::stripe_purchase_by_raw(&**txn, key, v).await?;
                if found.is_some() {
                    break;
                }
            }
        }
        if found.is_none()
            && let Some(sub) = &d.subscription
        {
            found = store_purchases::store_purchase(&**txn, Store::Stripe, sub).await?;
        }
        let Some(purchase) = found else {
            return Ok((WebhookOutcome::UnmatchedDispute, None));
        };
        let who = Some(purchase.customer_id.clone());
        if purchase.status == PurchaseStatus::Refunded.as_str() {
            return Ok((WebhookOutcome::AlreadyRefunded, who));
        }
        let revoked_by_dispute = purchase.status == PurchaseStatus::Revoked.as_str()
            && purchase
                .raw
                .as_ref()
                .and_then(|r| r.pointer("/dispute/status"))
                .is_some();
        // `warning_closed`: an inquiry that closed without a chargeback.
        let won = d.closed && matches!(d.status.as_str(), "won" | "warning_closed");
        let (vp, outcome) = if won {
            if !revoked_by_dispute {
                return Ok((WebhookOutcome::DisputeWon, who));
            }
            (
                p.dispute_won(&purchase, d.at, &d.dispute),
                WebhookOutcome::DisputeWon,
            )
        } else {
            let outcome = if d.closed {
                WebhookOutcome::DisputeLost
            } else {
                WebhookOutcome::Disputed
            };
            (p.disputed(&purchase, d.at, &d.dispute), outcome)
        };
        let Some(vp) = vp else {
            return Ok((WebhookOutcome::UnmatchedDispute, who));
        };
        self.purchases
            .apply_purchase_in(txn, &vp, Submitter::Store, now)
            .await?;
        Ok((outcome, who))
    }

    /// Which catalog product a paid one-time session is, and the id its
    /// purchase is stored under (one the catalog maps): the price Stripe
    /// charged, else (without the API) the product our own checkout named,
    /// else the Payment Link the session came from.
    fn stripe_session_product(
        &self,
        session: &stripe_shared::CheckoutSession,
        price: Option<&str>,
        p: &StripeProvider,
    ) -> Option<(ProductKind, String)> {
        if let Some(pr) = price
            && let Some(def) = self.ctx.catalog.product_by_stripe_price(pr)
        {
            return Some((def.kind, pr.to_string()));
        }
        if p.api().is_none()
            && let Some(def) = session
                .metadata
                .as_ref()
                .and_then(|m| m.get("product_id"))
                .and_then(|id| self.ctx.catalog.product(id))
            && let Some(key) = def
                .stripe_price_id
                .as_ref()
                .or(def.stripe_payment_link.as_ref())
        {
            return Some((def.kind, key.clone()));
        }
        let link = session.payment_link.as_ref().map(|l| l.id().to_string())?;
        let def = self.ctx.catalog.product_by_payment_link(&link)?;
        Some((def.kind, link))
    }

    /// Whether a one-time purchase was paid by this PaymentIntent.
    async fn has_purchase_with(&self, payment_intent: &str) -> AppResult<bool> {
        Ok(store_purchases::stripe_purchase_by_raw(
            &self.ctx.db.conn,
            "payment_intent",
            payment_intent,
        )
        .await?
        .is_some())
    }

    /// Our customer whose Stripe customer id is `stripe_customer`.
    pub async fn customer_by_stripe_id(&self, stripe_customer: &str) -> AppResult<Option<String>> {
        store_purchases::customer_of_stripe_customer(&self.ctx.db.conn, stripe_customer).await
    }

    async fn stripe_customer_of(&self, customer_id: &str) -> AppResult<Option<String>> {
        Ok(self.reads.find_customer(customer_id).await?.and_then(|c| {
            c.attributes
                .get(STRIPE_CUSTOMER_ATTR)
                .and_then(Value::as_str)
                .map(str::to_string)
        }))
    }

    /// Creates a Checkout Session for a catalog product; writes nothing.
    pub async fn create_checkout_session(
        &self,
        customer_id: &str,
        product_id: &str,
        success_url: &str,
        cancel_url: &str,
    ) -> AppResult<(String, String)> {
        let api = self.stripe()?.require_api()?;
        let product = self
            .ctx
            .catalog
            .product(product_id)
            .ok_or_else(|| AppError::bad_input(format!("unknown productId `{product_id}`")))?;
        let price = product
            .stripe_price_id
            .as_deref()
            .ok_or_else(|| AppError::bad_input("this product is not sold on Stripe"))?;
        for (name, u) in [("successUrl", success_url), ("cancelUrl", cancel_url)] {
            check_url(name, u)?;
        }
        let stripe_customer = self.stripe_customer_of(customer_id).await?;
        // Stable for the same request within ten minutes, so a client retry
        // (or a double click) gets the same session instead of a second one.
        let bucket = self.ctx.now().timestamp() / 600;
        let mut h = Sha256::new();
        for part in [
            customer_id,
            price,
            success_url,
            cancel_url,
            &bucket.to_string(),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        let key = format!("entitle-checkout-{}", hex::encode(&h.finalize()[..16]));
        api.create_checkout_session(CheckoutRequest {
            customer_id,
            price_id: price,
            product_id,
            subscription: product.kind == ProductKind::Subscription,
            stripe_customer: stripe_customer.as_deref(),
            success_url,
            cancel_url,
            idempotency_key: key,
        })
        .await
    }

    /// A billing portal URL for a customer Stripe knows.
    pub async fn create_portal_session(
        &self,
        customer_id: &str,
        return_url: &str,
    ) -> AppResult<String> {
        let api = self.stripe()?.require_api()?;
        check_url("returnUrl", return_url)?;
        let sc = self
            .stripe_customer_of(customer_id)
            .await?
            .ok_or(AppError::NotFound("Stripe customer for this customer"))?;
        api.create_portal_session(&sc, return_url).await
    }
}

fn check_url(name: &str, u: &str) -> AppResult<()> {
    match url::Url::parse(u) {
        Ok(p) if matches!(p.scheme(), "https" | "http") && p.host().is_some() => Ok(()),
        _ => Err(AppError::bad_input(format!(
            "{name} must be an http(s) URL"
        ))),
    }
}

/// Remembers the Stripe customer `customer_id` pays as (and the e-mail
/// Stripe reported, when it did), both indexed for lookups and search.
async fn remember_stripe_customer(
    txn: &WriteTxn,
    customer_id: &str,
    stripe_customer: &str,
    email: Option<&str>,
) -> AppResult<()> {
    let email = email.map(|e| e.trim().to_lowercase());
    store_purchases::remember_stripe_customer(
        txn,
        customer_id,
        STRIPE_CUSTOMER_ATTR,
        stripe_customer,
        email.as_deref(),
    )
    .await
}

/// Counts one more paid renewal on the subscription we hold, returning its
/// owner; `None` when we hold none by that id.
async fn count_renewal(txn: &WriteTxn, subscription: &str) -> AppResult<Option<String>> {
    let Some(p) = store_purchases::store_purchase(&**txn, Store::Stripe, subscription).await?
    else {
        return Ok(None);
    };
    // Locking the owner drops its cached reads once this commits.
    db::hold_customer(txn, &p.customer_id).await?;
    store_purchases::add_renewal(&**txn, p.id).await?;
    Ok(Some(p.customer_id))
}
