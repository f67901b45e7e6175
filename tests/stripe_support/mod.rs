//! A fake Stripe API (wiremock) serving Stripe's own fixture objects, and
//! webhook requests signed the way Stripe signs them.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use entitle::{config::Secret, providers::stripe::signature};
use reqwest::StatusCode;
use serde_json::{Value, json};
use wiremock::{MockServer, Request, Respond, ResponseTemplate, matchers::any};

use crate::common::TestApp;

pub const WEBHOOK_SECRET: &str = "whsec_test_entitle_0123456789";
pub const SECRET_KEY: &str = "sk_test_entitle_fake";

pub fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors/stripe")
}

pub fn fixture(name: &str) -> Value {
    let p = vectors().join(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

/// One example object of Stripe's OpenAPI fixtures (what stripe-mock serves).
pub fn openapi_fixture(resource: &str) -> Value {
    let all = fixture("openapi-fixtures3.json");
    all["resources"][resource].clone()
}

/// The fixture subscription, shaped for a test: one item at `price`, the
/// current period `[start, end)`, owned by `customer_id` via metadata.
pub fn subscription(
    id: &str,
    stripe_customer: &str,
    customer_id: Option<&str>,
    price: &str,
    status: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Value {
    let mut s = fixture("object.subscription.json");
    s["id"] = json!(id);
    s["customer"] = json!(stripe_customer);
    s["status"] = json!(status);
    s["cancel_at"] = Value::Null;
    s["canceled_at"] = Value::Null;
    s["ended_at"] = Value::Null;
    s["cancel_at_period_end"] = json!(false);
    s["trial_end"] = Value::Null;
    s["trial_start"] = Value::Null;
    s["start_date"] = json!(start.timestamp());
    s["created"] = json!(start.timestamp());
    s["latest_invoice"] = json!(format!("in_{id}"));
    s["metadata"] = match customer_id {
        Some(c) => json!({ "customer_id": c }),
        None => json!({}),
    };
    let item = &mut s["items"]["data"][0];
    item["price"]["id"] = json!(price);
    item["subscription"] = json!(id);
    item["current_period_start"] = json!(start.timestamp());
    item["current_period_end"] = json!(end.timestamp());
    s
}

/// The fixture Checkout Session, completed and paid.
pub fn checkout_session(
    id: &str,
    mode: &str,
    client_reference_id: Option<&str>,
    stripe_customer: Option<&str>,
    subscription: Option<&str>,
) -> Value {
    let mut s = fixture("object.checkout.session.json");
    s["id"] = json!(id);
    s["mode"] = json!(mode);
    s["client_reference_id"] = json!(client_reference_id);
    s["customer"] = json!(stripe_customer);
    s["subscription"] = json!(subscription);
    s["status"] = json!("complete");
    s["payment_status"] = json!("paid");
    s["payment_intent"] = if mode == "payment" {
        json!(format!("pi_{id}"))
    } else {
        Value::Null
    };
    s
}

/// A Stripe event envelope (the fixture's shape) around `object`.
pub fn event(id: &str, kind: &str, object: Value, created: DateTime<Utc>) -> String {
    let mut e = fixture("event.checkout.session.completed.json");
    e["id"] = json!(id);
    e["type"] = json!(kind);
    e["created"] = json!(created.timestamp());
    e["data"] = json!({ "object": object });
    e.to_string()
}

pub fn sign(body: &str, secret: &str, t: i64) -> String {
    signature::sign(body.as_bytes(), secret, t)
}

/// Sends a signed webhook as Stripe would, at the app's clock.
pub async fn deliver(app: &TestApp, body: &str) -> (StatusCode, Value) {
    let h = sign(body, WEBHOOK_SECRET, app.state.core.now().timestamp());
    post_webhook(app, body.as_bytes().to_vec(), Some(h)).await
}

pub async fn post_webhook(
    app: &TestApp,
    body: Vec<u8>,
    signature: Option<String>,
) -> (StatusCode, Value) {
    let mut rb = app
        .client
        .post(app.url("/webhooks/stripe"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(s) = signature {
        rb = rb.header("Stripe-Signature", s);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Serves `GET` objects from a map the test changes as Stripe's truth
/// changes, and records what was created.
#[derive(Clone, Default)]
struct Objects {
    by_path: Arc<Mutex<HashMap<String, Value>>>,
    delay: Arc<Mutex<Option<Duration>>>,
    down: Arc<Mutex<bool>>,
}

impl Respond for Objects {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        if *self.down.lock().unwrap() {
            return ResponseTemplate::new(500).set_body_json(json!({
                "error": { "type": "api_error", "message": "An unknown error occurred" }
            }));
        }
        let key = format!("{} {}", req.method, req.url.path());
        let found = self.by_path.lock().unwrap().get(&key).cloned();
        let mut t = match found {
            Some(v) => ResponseTemplate::new(200).set_body_json(v),
            None => ResponseTemplate::new(404).set_body_json(json!({
                "error": { "type": "invalid_request_error", "message": "No such object", "code": "resource_missing" }
            })),
        };
        if let Some(d) = *self.delay.lock().unwrap() {
            t = t.set_delay(d);
        }
        t
    }
}

pub struct FakeStripe {
    pub server: MockServer,
    objects: Objects,
}

impl FakeStripe {
    pub async fn start() -> FakeStripe {
        let server = MockServer::start().await;
        let objects = Objects::default();
        wiremock::Mock::given(any())
            .respond_with(objects.clone())
            .mount(&server)
            .await;
        let fake = FakeStripe { server, objects };
        let mut session = fixture("object.checkout.session.json");
        session["id"] = json!("cs_test_created");
        session["url"] = json!("https://checkout.stripe.com/c/pay/cs_test_created");
        fake.set("POST", "/v1/checkout/sessions", session);
        let mut portal = openapi_fixture("billing_portal.session");
        portal["url"] = json!("https://billing.stripe.com/p/session/test_portal");
        fake.set("POST", "/v1/billing_portal/sessions", portal);
        fake
    }

    pub fn base(&self) -> String {
        format!("{}/", self.server.uri())
    }

    pub fn set(&self, method: &str, path: &str, v: Value) {
        self.objects
            .by_path
            .lock()
            .unwrap()
            .insert(format!("{method} {path}"), v);
    }

    pub fn set_subscription(&self, sub: &Value) {
        let id = sub["id"].as_str().unwrap();
        self.set("GET", &format!("/v1/subscriptions/{id}"), sub.clone());
    }

    /// Line items of a Checkout Session: one item at `price`.
    pub fn set_line_items(&self, session_id: &str, price: &str) {
        let mut item = openapi_fixture("item");
        item["price"]["id"] = json!(price);
        self.set(
            "GET",
            &format!("/v1/checkout/sessions/{session_id}/line_items"),
            json!({
                "object": "list",
                "data": [item],
                "has_more": false,
                "url": format!("/v1/checkout/sessions/{session_id}/line_items"),
            }),
        );
    }

    pub fn set_down(&self, down: bool) {
        *self.objects.down.lock().unwrap() = down;
    }

    pub fn set_delay(&self, d: Option<Duration>) {
        *self.objects.delay.lock().unwrap() = d;
    }

    /// Requests the server saw for `method path`.
    pub async fn requests(&self, method: &str, path: &str) -> Vec<Request> {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.method.as_str() == method && r.url.path() == path)
            .collect()
    }
}

/// Stripe configured with webhooks and, when `api` is given, the API.
pub fn configure(c: &mut entitle::config::Config, api: Option<&FakeStripe>) {
    let s = c.stripe.as_mut().expect("test config has a stripe section");
    s.webhook_secret = Some(Secret::new(WEBHOOK_SECRET));
    if let Some(f) = api {
        s.secret_key = Some(Secret::new(SECRET_KEY));
        s.api_base = Some(f.base());
        s.api_timeout_secs = Some(2);
    }
}

/// [`configure`] with the Stripe API and without background jobs, for a
/// test that moves the clock up to a renewal: a refresh run late off its
/// first tick (under load) would re-read the renewal itself, and the
/// webhook's read, a moment earlier, would then rightly be the stale one.
pub fn configure_api_without_jobs(c: &mut entitle::config::Config, api: &FakeStripe) {
    configure(c, Some(api));
    c.jobs.enabled = false;
}

/// `customer(id) { entitlements }` read as an admin.
pub async fn entitlements(app: &TestApp, customer: &str) -> Value {
    let admin = app.key(entitle::domain::ApiKeyRole::Admin).await;
    let (s, body) = app
        .gql(
            &admin,
            "query($id: ID!) { customer(id: $id) { paidStatus entitlements { key isActive status expiresAt willRenew store productId gracePeriodExpiresAt } } }",
            json!({ "id": customer }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body["data"]["customer"].clone()
}

pub fn entitlement<'a>(customer: &'a Value, key: &str) -> &'a Value {
    customer["entitlements"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["key"] == key))
        .unwrap_or(&Value::Null)
}
