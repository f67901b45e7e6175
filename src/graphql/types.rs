//! GraphQL object types. Enums mirror `domain` through `remote`, so the
//! domain stays free of GraphQL.

use std::sync::Arc;

use async_graphql::{Context, Enum, ID, Object, SimpleObject};
use chrono::{DateTime, Utc};
use entities::{customers, devices, entitlement_events, receipts};
use tokio::sync::OnceCell;

use crate::{
    db,
    domain::{self, EntitlementState, PurchaseFacts, Snapshot},
    error::AppError,
    policy::{Action, authorize},
    service::Core,
};

pub(crate) fn core<'a>(ctx: &Context<'a>) -> &'a Arc<Core> {
    ctx.data_unchecked::<Arc<Core>>()
}

/// A field whose data belongs to `owner`, guarded by `action`.
fn guard(ctx: &Context<'_>, action: Action, owner: &str) -> Result<(), AppError> {
    authorize(super::query::principal(ctx), action, Some(owner))
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "crate::domain::Store")]
#[allow(clippy::enum_variant_names)] // the stores' own names
pub enum Store {
    AppStore,
    PlayStore,
    Stripe,
    Promotional,
    Trial,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "crate::domain::Environment")]
pub enum Environment {
    Production,
    Sandbox,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "crate::domain::PurchaseStatus")]
pub enum PurchaseStatus {
    Active,
    Trialing,
    Canceled,
    InGracePeriod,
    InBillingRetry,
    OnHold,
    Paused,
    Expired,
    Refunded,
    Revoked,
    Pending,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "crate::domain::PeriodType")]
pub enum PeriodType {
    Normal,
    Trial,
    Intro,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "crate::domain::Platform")]
pub enum Platform {
    Garmin,
    Ios,
    Android,
    Web,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "crate::domain::PaidStatus")]
pub enum PaidStatus {
    Paid,
    Trial,
    Expired,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "crate::domain::EventKind")]
pub enum EventKind {
    Granted,
    Renewed,
    BillingIssue,
    Canceled,
    Uncanceled,
    Expired,
    Refunded,
    Revoked,
    Transferred,
    ProductChanged,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "crate::domain::ProductKind")]
pub enum ProductKind {
    Subscription,
    Lifetime,
}

/// A customer (an app user id, or a Garmin device id) and what it may use.
pub struct Customer {
    model: customers::Model,
    snapshot: OnceCell<Snapshot>,
}

impl Customer {
    pub fn new(model: customers::Model) -> Self {
        Customer {
            model,
            snapshot: OnceCell::new(),
        }
    }

    /// A customer whose entitlements the caller just computed.
    pub fn with_snapshot(model: customers::Model, snapshot: Snapshot) -> Self {
        Customer {
            model,
            snapshot: OnceCell::new_with(Some(snapshot)),
        }
    }

    async fn snap(&self, ctx: &Context<'_>) -> async_graphql::Result<&Snapshot> {
        Ok(self
            .snapshot
            .get_or_try_init(|| core(ctx).reads().snapshot(&self.model.id))
            .await?)
    }
}

#[Object]
impl Customer {
    async fn id(&self) -> ID {
        ID(self.model.id.clone())
    }

    async fn created_at(&self, ctx: &Context<'_>) -> async_graphql::Result<DateTime<Utc>> {
        guard(ctx, Action::ReadCustomerProfile, &self.model.id)?;
        Ok(self.model.created_at)
    }

    /// `PAID` when a paid or promotional source grants access, `TRIAL` when
    /// only the server-side trial does, `EXPIRED` otherwise.
    async fn paid_status(&self, ctx: &Context<'_>) -> async_graphql::Result<PaidStatus> {
        Ok(self.snap(ctx).await?.paid_status.into())
    }

