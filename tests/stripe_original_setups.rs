//! The original set-ups of issue 13, word for word, through the real routes:
//! a Garmin watch paid through a Payment Link with only the webhook secret,
//! a billing service binding by `metadata.user_id`, checking without a key
//! and consuming the event stream, disputes and renewal counts.

mod common;
mod events_support;
mod stripe_support;

use chrono::Duration;
use common::{Auth, Backend, TestApp, spawn_with};
use entitle::{config::Secret, domain::ApiKeyRole};
use events_support::{GroupConsumer, redis_url, unique};
use reqwest::StatusCode;
use serde_json::{Value, json};
use stripe_support::*;

const LINK: &str = "plink_1GarminLifetime";

/// Webhook secret only, as the original Garmin set-up had it, and the
/// lifetime product sold through a Payment Link.
fn link_only(c: &mut entitle::config::Config) {
    configure(c, None);
    let p = c
        .catalog
        .products
        .iter_mut()
        .find(|p| p.id == "pro_lifetime")
        .unwrap();
    p.stripe_payment_link = Some(LINK.into());
}

/// The shared session fixture as a Payment Link completes it.
fn link_session(id: &str, reference: Option<&str>, link: &str) -> Value {
    let mut s = checkout_session(id, "payment", reference, None, None);
    s["payment_link"] = json!(link);
    s
}

async fn webhook_row(app: &TestApp, event_id: &str) -> Option<(String, Value)> {
    use entities::webhook_events;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    webhook_events::Entity::find()
        .filter(webhook_events::Column::EventId.eq(event_id))
        .one(&app.state.core.db().conn)
        .await
        .unwrap()
        .map(|r| (r.outcome, r.payload))
}

async fn purchase(app: &TestApp, store_purchase_id: &str) -> Option<entities::purchases::Model> {
    use entities::purchases;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    purchases::Entity::find()
        .filter(purchases::Column::StorePurchaseId.eq(store_purchase_id))
        .one(&app.state.core.db().conn)
        .await
        .unwrap()
}

/// `(kind, oldStatus, newStatus, reason)` of a customer's `pro` change log.
async fn changes(app: &TestApp, customer: &str) -> Vec<(String, Option<String>, String, String)> {
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
        .map(|e| {
            (
                e.kind,
                e.old_status,
                e.new_status,
                e.reason.unwrap_or_default(),
            )
        })
        .collect()
}

fn change(
    kind: &str,
    old: Option<&str>,
    new: &str,
    reason: &str,
) -> (String, Option<String>, String, String) {
    (
        kind.into(),
        old.map(str::to_string),
        new.into(),
        reason.into(),
    )
}

async fn metrics(app: &TestApp) -> String {
    app.metrics_text().await
}

