//! Reconciliation of missed store notifications (Stripe undelivered events,
//! App Store notification history, Play voided purchases) and the refresh
//! scheduler, against fakes answering in the stores' shapes.

mod apple_support;
mod common;
mod google_support;
mod stripe_support;

use chrono::{DateTime, Duration, Utc};
use common::{Backend, TestApp, spawn_with};
use entitle::{
    config::{AppleEnvironment, JobsConfig, ReconcileConfig},
    domain::{ApiKeyRole, Store},
    jobs::{
        read_cursor,
        reconcile::{self, Counts, Source},
        refresh,
    },
};
use sea_orm::{ConnectionTrait, Statement};
use serde_json::{Value, json};
use wiremock::{
    Mock, MockServer, Request, ResponseTemplate,
    matchers::{header_exists, method, path, query_param},
};

fn all_enabled() -> ReconcileConfig {
    ReconcileConfig {
        stripe: true,
        apple: true,
        google: true,
    }
}

async fn reconcile_one(app: &TestApp, source: Source) -> Counts {
    let out = reconcile::run(&app.state.core, &all_enabled(), None).await;
    let (s, r) = out
        .into_iter()
        .find(|(s, _)| *s == source)
        .expect("reconciliation enabled");
    r.unwrap_or_else(|e| panic!("{} failed: {e:?}", s.name()))
}

fn counts(seen: usize, applied: usize, duplicates: usize, skipped: usize) -> Counts {
    Counts {
        seen,
        applied,
        duplicates,
        skipped,
    }
}

async fn cursor(app: &TestApp, source: Source) -> DateTime<Utc> {
    let v = read_cursor(&app.state.core.db().conn, source.cursor())
        .await
        .unwrap()
        .expect("cursor saved");
    DateTime::parse_from_rfc3339(&v)
        .unwrap()
        .with_timezone(&Utc)
}

fn query(req: &Request, key: &str) -> Option<String> {
    req.url
        .query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

async fn change_kinds(app: &TestApp, customer: &str) -> Vec<String> {
    let db = &app.state.core.db().conn;
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            match db.get_database_backend() {
                sea_orm::DbBackend::Postgres => {
                    "SELECT kind FROM entitlement_events WHERE customer_id = $1 ORDER BY id"
                }
                _ => "SELECT kind FROM entitlement_events WHERE customer_id = ? ORDER BY id",
            },
            [customer.into()],
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.try_get::<String>("", "kind").unwrap())
        .collect()
}

// ------------------------------------------------------------------ Stripe

async fn stripe_app(b: Backend, fake: &stripe_support::FakeStripe) -> TestApp {
    spawn_with(b, |c| {
        stripe_support::configure(c, Some(fake));
        c.reconcile.stripe = true;
        // The test runs the jobs itself, at the moments it chooses.
        c.jobs.enabled = false;
    })
    .await
}

fn event_list(events: &[Value], has_more: bool) -> Value {
    json!({ "object": "list", "data": events, "has_more": has_more, "url": "/v1/events" })
}

