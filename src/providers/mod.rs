//! One folder per store. A provider turns raw store input into a verified,
//! normalised [`VerifiedPurchase`]. Only code in this module can construct
//! one, so unverified data cannot reach `service/`.

pub mod google;

use chrono::{DateTime, Utc};

use crate::domain::{Environment, PeriodType, PurchaseStatus, Store};

pub mod apple;
pub mod stripe;

/// A store's delivery as the route received it: nothing in it is trusted
/// until a [`Connector`] has verified it.
#[derive(Clone, Copy)]
pub struct Delivery<'a> {
    pub body: &'a [u8],
    /// The header the store authenticates with ([`Connector::AUTH_HEADER`]),
    /// when sent.
    pub auth: Option<&'a str>,
}

/// One store's way in: the only code that turns raw store input into a
/// verified notification. Each store's `Notification` type has a private
/// field, so nothing outside its provider can make one by hand; `service/`
/// receives only what a connector verified (a signed delivery, or a row of
/// the webhook log, where only verified notifications are recorded).
pub trait Connector: Send + Sync + 'static {
    const STORE: Store;
    /// The request header carrying the store's proof (`None`: the proof is
    /// in the body, as App Store notifications sign their payload).
    const AUTH_HEADER: Option<&'static str>;
    type Notification: Send + Sync;
    /// The store's answer to a re-read: a verified state, with whatever
    /// else the store needs applied along with it.
    type Reread: Send;

    /// Checks the delivery's proof (signature, certificate chain or OIDC
    /// token), then parses and checks what it says (bundle, package).
    fn verify(
        &self,
        delivery: Delivery<'_>,
        now: DateTime<Utc>,
    ) -> impl std::future::Future<Output = crate::error::AppResult<Self::Notification>> + Send;

    /// A notification read back from the webhook log, for a replay.
    fn read_stored(
        &self,
        row: &entities::webhook_events::Model,
    ) -> crate::error::AppResult<Self::Notification>;

    /// Reads a purchase we hold afresh from the store's API, so a renewal
    /// or a lapse is known even when its notification never came. `None`:
    /// the store reports a state we cannot apply.
    fn reread_purchase(
        &self,
        purchase: PurchaseRef<'_>,
        now: DateTime<Utc>,
    ) -> impl std::future::Future<Output = crate::error::AppResult<Option<Self::Reread>>> + Send;
}

/// A purchase we hold, named as its store knows it.
#[derive(Clone, Copy, Debug)]
pub struct PurchaseRef<'a> {
    /// Stripe subscription id, Apple original transaction id, Play
    /// purchase token.
    pub store_purchase_id: &'a str,
    /// Where it was bought: Apple answers about a purchase only from the
    /// environment it was made in.
    pub environment: Environment,
}

/// A store purchase's state as read from a verified source (a signature we
/// checked, or the store's own API). Only providers can make one.
#[derive(Clone, Debug)]
pub struct VerifiedPurchase(PurchaseState);

/// Everything a provider knows after verification; see [`VerifiedPurchase`].
/// Serialisable so a purchase held for an owner not yet known keeps it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PurchaseState {
    pub store: Store,
    /// Apple original transaction id, Play purchase token, Stripe
    /// subscription or checkout session id.
    pub store_purchase_id: String,
    /// The store's product id (Stripe: price id), as the catalog maps it.
    pub product_id: String,
    pub environment: Environment,
    pub status: PurchaseStatus,
    pub period_type: PeriodType,
    pub purchased_at: DateTime<Utc>,
    /// `None` for lifetime purchases.
    pub expires_at: Option<DateTime<Utc>>,
    pub grace_expires_at: Option<DateTime<Utc>>,
    pub auto_renew: bool,
    pub canceled_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// `None` keeps the stored count (or, with a `transaction_id`, counts
    /// the distinct transactions seen).
    pub renewal_count: Option<i32>,
    /// The store transaction this state comes from (Apple `transactionId`).
    #[serde(default)]
    pub transaction_id: Option<String>,
    /// The store's own timestamp of this state; older never overwrites newer.
    pub source_updated_at: DateTime<Utc>,
    /// Whom the store says made the purchase: Apple `appAccountToken` (a
    /// token the account-token index resolves), Play
    /// `obfuscatedExternalAccountId` (a customer id or token), Stripe
    /// `client_reference_id` / metadata (a customer id).
    pub bound_customer: Option<String>,
    /// A purchase of the same store this one supersedes (Play
    /// `linkedPurchaseToken`); it stops granting when this one is applied.
    pub replaces: Option<String>,
    /// The verified payload, kept for audit.
    pub raw: serde_json::Value,
}

impl VerifiedPurchase {
    /// Only providers call this, after checking signatures or reading the store API.
    #[allow(dead_code)] // the store providers are its callers
    pub(in crate::providers) fn new(s: PurchaseState) -> Self {
        VerifiedPurchase(s)
    }
}

impl std::ops::Deref for VerifiedPurchase {
    type Target = PurchaseState;
    fn deref(&self) -> &PurchaseState {
        &self.0
    }
}

/// The store's order id of a purchase, for search: Play's (`GPA.…`)
/// without the renewal suffix `..N`, so one id finds every renewal.
pub fn order_id(p: &PurchaseState) -> Option<String> {
    match p.store {
        Store::PlayStore => google::order_id(&p.raw),
        _ => None,
    }
}

/// A purchase state this server verified earlier and held (see
/// `held_purchases`); the store's verification stands for it.
pub(crate) fn from_held(state: serde_json::Value) -> Result<VerifiedPurchase, serde_json::Error> {
    serde_json::from_value(state).map(VerifiedPurchase)
}

/// Lets unit tests of `service/` stand in for a provider.
#[cfg(test)]
pub(crate) fn verified_for_test(s: PurchaseState) -> VerifiedPurchase {
    VerifiedPurchase(s)
}