fn counter(metrics: &str, store: &str, outcome: &str) -> u64 {
    let needle =
        format!("entitle_webhook_events_total{{store=\"{store}\",outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(needle.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap())
}

async fn paid(app: &TestApp, key: &Auth, id: &str) -> Value {
    app.post_user(key, id).await.1["paid_status"].clone()
}

async fn post_user_form(app: &TestApp, auth: &Auth, body: &str) -> (StatusCode, Value) {
    let resp = auth
        .apply(
            app.client
                .post(app.url("/user"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body.to_string()),
        )
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Point 1: with the webhook secret only, a signed completed session from
/// the Payment Link, naming the watch, makes the watch paid.
async fn payment_link_without_api_key_grants_the_watch(b: Backend) {
    let app = spawn_with(b, link_only).await;
    let key = app.key(ApiKeyRole::Client).await;
    assert_eq!(
        app.post_user(&key, "watch-2").await.1["paid_status"],
        "trial"
    );
    app.clock.advance(Duration::days(8));
    assert_eq!(
        app.post_user(&key, "watch-2").await.1["paid_status"],
        "expired"
    );

    let ev = event(
        "evt_pl_1",
        "checkout.session.completed",
        link_session("cs_pl_1", Some("watch-2"), LINK),
        app.state.core.now(),
    );
    let (s, r) = deliver(&app, &ev).await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("applied")),
        "{r}"
    );
    let (_, body) = app.post_user(&key, "watch-2").await;
    assert_eq!(
        (body["paid_status"].as_str(), body["status"].as_str()),
        (Some("paid"), Some("paid")),
        "{body}"
    );
    // One-time payment: lifetime, for every entitlement of the product.
    let c = entitlements(&app, "watch-2").await;
    for k in ["pro", "maps"] {
        let e = entitlement(&c, k);
        assert_eq!(
            (e["isActive"].as_bool(), e["expiresAt"].is_null()),
            (Some(true), true),
            "{k}: {c}"
        );
    }
    let p = purchase(&app, "cs_pl_1").await.expect("purchase stored");
    assert_eq!(
        (p.customer_id.as_str(), p.product_id.as_str()),
        ("watch-2", LINK)
    );
    assert_eq!(p.expires_at, None);
    assert_eq!(
        changes(&app, "watch-2").await.last().unwrap(),
        &change("granted", Some("EXPIRED"), "ACTIVE", "active")
    );
    assert_eq!(counter(&metrics(&app).await, "stripe", "applied"), 1);
}

/// Point 1, bad input: a paid session from a link the catalog does not know
/// is recorded `unknown_product` (issue 16: it was `unmatched`) with its
/// verified payload, counted, and changes nothing else; its redelivery is a
/// duplicate.
async fn unmatched_payment_is_recorded_counted_and_changes_nothing(b: Backend) {
    let app = spawn_with(b, link_only).await;
    let key = app.key(ApiKeyRole::Client).await;
    app.post_user(&key, "watch-3").await;
    let before = app.counts().await;
    let ev = event(
        "evt_pl_unknown",
        "checkout.session.completed",
        link_session("cs_pl_2", Some("watch-3"), "plink_someone_elses"),
        app.state.core.now(),
    );
    let (s, r) = deliver(&app, &ev).await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("unknown_product")),
        "{r}"
    );
    let (outcome, payload) = webhook_row(&app, "evt_pl_unknown").await.expect("recorded");
    assert_eq!(outcome, "unknown_product");
    assert_eq!(
        payload,
        serde_json::from_str::<Value>(&ev).unwrap(),
        "kept for replay"
    );
    let after = app.counts().await;
    for ((t, n0), (_, n1)) in before.iter().zip(&after) {
        let grew = if *t == "webhook_events" { 1 } else { 0 };
        assert_eq!(*n1, n0 + grew, "{t}");
    }
    assert!(purchase(&app, "cs_pl_2").await.is_none());
    assert_eq!(
        app.post_user(&key, "watch-3").await.1["paid_status"],
        "trial"
    );
    let m = metrics(&app).await;
    assert_eq!(counter(&m, "stripe", "unknown_product"), 1, "{m}");

    let (s, r) = deliver(&app, &ev).await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("duplicate"))
    );
    let m = metrics(&app).await;
    assert_eq!(counter(&m, "stripe", "unknown_product"), 1);
    assert_eq!(counter(&m, "stripe", "duplicate"), 1);

    // A paid link session naming nobody is `no_customer` (it was `unmatched`).
    let ev = event(
        "evt_pl_nobody",
        "checkout.session.completed",
        link_session("cs_pl_3", None, LINK),
        app.state.core.now(),
    );
    let (s, r) = deliver(&app, &ev).await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("no_customer")),
        "{r}"
    );
    assert!(purchase(&app, "cs_pl_3").await.is_none());
    assert_eq!(counter(&metrics(&app).await, "stripe", "no_customer"), 1);
}

