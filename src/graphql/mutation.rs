use async_graphql::{Context, ID, InputObject, Object, SimpleObject};
use chrono::{DateTime, Utc};

use super::{
    query::principal,
    stripe::{CheckoutSession, CreateCheckoutSessionInput, PortalSession, signed_in_customer},
    types::{Customer, Device, Platform, core},
};
use crate::{
    auth::Principal,
    domain::{self, ExternalId},
    error::AppError,
    policy::{Action, authorize, permits},
    service::customers::Rebind,
};

pub struct MutationRoot;

#[derive(InputObject)]
pub struct RegisterDeviceInput {
    pub platform: Platform,
    pub device_id: String,
    /// The app's user id; defaults to the device id.
    pub customer_id: Option<ID>,
}

#[derive(SimpleObject)]
pub struct RegisterDevicePayload {
    pub customer: Customer,
    pub device: Device,
    /// True when this call saw the device for the first time.
    pub created: bool,
}

fn parse_id(what: &str, s: &str) -> Result<ExternalId, AppError> {
    ExternalId::parse(s).map_err(|e| AppError::bad_input(format!("invalid {what}: {e}")))
}

async fn customer_with(
    ctx: &Context<'_>,
    id: &str,
    snapshot: domain::Snapshot,
) -> async_graphql::Result<Customer> {
    let model = core(ctx)
        .reads()
        .find_customer(id)
        .await?
        .ok_or(AppError::NotFound("customer"))?;
    Ok(Customer::with_snapshot(model, snapshot))
}

#[Object]
impl MutationRoot {
    /// Registers a device; its first sight starts the configured free trial.
    /// A device bound to one customer stays bound: naming another customer
    /// is refused with `DEVICE_ALREADY_BOUND` unless an admin asks.
    async fn register_device(
        &self,
        ctx: &Context<'_>,
        input: RegisterDeviceInput,
    ) -> async_graphql::Result<RegisterDevicePayload> {
        let device_id = parse_id("deviceId", &input.device_id)?;
        let customer_id = input
            .customer_id
            .as_deref()
            .map(|c| parse_id("customerId", c))
            .transpose()?;
        let p = principal(ctx);
        // A customer token registers devices for itself.
        let customer_id = match (p, customer_id) {
            (Principal::Customer(sub), None) => Some(parse_id("customerId", sub)?),
            (_, c) => c,
        };
        let target = customer_id.as_ref().map(ExternalId::as_str);
        authorize(p, Action::RegisterDevice, target)?;
        let rebind = if permits(p, Action::RebindDevice, target) {
            Rebind::Allow
        } else {
            Rebind::Refuse
        };
        let reg = core(ctx)
            .customers()
            .register_device(
                input.platform.into(),
                &device_id,
                customer_id.as_ref(),
                rebind,
            )
            .await?;
        Ok(RegisterDevicePayload {
            customer: customer_with(ctx, &reg.customer_id, reg.snapshot).await?,
            device: Device(reg.device),
            created: reg.created,
        })
    }

    /// Starts a Stripe Checkout for a catalog product, for the signed-in
    /// customer: a subscription for a subscription product, a one-time
    /// payment for a lifetime one.
    async fn create_checkout_session(
        &self,
        ctx: &Context<'_>,
        input: CreateCheckoutSessionInput,
    ) -> async_graphql::Result<CheckoutSession> {
        let customer = signed_in_customer(principal(ctx), Action::Checkout)?;
        let (id, url) = core(ctx)
            .stores()
            .create_checkout_session(
                customer,
                &input.product_id,
                &input.success_url,
                &input.cancel_url,
            )
            .await?;
        Ok(CheckoutSession { id, url })
    }

    /// A Stripe billing portal session for the signed-in customer.
    async fn create_portal_session(
        &self,
        ctx: &Context<'_>,
        return_url: String,
    ) -> async_graphql::Result<PortalSession> {
        let customer = signed_in_customer(principal(ctx), Action::Portal)?;
        let url = core(ctx)
            .stores()
            .create_portal_session(customer, &return_url)
            .await?;
        Ok(PortalSession { url })
    }

    /// Verifies a store purchase and gives it to the customer: the caller
    /// itself for a customer token; `customerId` for an app key.
    async fn verify_purchase(
        &self,
        ctx: &Context<'_>,
        input: super::verify::VerifyPurchaseInput,
        customer_id: Option<ID>,
    ) -> async_graphql::Result<super::verify::VerifyPurchasePayload> {
        super::verify::verify_purchase(ctx, input, customer_id).await
    }

    /// Grants a promotional entitlement until `expiresAt`, or for life (admin).
    async fn grant_entitlement(
        &self,
        ctx: &Context<'_>,
        customer_id: ID,
        entitlement: String,
        expires_at: Option<DateTime<Utc>>,
    ) -> async_graphql::Result<Customer> {
        authorize(
            principal(ctx),
            Action::GrantEntitlement,
            Some(customer_id.as_str()),
        )?;
        let snap = core(ctx)
            .customers()
            .grant_entitlement(&customer_id, &entitlement, expires_at)
            .await?;
        customer_with(ctx, &customer_id, snap).await
    }

    /// Joins a device to the signed-in customer's account with the pairing
    /// code the device showed (customer tokens only): the device's own
    /// customer is merged into the account, and its old id stays an alias.
    async fn pair_device(
        &self,
        ctx: &Context<'_>,
        #[graphql(validator(max_length = 64))] code: String,
    ) -> async_graphql::Result<Customer> {
        let p = principal(ctx);
        authorize(p, Action::PairDevice, None)?;
        let crate::auth::Principal::Customer(account) = p else {
            return Err(AppError::Forbidden(Action::PairDevice.refusal()).into());
        };
        let (id, snap) = core(ctx).pairing().pair_device(account, &code).await?;
        customer_with(ctx, &id, snap).await
    }

    /// Merges customer `from` into `into` (admin): purchases, devices and
    /// receipts move, one trial survives, and `from` stays an alias of `into`.
    async fn merge_customers(
        &self,
        ctx: &Context<'_>,
        from: ID,
        into: ID,
    ) -> async_graphql::Result<Customer> {
        authorize(principal(ctx), Action::MergeCustomers, Some(into.as_str()))?;
        let (id, snap) = core(ctx).customers().merge_customers(&from, &into).await?;
        customer_with(ctx, &id, snap).await
    }

    /// Ends a promotional grant now; other sources are untouched (admin).
    async fn revoke_grant(
        &self,
        ctx: &Context<'_>,
        customer_id: ID,
        entitlement: String,
    ) -> async_graphql::Result<Customer> {
        authorize(
            principal(ctx),
            Action::RevokeGrant,
            Some(customer_id.as_str()),
        )?;
        let snap = core(ctx)
            .customers()
            .revoke_grant(&customer_id, &entitlement)
            .await?;
        customer_with(ctx, &customer_id, snap).await
    }

    /// Runs a recorded store notification again through the same ingest
    /// path as a live delivery (admin). Only one that matched nothing or
    /// failed can change anything; running it twice applies it once.
    async fn replay_webhook_event(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<super::webhooks::WebhookReplay> {
        authorize(principal(ctx), Action::ReplayWebhook, None)?;
        let id: i64 = id
            .parse()
            .map_err(|_| AppError::bad_input("invalid webhook event id"))?;
        let core = core(ctx);
        let r = core.operator().replay_webhook_event(id).await?;
        let row = core.operator().webhook_event(id).await?;
        Ok(super::webhooks::replay_payload(r, row))
    }
}