/// An event whose webhook never arrived is recovered: its effect is in the
/// database once, however often reconciliation (or the late webhook) runs,
/// and each run asks Stripe from where the previous one ended.
async fn stripe_missed_event_is_recovered_once(b: Backend) {
    use stripe_support::*;
    let fake = FakeStripe::start().await;
    let app = stripe_app(b, &fake).await;
    let now = app.state.core.now();
    let sub = subscription(
        "sub_missed",
        "cus_missed",
        Some("alice"),
        "price_pro_monthly",
        "active",
        now - Duration::days(1),
        now + Duration::days(29),
    );
    fake.set_subscription(&sub);
    let created: Value = serde_json::from_str(&event(
        "evt_missed_1",
        "customer.subscription.created",
        sub.clone(),
        now - Duration::hours(2),
    ))
    .unwrap();
    let ignored: Value = serde_json::from_str(&event(
        "evt_missed_2",
        "customer.created",
        json!({"id": "cus_missed", "object": "customer"}),
        now - Duration::hours(3),
    ))
    .unwrap();
    // Two pages, newest first, as Stripe lists them.
    Mock::given(method("GET"))
        .and(path("/v1/events"))
        .and(query_param("starting_after", "evt_missed_1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(event_list(&[ignored], false)))
        .with_priority(1)
        .mount(&fake.server)
        .await;
    fake.set("GET", "/v1/events", event_list(&[created], true));

    assert_eq!(
        reconcile_one(&app, Source::Stripe).await,
        counts(2, 1, 0, 1)
    );
    let first_run = cursor(&app, Source::Stripe).await;
    let c = entitlements(&app, "alice").await;
    assert_eq!(entitlement(&c, "pro")["isActive"], true, "{c}");
    assert_eq!(change_kinds(&app, "alice").await, vec!["granted"]);

    let first = fake.requests("GET", "/v1/events").await;
    assert_eq!(first.len(), 2, "two pages");
    assert_eq!(
        query(&first[0], "delivery_success").as_deref(),
        Some("false")
    );
    // No cursor yet: three days back.
    assert_eq!(
        query(&first[0], "created[gte]"),
        Some((first_run - Duration::days(3)).timestamp().to_string())
    );
    assert_eq!(query(&first[0], "starting_after"), None);
    assert_eq!(
        query(&first[1], "starting_after").as_deref(),
        Some("evt_missed_1")
    );

    // Again, later: nothing happens twice, and Stripe is asked from the cursor.
    let saved = first_run;
    app.clock.advance(Duration::hours(1));
    assert_eq!(
        reconcile_one(&app, Source::Stripe).await,
        counts(2, 0, 2, 0)
    );
    let all = fake.requests("GET", "/v1/events").await;
    assert_eq!(
        query(&all[2], "created[gte]"),
        Some((saved - Duration::minutes(10)).timestamp().to_string())
    );
    assert!(cursor(&app, Source::Stripe).await > saved);
    // The webhook arriving late is a duplicate too.
    let (s, body) = deliver(
        &app,
        &event(
            "evt_missed_1",
            "customer.subscription.created",
            sub,
            now - Duration::hours(2),
        ),
    )
    .await;
    assert_eq!(s, reqwest::StatusCode::OK);
    assert_eq!(body["outcome"], "duplicate");
    assert_eq!(change_kinds(&app, "alice").await, vec!["granted"]);
    assert_eq!(app.count("purchases").await, 1);
}

/// A Stripe failure fails the store's run and keeps its cursor.
async fn stripe_down_keeps_the_cursor(b: Backend) {
    let fake = stripe_support::FakeStripe::start().await;
    let app = stripe_app(b, &fake).await;
    fake.set("GET", "/v1/events", event_list(&[], false));
    assert_eq!(
        reconcile_one(&app, Source::Stripe).await,
        counts(0, 0, 0, 0)
    );
    let saved = cursor(&app, Source::Stripe).await;
    fake.set_down(true);
    app.clock.advance(Duration::hours(1));
    let out = reconcile::run(&app.state.core, &all_enabled(), None).await;
    assert!(matches!(
        &out[..],
        [(
            Source::Stripe,
            Err(entitle::error::AppError::StoreUnavailable(_))
        )]
    ));
    assert_eq!(cursor(&app, Source::Stripe).await, saved);
}

// --------------------------------------------------------------- App Store

const APPLE_CUSTOMER: &str = "6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11";

fn statuses(sub: &apple_support::Sub, status: i64, tx: &Value, renewal: &Value) -> Value {
    use apple_support::*;
    json!({
        "environment": sub.env, "bundleId": BUNDLE, "appAppleId": APP_APPLE_ID,
        "data": [{ "subscriptionGroupIdentifier": "21000000", "lastTransactions": [{
            "status": status, "originalTransactionId": sub.original,
            "signedTransactionInfo": sign(tx), "signedRenewalInfo": sign(renewal),
        }]}]
    })
}

fn history(payloads: &[String], next: Option<&str>) -> Value {
    let items: Vec<Value> = payloads
        .iter()
        .map(|p| {
            json!({ "signedPayload": p, "sendAttempts": [
                { "attemptDate": 1_700_000_000_000i64, "sendAttemptResult": "TIMED_OUT" }
            ]})
        })
        .collect();
    let mut v = json!({ "notificationHistory": items, "hasMore": next.is_some() });
    if let Some(t) = next {
        v["paginationToken"] = json!(t);
    }
    v
}

/// A notification Apple failed to deliver is found in its history and
/// applied as the webhook would have; a rerun is a duplicate.
async fn apple_history_is_applied(b: Backend) {
    use apple_support::*;
    let server = MockServer::start().await;
    let uri = server.uri();
    let app = spawn_with(b, |c| {
        configure(c, AppleEnvironment::Production, Some(&uri));
        c.reconcile.apple = true;
        c.jobs.enabled = false;
    })
    .await;
    app.sign_up(APPLE_CUSTOMER).await;
    let t0 = app.state.core.now();
    let sub = Sub::new(
        "7000000001",
        MONTHLY,
        APPLE_CUSTOMER,
        t0 - Duration::hours(1),
    );
    let tx = sub.tx(
        "7000000002",
        t0 - Duration::hours(1),
        Some(t0 + Duration::days(30)),
        t0 - Duration::hours(1),
    );
    let renewal = sub.renewal(true, false, None, t0 - Duration::hours(1));
    for p in ["transactions", "subscriptions"] {
        let body = if p == "transactions" {
            json!({ "signedTransactionInfo": sign(&tx) })
        } else {
            statuses(&sub, 1, &tx, &renewal)
        };
        Mock::given(method("GET"))
            .and(path(format!("/inApps/v1/{p}/7000000002")))
            .and(header_exists("authorization"))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .mount(&server)
            .await;
    }
    let subscribed = notification(
        "SUBSCRIBED",
        Some("INITIAL_BUY"),
        "a0000000-0000-4000-8000-000000000001",
        "Production",
        t0 - Duration::hours(1),
        Some(&tx),
        Some(&renewal),
        Some(1),
    );
    let test = notification(
        "TEST",
        None,
        "a0000000-0000-4000-8000-000000000002",
        "Production",
        t0 - Duration::minutes(30),
        None,
        None,
        None,
    );
    Mock::given(method("POST"))
        .and(path("/inApps/v1/notifications/history"))
        .and(query_param("paginationToken", "page-2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(history(&[test], None)))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/inApps/v1/notifications/history"))
        .and(header_exists("authorization"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(history(&[subscribed], Some("page-2"))),
        )
        .with_priority(2)
        .mount(&server)
        .await;

    assert_eq!(reconcile_one(&app, Source::Apple).await, counts(2, 1, 0, 1));
    let first_run = cursor(&app, Source::Apple).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let (_, body) = app
        .gql(
            &admin,
            "query($id: ID!) { customer(id: $id) { entitlement(key: \"pro\") { isActive willRenew } } }",
            json!({ "id": APPLE_CUSTOMER }),
        )
        .await;
    assert_eq!(
        body["data"]["customer"]["entitlement"]["isActive"], true,
        "{body}"
    );
    assert_eq!(change_kinds(&app, APPLE_CUSTOMER).await, vec!["granted"]);

    let reqs: Vec<Request> = server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.url.path() == "/inApps/v1/notifications/history")
        .collect();
    assert_eq!(reqs.len(), 2);
    let body: Value = serde_json::from_slice(&reqs[0].body).unwrap();
    // Milliseconds, as Apple wants them (rounded by the library's encoder).
    let near = |v: &Value, t: DateTime<Utc>| (v.as_i64().unwrap() - ms(t)).abs() <= 1;
    assert!(
        near(&body["startDate"], first_run - Duration::days(3)),
        "{body}"
    );
    assert!(near(&body["endDate"], first_run), "{body}");
    assert_eq!(body["onlyFailures"], true);
    assert_eq!(
        query(&reqs[1], "paginationToken").as_deref(),
        Some("page-2")
    );

    let saved = first_run;
    app.clock.advance(Duration::hours(2));
    assert_eq!(reconcile_one(&app, Source::Apple).await, counts(2, 0, 2, 0));
    let reqs: Vec<Request> = server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.url.path() == "/inApps/v1/notifications/history")
        .collect();
    let body: Value = serde_json::from_slice(&reqs[2].body).unwrap();
    assert!(
        near(&body["startDate"], saved - Duration::minutes(10)),
        "{body}"
    );
    assert_eq!(change_kinds(&app, APPLE_CUSTOMER).await, vec!["granted"]);
}

// ------------------------------------------------------------- Google Play

const VOIDED_PATH: &str =
    "/androidpublisher/v3/applications/com.example.app/purchases/voidedpurchases";

/// A refund Google reports only in its voided-purchases list revokes
/// access; tokens nobody here holds are counted and skipped.
async fn play_voided_purchase_revokes(b: Backend) {
    use google_support::*;
    let (app, g) = setup_with(b, |c| {
        c.reconcile.google = true;
        c.jobs.enabled = false;
    })
    .await;
    let key = app.key(ApiKeyRole::Client).await;
    let now = app.state.core.now();
    g.fake.set("sub-void", Sub::active(now).json());
    verify(&app, &key, "carol", "pro_sub", "sub-void").await;
    assert!(is_active(&entitlement(&app, &key, "carol", "pro").await));

    let voided_at = now + Duration::minutes(5);
    app.clock.advance(Duration::minutes(10));
    let entry = |token: &str, at: DateTime<Utc>| {
        json!({
            "kind": "androidpublisher#voidedPurchase",
            "purchaseToken": token,
            "purchaseTimeMillis": now.timestamp_millis().to_string(),
            "voidedTimeMillis": at.timestamp_millis().to_string(),
            "orderId": format!("GPA.{token}"),
            "voidedSource": 0,
            "voidedReason": 1,
            "refundType": 1
        })
    };
    Mock::given(method("GET"))
        .and(path(VOIDED_PATH))
        .and(query_param("token", "next-1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "voidedPurchases": [entry("someone-elses", voided_at)]
        })))
        .with_priority(1)
        .mount(&g.server)
        .await;
    Mock::given(method("GET"))
        .and(path(VOIDED_PATH))
        .and(header_exists("authorization"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "tokenPagination": { "nextPageToken": "next-1" },
            "voidedPurchases": [entry("sub-void", voided_at)]
        })))
        .with_priority(2)
        .mount(&g.server)
        .await;

    assert_eq!(
        reconcile_one(&app, Source::Google).await,
        counts(2, 1, 0, 1)
    );
    let first_run = cursor(&app, Source::Google).await;
    let c = entitlement(&app, &key, "carol", "pro").await;
    assert!(!is_active(&c), "{c}");
    assert_eq!(purchase_status(&c, "sub-void"), "REFUNDED");
    assert_eq!(
        change_kinds(&app, "carol").await,
        vec!["granted", "refunded"]
    );

    let voided_reqs = |reqs: Vec<Request>| -> Vec<Request> {
        reqs.into_iter()
            .filter(|r| r.url.path() == VOIDED_PATH)
            .collect()
    };
    let reqs = voided_reqs(g.server.received_requests().await.unwrap());
    assert_eq!(reqs.len(), 2);
    assert_eq!(query(&reqs[0], "type").as_deref(), Some("1"));
    assert_eq!(
        query(&reqs[0], "startTime"),
        Some(
            (first_run - Duration::days(3))
                .timestamp_millis()
                .to_string()
        )
    );
    assert_eq!(query(&reqs[1], "token").as_deref(), Some("next-1"));

    let saved = first_run;
    app.clock.advance(Duration::hours(1));
    assert_eq!(
        reconcile_one(&app, Source::Google).await,
        counts(2, 0, 1, 1)
    );
    let reqs = voided_reqs(g.server.received_requests().await.unwrap());
    assert_eq!(
        query(&reqs[2], "startTime"),
        Some(
            (saved - Duration::minutes(10))
                .timestamp_millis()
                .to_string()
        )
    );
    assert_eq!(
        change_kinds(&app, "carol").await,
        vec!["granted", "refunded"]
    );
}