/// Point 2: the billing service's checkout sets
/// `subscription_data.metadata.user_id`, which lands on the subscription;
/// its integer user id is not a customer yet. Stripe took the money, so the
/// id becomes a customer and is granted.
async fn subscription_metadata_user_id_binds_a_new_customer(b: Backend) {
    let app = spawn_with(b, |c| configure(c, None)).await;
    let before = app.count("customers").await;
    let now = app.state.core.now();
    let mut sub = subscription(
        "sub_bs_1",
        "cus_bs_1",
        None,
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    sub["metadata"] = json!({ "user_id": "4711" });
    let (s, r) = deliver(
        &app,
        &event("evt_bs_1", "customer.subscription.created", sub, now),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("applied")),
        "{r}"
    );
    assert_eq!(app.count("customers").await, before + 1);
    let c = entitlements(&app, "4711").await;
    assert_eq!(entitlement(&c, "pro")["isActive"], true, "{c}");
    assert_eq!(
        purchase(&app, "sub_bs_1").await.unwrap().customer_id,
        "4711"
    );

    // A session paid once names its buyer by `metadata.user_id` as well.
    let mut life = link_session("cs_bs_2", None, "plink_unused");
    life["metadata"] = json!({ "user_id": "4712", "product_id": "pro_lifetime" });
    let (s, r) = deliver(
        &app,
        &event("evt_bs_2", "checkout.session.completed", life, now),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("applied")),
        "{r}"
    );
    assert_eq!(
        entitlement(&entitlements(&app, "4712").await, "maps")["isActive"],
        true
    );
}

/// Point 2: the keys are configuration; a key not listed binds nothing.
async fn only_configured_metadata_keys_bind(b: Backend) {
    let app = spawn_with(b, |c| {
        configure(c, None);
        c.stripe.as_mut().unwrap().customer_metadata_keys = vec!["account".into()];
    })
    .await;
    let now = app.state.core.now();
    let mut sub = subscription(
        "sub_k_1",
        "cus_k_1",
        None,
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    sub["metadata"] = json!({ "user_id": "99" });
    let before = app.counts().await;
    let (s, r) = deliver(
        &app,
        &event("evt_k_1", "customer.subscription.created", sub.clone(), now),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("unmatched")),
        "{r}"
    );
    let after = app.counts().await;
    assert_eq!(after[0], before[0], "no customer");
    assert_eq!(after[2], before[2], "no purchase");
    sub["id"] = json!("sub_k_2");
    sub["metadata"] = json!({ "user_id": "99", "account": "acct-7" });
    let (s, r) = deliver(
        &app,
        &event("evt_k_2", "customer.subscription.created", sub, now),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("applied")),
        "{r}"
    );
    assert_eq!(
        purchase(&app, "sub_k_2").await.unwrap().customer_id,
        "acct-7"
    );
}