    /// End of the server-side free trial, if one was ever started.
    async fn trial_ends_at(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Option<DateTime<Utc>>> {
        Ok(self.snap(ctx).await?.trial_ends_at)
    }

    /// Every entitlement of the catalog, active or not.
    async fn entitlements(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Entitlement>> {
        Ok(self
            .snap(ctx)
            .await?
            .entitlements
            .iter()
            .map(|e| Entitlement::of(e, &self.model.id))
            .collect())
    }

    async fn entitlement(
        &self,
        ctx: &Context<'_>,
        key: String,
    ) -> async_graphql::Result<Option<Entitlement>> {
        Ok(self
            .snap(ctx)
            .await?
            .entitlement(&key)
            .map(|e| Entitlement::of(e, &self.model.id)))
    }

    /// A signed JWT (ES256 by default) of this customer's active
    /// entitlements, for apps to verify offline with the keys at
    /// `/.well-known/jwks.json`. With `deviceId` (one of the customer's
    /// devices) the token names that device in `dev`.
    async fn entitlement_token(
        &self,
        ctx: &Context<'_>,
        device_id: Option<ID>,
    ) -> async_graphql::Result<String> {
        guard(ctx, Action::ReadCustomerSummary, &self.model.id)?;
        let core = core(ctx);
        if let Some(d) = &device_id {
            let devices = core.reads().devices_of(&self.model.id).await?;
            if !devices.iter().any(|x| x.device_id == d.as_str()) {
                return Err(AppError::NotFound("device").into());
            }
        }
        let snap = self.snap(ctx).await?;
        Ok(core
            .tokens()
            .entitlement_token(&self.model.id, device_id.as_ref().map(|d| d.as_str()), snap)
            .await?)
    }

    async fn purchases(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Purchase>> {
        guard(ctx, Action::ReadPurchases, &self.model.id)?;
        let rows = core(ctx).reads().purchases_of(&self.model.id).await?;
        rows.into_iter()
            .map(|m| {
                Ok(Purchase {
                    facts: db::purchase_facts(&m)?,
                    model: m,
                })
            })
            .collect::<Result<_, AppError>>()
            .map_err(Into::into)
    }

    async fn devices(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Device>> {
        guard(ctx, Action::ReadDevices, &self.model.id)?;
        Ok(core(ctx)
            .reads()
            .devices_of(&self.model.id)
            .await?
            .into_iter()
            .map(Device)
            .collect())
    }

    /// Purchase submissions, newest first.
    #[graphql(complexity = "limit as usize * child_complexity")]
    async fn receipts(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50, validator(minimum = 1, maximum = 500))] limit: u64,
    ) -> async_graphql::Result<Vec<Receipt>> {
        guard(ctx, Action::ReadReceipts, &self.model.id)?;
        Ok(core(ctx)
            .reads()
            .receipts_of(&self.model.id, limit)
            .await?
            .into_iter()
            .map(Receipt)
            .collect())
    }

    /// The store notifications that touched this customer, newest first
    /// (their payloads admin only).
    #[graphql(complexity = "limit as usize * child_complexity")]
    async fn webhook_events(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20, validator(minimum = 1, maximum = 100))] limit: u64,
    ) -> async_graphql::Result<Vec<super::webhooks::WebhookEvent>> {
        guard(ctx, Action::ReadCustomerDeliveries, &self.model.id)?;
        Ok(core(ctx)
            .operator()
            .webhook_events_of(&self.model.id, limit)
            .await?
            .into_iter()
            .map(super::webhooks::WebhookEvent)
            .collect())
    }

    /// The entitlement change log, newest first.
    #[graphql(complexity = "limit as usize * child_complexity")]
    async fn events(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50, validator(minimum = 1, maximum = 500))] limit: u64,
    ) -> async_graphql::Result<Vec<EntitlementEvent>> {
        guard(ctx, Action::ReadEvents, &self.model.id)?;
        Ok(core(ctx)
            .reads()
            .events_of(&self.model.id, limit)
            .await?
            .into_iter()
            .map(EntitlementEvent)
            .collect())
    }
}

/// One entitlement's state now, and the purchase it comes from.
pub struct Entitlement {
    state: EntitlementState,
    /// The customer it belongs to: the purchase behind it is theirs to read.
    owner: String,
}

impl Entitlement {
    fn of(state: &EntitlementState, owner: &str) -> Self {
        Entitlement {
            state: state.clone(),
            owner: owner.to_string(),
        }
    }
}