// ---------------------------------------------------------------- refresh

async fn outcome_of(app: &TestApp, store_purchase_id: &str) -> Option<String> {
    let db = &app.state.core.db().conn;
    let sql = match db.get_database_backend() {
        sea_orm::DbBackend::Postgres => {
            "SELECT c.outcome FROM purchase_checks c JOIN purchases p ON p.id = c.purchase_id WHERE p.store_purchase_id = $1"
        }
        _ => {
            "SELECT c.outcome FROM purchase_checks c JOIN purchases p ON p.id = c.purchase_id WHERE p.store_purchase_id = ?"
        }
    };
    db.query_one_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        sql,
        [store_purchase_id.into()],
    ))
    .await
    .unwrap()
    .map(|r| r.try_get::<String>("", "outcome").unwrap())
}

/// Purchases near renewal are re-read from the store once per
/// `refresh_every_secs` and the renewal the store reports is applied;
/// purchases far from renewal cost no store call; a failing store is
/// recorded and not asked again before its time.
async fn refresh_rereads_purchases_near_renewal(b: Backend) {
    use stripe_support::*;
    let fake = FakeStripe::start().await;
    let app = stripe_app(b, &fake).await;
    let now = app.state.core.now();
    let start = now - Duration::days(30);
    let subs = [
        ("sub_near", "dora", now + Duration::minutes(2)),
        ("sub_stuck", "erin", now + Duration::minutes(3)),
        ("sub_far", "finn", now + Duration::days(20)),
    ];
    for (i, (id, customer, end)) in subs.iter().enumerate() {
        let s = subscription(
            id,
            &format!("cus_{customer}"),
            Some(customer),
            "price_pro_monthly",
            "active",
            start,
            *end,
        );
        fake.set_subscription(&s);
        let (st, body) = deliver(
            &app,
            &event(
                &format!("evt_r{i}"),
                "customer.subscription.created",
                s,
                now,
            ),
        )
        .await;
        assert_eq!(st, reqwest::StatusCode::OK, "{body}");
    }
    let calls = |id: &'static str| {
        let fake = &fake;
        async move {
            fake.requests("GET", &format!("/v1/subscriptions/{id}"))
                .await
                .len()
        }
    };
    let before = [
        calls("sub_near").await,
        calls("sub_stuck").await,
        calls("sub_far").await,
    ];
    // Stripe renewed one of them; the other is still waiting on its payment.
    let renewed_end = now + Duration::days(30) + Duration::minutes(2);
    fake.set_subscription(&subscription(
        "sub_near",
        "cus_dora",
        Some("dora"),
        "price_pro_monthly",
        "active",
        now + Duration::minutes(2),
        renewed_end,
    ));
    let cfg = JobsConfig::default();
    let core = &app.state.core;

    let r = refresh::run(core, &cfg).await.unwrap();
    assert_eq!((r.checked, r.failed), (2, 0));
    assert_eq!(calls("sub_near").await, before[0] + 1);
    assert_eq!(calls("sub_stuck").await, before[1] + 1);
    assert_eq!(
        calls("sub_far").await,
        before[2],
        "far from renewal: not asked"
    );
    let c = entitlements(&app, "dora").await;
    let expires =
        DateTime::parse_from_rfc3339(entitlement(&c, "pro")["expiresAt"].as_str().unwrap())
            .unwrap();
    assert_eq!(expires.timestamp(), renewed_end.timestamp(), "{c}");
    assert_eq!(
        outcome_of(&app, "sub_near").await.as_deref(),
        Some("applied")
    );

    // Within refresh_every_secs: nobody is asked again.
    let r = refresh::run(core, &cfg).await.unwrap();
    assert_eq!(r.checked, 0);
    assert_eq!(calls("sub_stuck").await, before[1] + 1);

    // Once it has passed, the unsettled one is asked again (its period
    // ended less than a day ago); the renewed one is far from renewal now.
    app.clock
        .advance(Duration::seconds(cfg.refresh_every_secs as i64 + 1));
    fake.set_down(true);
    let r = refresh::run(core, &cfg).await.unwrap();
    assert_eq!((r.checked, r.failed), (1, 1));
    assert_eq!(
        outcome_of(&app, "sub_stuck").await.as_deref(),
        Some("error:STORE_UNAVAILABLE")
    );
    fake.set_down(false);
    assert_eq!(
        refresh::run(core, &cfg).await.unwrap().checked,
        0,
        "a failing store is not hammered"
    );
    assert_eq!(calls("sub_near").await, before[0] + 1);
}

