//! `POST /webhooks/stripe` end to end against a fake Stripe API: the Garmin
//! payment-link flow, a web subscription's whole life, duplicates,
//! orderings, and every bad input.

mod common;
mod stripe_support;

use chrono::{Duration, Utc};
use common::{Backend, spawn_with};
use entitle::domain::ApiKeyRole;
use reqwest::StatusCode;
use serde_json::{Value, json};
use stripe_support::*;

async fn garmin_flow_payment_link_to_paid(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure_api_without_jobs(c, &fake)).await;
    let key = app.key(ApiKeyRole::Client).await;

    let (s, body) = app.post_user(&key, "watch-1").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["paid_status"], "trial");
    app.clock.advance(Duration::days(8));
    let (_, body) = app.post_user(&key, "watch-1").await;
    assert_eq!(body["paid_status"], "expired");
    assert_eq!(
        body["checkout_url"],
        "https://buy.stripe.com/test_123?client_reference_id=watch-1"
    );

    // The phone pays through the payment link; Stripe reports the session.
    let session = checkout_session(
        "cs_garmin_1",
        "payment",
        Some("watch-1"),
        Some("cus_g1"),
        None,
    );
    fake.set_line_items("cs_garmin_1", "price_pro_lifetime");
    let ev = event(
        "evt_g1",
        "checkout.session.completed",
        session,
        app.state.core.now(),
    );
    let (s, r) = deliver(&app, &ev).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["outcome"], "applied", "{r}");

    let (_, body) = app.post_user(&key, "watch-1").await;
    assert_eq!(body["paid_status"], "paid", "{body}");
    assert_eq!(body["status"], "paid");
    let c = entitlements(&app, "watch-1").await;
    let maps = entitlement(&c, "maps");
    assert_eq!(maps["isActive"], true, "{c}");
    assert_eq!(maps["expiresAt"], Value::Null, "lifetime: {c}");
    assert_eq!(maps["store"], "STRIPE");
    // The Stripe customer is remembered for later checkouts.
    assert_eq!(
        app.state
            .core
            .stores()
            .customer_by_stripe_id("cus_g1")
            .await
            .map_err(anyhow::Error::from)
            .unwrap()
            .as_deref(),
        Some("watch-1")
    );
}

/// The Garmin flow with a subscription payment link and no API key: the
/// session binds the Stripe customer, the subscription events carry state.
async fn garmin_flow_subscription_without_api(b: Backend) {
    let app = spawn_with(b, |c| configure(c, None)).await;
    let key = app.key(ApiKeyRole::Client).await;
    app.post_user(&key, "watch-7").await;
    app.clock.advance(Duration::days(8));
    let now = app.state.core.now();

    let session = checkout_session(
        "cs_g7",
        "subscription",
        Some("watch-7"),
        Some("cus_g7"),
        Some("sub_g7"),
    );
    let (s, r) = deliver(
        &app,
        &event("evt_g7a", "checkout.session.completed", session, now),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("bound")),
        "{r}"
    );
    // Stripe's own subscription event names only its customer.
    let sub = subscription(
        "sub_g7",
        "cus_g7",
        None,
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    let (s, r) = deliver(
        &app,
        &event("evt_g7b", "customer.subscription.created", sub, now),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("applied")),
        "{r}"
    );
    assert_eq!(
        app.post_user(&key, "watch-7").await.1["paid_status"],
        "paid"
    );
}

/// A subscription payment link with the API configured, in the order Stripe
/// usually sends: the subscription (naming only Stripe's customer) first,
/// then the completed session that names the device.
async fn garmin_flow_subscription_link_with_api(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure_api_without_jobs(c, &fake)).await;
    let key = app.key(ApiKeyRole::Client).await;
    app.post_user(&key, "watch-8").await;
    app.clock.advance(Duration::days(8));
    let now = app.state.core.now();
    let sub = subscription(
        "sub_g8",
        "cus_g8",
        None,
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    fake.set_subscription(&sub);
    let (s, r) = deliver(
        &app,
        &event("evt_g8a", "customer.subscription.created", sub, now),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("unmatched")),
        "{r}"
    );
    assert_eq!(
        app.post_user(&key, "watch-8").await.1["paid_status"],
        "expired"
    );
    let session = checkout_session(
        "cs_g8",
        "subscription",
        Some("watch-8"),
        Some("cus_g8"),
        Some("sub_g8"),
    );
    let (s, r) = deliver(
        &app,
        &event("evt_g8b", "checkout.session.completed", session, now),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("applied")),
        "{r}"
    );
    assert_eq!(
        app.post_user(&key, "watch-8").await.1["paid_status"],
        "paid"
    );
    // Later events find the device through the Stripe customer on file.
    let (s, r) = deliver(
        &app,
        &event(
            "evt_g8c",
            "invoice.paid",
            json!({ "id": "in_g8", "subscription": "sub_g8", "customer": "cus_g8" }),
            now,
        ),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("applied")),
        "{r}"
    );
}

