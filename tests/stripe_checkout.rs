//! `createCheckoutSession` and `createPortalSession` against a fake Stripe API.

mod common;
mod stripe_support;

use std::time::Duration as StdDuration;

use common::{Auth, Backend, TestApp, error_code, spawn_with};
use entitle::{
    config::{JwtAlgorithm, JwtConfig, Secret},
    domain::ApiKeyRole,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use stripe_support::*;

const CHECKOUT: &str = "mutation($input: CreateCheckoutSessionInput!) { createCheckoutSession(input: $input) { id url } }";
const PORTAL: &str = "mutation($r: String!) { createPortalSession(returnUrl: $r) { url } }";

fn jwt() -> JwtConfig {
    JwtConfig {
        jwks_url: None,
        algorithm: JwtAlgorithm::HS256,
        secret: Some(Secret::new("0123456789abcdef0123456789abcdef-test")),
        public_key_pem: None,
        private_key_pem: None,
        issuer: "https://issuer.test".into(),
        audience: "entitle".into(),
        admin_claim: "role".into(),
        admin_value: "admin".into(),
        leeway_secs: 5,
    }
}

async fn app_with(b: Backend, fake: &FakeStripe) -> TestApp {
    spawn_with(b, |c| {
        configure(c, Some(fake));
        c.auth.jwt = Some(jwt());
    })
    .await
}

fn customer(sub: &str) -> Auth {
    Auth::Bearer(
        entitle::auth::mint_token(&jwt(), sub, false, StdDuration::from_secs(600)).unwrap(),
    )
}

fn input(product: &str) -> Value {
    json!({ "input": {
        "productId": product,
        "successUrl": "https://app.example.com/paid?session={CHECKOUT_SESSION_ID}",
        "cancelUrl": "https://app.example.com/cancel",
    }})
}

fn form(req: &wiremock::Request) -> Vec<(String, String)> {
    url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect()
}

fn field<'a>(f: &'a [(String, String)], k: &str) -> Option<&'a str> {
    f.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
}

async fn subscription_checkout(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = app_with(b, &fake).await;
    let before = app.counts().await;
    let (s, r) = app
        .gql(&customer("user-1"), CHECKOUT, input("pro_monthly"))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        r["data"]["createCheckoutSession"]["id"], "cs_test_created",
        "{r}"
    );
    assert_eq!(
        r["data"]["createCheckoutSession"]["url"],
        "https://checkout.stripe.com/c/pay/cs_test_created"
    );
    let reqs = fake.requests("POST", "/v1/checkout/sessions").await;
    assert_eq!(reqs.len(), 1);
    let f = form(&reqs[0]);
    assert_eq!(field(&f, "mode"), Some("subscription"), "{f:?}");
    assert_eq!(field(&f, "client_reference_id"), Some("user-1"));
    assert_eq!(field(&f, "metadata[customer_id]"), Some("user-1"));
    assert_eq!(
        field(&f, "subscription_data[metadata][customer_id]"),
        Some("user-1")
    );
    assert_eq!(field(&f, "line_items[0][price]"), Some("price_pro_monthly"));
    assert_eq!(field(&f, "customer"), None);
    let auth = reqs[0]
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(auth, format!("Bearer {SECRET_KEY}"));
    let key1 = reqs[0]
        .headers
        .get("idempotency-key")
        .expect("idempotency key")
        .clone();

    // The same request again reuses the key; another product does not.
    app.gql(&customer("user-1"), CHECKOUT, input("pro_monthly"))
        .await;
    app.gql(&customer("user-1"), CHECKOUT, input("pro_lifetime"))
        .await;
    let reqs = fake.requests("POST", "/v1/checkout/sessions").await;
    assert_eq!(reqs[1].headers.get("idempotency-key"), Some(&key1));
    assert_ne!(reqs[2].headers.get("idempotency-key"), Some(&key1));
    let f = form(&reqs[2]);
    assert_eq!(field(&f, "mode"), Some("payment"), "{f:?}");
    assert_eq!(field(&f, "customer_creation"), Some("always"));
    assert_eq!(field(&f, "subscription_data[metadata][customer_id]"), None);
    // Creating a session writes nothing.
    assert_eq!(app.counts().await, before);
}