/// The Play subscription near renewal is re-read with `subscriptionsv2.get`
/// and the renewal applied.
async fn refresh_rereads_a_play_subscription(b: Backend) {
    use google_support::*;
    let (app, g) = setup_with(b, |c| c.jobs.enabled = false).await;
    let key = app.key(ApiKeyRole::Client).await;
    let now = app.state.core.now();
    let mut sub = Sub::active(now);
    sub.expiry = now + Duration::minutes(1);
    sub.acknowledged = true;
    g.fake.set("sub-renewing", sub.json());
    verify(&app, &key, "gina", "pro_sub", "sub-renewing").await;
    let reads = || async {
        g.server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .filter(|r| {
                r.url
                    .path()
                    .ends_with("/subscriptionsv2/tokens/sub-renewing")
            })
            .count()
    };
    let before = reads().await;
    let renewed = now + Duration::days(30);
    sub.expiry = renewed;
    g.fake.set("sub-renewing", sub.json());

    let r = refresh::run(&app.state.core, &JobsConfig::default())
        .await
        .unwrap();
    assert_eq!((r.checked, r.failed), (1, 0));
    assert_eq!(reads().await, before + 1);
    let c = entitlement(&app, &key, "gina", "pro").await;
    let expires =
        DateTime::parse_from_rfc3339(c["entitlement"]["expiresAt"].as_str().unwrap()).unwrap();
    assert_eq!(expires.timestamp(), renewed.timestamp(), "{c}");
    assert_eq!(
        outcome_of(&app, "sub-renewing").await.as_deref(),
        Some("applied")
    );
}