/// A delayed payment method: nothing until `async_payment_succeeded`.
async fn async_payment_grants_only_when_it_succeeds(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure(c, Some(&fake))).await;
    let now = app.state.core.now();
    fake.set_line_items("cs_async", "price_pro_lifetime");
    let mut session = checkout_session("cs_async", "payment", Some("user-a"), Some("cus_a"), None);
    session["payment_status"] = json!("unpaid");
    let (s, r) = deliver(
        &app,
        &event("evt_a1", "checkout.session.completed", session.clone(), now),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("awaiting_payment")),
        "{r}"
    );
    assert_eq!(app.count("purchases").await, 0);
    let (s, r) = deliver(
        &app,
        &event(
            "evt_a2",
            "checkout.session.async_payment_failed",
            session.clone(),
            now,
        ),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("payment_failed")),
        "{r}"
    );
    assert_eq!(app.count("purchases").await, 0);
    session["payment_status"] = json!("paid");
    let (s, r) = deliver(
        &app,
        &event(
            "evt_a3",
            "checkout.session.async_payment_succeeded",
            session,
            now,
        ),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("applied")),
        "{r}"
    );
    assert_eq!(entitlements(&app, "user-a").await["paidStatus"], "PAID");
}

/// Distinct events about one new subscription, all at once: one purchase.
async fn concurrent_events_for_one_subscription(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure(c, Some(&fake))).await;
    let now = app.state.core.now();
    let sub = subscription(
        "sub_cc",
        "cus_cc",
        Some("user-cc"),
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    fake.set_subscription(&sub);
    let session = checkout_session(
        "cs_cc",
        "subscription",
        Some("user-cc"),
        Some("cus_cc"),
        Some("sub_cc"),
    );
    let events = [
        event("evt_cc1", "customer.subscription.created", sub.clone(), now),
        event("evt_cc2", "customer.subscription.updated", sub.clone(), now),
        event("evt_cc3", "checkout.session.completed", session, now),
        event(
            "evt_cc4",
            "invoice.paid",
            json!({ "id": "in_cc", "subscription": "sub_cc" }),
            now,
        ),
    ];
    let results = futures_util::future::join_all(events.iter().map(|e| deliver(&app, e))).await;
    for (s, r) in &results {
        assert_eq!(*s, StatusCode::OK, "{r}");
    }
    assert_eq!(app.count("purchases").await, 1);
    assert_eq!(app.count("webhook_events").await, 4);
    assert_eq!(event_kinds(&app, "user-cc").await, ["granted"]);
}