#[Object]
impl Entitlement {
    async fn key(&self) -> &str {
        &self.state.key
    }
    async fn is_active(&self) -> bool {
        self.state.is_active
    }
    /// When access ends; null for lifetime access or no source.
    async fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.state.expires_at
    }
    async fn will_renew(&self) -> bool {
        self.state.will_renew
    }
    async fn store(&self) -> Option<Store> {
        self.state.store.map(Into::into)
    }
    async fn product_id(&self) -> Option<&str> {
        self.state.product_id.as_deref()
    }
    async fn period_type(&self) -> Option<PeriodType> {
        self.state.period_type.map(Into::into)
    }
    /// The source purchase's status; null when nothing ever granted it.
    async fn status(&self) -> Option<PurchaseStatus> {
        self.state.status.map(Into::into)
    }
    async fn grace_period_expires_at(&self) -> Option<DateTime<Utc>> {
        self.state.grace_period_expires_at
    }
    async fn purchase_id(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<ID>> {
        guard(ctx, Action::ReadPurchases, &self.owner)?;
        Ok(self.state.purchase_id.map(|id| ID(id.to_string())))
    }
    /// Why the entitlement is active and until when, or why it is not, in
    /// one plain sentence (for support and the dashboard; not for parsing).
    async fn explanation(&self, ctx: &Context<'_>) -> async_graphql::Result<String> {
        guard(ctx, Action::ReadExplanation, &self.owner)?;
        Ok(core(ctx).reads().explain(&self.owner, &self.state).await?)
    }
}

pub struct Purchase {
    facts: PurchaseFacts,
    model: entities::purchases::Model,
}

impl Purchase {
    pub fn from_model(model: entities::purchases::Model) -> Result<Self, AppError> {
        Ok(Purchase {
            facts: db::purchase_facts(&model)?,
            model,
        })
    }
}

#[Object]
impl Purchase {
    async fn id(&self) -> ID {
        ID(self.model.id.to_string())
    }
    async fn store(&self) -> Store {
        self.facts.store.into()
    }
    /// Admin only: a Play purchase token is one, and whoever holds it can
    /// submit the purchase as their own.
    async fn store_purchase_id(&self, ctx: &Context<'_>) -> async_graphql::Result<&str> {
        guard(ctx, Action::ReadStorePurchaseId, &self.model.customer_id)?;
        Ok(&self.model.store_purchase_id)
    }
    async fn product_id(&self) -> &str {
        &self.model.product_id
    }
    async fn environment(&self) -> Environment {
        self.facts.environment.into()
    }
    /// The status as the store last reported it.
    async fn status(&self) -> PurchaseStatus {
        self.facts.status.into()
    }
    /// The status now, as the engine reads it: a period that ran out reads
    /// as `EXPIRED`, and a revocation that took effect as `REVOKED`, even
    /// before the store says so.
    async fn effective_status(&self, ctx: &Context<'_>) -> PurchaseStatus {
        self.facts.effective_status(core(ctx).now()).into()
    }
    async fn period_type(&self) -> PeriodType {
        self.facts.period_type.into()
    }
    async fn purchased_at(&self) -> DateTime<Utc> {
        self.model.purchased_at
    }
    async fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.model.expires_at
    }
    async fn grace_expires_at(&self) -> Option<DateTime<Utc>> {
        self.model.grace_expires_at
    }
    async fn auto_renew(&self) -> bool {
        self.model.auto_renew
    }
    async fn canceled_at(&self) -> Option<DateTime<Utc>> {
        self.model.canceled_at
    }
    async fn revoked_at(&self) -> Option<DateTime<Utc>> {
        self.model.revoked_at
    }
    async fn renewal_count(&self) -> i32 {
        self.model.renewal_count
    }
    async fn source_updated_at(&self) -> DateTime<Utc> {
        self.model.source_updated_at
    }
    /// What this purchase grants now and until when, or why it grants
    /// nothing (expired, refunded, a sandbox purchase the server ignores, a
    /// product not in the catalog, ...), in one plain sentence from the
    /// rules that decide access (for support and the dashboard; not for parsing).
    async fn explanation(&self, ctx: &Context<'_>) -> async_graphql::Result<String> {
        guard(ctx, Action::ReadExplanation, &self.model.customer_id)?;
        Ok(core(ctx).reads().explain_purchase(&self.facts))
    }
}

pub struct Device(pub devices::Model);

