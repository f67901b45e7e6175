//! The Stripe API calls Entitle makes. Every Stripe failure becomes
//! `StoreUnavailable` here and nowhere else; the key never leaves the client.

use std::{collections::HashMap, time::Duration};

use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError};
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionCustomerCreation, CreateCheckoutSessionLineItems,
    CreateCheckoutSessionSubscriptionData, ListLineItemsCheckoutSession,
};
use stripe_client_core::{RequestBuilder, StripeMethod, StripeRequest};
use stripe_shared::{CheckoutSessionMode, Subscription};

use crate::error::{AppError, AppResult};

const STORE: &str = "Stripe";

pub struct StripeApi {
    client: Client,
    timeout: Duration,
}

impl std::fmt::Debug for StripeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StripeApi(<redacted>)")
    }
}

/// What `createCheckoutSession` asks Stripe for.
pub struct CheckoutRequest<'a> {
    pub customer_id: &'a str,
    pub price_id: &'a str,
    pub product_id: &'a str,
    pub subscription: bool,
    pub stripe_customer: Option<&'a str>,
    pub success_url: &'a str,
    pub cancel_url: &'a str,
    pub idempotency_key: String,
}

#[derive(miniserde::Deserialize)]
struct PortalSession {
    url: String,
}

#[derive(miniserde::Deserialize)]
struct InvoicePayments {
    data: Vec<InvoicePayment>,
}

#[derive(miniserde::Deserialize)]
struct InvoicePayment {
    invoice: Option<String>,
}

#[derive(miniserde::Deserialize)]
struct EventList {
    data: Vec<miniserde::json::Value>,
    has_more: bool,
}

fn unavailable(what: &'static str, e: StripeError) -> AppError {
    // Stripe's message may quote the request; keep it in the log only.
    match &e {
        StripeError::Stripe(_, status) => {
            tracing::warn!(status = *status, call = what, "Stripe API error")
        }
        other => tracing::warn!(error = %other, call = what, "Stripe API unreachable"),
    }
    AppError::StoreUnavailable(STORE)
}

impl StripeApi {
    pub fn new(
        secret_key: &str,
        api_base: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut b = ClientBuilder::new(secret_key).timeout(timeout);
        if let Some(base) = api_base {
            b = b.url(base);
        }
        let client = b
            .build()
            .map_err(|e| anyhow::anyhow!("invalid configuration: stripe: {e}"))?;
        Ok(StripeApi { client, timeout })
    }

    pub async fn subscription(&self, id: &str) -> AppResult<Subscription> {
        RequestBuilder::new(
            StripeMethod::Get,
            format!("/subscriptions/{}", path_part(id)?),
        )
        .customize::<Subscription>()
        .timeout(self.timeout)
        .send(&self.client)
        .await
        .map_err(|e| unavailable("retrieve subscription", e))
    }