async fn payment_for_unknown_id_creates_the_customer(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure(c, Some(&fake))).await;
    let before = app.count("customers").await;
    fake.set_line_items("cs_new_1", "price_pro_lifetime");
    let session = checkout_session(
        "cs_new_1",
        "payment",
        Some("never-seen-device"),
        Some("cus_n1"),
        None,
    );
    let (s, r) = deliver(
        &app,
        &event(
            "evt_n1",
            "checkout.session.completed",
            session,
            app.state.core.now(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(app.count("customers").await, before + 1);
    let c = entitlements(&app, "never-seen-device").await;
    assert_eq!(c["paidStatus"], "PAID", "{c}");
}

/// created -> renewed by invoice.paid -> payment failed -> recovered ->
/// canceled at period end -> deleted -> refunded; each step re-read from
/// the fake API, as the webhook is only a hint.
async fn web_subscription_life_cycle(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure_api_without_jobs(c, &fake)).await;
    let t0 = app.state.core.now();
    let month = Duration::days(30);
    let id = "sub_web_1";
    let mut sub = subscription(
        id,
        "cus_web_1",
        Some("user-1"),
        "price_pro_monthly",
        "active",
        t0,
        t0 + month,
    );
    let mut n = 0;
    let mut send = async |kind: &str, object: Value| {
        n += 1;
        let ev = event(&format!("evt_web_{n}"), kind, object, app.state.core.now());
        let (s, r) = deliver(&app, &ev).await;
        assert_eq!(s, StatusCode::OK, "{kind}: {r}");
        r["outcome"].as_str().unwrap_or_default().to_string()
    };

    fake.set_subscription(&sub);
    assert_eq!(
        send("customer.subscription.created", sub.clone()).await,
        "applied"
    );
    let c = entitlements(&app, "user-1").await;
    let pro = entitlement(&c, "pro");
    assert_eq!(
        (pro["isActive"].as_bool(), pro["status"].as_str()),
        (Some(true), Some("ACTIVE")),
        "{c}"
    );
    assert_eq!(pro["willRenew"], true);
    assert_eq!(pro["productId"], "price_pro_monthly");
    let first_end = pro["expiresAt"].as_str().unwrap().to_string();

    // Renewed: a new period, a minute before the old one ends.
    app.clock.advance(month - Duration::minutes(1));
    let t1 = app.state.core.now();
    sub["items"]["data"][0]["current_period_start"] = json!(t1.timestamp());
    sub["items"]["data"][0]["current_period_end"] = json!((t1 + month).timestamp());
    fake.set_subscription(&sub);
    let invoice =
        json!({ "id": "in_2", "object": "invoice", "subscription": id, "customer": "cus_web_1" });
    assert_eq!(send("invoice.paid", invoice.clone()).await, "applied");
    let pro = entitlement(&entitlements(&app, "user-1").await, "pro").clone();
    assert_eq!(pro["isActive"], true);
    assert!(
        pro["expiresAt"].as_str().unwrap() > first_end.as_str(),
        "{pro}"
    );

    // The next renewal fails: past_due, no grace configured -> no access.
    app.clock.advance(month - Duration::minutes(1));
    let t2 = app.state.core.now();
    sub["status"] = json!("past_due");
    sub["items"]["data"][0]["current_period_start"] = json!(t2.timestamp());
    sub["items"]["data"][0]["current_period_end"] = json!((t2 + month).timestamp());
    fake.set_subscription(&sub);
    // Newer API versions name the subscription under `parent`.
    let failed = json!({ "id": "in_3", "object": "invoice", "parent": { "subscription_details": { "subscription": id } } });
    assert_eq!(send("invoice.payment_failed", failed).await, "applied");
    let c = entitlements(&app, "user-1").await;
    let pro = entitlement(&c, "pro");
    assert_eq!(pro["isActive"], false, "{c}");
    assert_eq!(pro["status"], "IN_BILLING_RETRY", "{c}");

    // Recovered.
    sub["status"] = json!("active");
    fake.set_subscription(&sub);
    assert_eq!(
        send("invoice.paid", json!({ "id": "in_3", "subscription": id })).await,
        "applied"
    );
    let pro = entitlement(&entitlements(&app, "user-1").await, "pro").clone();
    assert_eq!(
        (pro["isActive"].as_bool(), pro["status"].as_str()),
        (Some(true), Some("ACTIVE")),
        "{pro}"
    );

    // Canceled at period end: access until then, no renewal.
    sub["cancel_at_period_end"] = json!(true);
    sub["canceled_at"] = json!(app.state.core.now().timestamp());
    fake.set_subscription(&sub);
    assert_eq!(
        send("customer.subscription.updated", sub.clone()).await,
        "applied"
    );
    let pro = entitlement(&entitlements(&app, "user-1").await, "pro").clone();
    assert_eq!(pro["isActive"], true, "{pro}");
    assert_eq!(pro["willRenew"], false, "{pro}");
    assert_eq!(pro["status"], "CANCELED");

    // Deleted at period end.
    app.clock.advance(month + Duration::seconds(5));
    sub["status"] = json!("canceled");
    sub["ended_at"] = json!((t2 + month).timestamp());
    fake.set_subscription(&sub);
    assert_eq!(
        send("customer.subscription.deleted", sub.clone()).await,
        "applied"
    );
    let pro = entitlement(&entitlements(&app, "user-1").await, "pro").clone();
    assert_eq!(pro["isActive"], false, "{pro}");

    // Refunded: the last charge of the subscription.
    let mut charge = openapi_fixture("charge");
    charge["id"] = json!("ch_web_1");
    charge["refunded"] = json!(true);
    charge["invoice"] = json!(format!("in_{id}"));
    charge["payment_intent"] = json!("pi_unrelated");
    assert_eq!(send("charge.refunded", charge).await, "refunded");
    let c = entitlements(&app, "user-1").await;
    assert_eq!(entitlement(&c, "pro")["isActive"], false, "{c}");
    let status: String = purchase_status(&app, id).await;
    assert_eq!(status, "refunded");
    // A late, older hint does not undo the refund.
    assert_eq!(
        send("customer.subscription.updated", sub.clone()).await,
        "refund_stands"
    );
    assert_eq!(purchase_status(&app, id).await, "refunded");

    // One change-log row per real change, in order. The period ran out
    // before `deleted` arrived: that lapse is logged (when `deleted` noticed
    // it), and `deleted` itself changed no entitlement.
    let kinds = event_kinds(&app, "user-1").await;
    assert_eq!(
        kinds,
        [
            "granted",
            "renewed",
            "billing_issue",
            "renewed",
            "canceled",
            "expired",
            "refunded"
        ],
        "{kinds:?}"
    );
}

/// A refund under a newer API version: the charge names no invoice; the
/// invoice is found through the PaymentIntent's invoice payment.
async fn subscription_refund_found_through_invoice_payments(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure(c, Some(&fake))).await;
    let now = app.state.core.now();
    let sub = subscription(
        "sub_r",
        "cus_r",
        Some("user-r"),
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    fake.set_subscription(&sub);
    let (s, _) = deliver(
        &app,
        &event("evt_r1", "customer.subscription.created", sub, now),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let mut payment = openapi_fixture("invoice_payment");
    payment["invoice"] = json!("in_sub_r");
    payment["payment"] = json!({ "type": "payment_intent", "payment_intent": "pi_r" });
    fake.set(
        "GET",
        "/v1/invoice_payments",
        json!({ "object": "list", "data": [payment], "has_more": false, "url": "/v1/invoice_payments" }),
    );
    let mut charge = openapi_fixture("charge");
    charge["refunded"] = json!(true);
    charge["payment_intent"] = json!("pi_r");
    if let Some(o) = charge.as_object_mut() {
        o.remove("invoice");
    }
    let (s, r) = deliver(&app, &event("evt_r2", "charge.refunded", charge, now)).await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("refunded")),
        "{r}"
    );
    let reqs = fake.requests("GET", "/v1/invoice_payments").await;
    let q = reqs[0].url.query().unwrap_or_default().to_string();
    assert!(
        q.contains("payment_intent%5D=pi_r") || q.contains("payment_intent]=pi_r"),
        "{q}"
    );
    assert_eq!(entitlements(&app, "user-r").await["paidStatus"], "EXPIRED");
}

