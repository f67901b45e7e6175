//! Stripe: webhook signature verification, the API client, and the mapping
//! of Stripe objects onto purchases.
//!
//! The Stripe customer id (`cus_…`) of one of our customers is kept in that
//! customer's `attributes.stripe_customer_id`; see `service::stores::stripe`.

use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::Value;
use stripe_shared::{CheckoutSession, Subscription};

use super::{PurchaseState, VerifiedPurchase};
use crate::{
    config::StripeConfig,
    error::{AppError, AppResult},
};

pub mod api;
pub mod map;
pub mod signature;

pub use api::{CheckoutRequest, StripeApi};

pub struct StripeProvider {
    webhook_secrets: Vec<crate::config::Secret>,
    api: Option<StripeApi>,
    grace: Option<Duration>,
    customer_metadata_keys: Vec<String>,
}

impl std::fmt::Debug for StripeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeProvider")
            .field("webhooks", &!self.webhook_secrets.is_empty())
            .field("api", &self.api.is_some())
            .finish()
    }
}

/// An event we can trust: a webhook whose signature and timestamp we
/// checked, or one the Stripe API returned to a call made with our secret
/// key. Only this module makes one.
#[derive(Debug)]
pub struct VerifiedEvent {
    pub id: String,
    pub kind: String,
    pub created: DateTime<Utc>,
    /// The whole event, as recorded in `webhook_events`.
    pub payload: Value,
    source: EventSource,
}

/// How an event reached us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventSource {
    Webhook,
    /// Listed by the API (reconciliation of missed deliveries).
    Api,
    /// Read back from the webhook log, where it was recorded verified.
    Replay,
}

impl VerifiedEvent {
    pub fn source(&self) -> EventSource {
        self.source
    }

    /// The event's object (`data.object`), read in place: parsing made sure
    /// it is there.
    pub fn object(&self) -> &Value {
        &self.payload["data"]["object"]
    }

    /// An event as the API returned it. The API answered a call signed with
    /// our secret key, so it is Stripe's word, as a signature would be.
    fn from_api(payload: Value) -> AppResult<VerifiedEvent> {
        Self::parse(payload, EventSource::Api)
    }

    /// An event from the webhook log. Only verified events are recorded
    /// there (a signed delivery or the API's answer), so the stored row is
    /// as trustworthy as when it arrived.
    fn from_stored(row: &entities::webhook_events::Model) -> AppResult<VerifiedEvent> {
        if row.source != crate::domain::Store::Stripe.as_str() {
            return Err(malformed("event"));
        }
        Self::parse(row.payload.clone(), EventSource::Replay)
    }

    fn parse(payload: Value, source: EventSource) -> AppResult<VerifiedEvent> {
        // Read through a reference, the object left where it is.
        let env = Envelope::deserialize(&payload).map_err(|_| malformed("event"))?;
        if env.id.is_empty() || env.id.len() > 255 {
            return Err(malformed("event"));
        }
        Ok(VerifiedEvent {
            id: env.id,
            kind: env.kind,
            created: map::ts(env.created),
            payload,
            source,
        })
    }
}

/// One page of events the API listed.
pub struct EventPage {
    pub events: Vec<VerifiedEvent>,
    pub has_more: bool,
}

#[derive(Deserialize)]
struct Envelope {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    created: i64,
    /// Only checked to be there, not copied: [`VerifiedEvent::object`]
    /// reads it in place.
    #[serde(rename = "data")]
    _data: EnvelopeData,
}

#[derive(Deserialize)]
struct EnvelopeData {
    #[serde(rename = "object")]
    _object: serde::de::IgnoredAny,
}

/// Verified Stripe state whose owner is still to be resolved against our
/// records (the Stripe customer on file). Only this module makes one.
#[derive(Debug)]
pub struct StripeState {
    state: PurchaseState,
    /// The Stripe customer (`cus_…`) the object belongs to.
    pub stripe_customer: Option<String>,
    /// The buyer's e-mail, when the object carried one (a Checkout Session).
    pub email: Option<String>,
}