async fn known_stripe_customer_is_reused(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = app_with(b, &fake).await;
    // A completed subscription tells us user-2 is cus_known.
    let now = app.state.core.now();
    let sub = subscription(
        "sub_k",
        "cus_known",
        Some("user-2"),
        "price_pro_monthly",
        "active",
        now,
        now + chrono::Duration::days(30),
    );
    fake.set_subscription(&sub);
    let (s, _) = deliver(
        &app,
        &event("evt_k", "customer.subscription.created", sub, now),
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    app.gql(&customer("user-2"), CHECKOUT, input("pro_lifetime"))
        .await;
    let reqs = fake.requests("POST", "/v1/checkout/sessions").await;
    let f = form(&reqs[0]);
    assert_eq!(field(&f, "customer"), Some("cus_known"), "{f:?}");
    assert_eq!(field(&f, "customer_creation"), None);

    let (s, r) = app
        .gql(
            &customer("user-2"),
            PORTAL,
            json!({ "r": "https://app.example.com/account" }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        r["data"]["createPortalSession"]["url"], "https://billing.stripe.com/p/session/test_portal",
        "{r}"
    );
    let reqs = fake.requests("POST", "/v1/billing_portal/sessions").await;
    let f = form(&reqs[0]);
    assert_eq!(field(&f, "customer"), Some("cus_known"));
    assert_eq!(
        field(&f, "return_url"),
        Some("https://app.example.com/account")
    );
}

async fn bad_checkout_input_writes_nothing(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = app_with(b, &fake).await;
    let client = app.key(ApiKeyRole::Client).await;
    let before = app.counts().await;
    let cases = [
        (
            customer("user-3"),
            input("no_such_product"),
            "BAD_USER_INPUT",
        ),
        (
            customer("user-3"),
            json!({ "input": { "productId": "pro_monthly", "successUrl": "javascript:alert(1)", "cancelUrl": "https://a.example" } }),
            "BAD_USER_INPUT",
        ),
        (Auth::None, input("pro_monthly"), "UNAUTHENTICATED"),
        (client, input("pro_monthly"), "FORBIDDEN"),
    ];
    for (auth, vars, code) in cases {
        let (_, r) = app.gql(&auth, CHECKOUT, vars).await;
        assert_eq!(error_code(&r), Some(code), "{r}");
    }
    // A portal for a customer Stripe does not know.
    let (_, r) = app
        .gql(
            &customer("user-3"),
            PORTAL,
            json!({ "r": "https://app.example.com/" }),
        )
        .await;
    assert_eq!(error_code(&r), Some("NOT_FOUND"), "{r}");
    assert!(
        fake.requests("POST", "/v1/checkout/sessions")
            .await
            .is_empty()
    );
    assert_eq!(app.counts().await, before);
}

async fn stripe_down_is_store_unavailable(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = app_with(b, &fake).await;
    let before = app.counts().await;

    fake.set_down(true);
    let (s, r) = app
        .gql(&customer("user-4"), CHECKOUT, input("pro_monthly"))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(error_code(&r), Some("STORE_UNAVAILABLE"), "{r}");
    assert_eq!(r["errors"][0]["extensions"]["retryable"], true);
    assert!(!r.to_string().contains(SECRET_KEY));
    fake.set_down(false);

    // A timeout (the client's limit is 2 s).
    fake.set_delay(Some(StdDuration::from_secs(4)));
    let (_, r) = app
        .gql(&customer("user-4"), CHECKOUT, input("pro_monthly"))
        .await;
    assert_eq!(error_code(&r), Some("STORE_UNAVAILABLE"), "{r}");
    fake.set_delay(None);
    assert_eq!(app.counts().await, before);
}

async fn unreachable_stripe_is_store_unavailable(b: Backend) {
    let app = spawn_with(b, |c| {
        c.auth.jwt = Some(jwt());
        let s = c.stripe.as_mut().unwrap();
        s.secret_key = Some(Secret::new(SECRET_KEY));
        // Nothing listens on port 9 of the loopback.
        s.api_base = Some("http://127.0.0.1:9/".into());
        s.api_timeout_secs = Some(2);
    })
    .await;
    let before = app.counts().await;
    let (_, r) = app
        .gql(&customer("user-5"), CHECKOUT, input("pro_monthly"))
        .await;
    assert_eq!(error_code(&r), Some("STORE_UNAVAILABLE"), "{r}");
    assert_eq!(app.counts().await, before);
}

async fn checkout_without_api_key_is_not_configured(b: Backend) {
    let app = spawn_with(b, |c| c.auth.jwt = Some(jwt())).await;
    let (_, r) = app
        .gql(&customer("user-6"), CHECKOUT, input("pro_monthly"))
        .await;
    assert_eq!(error_code(&r), Some("NOT_CONFIGURED"), "{r}");
}

on_all_backends!(
    subscription_checkout,
    known_stripe_customer_is_reused,
    bad_checkout_input_writes_nothing,
    stripe_down_is_store_unavailable,
    unreachable_stripe_is_store_unavailable,
    checkout_without_api_key_is_not_configured,
);