async fn purchase_status(app: &common::TestApp, store_purchase_id: &str) -> String {
    use entities::purchases;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    purchases::Entity::find()
        .filter(purchases::Column::StorePurchaseId.eq(store_purchase_id))
        .one(&app.state.core.db().conn)
        .await
        .unwrap()
        .map(|p| p.status)
        .unwrap_or_default()
}

async fn event_kinds(app: &common::TestApp, customer: &str) -> Vec<String> {
    use entities::entitlement_events as ev;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
    ev::Entity::find()
        .filter(ev::Column::CustomerId.eq(customer))
        .filter(ev::Column::Entitlement.eq("pro"))
        .order_by_asc(ev::Column::Id)
        .all(&app.state.core.db().conn)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

async fn lifetime_refund_revokes(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure(c, Some(&fake))).await;
    fake.set_line_items("cs_life_1", "price_pro_lifetime");
    let session = checkout_session("cs_life_1", "payment", Some("user-l"), Some("cus_l"), None);
    let (s, _) = deliver(
        &app,
        &event(
            "evt_l1",
            "checkout.session.completed",
            session,
            app.state.core.now(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(entitlements(&app, "user-l").await["paidStatus"], "PAID");
    let mut charge = openapi_fixture("charge");
    charge["refunded"] = json!(true);
    charge["payment_intent"] = json!("pi_cs_life_1");
    charge["invoice"] = Value::Null;
    let (s, r) = deliver(
        &app,
        &event("evt_l2", "charge.refunded", charge, app.state.core.now()),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("refunded")),
        "{r}"
    );
    let c = entitlements(&app, "user-l").await;
    assert_eq!(c["paidStatus"], "EXPIRED", "{c}");
    assert_eq!(purchase_status(&app, "cs_life_1").await, "refunded");
    // A partial refund changes nothing.
    let mut partial = openapi_fixture("charge");
    partial["refunded"] = json!(false);
    let (s, r) = deliver(
        &app,
        &event("evt_l3", "charge.refunded", partial, app.state.core.now()),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("partial_refund"))
    );
}

async fn past_due_with_grace_keeps_access(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| {
        configure_api_without_jobs(c, &fake);
        c.stripe.as_mut().unwrap().grace_period_days = Some(3);
    })
    .await;
    let now = app.state.core.now();
    let sub = subscription(
        "sub_g",
        "cus_g",
        Some("user-g"),
        "price_pro_monthly",
        "past_due",
        now - Duration::days(1),
        now + Duration::days(29),
    );
    fake.set_subscription(&sub);
    let (s, _) = deliver(
        &app,
        &event("evt_pd", "customer.subscription.updated", sub, now),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let c = entitlements(&app, "user-g").await;
    let pro = entitlement(&c, "pro");
    assert_eq!(pro["isActive"], true, "{c}");
    assert_eq!(pro["status"], "IN_GRACE_PERIOD");
    assert!(pro["gracePeriodExpiresAt"].is_string(), "{c}");
    app.clock.advance(Duration::days(2) + Duration::seconds(5));
    assert_eq!(
        entitlement(&entitlements(&app, "user-g").await, "pro")["isActive"],
        false
    );
}

async fn trialing_unpaid_paused_and_incomplete_expired(b: Backend) {
    let app = spawn_with(b, |c| configure(c, None)).await;
    let now = app.state.core.now();
    for (i, (status, active)) in [
        ("trialing", true),
        ("unpaid", false),
        ("paused", false),
        ("incomplete_expired", false),
        ("incomplete", false),
    ]
    .into_iter()
    .enumerate()
    {
        let cust = format!("user-s{i}");
        let mut sub = subscription(
            &format!("sub_s{i}"),
            &format!("cus_s{i}"),
            Some(&cust),
            "price_pro_monthly",
            status,
            now,
            now + Duration::days(7),
        );
        if status == "trialing" {
            sub["trial_end"] = json!((now + Duration::days(7)).timestamp());
        }
        let (s, r) = deliver(
            &app,
            &event(
                &format!("evt_s{i}"),
                "customer.subscription.updated",
                sub,
                now,
            ),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{r}");
        let c = entitlements(&app, &cust).await;
        assert_eq!(entitlement(&c, "pro")["isActive"], active, "{status}: {c}");
    }
}

/// The same event ten times, five of them at once: one purchase, one
/// `webhook_events` row, one change-log row.
async fn duplicates_apply_once(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure(c, Some(&fake))).await;
    let now = app.state.core.now();
    let sub = subscription(
        "sub_dup",
        "cus_dup",
        Some("user-d"),
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    fake.set_subscription(&sub);
    let ev = event("evt_dup", "customer.subscription.created", sub, now);
    let before = app.counts().await;
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let app_ref = &app;
        let ev = ev.clone();
        tasks.push(async move { deliver(app_ref, &ev).await });
    }
    let results = futures_util::future::join_all(tasks).await;
    for (s, r) in &results {
        assert_eq!(*s, StatusCode::OK, "{r}");
    }
    for _ in 0..5 {
        let (s, r) = deliver(&app, &ev).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(r["outcome"], "duplicate");
    }
    let after = app.counts().await;
    let delta = |t: &str| {
        after.iter().find(|(n, _)| *n == t).unwrap().1
            - before.iter().find(|(n, _)| *n == t).unwrap().1
    };
    assert_eq!(delta("purchases"), 1);
    assert_eq!(delta("webhook_events"), 1);
    assert_eq!(delta("entitlement_events"), 1);
    assert_eq!(delta("customers"), 1);
}

/// Every order of created/updated/deleted ends in the same state, with
/// state taken from the events themselves (no API key).
async fn orderings_converge(b: Backend) {
    let app = spawn_with(b, |c| configure(c, None)).await;
    let now = app.state.core.now();
    let orders: [[usize; 3]; 6] = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    let mut finals = Vec::new();
    for (i, order) in orders.iter().enumerate() {
        let id = format!("sub_o{i}");
        let cust = format!("user-o{i}");
        let start = now - Duration::days(40);
        let end = now - Duration::days(10);
        let created = subscription(
            &id,
            &format!("cus_o{i}"),
            Some(&cust),
            "price_pro_monthly",
            "active",
            start,
            end,
        );
        let mut updated = created.clone();
        updated["cancel_at_period_end"] = json!(true);
        let mut deleted = updated.clone();
        deleted["status"] = json!("canceled");
        deleted["ended_at"] = json!(end.timestamp());
        let events = [
            event(
                &format!("evt_o{i}_c"),
                "customer.subscription.created",
                created.clone(),
                now - Duration::seconds(30),
            ),
            event(
                &format!("evt_o{i}_u"),
                "customer.subscription.updated",
                updated.clone(),
                now - Duration::seconds(20),
            ),
            event(
                &format!("evt_o{i}_d"),
                "customer.subscription.deleted",
                deleted.clone(),
                now - Duration::seconds(10),
            ),
        ];
        for k in order {
            let (s, r) = deliver(&app, &events[*k]).await;
            assert_eq!(s, StatusCode::OK, "{r}");
        }
        finals.push((
            purchase_status(&app, &id).await,
            entitlements(&app, &cust).await["paidStatus"].clone(),
        ));

        // The same, all stamped with one second (Stripe's resolution): the
        // end of the subscription still wins.
        let id = format!("sub_os{i}");
        let cust = format!("user-os{i}");
        let same = now - Duration::seconds(5);
        let events: Vec<String> = [
            ("created", created),
            ("updated", updated),
            ("deleted", deleted),
        ]
        .into_iter()
        .map(|(k, mut o)| {
            o["id"] = json!(id);
            o["metadata"] = json!({ "customer_id": cust });
            event(
                &format!("evt_os{i}_{k}"),
                &format!("customer.subscription.{k}"),
                o,
                same,
            )
        })
        .collect();
        for k in order {
            let (s, r) = deliver(&app, &events[*k]).await;
            assert_eq!(s, StatusCode::OK, "{r}");
        }
        finals.push((
            purchase_status(&app, &id).await,
            entitlements(&app, &cust).await["paidStatus"].clone(),
        ));
    }
    for f in &finals {
        assert_eq!(f, &("expired".to_string(), json!("EXPIRED")), "{finals:?}");
    }
}

async fn bad_input_is_rejected_and_writes_nothing(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure(c, Some(&fake))).await;
    let now = app.state.core.now();
    let t = now.timestamp();
    let sub = subscription(
        "sub_bad",
        "cus_bad",
        Some("user-b"),
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    fake.set_subscription(&sub);
    let body = event("evt_bad", "customer.subscription.created", sub, now);
    let good_sig = sign(&body, WEBHOOK_SECRET, t);
    let v1 = good_sig.split("v1=").nth(1).unwrap().to_string();
    let mut flipped = body.clone().into_bytes();
    let pos = flipped.len() / 2;
    flipped[pos] ^= 0x01;
    let malformed = "{\"id\": \"evt_x\", \"type\": ";
    let bad_ref = checkout_session("cs_bad", "payment", Some(" spaced-id"), None, None);
    fake.set_line_items("cs_bad", "price_pro_lifetime");
    let bad_ref_body = event("evt_bad_ref", "checkout.session.completed", bad_ref, now);
    let not_an_object = event(
        "evt_bad_obj",
        "customer.subscription.updated",
        json!({"id": "sub_x"}),
        now,
    );

    // Headers are made at sending time: the tolerance is checked to the second.
    type Header = Box<dyn Fn(i64) -> Option<String>>;
    let signed = |b: &str| -> Header {
        let b = b.to_string();
        Box::new(move |t| Some(sign(&b, WEBHOOK_SECRET, t)))
    };
    let cases: Vec<(&str, Vec<u8>, Header)> = vec![
        (
            "missing header",
            body.clone().into_bytes(),
            Box::new(|_| None),
        ),
        (
            "empty header",
            body.clone().into_bytes(),
            Box::new(|_| Some(String::new())),
        ),
        ("wrong secret", body.clone().into_bytes(), {
            let b = body.clone();
            Box::new(move |t| Some(sign(&b, "whsec_wrong", t)))
        }),
        ("flipped byte", flipped, signed(&body)),
        ("301 s old", body.clone().into_bytes(), {
            let b = body.clone();
            Box::new(move |t| Some(sign(&b, WEBHOOK_SECRET, t - 301)))
        }),
        ("301 s ahead", body.clone().into_bytes(), {
            let b = body.clone();
            Box::new(move |t| Some(sign(&b, WEBHOOK_SECRET, t + 301)))
        }),
        ("v0 only", body.clone().into_bytes(), {
            let v1 = v1.clone();
            Box::new(move |t| Some(format!("t={t},v0={v1}")))
        }),
        ("no timestamp", body.clone().into_bytes(), {
            let v1 = v1.clone();
            Box::new(move |_| Some(format!("v1={v1}")))
        }),
        (
            "malformed JSON, valid signature",
            malformed.as_bytes().to_vec(),
            signed(malformed),
        ),
        (
            "invalid client_reference_id",
            bad_ref_body.clone().into_bytes(),
            signed(&bad_ref_body),
        ),
        (
            "subscription missing fields",
            not_an_object.clone().into_bytes(),
            signed(&not_an_object),
        ),
    ];
    let before = app.counts().await;
    for (name, body, header) in cases {
        let (s, r) = post_webhook(&app, body, header(app.state.core.now().timestamp())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{name}: {r}");
        assert_eq!(r["error"]["code"], "BAD_USER_INPUT", "{name}: {r}");
        assert_eq!(app.counts().await, before, "{name} wrote something");
    }
    // Oversize body.
    let big = vec![b' '; 70 * 1024];
    let (s, _) = post_webhook(&app, big, Some(good_sig.clone())).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.counts().await, before);

    // Just inside the tolerance is accepted (here: the real event, at last).
    let t = app.state.core.now().timestamp();
    let (s, r) = post_webhook(
        &app,
        body.clone().into_bytes(),
        Some(sign(&body, WEBHOOK_SECRET, t - 298)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");

    // An event type we do not handle: acknowledged and recorded, no change.
    let before = app.counts().await;
    let other = event(
        "evt_other",
        "customer.created",
        fixture("object.customer.json"),
        now,
    );
    let (s, r) = deliver(&app, &other).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["outcome"], "ignored");
    let after = app.counts().await;
    for ((t, a), (_, b)) in after.iter().zip(before.iter()) {
        let expected = if *t == "webhook_events" { b + 1 } else { *b };
        assert_eq!(*a, expected, "{t}");
    }
}

/// Rotation: Stripe signs with the old and the new secret at once.
async fn several_v1_signatures_are_accepted(b: Backend) {
    let app = spawn_with(b, |c| configure(c, None)).await;
    let now = app.state.core.now();
    let body = event(
        "evt_rot",
        "customer.created",
        fixture("object.customer.json"),
        now,
    );
    let t = now.timestamp();
    let old = sign(&body, "whsec_old_secret", t);
    let new = sign(&body, WEBHOOK_SECRET, t);
    let header = format!("{old},v1={}", new.split("v1=").nth(1).unwrap());
    let (s, r) = post_webhook(&app, body.into_bytes(), Some(header)).await;
    assert_eq!(s, StatusCode::OK, "{r}");
}

async fn not_configured_is_503(b: Backend) {
    let app = spawn_with(b, |c| c.stripe = None).await;
    let body = event("evt_nc", "customer.created", json!({}), Utc::now());
    let before = app.counts().await;
    let (s, r) = deliver(&app, &body).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{r}");
    assert_eq!(r["error"]["code"], "NOT_CONFIGURED");
    assert_eq!(app.counts().await, before);
}

/// Stripe's API down while re-reading: 5xx so Stripe retries, nothing
/// applied (the verified event is kept as `failed`, for the operator), and
/// the retry is processed.
async fn api_down_during_webhook_is_retried(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure(c, Some(&fake))).await;
    let now = app.state.core.now();
    let sub = subscription(
        "sub_down",
        "cus_down",
        Some("user-dn"),
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    fake.set_subscription(&sub);
    fake.set_down(true);
    let ev = event("evt_down", "customer.subscription.created", sub, now);
    let before = app.counts().await;
    let (s, r) = deliver(&app, &ev).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{r}");
    assert_eq!(r["error"]["code"], "STORE_UNAVAILABLE");
    let after = app.counts().await;
    for ((t, n0), (_, n1)) in before.iter().zip(&after) {
        let grew = i64::from(*t == "webhook_events");
        assert_eq!(*n1, n0 + grew, "{t}");
    }
    let row = failed_row(&app, "evt_down").await;
    assert_eq!(row.outcome, "failed");
    assert!(
        row.error.as_deref().unwrap().contains("unavailable"),
        "{row:?}"
    );
    fake.set_down(false);
    let (s, r) = deliver(&app, &ev).await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("applied")),
        "{r}"
    );
    let row = failed_row(&app, "evt_down").await;
    assert_eq!((row.outcome.as_str(), row.error), ("applied", None));
    assert_eq!(row.customer_id.as_deref(), Some("user-dn"));
    assert_eq!(app.count("webhook_events").await, after[4].1);
}