async fn mount_apple_api(
    server: &MockServer,
    tid: &str,
    sub: &apple_support::Sub,
    tx: &Value,
    renewal: &Value,
) {
    use apple_support::*;
    server.reset().await;
    Mock::given(method("GET"))
        .and(path(format!("/inApps/v1/transactions/{tid}")))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({ "signedTransactionInfo": sign(tx) })),
        )
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/inApps/v1/subscriptions/{tid}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(statuses(sub, 1, tx, renewal)))
        .mount(server)
        .await;
}

/// The App Store subscription near renewal is re-read (Get Transaction Info
/// and Get All Subscription Statuses by its original transaction id) and
/// the renewal applied.
async fn refresh_rereads_an_app_store_subscription(b: Backend) {
    use apple_support::*;
    let server = MockServer::start().await;
    let uri = server.uri();
    let app = spawn_with(b, |c| {
        configure(c, AppleEnvironment::Production, Some(&uri));
        c.jobs.enabled = false;
    })
    .await;
    app.sign_up(APPLE_CUSTOMER).await;
    let t0 = app.state.core.now();
    let sub = Sub::new(
        "8000000001",
        MONTHLY,
        APPLE_CUSTOMER,
        t0 - Duration::days(30),
    );
    let first = sub.tx(
        "8000000001",
        t0 - Duration::days(30),
        Some(t0 + Duration::minutes(2)),
        t0 - Duration::days(30),
    );
    let renewal = sub.renewal(true, false, None, t0 - Duration::minutes(1));
    mount_apple_api(&server, "8000000001", &sub, &first, &renewal).await;
    let jws = notification(
        "SUBSCRIBED",
        Some("INITIAL_BUY"),
        "b0000000-0000-4000-8000-000000000001",
        "Production",
        t0 - Duration::minutes(1),
        Some(&first),
        Some(&renewal),
        Some(1),
    );
    let (status, _) = app.apple_notification(&jws).await;
    assert_eq!(status, reqwest::StatusCode::OK);

    // Apple renewed it: the latest transaction runs another month.
    let renewed_end = t0 + Duration::days(30);
    let next = sub.tx(
        "8000000002",
        t0 + Duration::minutes(2),
        Some(renewed_end),
        t0,
    );
    mount_apple_api(
        &server,
        "8000000001",
        &sub,
        &next,
        &sub.renewal(true, false, None, t0),
    )
    .await;
    let r = refresh::run(&app.state.core, &JobsConfig::default())
        .await
        .unwrap();
    assert_eq!((r.checked, r.failed), (1, 0));
    let admin = app.key(ApiKeyRole::Admin).await;
    let (_, body) = app
        .gql(
            &admin,
            "query($id: ID!) { customer(id: $id) { entitlement(key: \"pro\") { isActive expiresAt } } }",
            json!({ "id": APPLE_CUSTOMER }),
        )
        .await;
    let e = &body["data"]["customer"]["entitlement"];
    let expires = DateTime::parse_from_rfc3339(e["expiresAt"].as_str().unwrap()).unwrap();
    assert_eq!(expires.timestamp(), renewed_end.timestamp(), "{body}");
    assert_eq!(
        outcome_of(&app, "8000000001").await.as_deref(),
        Some("applied")
    );
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        2,
        "one re-read"
    );
}