/// The e-mail a Checkout Session reports for its buyer.
pub fn session_email(session: &CheckoutSession) -> Option<String> {
    session
        .customer_details
        .as_ref()
        .and_then(|d| d.email.clone())
        .or_else(|| session.customer_email.clone())
        .filter(|e| !e.trim().is_empty())
}

impl StripeState {
    pub fn state(&self) -> &PurchaseState {
        &self.state
    }

    /// The purchase, bound to `customer` when the object did not name one.
    pub fn bind(mut self, customer: Option<String>) -> VerifiedPurchase {
        if self.state.bound_customer.is_none() {
            self.state.bound_customer = customer;
        }
        VerifiedPurchase::new(self.state)
    }
}

fn malformed(what: &str) -> AppError {
    AppError::bad_input(format!("malformed Stripe {what}"))
}

/// Read straight from the parsed tree: printing it back to text for a
/// second parser cost as much as the first parse.
fn parse_typed<T: serde::de::DeserializeOwned>(object: &Value, what: &str) -> AppResult<T> {
    T::deserialize(object).map_err(|_| malformed(what))
}

pub fn parse_subscription(object: &Value) -> AppResult<Subscription> {
    parse_typed(object, "subscription")
}

pub fn parse_session(object: &Value) -> AppResult<CheckoutSession> {
    parse_typed(object, "checkout session")
}