/// Notifications beyond `http.webhooks_in_flight` wait for a turn instead
/// of all being processed at once, and each still gets its answer: with two
/// turns and a Stripe API that takes 400 ms per read, six subscriptions'
/// events take three rounds. Processed all at once they take one.
async fn notifications_beyond_the_limit_wait_their_turn(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| {
        configure(c, Some(&fake));
        c.http.webhooks_in_flight = 2;
    })
    .await;
    let now = app.state.core.now();
    let bodies: Vec<String> = (0..6)
        .map(|i| {
            let sub = subscription(
                &format!("sub_turn{i}"),
                &format!("cus_turn{i}"),
                Some(&format!("turn-{i}")),
                "price_pro_monthly",
                "active",
                now,
                now + Duration::days(30),
            );
            fake.set_subscription(&sub);
            event(
                &format!("evt_turn{i}"),
                "customer.subscription.updated",
                sub,
                now,
            )
        })
        .collect();
    fake.set_delay(Some(std::time::Duration::from_millis(400)));
    let started = std::time::Instant::now();
    let deliveries = futures_util::future::join_all(bodies.iter().map(|body| deliver(&app, body)));
    // Operators see the queue: four of the six wait while two are processed.
    let watch = async {
        let mut most = 0;
        while started.elapsed() < std::time::Duration::from_millis(1000) {
            most = most.max(waiting(&app).await);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        most
    };
    let (answers, most_waiting) = tokio::join!(deliveries, watch);
    let took = started.elapsed();
    assert_eq!(most_waiting, 4, "entitle_webhooks_waiting at its highest");
    assert_eq!(waiting(&app).await, 0, "nobody waits once all are answered");
    for (s, r) in &answers {
        assert_eq!(*s, StatusCode::OK, "{r}");
    }
    for i in 0..6 {
        let path = format!("/v1/subscriptions/sub_turn{i}");
        assert_eq!(fake.requests("GET", &path).await.len(), 1, "{path}");
    }
    assert!(
        took >= std::time::Duration::from_millis(1200),
        "six events through two turns took {took:?}: they were not made to wait"
    );
}