/// A lost message must not cut off a paying user: purchases on hold or
/// paused are re-read while the store may still settle them, and a
/// recovery Google reports (its notification lost) is applied.
async fn refresh_rereads_on_hold_and_paused_play(b: Backend) {
    use google_support::*;
    let (app, g) = setup_with(b, |c| c.jobs.enabled = false).await;
    let key = app.key(ApiKeyRole::Client).await;
    let now = app.state.core.now();
    for (i, state) in ["SUBSCRIPTION_STATE_ON_HOLD", "SUBSCRIPTION_STATE_PAUSED"]
        .iter()
        .enumerate()
    {
        let token = format!("sub-stalled-{i}");
        let customer = format!("stalled-{i}");
        let mut sub = Sub::active(now);
        sub.acknowledged = true;
        g.fake.set(&token, sub.json());
        verify(&app, &key, &customer, "pro_sub", &token).await;
        // Its period ended weeks ago and Google holds it.
        let mut stalled = Sub::active(now - Duration::days(40));
        stalled.state = state;
        stalled.acknowledged = true;
        stalled.expiry = now - Duration::days(10);
        g.fake.set(&token, stalled.json());
        let (_, body) = push(
            &app,
            &format!("m-stall-{i}"),
            &sub_note(
                if i == 0 { 5 } else { 10 },
                &token,
                now + Duration::minutes(1),
            ),
        )
        .await;
        assert_eq!(body["outcome"], "applied", "{body}");
        assert!(!is_active(&entitlement(&app, &key, &customer, "pro").await));
    }
    // The payment went through / the pause ended; neither was notified.
    for i in 0..2 {
        let mut back = Sub::active(now);
        back.acknowledged = true;
        back.expiry = now + Duration::days(30);
        g.fake.set(&format!("sub-stalled-{i}"), back.json());
    }
    app.clock.advance(Duration::minutes(2));
    let r = refresh::run(&app.state.core, &JobsConfig::default())
        .await
        .unwrap();
    assert_eq!((r.checked, r.failed), (2, 0));
    for i in 0..2 {
        let c = entitlement(&app, &key, &format!("stalled-{i}"), "pro").await;
        assert!(is_active(&c), "{c}");
        assert_eq!(
            outcome_of(&app, &format!("sub-stalled-{i}"))
                .await
                .as_deref(),
            Some("applied")
        );
    }
}

/// A canceled App Store subscription is re-read at its period end like an
/// active one: the un-cancel whose notification was lost shows as a renewal.
async fn refresh_rereads_a_canceled_app_store_subscription(b: Backend) {
    use apple_support::*;
    let server = MockServer::start().await;
    let uri = server.uri();
    let app = spawn_with(b, |c| {
        configure(c, AppleEnvironment::Production, Some(&uri));
        c.jobs.enabled = false;
    })
    .await;
    app.sign_up(APPLE_CUSTOMER).await;
    let t0 = app.state.core.now();
    let sub = Sub::new(
        "8100000001",
        MONTHLY,
        APPLE_CUSTOMER,
        t0 - Duration::days(30),
    );
    let first = sub.tx(
        "8100000001",
        t0 - Duration::days(30),
        Some(t0 + Duration::minutes(2)),
        t0 - Duration::days(30),
    );
    let off = sub.renewal(false, false, None, t0 - Duration::minutes(1));
    mount_apple_api(&server, "8100000001", &sub, &first, &off).await;
    let jws = notification(
        "DID_CHANGE_RENEWAL_STATUS",
        Some("AUTO_RENEW_DISABLED"),
        "b1000000-0000-4000-8000-000000000001",
        "Production",
        t0 - Duration::minutes(1),
        Some(&first),
        Some(&off),
        Some(1),
    );
    let (status, _) = app.apple_notification(&jws).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let admin = app.key(ApiKeyRole::Admin).await;
    let q = "query($id: ID!) { customer(id: $id) { entitlement(key: \"pro\") { isActive expiresAt willRenew } } }";
    let (_, body) = app.gql(&admin, q, json!({ "id": APPLE_CUSTOMER })).await;
    assert_eq!(
        body["data"]["customer"]["entitlement"]["willRenew"], false,
        "{body}"
    );

    // The user turned renewal back on and Apple renewed; we heard nothing.
    let renewed_end = t0 + Duration::days(30);
    let next = sub.tx(
        "8100000002",
        t0 + Duration::minutes(2),
        Some(renewed_end),
        t0,
    );
    mount_apple_api(
        &server,
        "8100000001",
        &sub,
        &next,
        &sub.renewal(true, false, None, t0),
    )
    .await;
    let r = refresh::run(&app.state.core, &JobsConfig::default())
        .await
        .unwrap();
    assert_eq!((r.checked, r.failed), (1, 0));
    let (_, body) = app.gql(&admin, q, json!({ "id": APPLE_CUSTOMER })).await;
    let e = &body["data"]["customer"]["entitlement"];
    let expires = DateTime::parse_from_rfc3339(e["expiresAt"].as_str().unwrap()).unwrap();
    assert_eq!(expires.timestamp(), renewed_end.timestamp(), "{body}");
    assert_eq!(e["willRenew"], true, "{body}");
}

/// A purchase of the named customer, as the database holds it.
async fn purchase_row(
    app: &TestApp,
    customer: &str,
    store_purchase_id: &str,
) -> entities::purchases::Model {
    entitle::db::purchases_of(&app.state.core.db().conn, customer)
        .await
        .map_err(anyhow::Error::from)
        .unwrap()
        .into_iter()
        .find(|p| p.store_purchase_id == store_purchase_id)
        .expect("purchase held")
}