#[Object]
impl Device {
    async fn platform(&self) -> async_graphql::Result<Platform> {
        let p: domain::Platform = self
            .0
            .platform
            .parse()
            .map_err(|e| AppError::Internal(anyhow::Error::new(e)))?;
        Ok(p.into())
    }
    async fn device_id(&self) -> &str {
        &self.0.device_id
    }
    async fn customer_id(&self) -> ID {
        ID(self.0.customer_id.clone())
    }
    async fn first_seen_at(&self) -> DateTime<Utc> {
        self.0.first_seen_at
    }
    async fn last_seen_at(&self) -> DateTime<Utc> {
        self.0.last_seen_at
    }
}

/// A purchase submission as received, before and after verification.
pub struct Receipt(receipts::Model);

#[Object]
impl Receipt {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn store(&self) -> async_graphql::Result<Store> {
        let s: domain::Store = self
            .0
            .store
            .parse()
            .map_err(|e| AppError::Internal(anyhow::Error::new(e)))?;
        Ok(s.into())
    }
    async fn received_at(&self) -> DateTime<Utc> {
        self.0.received_at
    }
    /// `pending`, `valid` or `invalid`.
    async fn outcome(&self) -> &str {
        &self.0.outcome
    }
    async fn error(&self) -> Option<&str> {
        self.0.error.as_deref()
    }
    async fn purchase_id(&self) -> Option<ID> {
        self.0.purchase_id.map(|id| ID(id.to_string()))
    }
    /// The submission as received (admin only: it is the purchase itself).
    async fn payload(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<async_graphql::Json<serde_json::Value>> {
        guard(ctx, Action::ReadReceiptPayload, &self.0.customer_id)?;
        Ok(async_graphql::Json(self.0.payload.clone()))
    }
}

/// A change-log row's stored kind, as the GraphQL enum.
pub(crate) fn event_kind(stored: &str) -> async_graphql::Result<EventKind> {
    let k: domain::EventKind = stored
        .parse()
        .map_err(|e| AppError::Internal(anyhow::Error::new(e)))?;
    Ok(k.into())
}

/// One row of the change log.
pub struct EntitlementEvent(entitlement_events::Model);

#[Object]
impl EntitlementEvent {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn entitlement(&self) -> &str {
        &self.0.entitlement
    }
    async fn kind(&self) -> async_graphql::Result<EventKind> {
        event_kind(&self.0.kind)
    }
    /// Access level before the change, `ACTIVE` or `EXPIRED`; null if never held.
    async fn old_status(&self) -> Option<&str> {
        self.0.old_status.as_deref()
    }
    /// Access level after the change: `ACTIVE` when the entitlement is on,
    /// `EXPIRED` when it is off, whatever the cause.
    async fn new_status(&self) -> &str {
        &self.0.new_status
    }
    /// The cause: the store status behind the change (`refunded`,
    /// `billing_retry`, `grace_period`, `canceled`, ...).
    async fn reason(&self) -> Option<&str> {
        self.0.reason.as_deref()
    }
    async fn purchase_id(&self) -> Option<ID> {
        self.0.purchase_id.map(|id| ID(id.to_string()))
    }
    async fn occurred_at(&self) -> DateTime<Utc> {
        self.0.occurred_at
    }
    async fn published_at(&self) -> Option<DateTime<Utc>> {
        self.0.published_at
    }
}

/// A product of the catalog, for paywalls.
#[derive(SimpleObject)]
pub struct Product {
    pub id: ID,
    pub display_name: Option<String>,
    pub entitlements: Vec<String>,
    pub stripe_price_id: Option<String>,
    pub app_store_product_id: Option<String>,
    pub play_store_product_id: Option<String>,
    pub kind: ProductKind,
}

impl From<&domain::ProductDef> for Product {
    fn from(p: &domain::ProductDef) -> Self {
        Product {
            id: ID(p.id.clone()),
            display_name: p.display_name.clone(),
            entitlements: p.entitlements.clone(),
            stripe_price_id: p.stripe_price_id.clone(),
            app_store_product_id: p.app_store_product_id.clone(),
            play_store_product_id: p.play_store_product_id.clone(),
            kind: p.kind.into(),
        }
    }
}