    /// `GET /v1/events?delivery_success=false&created[gte]=…`: one page of
    /// events whose webhook delivery failed, as JSON, and whether more follow.
    pub async fn undelivered_events(
        &self,
        created_gte: i64,
        starting_after: Option<&str>,
    ) -> AppResult<(Vec<serde_json::Value>, bool)> {
        #[derive(serde::Serialize)]
        struct Created {
            gte: i64,
        }
        #[derive(serde::Serialize)]
        struct Query<'a> {
            delivery_success: bool,
            created: Created,
            limit: u8,
            #[serde(skip_serializing_if = "Option::is_none")]
            starting_after: Option<&'a str>,
        }
        let q = Query {
            delivery_success: false,
            created: Created { gte: created_gte },
            limit: 100,
            starting_after: starting_after.map(path_part).transpose()?,
        };
        let list = RequestBuilder::new(StripeMethod::Get, "/events")
            .query(&q)
            .customize::<EventList>()
            .timeout(self.timeout)
            .send(&self.client)
            .await
            .map_err(|e| unavailable("list events", e))?;
        // The whole event is kept as received (for `webhook_events`), so it
        // is carried over to serde's JSON rather than typed.
        let events = list
            .data
            .iter()
            .map(|e| {
                serde_json::from_str(&miniserde::json::to_string(e)).map_err(|_| {
                    AppError::Internal(anyhow::anyhow!("Stripe event list not understood"))
                })
            })
            .collect::<AppResult<Vec<_>>>()?;
        Ok((events, list.has_more))
    }

    /// `GET /v1/{kind}/{id}` as JSON, for objects only a few fields of which
    /// are read (disputes, invoices).
    async fn object(
        &self,
        kind: &'static str,
        id: &str,
        what: &'static str,
    ) -> AppResult<serde_json::Value> {
        let v = RequestBuilder::new(StripeMethod::Get, format!("/{kind}/{}", path_part(id)?))
            .customize::<miniserde::json::Value>()
            .timeout(self.timeout)
            .send(&self.client)
            .await
            .map_err(|e| unavailable(what, e))?;
        serde_json::from_str(&miniserde::json::to_string(&v))
            .map_err(|_| AppError::Internal(anyhow::anyhow!("Stripe {kind} not understood")))
    }

    /// The dispute as Stripe holds it now (its status may have moved on).
    pub async fn dispute(&self, id: &str) -> AppResult<serde_json::Value> {
        self.object("disputes", id, "retrieve dispute").await
    }

    pub async fn invoice(&self, id: &str) -> AppResult<serde_json::Value> {
        self.object("invoices", id, "retrieve invoice").await
    }

    /// The price of a Checkout Session's first line item.
    pub async fn session_price(&self, session_id: &str) -> AppResult<Option<String>> {
        path_part(session_id)?;
        let items = ListLineItemsCheckoutSession::new(session_id)
            .customize()
            .timeout(self.timeout)
            .send(&self.client)
            .await
            .map_err(|e| unavailable("list checkout line items", e))?;
        Ok(items
            .data
            .iter()
            .find_map(|i| i.price.as_ref().map(|p| p.id.to_string())))
    }

    /// The invoice a PaymentIntent paid. Newer API versions no longer name
    /// the invoice on a charge; invoice payments link the two.
    pub async fn invoice_of_payment_intent(
        &self,
        payment_intent: &str,
    ) -> AppResult<Option<String>> {
        #[derive(serde::Serialize)]
        struct Payment<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            payment_intent: &'a str,
        }
        #[derive(serde::Serialize)]
        struct Query<'a> {
            payment: Payment<'a>,
            limit: u8,
        }
        let q = Query {
            payment: Payment {
                kind: "payment_intent",
                payment_intent: path_part(payment_intent)?,
            },
            limit: 1,
        };
        let list = RequestBuilder::new(StripeMethod::Get, "/invoice_payments")
            .query(&q)
            .customize::<InvoicePayments>()
            .timeout(self.timeout)
            .send(&self.client)
            .await
            .map_err(|e| unavailable("list invoice payments", e))?;
        Ok(list.data.into_iter().find_map(|p| p.invoice))
    }

    pub async fn create_checkout_session(
        &self,
        r: CheckoutRequest<'_>,
    ) -> AppResult<(String, String)> {
        let metadata = HashMap::from([
            ("customer_id".to_string(), r.customer_id.to_string()),
            ("product_id".to_string(), r.product_id.to_string()),
        ]);
        let mut item = CreateCheckoutSessionLineItems::new();
        item.price = Some(r.price_id.to_string());
        item.quantity = Some(1);
        let mut req = CreateCheckoutSession::new()
            .mode(if r.subscription {
                CheckoutSessionMode::Subscription
            } else {
                CheckoutSessionMode::Payment
            })
            .line_items(vec![item])
            .client_reference_id(r.customer_id)
            .metadata(metadata.clone())
            .success_url(r.success_url)
            .cancel_url(r.cancel_url);
        if r.subscription {
            let mut sd = CreateCheckoutSessionSubscriptionData::new();
            sd.metadata = Some(metadata);
            req = req.subscription_data(sd);
        }
        match r.stripe_customer {
            Some(c) => req = req.customer(c),
            // A one-time payment makes no customer unless asked; the portal
            // and later purchases need one.
            None if !r.subscription => {
                req = req.customer_creation(CreateCheckoutSessionCustomerCreation::Always)
            }
            None => {}
        }
        let key = IdempotencyKey::new(&r.idempotency_key)
            .map_err(|_| AppError::Internal(anyhow::anyhow!("invalid idempotency key")))?;
        let session = req
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .timeout(self.timeout)
            .send(&self.client)
            .await
            .map_err(|e| unavailable("create checkout session", e))?;
        let url = session
            .url
            .clone()
            .ok_or(AppError::StoreUnavailable(STORE))?;
        Ok((session.id.to_string(), url))
    }

    pub async fn create_portal_session(
        &self,
        stripe_customer: &str,
        return_url: &str,
    ) -> AppResult<String> {
        #[derive(serde::Serialize)]
        struct Form<'a> {
            customer: &'a str,
            return_url: &'a str,
        }
        let form = Form {
            customer: stripe_customer,
            return_url,
        };
        let s = RequestBuilder::new(StripeMethod::Post, "/billing_portal/sessions")
            .form(&form)
            .customize::<PortalSession>()
            .timeout(self.timeout)
            .send(&self.client)
            .await
            .map_err(|e| unavailable("create billing portal session", e))?;
        Ok(s.url)
    }
}

/// Ids come from webhook bodies: keep them to one path segment.
fn path_part(id: &str) -> AppResult<&str> {
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(id)
    } else {
        Err(AppError::bad_input("invalid Stripe object id"))
    }
}