/// The refresh is one path for every store: in a deployment with the three
/// stores, one run re-reads a subscription of each near its renewal and
/// applies each store's answer, and each store's own rules still hold on
/// that path: Play is acknowledged only once the renewal is committed, a
/// Play refund stands against a lagging re-read, and a Stripe subscription
/// that ended stays ended.
async fn refresh_takes_one_path_for_every_store(b: Backend) {
    let stripe = stripe_support::FakeStripe::start().await;
    let apple = MockServer::start().await;
    let google = google_support::fake_google().await;
    let (apple_uri, google_uri) = (apple.uri(), google.server.uri());
    let app = spawn_with(b, |c| {
        stripe_support::configure(c, Some(&stripe));
        apple_support::configure(c, AppleEnvironment::Production, Some(&apple_uri));
        google_support::with_google(c, &google_uri);
        c.jobs.enabled = false;
    })
    .await;
    let core = &app.state.core;
    assert_eq!(
        refresh::stores(core),
        vec![Store::Stripe, Store::AppStore, Store::PlayStore]
    );
    let now = core.now();
    let start = now - Duration::days(30);

    // Stripe: a subscription ending in two minutes.
    let stripe_sub = |status: &str, from: DateTime<Utc>, until: DateTime<Utc>| {
        stripe_support::subscription(
            "sub_every",
            "cus_every",
            Some("stripe-user"),
            "price_pro_monthly",
            status,
            from,
            until,
        )
    };
    let s = stripe_sub("active", start, now + Duration::minutes(2));
    stripe.set_subscription(&s);
    let (st, body) = stripe_support::deliver(
        &app,
        &stripe_support::event("evt_every_1", "customer.subscription.created", s, now),
    )
    .await;
    assert_eq!(st, reqwest::StatusCode::OK, "{body}");

    // App Store: one ending in two minutes.
    app.sign_up(APPLE_CUSTOMER).await;
    let sub = apple_support::Sub::new("8200000001", apple_support::MONTHLY, APPLE_CUSTOMER, start);
    let first = sub.tx("8200000001", start, Some(now + Duration::minutes(2)), start);
    let renewal = sub.renewal(true, false, None, now - Duration::minutes(1));
    mount_apple_api(&apple, "8200000001", &sub, &first, &renewal).await;
    let jws = apple_support::notification(
        "SUBSCRIBED",
        Some("INITIAL_BUY"),
        "b2000000-0000-4000-8000-000000000001",
        "Production",
        now - Duration::minutes(1),
        Some(&first),
        Some(&renewal),
        Some(1),
    );
    let (status, _) = app.apple_notification(&jws).await;
    assert_eq!(status, reqwest::StatusCode::OK);

    // Google Play: one ending in a minute, acknowledged.
    let key = app.key(ApiKeyRole::Client).await;
    let mut play = google_support::Sub::active(now);
    play.expiry = now + Duration::minutes(1);
    play.acknowledged = true;
    google.fake.set("sub-every", play.json());
    let body = google_support::verify(&app, &key, "play-user", "pro_sub", "sub-every").await;
    assert!(body["errors"].is_null(), "{body}");
    assert!(google.fake.with(|s| s.acks.is_empty()));

    // Each store renewed; Google waits for the renewal's acknowledgement.
    let renewed_end = now + Duration::days(30);
    stripe.set_subscription(&stripe_sub(
        "active",
        now + Duration::minutes(2),
        renewed_end,
    ));
    let next = sub.tx(
        "8200000002",
        now + Duration::minutes(2),
        Some(renewed_end),
        now,
    );
    mount_apple_api(
        &apple,
        "8200000001",
        &sub,
        &next,
        &sub.renewal(true, false, None, now),
    )
    .await;
    play.expiry = renewed_end;
    play.acknowledged = false;
    google.fake.set("sub-every", play.json());

    let r = refresh::run(core, &JobsConfig::default()).await.unwrap();
    assert_eq!((r.checked, r.failed), (3, 0));
    let admin = app.key(ApiKeyRole::Admin).await;
    for (customer, id) in [
        ("stripe-user", "sub_every"),
        (APPLE_CUSTOMER, "8200000001"),
        ("play-user", "sub-every"),
    ] {
        let (_, body) = app
            .gql(
                &admin,
                "query($id: ID!) { customer(id: $id) { entitlement(key: \"pro\") { isActive expiresAt } } }",
                json!({ "id": customer }),
            )
            .await;
        let e = &body["data"]["customer"]["entitlement"];
        assert_eq!(e["isActive"], true, "{customer}: {body}");
        let expires = DateTime::parse_from_rfc3339(e["expiresAt"].as_str().unwrap()).unwrap();
        assert_eq!(
            expires.timestamp(),
            renewed_end.timestamp(),
            "{customer}: {body}"
        );
        assert_eq!(
            outcome_of(&app, id).await.as_deref(),
            Some("applied"),
            "{customer}"
        );
    }
    assert_eq!(
        google.fake.with(|s| s.acks.clone()),
        vec!["sub-every".to_string()]
    );
    assert_eq!(
        google.fake.ack_state("sub-every"),
        "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED"
    );

    // Google refunds it, and its API lags, still saying active.
    let (st, _) = google_support::push(
        &app,
        "m-every-void",
        &google_support::voided_note("sub-every", 1, core.now()),
    )
    .await;
    assert_eq!(st, reqwest::StatusCode::OK);
    app.clock.advance(Duration::minutes(1));
    let row = purchase_row(&app, "play-user", "sub-every").await;
    assert_eq!(row.status, "refunded");
    core.stores().refresh_purchase(&row).await.unwrap();
    let after = purchase_row(&app, "play-user", "sub-every").await;
    assert_eq!(
        (after.status.as_str(), after.revoked_at),
        ("refunded", row.revoked_at),
        "a refund stands"
    );

    // Stripe ends the subscription; a read saying otherwise changes nothing.
    let ended = {
        let mut s = stripe_sub("canceled", now + Duration::minutes(2), renewed_end);
        s["ended_at"] = json!(core.now().timestamp());
        s
    };
    stripe.set_subscription(&ended);
    let (st, body) = stripe_support::deliver(
        &app,
        &stripe_support::event(
            "evt_every_2",
            "customer.subscription.deleted",
            ended,
            core.now(),
        ),
    )
    .await;
    assert_eq!(st, reqwest::StatusCode::OK, "{body}");
    stripe.set_subscription(&stripe_sub(
        "active",
        now + Duration::minutes(2),
        renewed_end,
    ));
    app.clock.advance(Duration::minutes(1));
    let row = purchase_row(&app, "stripe-user", "sub_every").await;
    assert_eq!(
        core.stores().refresh_purchase(&row).await.unwrap().as_str(),
        "already_ended"
    );
    assert_eq!(purchase_row(&app, "stripe-user", "sub_every").await, row);
}