/// `entitle_webhooks_waiting` as `/metrics` reports it.
async fn waiting(app: &common::TestApp) -> i64 {
    app.metrics_text()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("entitle_webhooks_waiting "))
        .expect("the gauge is exported")
        .trim()
        .parse()
        .unwrap()
}

async fn failed_row(app: &common::TestApp, event_id: &str) -> entities::webhook_events::Model {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    entities::webhook_events::Entity::find()
        .filter(entities::webhook_events::Column::EventId.eq(event_id))
        .one(&app.state.core.db().conn)
        .await
        .unwrap()
        .expect("recorded")
}

on_all_backends!(
    garmin_flow_payment_link_to_paid,
    garmin_flow_subscription_without_api,
    garmin_flow_subscription_link_with_api,
    async_payment_grants_only_when_it_succeeds,
    concurrent_events_for_one_subscription,
    payment_for_unknown_id_creates_the_customer,
    web_subscription_life_cycle,
    lifetime_refund_revokes,
    subscription_refund_found_through_invoice_payments,
    past_due_with_grace_keeps_access,
    trialing_unpaid_paused_and_incomplete_expired,
    duplicates_apply_once,
    orderings_converge,
    bad_input_is_rejected_and_writes_nothing,
    several_v1_signatures_are_accepted,
    not_configured_is_503,
    api_down_during_webhook_is_retried,
    notifications_beyond_the_limit_wait_their_turn,
);