/// Point 3: the check answers without a key when the operator says so; a
/// key that is presented must still be a valid service key.
async fn check_without_key_on_a_private_network(b: Backend) {
    let app = spawn_with(b, |c| c.http.check_requires_key = false).await;
    let client = app.key(ApiKeyRole::Client).await;
    app.post_user(&client, "watch-c").await;
    let get = |auth: Auth| {
        let rb = app.client.get(app.url("/api/subscriptions/check/watch-c"));
        async move {
            let resp = auth.apply(rb).send().await.unwrap();
            let s = resp.status();
            (s, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, body) = get(Auth::None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["is_subscribed"], true, "trial: {body}");
    assert_eq!(
        get(Auth::Key("not-a-key".into())).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(get(client.clone()).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        get(app.key(ApiKeyRole::Service).await).await.0,
        StatusCode::OK
    );

    // The default still wants the key.
    let strict = spawn_with(Backend::Sqlite, |_| {}).await;
    let resp = strict
        .client
        .get(strict.url("/api/subscriptions/check/watch-c"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

/// Point 6: Connect IQ's form-encoded body.
async fn garmin_form_body(b: Backend) {
    let app = spawn_with(b, |_| {}).await;
    let key = app.key(ApiKeyRole::Client).await;
    let (s, body) = post_user_form(&app, &key, "id=watch-f%201").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["paid_status"], "trial");
    assert_eq!(
        body["checkout_url"],
        "https://buy.stripe.com/test_123?client_reference_id=watch-f+1"
    );
    assert!(
        app.state
            .core
            .reads()
            .find_customer("watch-f 1")
            .await
            .map_err(anyhow::Error::from)
            .unwrap()
            .is_some()
    );

    let before = app.counts().await;
    for bad in ["name=watch-g", "id=", "id=%20x"] {
        let (s, body) = post_user_form(&app, &key, bad).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    assert_eq!(
        post_user_form(&app, &Auth::None, "id=watch-g").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.counts().await, before, "nothing written");
}

/// Point 4: the billing service's Redis consumer, unchanged: it enables on
/// `newStatus == ACTIVE` and disables on `EXPIRED`, and is right for a
/// grant, a renewal, a billing retry, a recovery, a refund and an expiry.
async fn billing_consumer_follows_access_level(b: Backend) {
    let stream = unique("billing-test:");
    let mut consumer = GroupConsumer::join(&redis_url(), &stream).await;
    let app = spawn_with(b, |c| {
        configure(c, None);
        c.redis_url = Some(Secret::new(redis_url()));
        c.events.stream_key = stream.clone();
        c.events.relay_poll_ms = 50;
    })
    .await;
    let user = unique("u");
    let mut enabled = std::collections::HashMap::<String, bool>::new();
    let t0 = app.state.core.now();
    let day = Duration::days(1);
    let sub = |status: &str, from: chrono::DateTime<chrono::Utc>, to| {
        let mut s = subscription(
            "sub_loop",
            "cus_loop",
            None,
            "price_pro_monthly",
            status,
            t0,
            to,
        );
        s["items"]["data"][0]["current_period_start"] = json!(from.timestamp());
        s["metadata"] = json!({ "user_id": user });
        s
    };
    let mut refund = openapi_fixture("charge");
    refund["refunded"] = json!(true);
    refund["invoice"] = json!("in_sub_loop");
    refund["payment_intent"] = Value::Null;
    if let Some(o) = refund.as_object_mut() {
        o.remove("refunds");
    }
    let steps: Vec<(&str, &str, Value, bool, &str, &str)> = vec![
        (
            "evt_c1",
            "customer.subscription.created",
            sub("active", t0, t0 + day * 30),
            true,
            "granted",
            "active",
        ),
        (
            "evt_c2",
            "customer.subscription.updated",
            sub("active", t0 + day * 30, t0 + day * 60),
            true,
            "renewed",
            "active",
        ),
        (
            "evt_c3",
            "customer.subscription.updated",
            sub("past_due", t0 + day * 60, t0 + day * 90),
            false,
            "billing_issue",
            "billing_retry",
        ),
        (
            "evt_c4",
            "customer.subscription.updated",
            sub("active", t0 + day * 60, t0 + day * 90),
            true,
            "renewed",
            "active",
        ),
        (
            "evt_c5",
            "charge.refunded",
            refund,
            false,
            "refunded",
            "refunded",
        ),
    ];
    for (id, kind, object, on, want_kind, want_reason) in steps {
        app.clock.advance(Duration::minutes(1));
        let (s, r) = deliver(&app, &event(id, kind, object, app.state.core.now())).await;
        assert_eq!(s, StatusCode::OK, "{id}: {r}");
        let got = consumer
            .read_until(1, 10, |e| e["userId"] == user.as_str())
            .await;
        let e = &got[0];
        // The consumer loop, verbatim.
        match e["newStatus"].as_str() {
            Some("ACTIVE") => enabled.insert(user.clone(), true),
            Some("EXPIRED") => enabled.insert(user.clone(), false),
            other => panic!("{id}: status {other:?} the consumer ignores: {e}"),
        };
        assert_eq!(enabled.get(&user), Some(&on), "{id}: {e}");
        assert_eq!(
            (e["kind"].as_str(), e["reason"].as_str()),
            (Some(want_kind), Some(want_reason)),
            "{id}: {e}"
        );
    }

    // Another user's subscription runs out.
    let other = unique("u");
    let mut s2 = subscription(
        "sub_loop_2",
        "cus_loop_2",
        None,
        "price_pro_monthly",
        "active",
        t0,
        t0 + day * 300,
    );
    s2["metadata"] = json!({ "user_id": other });
    app.clock.advance(Duration::minutes(1));
    deliver(
        &app,
        &event(
            "evt_c6",
            "customer.subscription.created",
            s2.clone(),
            app.state.core.now(),
        ),
    )
    .await;
    s2["status"] = json!("canceled");
    s2["ended_at"] = json!(app.state.core.now().timestamp());
    app.clock.advance(Duration::minutes(1));
    deliver(
        &app,
        &event(
            "evt_c7",
            "customer.subscription.deleted",
            s2,
            app.state.core.now(),
        ),
    )
    .await;
    let got = consumer
        .read_until(2, 10, |e| e["userId"] == other.as_str())
        .await;
    let statuses: Vec<_> = got
        .iter()
        .map(|e| (e["newStatus"].as_str(), e["reason"].as_str()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (Some("ACTIVE"), Some("active")),
            (Some("EXPIRED"), Some("expired"))
        ]
    );
    consumer.leave().await;

    // GraphQL's change log says the same.
    let admin = app.key(ApiKeyRole::Admin).await;
    let (_, r) = app
        .gql(&admin, "query($id: ID!) { customer(id: $id) { events(limit: 10) { kind newStatus oldStatus reason } } }", json!({ "id": user }))
        .await;
    let evs = r["data"]["customer"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(evs.len(), 5, "{r}");
    assert!(
        evs.iter()
            .all(|e| e["newStatus"] == "ACTIVE" || e["newStatus"] == "EXPIRED"),
        "{r}"
    );
    assert_eq!(
        evs[0],
        json!({ "kind": "REFUNDED", "newStatus": "EXPIRED", "oldStatus": "ACTIVE", "reason": "refunded" }),
        "{r}"
    );
}

fn dispute(id: &str, payment_intent: &str, status: &str, created: i64) -> Value {
    let mut d = openapi_fixture("dispute");
    d["id"] = json!(id);
    d["payment_intent"] = json!(payment_intent);
    d["status"] = json!(status);
    d["created"] = json!(created);
    d
}

/// Point 7: a chargeback on a Payment Link purchase, without the API.
async fn dispute_revokes_won_restores_lost_stays(b: Backend) {
    let app = spawn_with(b, link_only).await;
    let key = app.key(ApiKeyRole::Client).await;
    app.post_user(&key, "watch-d").await;
    app.clock.advance(Duration::days(8));
    let now = || app.state.core.now();
    let (_, r) = deliver(
        &app,
        &event(
            "evt_d0",
            "checkout.session.completed",
            link_session("cs_d", Some("watch-d"), LINK),
            now(),
        ),
    )
    .await;
    assert_eq!(r["outcome"], "applied");
    assert_eq!(paid(&app, &key, "watch-d").await, "paid");

    app.clock.advance(Duration::days(2));
    let (s, r) = deliver(
        &app,
        &event(
            "evt_d1",
            "charge.dispute.created",
            dispute("dp_1", "pi_cs_d", "needs_response", now().timestamp()),
            now(),
        ),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("disputed")),
        "{r}"
    );
    assert_eq!(paid(&app, &key, "watch-d").await, "expired");
    assert_eq!(purchase(&app, "cs_d").await.unwrap().status, "revoked");

    app.clock.advance(Duration::days(10));
    let (_, r) = deliver(
        &app,
        &event(
            "evt_d2",
            "charge.dispute.closed",
            dispute("dp_1", "pi_cs_d", "won", now().timestamp()),
            now(),
        ),
    )
    .await;
    assert_eq!(r["outcome"], "dispute_won", "{r}");
    assert_eq!(paid(&app, &key, "watch-d").await, "paid");
    let p = purchase(&app, "cs_d").await.unwrap();
    assert_eq!(
        (p.status.as_str(), p.revoked_at, p.expires_at),
        ("active", None, None)
    );

    app.clock.advance(Duration::days(1));
    let (_, r) = deliver(
        &app,
        &event(
            "evt_d3",
            "charge.dispute.created",
            dispute("dp_2", "pi_cs_d", "needs_response", now().timestamp()),
            now(),
        ),
    )
    .await;
    assert_eq!(r["outcome"], "disputed", "{r}");
    app.clock.advance(Duration::days(1));
    let (_, r) = deliver(
        &app,
        &event(
            "evt_d4",
            "charge.dispute.closed",
            dispute("dp_2", "pi_cs_d", "lost", now().timestamp()),
            now(),
        ),
    )
    .await;
    assert_eq!(r["outcome"], "dispute_lost", "{r}");
    assert_eq!(paid(&app, &key, "watch-d").await, "expired");
    assert_eq!(purchase(&app, "cs_d").await.unwrap().status, "revoked");

    let log = changes(&app, "watch-d").await;
    let tail: Vec<_> = log.iter().rev().take(4).rev().cloned().collect();
    assert_eq!(
        tail,
        vec![
            change("granted", Some("EXPIRED"), "ACTIVE", "active"),
            change("revoked", Some("ACTIVE"), "EXPIRED", "revoked"),
            change("renewed", Some("EXPIRED"), "ACTIVE", "active"),
            change("revoked", Some("ACTIVE"), "EXPIRED", "revoked"),
        ]
    );

    // A dispute on a charge we never sold is recorded, nothing else.
    let before = app.counts().await;
    let (s, r) = deliver(
        &app,
        &event(
            "evt_d5",
            "charge.dispute.created",
            dispute("dp_3", "pi_unknown", "needs_response", now().timestamp()),
            now(),
        ),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("unmatched_dispute")),
        "{r}"
    );
    let after = app.counts().await;
    assert_eq!(after[4].1, before[4].1 + 1, "the event is recorded");
    assert_eq!(
        (after[2], after[5]),
        (before[2], before[5]),
        "no purchase or change-log row"
    );
}

/// Point 7 with the API: the dispute is re-read (the event's status is only
/// a hint) and found through the PaymentIntent's invoice.
async fn subscription_dispute_found_through_the_api(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure_api_without_jobs(c, &fake)).await;
    let now = app.state.core.now();
    let sub = subscription(
        "sub_dsp",
        "cus_dsp",
        Some("user-dsp"),
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    fake.set_subscription(&sub);
    deliver(
        &app,
        &event("evt_ds0", "customer.subscription.created", sub, now),
    )
    .await;
    assert_eq!(entitlements(&app, "user-dsp").await["paidStatus"], "PAID");

    let mut payment = openapi_fixture("invoice_payment");
    payment["invoice"] = json!("in_old_cycle");
    payment["payment"] = json!({ "type": "payment_intent", "payment_intent": "pi_dsp" });
    fake.set("GET", "/v1/invoice_payments", json!({ "object": "list", "data": [payment], "has_more": false, "url": "/v1/invoice_payments" }));
    let mut invoice = fixture("object.invoice.json");
    invoice["id"] = json!("in_old_cycle");
    invoice["parent"]["subscription_details"]["subscription"] = json!("sub_dsp");
    fake.set("GET", "/v1/invoices/in_old_cycle", invoice);
    fake.set(
        "GET",
        "/v1/disputes/dp_s",
        dispute("dp_s", "pi_dsp", "needs_response", now.timestamp()),
    );
    app.clock.advance(Duration::hours(1));
    // The event body says `won`; Stripe's current word is that it is open.
    let (s, r) = deliver(
        &app,
        &event(
            "evt_ds1",
            "charge.dispute.created",
            dispute("dp_s", "pi_dsp", "won", now.timestamp()),
            app.state.core.now(),
        ),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("disputed")),
        "{r}"
    );
    assert_eq!(fake.requests("GET", "/v1/disputes/dp_s").await.len(), 1);
    assert_eq!(
        entitlements(&app, "user-dsp").await["paidStatus"],
        "EXPIRED"
    );

    fake.set(
        "GET",
        "/v1/disputes/dp_s",
        dispute("dp_s", "pi_dsp", "won", now.timestamp()),
    );
    app.clock.advance(Duration::hours(1));
    let (_, r) = deliver(
        &app,
        &event(
            "evt_ds2",
            "charge.dispute.closed",
            dispute("dp_s", "pi_dsp", "won", now.timestamp()),
            app.state.core.now(),
        ),
    )
    .await;
    assert_eq!(r["outcome"], "dispute_won", "{r}");
    let c = entitlements(&app, "user-dsp").await;
    assert_eq!(c["paidStatus"], "PAID", "{c}");
    assert_eq!(entitlement(&c, "pro")["willRenew"], true, "{c}");
    let kinds: Vec<_> = changes(&app, "user-dsp")
        .await
        .into_iter()
        .map(|c| (c.0, c.3))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("granted".to_string(), "active".to_string()),
            ("revoked".into(), "revoked".into()),
            ("renewed".into(), "active".into()),
        ]
    );
}

fn invoice_paid(subscription: &str, id: &str, reason: &str) -> Value {
    let mut inv = fixture("object.invoice.json");
    inv["id"] = json!(id);
    inv["status"] = json!("paid");
    inv["billing_reason"] = json!(reason);
    inv["parent"]["subscription_details"]["subscription"] = json!(subscription);
    inv
}

/// Point 9: each paid renewal invoice counts once; the first invoice and a
/// redelivery do not.
async fn renewal_count_is_paid_cycle_invoices(b: Backend) {
    let app = spawn_with(b, |c| configure(c, None)).await;
    let now = app.state.core.now();
    let sub = subscription(
        "sub_rc",
        "cus_rc",
        Some("user-rc"),
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    deliver(
        &app,
        &event("evt_rc0", "customer.subscription.created", sub, now),
    )
    .await;
    let (_, r) = deliver(
        &app,
        &event(
            "evt_rc1",
            "invoice.paid",
            invoice_paid("sub_rc", "in_rc1", "subscription_create"),
            now,
        ),
    )
    .await;
    assert_eq!(r["outcome"], "hint_without_api", "{r}");
    for (ev, inv) in [("evt_rc2", "in_rc2"), ("evt_rc3", "in_rc3")] {
        let body = event(
            ev,
            "invoice.paid",
            invoice_paid("sub_rc", inv, "subscription_cycle"),
            now,
        );
        let (_, r) = deliver(&app, &body).await;
        assert_eq!(r["outcome"], "renewal_counted", "{r}");
        let (_, r) = deliver(&app, &body).await;
        assert_eq!(r["outcome"], "duplicate", "{r}");
    }
    assert_eq!(purchase(&app, "sub_rc").await.unwrap().renewal_count, 2);
    let admin = app.key(ApiKeyRole::Admin).await;
    let (_, r) = app
        .gql(
            &admin,
            "query { customer(id: \"user-rc\") { purchases { renewalCount } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        r["data"]["customer"]["purchases"][0]["renewalCount"], 2,
        "{r}"
    );
    // A renewal of a subscription we do not hold is recorded, nothing else.
    let before = app.counts().await;
    let (_, r) = deliver(
        &app,
        &event(
            "evt_rc4",
            "invoice.paid",
            invoice_paid("sub_nobody", "in_rc4", "subscription_cycle"),
            now,
        ),
    )
    .await;
    assert_eq!(r["outcome"], "unmatched", "{r}");
    let after = app.counts().await;
    assert_eq!((after[2], after[5]), (before[2], before[5]));
}

/// Point 9 with the API: the invoice re-reads the subscription and counts.
async fn renewal_count_with_api(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure_api_without_jobs(c, &fake)).await;
    let now = app.state.core.now();
    let sub = subscription(
        "sub_rca",
        "cus_rca",
        Some("user-rca"),
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    fake.set_subscription(&sub);
    deliver(
        &app,
        &event("evt_rca0", "customer.subscription.created", sub, now),
    )
    .await;
    let renewed = subscription(
        "sub_rca",
        "cus_rca",
        Some("user-rca"),
        "price_pro_monthly",
        "active",
        now + Duration::days(30),
        now + Duration::days(60),
    );
    fake.set_subscription(&renewed);
    app.clock.advance(Duration::days(30));
    let (_, r) = deliver(
        &app,
        &event(
            "evt_rca1",
            "invoice.paid",
            invoice_paid("sub_rca", "in_rca1", "subscription_cycle"),
            app.state.core.now(),
        ),
    )
    .await;
    assert_eq!(r["outcome"], "applied", "{r}");
    let p = purchase(&app, "sub_rca").await.unwrap();
    assert_eq!(p.renewal_count, 1);
    assert_eq!(
        p.expires_at.map(|t| t.timestamp()),
        Some((now + Duration::days(60)).timestamp())
    );
}

on_all_backends!(
    payment_link_without_api_key_grants_the_watch,
    unmatched_payment_is_recorded_counted_and_changes_nothing,
    subscription_metadata_user_id_binds_a_new_customer,
    only_configured_metadata_keys_bind,
    check_without_key_on_a_private_network,
    garmin_form_body,
    billing_consumer_follows_access_level,
    dispute_revokes_won_restores_lost_stays,
    subscription_dispute_found_through_the_api,
    renewal_count_is_paid_cycle_invoices,
    renewal_count_with_api,
);
