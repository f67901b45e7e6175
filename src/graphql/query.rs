use async_graphql::{
    Context, ID, Object,
    connection::{Connection, Edge, EmptyFields},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use super::{
    types::{Customer, Product, Store, core},
    webhooks::{self, Overview, WebhookEvent},
};
use crate::{
    auth::Principal,
    error::AppError,
    policy::{Action, authorize},
};

pub struct QueryRoot;

pub(crate) fn principal<'a>(ctx: &Context<'a>) -> &'a Principal {
    ctx.data_unchecked::<Principal>()
}

fn encode_cursor(id: &str) -> String {
    URL_SAFE_NO_PAD.encode(id)
}

fn decode_cursor(c: &str) -> Result<String, AppError> {
    URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| AppError::bad_input("invalid cursor"))
}

#[Object]
impl QueryRoot {
    /// The signed-in customer (customer tokens only).
    async fn me(&self, ctx: &Context<'_>) -> async_graphql::Result<Customer> {
        let p = principal(ctx);
        authorize(p, Action::ReadMe, None)?;
        // An admin API key passes the policy but signs in as no one.
        let id = p
            .customer_id()
            .ok_or(AppError::Forbidden(Action::ReadMe.refusal()))?;
        let (model, snapshot) = core(ctx)
            .reads()
            .read_customer(id)
            .await?
            .ok_or(AppError::NotFound("customer"))?;
        Ok(Customer::with_snapshot(model, snapshot))
    }

    /// A customer by id: admins and service keys read anyone, client keys the
    /// customer they name, customer tokens only themselves.
    async fn customer(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Customer>> {
        authorize(
            principal(ctx),
            Action::ReadCustomerSummary,
            Some(id.as_str()),
        )?;
        Ok(core(ctx)
            .reads()
            .read_customer(&id)
            .await?
            .map(|(m, s)| Customer::with_snapshot(m, s)))
    }

    /// Customers ordered by id (admin). `search` finds them by customer id
    /// prefix, device id, store purchase id (App Store original transaction
    /// id, Play purchase token, Stripe subscription id), Play order id,
    /// Stripe customer id, or the e-mail Stripe reported.
    #[graphql(complexity = "first.max(1) as usize * child_complexity")]
    async fn customers(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20, validator(minimum = 1, maximum = 100))] first: i32,
        after: Option<String>,
        #[graphql(validator(max_length = 256))] search: Option<String>,
    ) -> async_graphql::Result<Connection<String, Customer, EmptyFields, EmptyFields>> {
        authorize(principal(ctx), Action::ListCustomers, None)?;
        let after = after.as_deref().map(decode_cursor).transpose()?;
        let (rows, more) = core(ctx)
            .reads()
            .customers_page(search.as_deref(), after.as_deref(), first as u64)
            .await?;
        let mut conn = Connection::new(after.is_some(), more);
        conn.edges.extend(
            rows.into_iter()
                .map(|m| Edge::new(encode_cursor(&m.id), Customer::new(m))),
        );
        Ok(conn)
    }

    /// The product catalog, for paywalls.
    async fn products(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Product>> {
        authorize(principal(ctx), Action::ReadCatalog, None)?;
        Ok(core(ctx)
            .reads()
            .products()
            .iter()
            .map(Product::from)
            .collect())
    }

    /// The webhook log (admin): verified store notifications, newest first,
    /// with what became of each. `replayable: true` lists those a replay
    /// may change (matched nothing, or failed).
    #[graphql(complexity = "first.max(1) as usize * child_complexity")]
    #[allow(clippy::too_many_arguments)]
    async fn webhook_events(
        &self,
        ctx: &Context<'_>,
        store: Option<Store>,
        outcome: Option<Vec<String>>,
        customer_id: Option<ID>,
        since: Option<chrono::DateTime<chrono::Utc>>,
        replayable: Option<bool>,
        #[graphql(default = 20, validator(minimum = 1, maximum = 100))] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<Connection<String, WebhookEvent, EmptyFields, EmptyFields>> {
        authorize(principal(ctx), Action::ReadWebhookLog, None)?;
        let f = webhooks::filter(
            store,
            outcome,
            customer_id,
            since,
            replayable,
            after.as_deref(),
        )?;
        let (rows, more) = core(ctx)
            .operator()
            .webhook_events_page(&f, first as u64)
            .await?;
        let mut conn = Connection::new(f.before_id.is_some(), more);
        conn.edges.extend(
            rows.into_iter()
                .map(|m| Edge::new(webhooks::encode_cursor(m.id), WebhookEvent(m))),
        );
        Ok(conn)
    }

    /// Now (customers with access per store, in trial, in grace, in billing
    /// retry) and the change log of the last `days` days (at most 90), per
    /// day (admin).
    #[graphql(complexity = "days.max(1) as usize + child_complexity")]
    async fn overview(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 30, validator(minimum = 1, maximum = 90))] days: i32,
    ) -> async_graphql::Result<Overview> {
        authorize(principal(ctx), Action::ReadOverview, None)?;
        Ok(core(ctx).operator().overview(days).await?.into())
    }
}