/// An id field that may be a plain id or an expanded object.
pub fn id_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Object(o) => o.get("id").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The subscription an invoice bills (newer API versions nest it under
/// `parent.subscription_details`).
pub fn invoice_subscription(invoice: &Value) -> Option<String> {
    id_of(invoice.pointer("/parent/subscription_details/subscription"))
        .or_else(|| id_of(invoice.get("subscription")))
}

impl StripeProvider {
    pub fn from_config(cfg: &StripeConfig) -> anyhow::Result<Self> {
        let api = match &cfg.secret_key {
            Some(k) if !k.expose().is_empty() => Some(StripeApi::new(
                k.expose(),
                cfg.api_base.as_deref(),
                StdDuration::from_secs(cfg.api_timeout_secs.unwrap_or(10).max(1)),
            )?),
            _ => None,
        };
        Ok(StripeProvider {
            webhook_secrets: cfg
                .webhook_secret
                .iter()
                .filter(|s| !s.expose().is_empty())
                .cloned()
                .collect(),
            api,
            grace: cfg
                .grace_period_days
                .filter(|d| *d > 0)
                .map(|d| Duration::days(d.into())),
            customer_metadata_keys: cfg.customer_metadata_keys.clone(),
        })
    }

    /// Our customer a Stripe object's metadata names, by the configured keys.
    pub fn metadata_customer(
        &self,
        m: Option<&std::collections::HashMap<String, String>>,
    ) -> Option<String> {
        map::metadata_customer(m, &self.customer_metadata_keys)
    }

    /// The same for an invoice, charge or dispute held as JSON.
    pub fn json_metadata_customer(&self, object: &Value) -> Option<String> {
        map::json_metadata_customer(object, &self.customer_metadata_keys)
    }

    pub fn api(&self) -> Option<&StripeApi> {
        self.api.as_ref()
    }

    pub fn require_api(&self) -> AppResult<&StripeApi> {
        self.api
            .as_ref()
            .ok_or(AppError::NotConfigured("Stripe API"))
    }

    /// Checks `Stripe-Signature` on the raw body, then parses the envelope.
    pub fn verify_webhook(
        &self,
        header: Option<&str>,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> AppResult<VerifiedEvent> {
        if self.webhook_secrets.is_empty() {
            return Err(AppError::NotConfigured("Stripe webhooks"));
        }
        let secrets: Vec<&str> = self.webhook_secrets.iter().map(|s| s.expose()).collect();
        signature::verify(header, body, &secrets, now.timestamp())
            .map_err(|e| AppError::bad_input(e.message()))?;
        let payload: Value = serde_json::from_slice(body).map_err(|_| malformed("event"))?;
        VerifiedEvent::parse(payload, EventSource::Webhook)
    }

    /// Events created since `since` whose webhook delivery failed, one page
    /// (newest first) after the event `starting_after`.
    pub async fn undelivered_events(
        &self,
        since: DateTime<Utc>,
        starting_after: Option<&str>,
    ) -> AppResult<EventPage> {
        let (raw, has_more) = self
            .require_api()?
            .undelivered_events(since.timestamp(), starting_after)
            .await?;
        let events = raw
            .into_iter()
            .map(VerifiedEvent::from_api)
            .collect::<AppResult<Vec<_>>>()?;
        Ok(EventPage { events, has_more })
    }

    /// The subscription's current state: re-read from the API when a key is
    /// configured (a webhook is only a hint), else the object the verified
    /// event carried, as of the event's time.
    pub async fn subscription_state(
        &self,
        id: &str,
        embedded: Option<(&Subscription, DateTime<Utc>)>,
        now: DateTime<Utc>,
    ) -> AppResult<Option<StripeState>> {
        let fetched;
        let (sub, observed_at) = match (&self.api, embedded) {
            (Some(api), _) => {
                fetched = api.subscription(id).await?;
                (&fetched, now)
            }
            (None, Some(e)) => e,
            (None, None) => return Ok(None),
        };
        Ok(map::subscription_state(
            sub,
            self.grace,
            observed_at,
            self.metadata_customer(Some(&sub.metadata)),
        )
        .map(|state| StripeState {
            state,
            stripe_customer: Some(sub.customer.id().to_string()),
            email: None,
        }))
    }

    /// A paid one-time Checkout Session for `price_id`, as a lifetime purchase.
    pub fn lifetime_state(
        &self,
        session: &CheckoutSession,
        price_id: &str,
        customer: String,
        observed_at: DateTime<Utc>,
    ) -> StripeState {
        StripeState {
            state: map::lifetime_state(session, price_id, customer, observed_at),
            stripe_customer: session.customer.as_ref().map(|c| c.id().to_string()),
            email: session_email(session),
        }
    }

    /// The stored purchase, revoked by a dispute (a verified event's object).
    pub fn disputed(
        &self,
        purchase: &entities::purchases::Model,
        at: DateTime<Utc>,
        dispute: &Value,
    ) -> Option<VerifiedPurchase> {
        map::disputed_state(purchase, at, dispute).map(VerifiedPurchase::new)
    }

    /// The stored purchase restored: the merchant won the dispute.
    pub fn dispute_won(
        &self,
        purchase: &entities::purchases::Model,
        at: DateTime<Utc>,
        dispute: &Value,
    ) -> Option<VerifiedPurchase> {
        map::dispute_won_state(purchase, at, dispute).map(VerifiedPurchase::new)
    }

    /// The stored purchase, refunded. `charge` is a verified event's object.
    pub fn refunded(
        &self,
        purchase: &entities::purchases::Model,
        refunded_at: DateTime<Utc>,
        charge: &Value,
    ) -> Option<VerifiedPurchase> {
        map::refunded_state(purchase, refunded_at, charge).map(VerifiedPurchase::new)
    }
}

impl super::Connector for StripeProvider {
    const STORE: crate::domain::Store = crate::domain::Store::Stripe;
    const AUTH_HEADER: Option<&'static str> = Some("stripe-signature");
    type Notification = VerifiedEvent;
    type Reread = StripeState;

    async fn verify(
        &self,
        delivery: super::Delivery<'_>,
        now: DateTime<Utc>,
    ) -> AppResult<VerifiedEvent> {
        self.verify_webhook(delivery.auth, delivery.body, now)
    }

    fn read_stored(&self, row: &entities::webhook_events::Model) -> AppResult<VerifiedEvent> {
        VerifiedEvent::from_stored(row)
    }

    async fn reread_purchase(
        &self,
        purchase: super::PurchaseRef<'_>,
        now: DateTime<Utc>,
    ) -> AppResult<Option<StripeState>> {
        // Without the API a subscription reads as nothing to apply; a
        // refresh that cannot ask Stripe is a configuration error instead.
        self.require_api()?;
        self.subscription_state(purchase.store_purchase_id, None, now)
            .await
    }
}