on_all_backends!(
    refresh_takes_one_path_for_every_store,
    refresh_rereads_on_hold_and_paused_play,
    refresh_rereads_a_canceled_app_store_subscription,
    refresh_rereads_a_play_subscription,
    refresh_rereads_an_app_store_subscription,
    stripe_missed_event_is_recovered_once,
    stripe_down_keeps_the_cursor,
    apple_history_is_applied,
    play_voided_purchase_revokes,
    refresh_rereads_purchases_near_renewal,
);

// -------------------------------------------------------------------- CLI

/// `entitle reconcile --since` asks Stripe from that instant, prints the
/// counts, and fails when a store fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reconcile_since() {
    use stripe_support::*;
    let fake = FakeStripe::start().await;
    let ev: Value = serde_json::from_str(&event(
        "evt_cli_1",
        "customer.created",
        json!({ "id": "cus_cli", "object": "customer" }),
        Utc::now() - Duration::hours(1),
    ))
    .unwrap();
    fake.set("GET", "/v1/events", event_list(&[ev], false));
    let dir = tempfile::tempdir().unwrap();
    let run = |args: Vec<String>, api_base: String| {
        let dir = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_entitle"))
                .args(&args)
                .current_dir(&dir)
                .env_remove("DATABASE_URL")
                .env(
                    "ENTITLE_DATABASE_URL",
                    format!("sqlite://{}?mode=rwc", dir.join("cli.db").display()),
                )
                .env("ENTITLE_LOG", "error")
                .env("ENTITLE_STRIPE__SECRET_KEY", SECRET_KEY)
                .env("ENTITLE_STRIPE__API_BASE", api_base)
                .env("ENTITLE_STRIPE__API_TIMEOUT_SECS", "2")
                .env("ENTITLE_RECONCILE__STRIPE", "true")
                .output()
                .unwrap()
        })
    };
    // Within the 30 days Stripe keeps events (older is asked from there).
    let since = (Utc::now() - Duration::days(5)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let out = run(
        vec!["reconcile".into(), "--since".into(), since.clone()],
        fake.base(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        "stripe: seen 1, applied 0, duplicates 0, skipped 1"
    );
    let reqs = fake.requests("GET", "/v1/events").await;
    assert_eq!(
        query(&reqs[0], "created[gte]"),
        Some(
            DateTime::parse_from_rfc3339(&since)
                .unwrap()
                .timestamp()
                .to_string()
        )
    );

    let out = run(
        vec!["reconcile".into(), "--since".into(), "2d".into()],
        fake.base(),
    )
    .await
    .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "stripe: seen 1, applied 0, duplicates 1, skipped 0"
    );
    let reqs = fake.requests("GET", "/v1/events").await;
    let asked: i64 = query(&reqs[1], "created[gte]").unwrap().parse().unwrap();
    let two_days_ago = (Utc::now() - Duration::days(2)).timestamp();
    assert!(
        (asked - two_days_ago).abs() < 120,
        "{asked} vs {two_days_ago}"
    );

    fake.set_down(true);
    let out = run(vec!["reconcile".into()], fake.base()).await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("stripe: failed"));

    let out = run(
        vec!["reconcile".into(), "--since".into(), "yesterday".into()],
        fake.base(),
    )
    .await
    .unwrap();
    assert!(!out.status.success(), "a bad --since is refused");
}
