//! The webhook log (issue 16, points 1 and 9) through the real routes and
//! the CLI: what matched nothing is recorded and listed, a replay after the
//! configuration is fixed applies it once, a failed delivery is kept and
//! replayed when the store is back, only an admin sees or replays any of it,
//! and the overview counts what the change log says.

mod common;
mod stripe_support;

use chrono::Duration;
use common::{Auth, Backend, TestApp, error_code, hs_config, respawn, sign_hs, spawn_with};
use entitle::domain::{ApiKeyRole, ProductDef, ProductKind};
use reqwest::StatusCode;
use serde_json::{Value, json};
use stripe_support::*;

/// A Payment Link the first configuration does not know.
const NEW_LINK: &str = "plink_1NewLifetime";

const LOG: &str = "query($o: [String!], $s: Store, $c: ID, $since: DateTime, $r: Boolean, $first: Int = 20, $after: String) {
  webhookEvents(outcome: $o, store: $s, customerId: $c, since: $since, replayable: $r, first: $first, after: $after) {
    pageInfo { hasNextPage endCursor }
    nodes { id store eventId type outcome customerId error receivedAt replayedAt replayable payload }
  } }";

const REPLAY: &str = "mutation($id: ID!) { replayWebhookEvent(id: $id) { previousOutcome outcome ran event { id outcome customerId replayedAt error } } }";

/// The catalog learns the link: a lifetime product granting `pro` alone,
/// so a grant is one change-log row.
fn knows_new_link(c: &mut entitle::config::Config) {
    configure(c, None);
    c.catalog.products.push(ProductDef {
        id: "pro_forever".into(),
        entitlements: vec!["pro".into()],
        kind: ProductKind::Lifetime,
        display_name: None,
        stripe_price_id: None,
        stripe_payment_link: Some(NEW_LINK.into()),
        app_store_product_id: None,
        play_store_product_id: None,
    });
}

fn link_session(id: &str, reference: Option<&str>, link: &str) -> Value {
    let mut s = checkout_session(id, "payment", reference, None, None);
    s["payment_link"] = json!(link);
    s
}

async fn log(app: &TestApp, auth: &Auth, vars: Value) -> Value {
    let (s, r) = app.gql(auth, LOG, vars).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert!(r["errors"].is_null(), "{r}");
    r["data"]["webhookEvents"].clone()
}

async fn replay(app: &TestApp, auth: &Auth, id: &str) -> Value {
    let (s, r) = app.gql(auth, REPLAY, json!({ "id": id })).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert!(r["errors"].is_null(), "{r}");
    r["data"]["replayWebhookEvent"].clone()
}

async fn changes_of(app: &TestApp, customer: &str) -> i64 {
    use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
    entities::entitlement_events::Entity::find()
        .filter(entities::entitlement_events::Column::CustomerId.eq(customer))
        .count(&app.state.core.db().conn)
        .await
        .unwrap() as i64
}

/// The issue's own test: a paid checkout for a product the catalog does not
/// know is `unknown_product`, listed with its verified payload; replayed
/// after the product is added (a restart with the new configuration), it
/// grants and writes one change-log row; a second replay, and Stripe's
/// redelivery, change nothing.
async fn unknown_product_checkout_replays_once_after_the_catalog_learns_it(b: Backend) {
    let app = spawn_with(b, |c| configure(c, None)).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let ev = event(
        "evt_unknown_link",
        "checkout.session.completed",
        link_session("cs_unknown", Some("buyer-1"), NEW_LINK),
        app.state.core.now(),
    );
    let (s, r) = deliver(&app, &ev).await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("unknown_product")),
        "{r}"
    );
    let before = app.counts().await;
    let page = log(&app, &admin, json!({ "o": ["unknown_product"] })).await;
    let nodes = page["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{page}");
    let n = &nodes[0];
    assert_eq!(n["store"], "STRIPE");
    assert_eq!(n["eventId"], "evt_unknown_link");
    assert_eq!(n["type"], "checkout.session.completed");
    assert_eq!(n["customerId"], "buyer-1");
    assert_eq!(n["replayable"], true);
    assert_eq!(n["replayedAt"], Value::Null);
    assert_eq!(n["payload"], serde_json::from_str::<Value>(&ev).unwrap());
    let id = n["id"].as_str().unwrap().to_string();

    // Replayed before the fix: still unknown, nothing else written.
    let r = replay(&app, &admin, &id).await;
    assert_eq!(
        (
            r["previousOutcome"].as_str(),
            r["outcome"].as_str(),
            r["ran"].as_bool()
        ),
        (Some("unknown_product"), Some("unknown_product"), Some(true)),
        "{r}"
    );
    assert!(r["event"]["replayedAt"].is_string(), "{r}");
    assert_eq!(app.counts().await, before);

    // The operator adds the product and restarts.
    let fixed = respawn(&app, knows_new_link).await;
    let admin = fixed.key(ApiKeyRole::Admin).await;
    let log_rows = fixed.count("entitlement_events").await;
    assert_eq!(changes_of(&fixed, "buyer-1").await, 0);
    let r = replay(&fixed, &admin, &id).await;
    assert_eq!(
        (
            r["previousOutcome"].as_str(),
            r["outcome"].as_str(),
            r["ran"].as_bool()
        ),
        (Some("unknown_product"), Some("applied"), Some(true)),
        "{r}"
    );
    assert_eq!(r["event"]["customerId"], "buyer-1");
    let c = entitlements(&fixed, "buyer-1").await;
    assert_eq!(entitlement(&c, "pro")["isActive"], true, "{c}");
    assert_eq!(entitlement(&c, "pro")["productId"], NEW_LINK, "{c}");
    assert_eq!(fixed.count("entitlement_events").await, log_rows + 1);
    assert_eq!(changes_of(&fixed, "buyer-1").await, 1);

    // Again: it already applied, so nothing runs or changes.
    let counts = fixed.counts().await;
    let r = replay(&fixed, &admin, &id).await;
    assert_eq!(
        (
            r["previousOutcome"].as_str(),
            r["outcome"].as_str(),
            r["ran"].as_bool()
        ),
        (Some("applied"), Some("applied"), Some(false)),
        "{r}"
    );
    assert_eq!(fixed.counts().await, counts);
    // Stripe's redelivery is a duplicate.
    let (s, r) = deliver(&fixed, &ev).await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("duplicate")),
        "{r}"
    );
    assert_eq!(fixed.counts().await, counts);
    // No longer listed as replayable; listed by its customer.
    let page = log(&fixed, &admin, json!({ "r": true })).await;
    assert_eq!(page["nodes"].as_array().unwrap().len(), 0, "{page}");
    let (_, r) = fixed
        .gql(
            &admin,
            "{ customer(id: \"buyer-1\") { webhookEvents { eventId outcome } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        r["data"]["customer"]["webhookEvents"],
        json!([{ "eventId": "evt_unknown_link", "outcome": "applied" }]),
        "{r}"
    );
}

/// Two replays at once apply the event once.
async fn concurrent_replays_apply_once(b: Backend) {
    let app = spawn_with(b, |c| configure(c, None)).await;
    let ev = event(
        "evt_race",
        "checkout.session.completed",
        link_session("cs_race", Some("racer"), NEW_LINK),
        app.state.core.now(),
    );
    assert_eq!(deliver(&app, &ev).await.1["outcome"], "unknown_product");
    let fixed = respawn(&app, knows_new_link).await;
    let admin = fixed.key(ApiKeyRole::Admin).await;
    let page = log(&fixed, &admin, json!({ "o": ["unknown_product"] })).await;
    let id = page["nodes"][0]["id"].as_str().unwrap().to_string();
    let (a, b2) = tokio::join!(replay(&fixed, &admin, &id), replay(&fixed, &admin, &id));
    let ran = [&a, &b2].iter().filter(|r| r["ran"] == true).count();
    assert_eq!(ran, 1, "{a} {b2}");
    assert_eq!(a["outcome"], "applied");
    assert_eq!(b2["outcome"], "applied");
    assert_eq!(changes_of(&fixed, "racer").await, 1);
}

/// A paid checkout that names nobody is `no_customer`, kept and listed.
async fn paid_checkout_naming_nobody_is_no_customer(b: Backend) {
    let app = spawn_with(b, knows_new_link).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let before = app.counts().await;
    let ev = event(
        "evt_nobody",
        "checkout.session.completed",
        link_session("cs_nobody", None, NEW_LINK),
        app.state.core.now(),
    );
    let (s, r) = deliver(&app, &ev).await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("no_customer")),
        "{r}"
    );
    let after = app.counts().await;
    for ((t, n0), (_, n1)) in before.iter().zip(&after) {
        let grew = i64::from(*t == "webhook_events");
        assert_eq!(*n1, n0 + grew, "{t}");
    }
    let page = log(&app, &admin, json!({ "o": ["no_customer"] })).await;
    assert_eq!(page["nodes"][0]["customerId"], Value::Null, "{page}");
    let id = page["nodes"][0]["id"].as_str().unwrap().to_string();
    let r = replay(&app, &admin, &id).await;
    assert_eq!(r["outcome"], "no_customer", "{r}");
    assert_eq!(app.counts().await, after);
}

/// Stripe's API down: the delivery answers 503 (Stripe retries) and is kept
/// as `failed` with a reason free of secrets; once Stripe is back a replay
/// applies it, and Stripe's own retry then changes nothing.
async fn failed_delivery_is_kept_and_replayed_when_the_store_is_back(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure(c, Some(&fake))).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let now = app.state.core.now();
    let sub = subscription(
        "sub_fail",
        "cus_fail",
        Some("user-fail"),
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    fake.set_subscription(&sub);
    fake.set_down(true);
    let ev = event("evt_fail", "customer.subscription.created", sub, now);
    let (s, r) = deliver(&app, &ev).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{r}");
    let page = log(&app, &admin, json!({ "o": ["failed"] })).await;
    let n = &page["nodes"][0];
    assert_eq!(n["eventId"], "evt_fail", "{page}");
    assert_eq!(n["replayable"], true);
    let error = n["error"].as_str().unwrap();
    assert!(error.contains("unavailable"), "{error}");
    assert!(!error.contains(SECRET_KEY) && !error.contains(WEBHOOK_SECRET));
    assert_eq!(n["payload"], serde_json::from_str::<Value>(&ev).unwrap());
    let id = n["id"].as_str().unwrap().to_string();

    // Still down: the replay fails too, and says so.
    let r = replay(&app, &admin, &id).await;
    assert_eq!(
        (r["outcome"].as_str(), r["ran"].as_bool()),
        (Some("failed"), Some(false)),
        "{r}"
    );
    assert_eq!(app.count("purchases").await, 0);

    fake.set_down(false);
    let r = replay(&app, &admin, &id).await;
    assert_eq!(
        (
            r["previousOutcome"].as_str(),
            r["outcome"].as_str(),
            r["ran"].as_bool()
        ),
        (Some("failed"), Some("applied"), Some(true)),
        "{r}"
    );
    assert_eq!(r["event"]["error"], Value::Null);
    assert_eq!(r["event"]["customerId"], "user-fail");
    let c = entitlements(&app, "user-fail").await;
    assert_eq!(entitlement(&c, "pro")["isActive"], true, "{c}");
    let counts = app.counts().await;
    let (s, r) = deliver(&app, &ev).await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("duplicate")),
        "{r}"
    );
    assert_eq!(app.counts().await, counts);
}

/// Filters by outcome, store, customer and time, and cursor paging.
async fn filters_and_paging(b: Backend) {
    let app = spawn_with(b, knows_new_link).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let t0 = app.state.core.now();
    for i in 0..3 {
        let ev = event(
            &format!("evt_u{i}"),
            "checkout.session.completed",
            link_session(
                &format!("cs_u{i}"),
                Some(&format!("cust-{i}")),
                "plink_other",
            ),
            app.state.core.now(),
        );
        assert_eq!(deliver(&app, &ev).await.1["outcome"], "unknown_product");
    }
    app.clock.advance(Duration::hours(2));
    let since = app.state.core.now();
    let ev = event(
        "evt_ok",
        "checkout.session.completed",
        link_session("cs_ok", Some("cust-0"), NEW_LINK),
        app.state.core.now(),
    );
    assert_eq!(deliver(&app, &ev).await.1["outcome"], "applied");

    let ids = |p: &Value| -> Vec<String> {
        p["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["eventId"].as_str().unwrap().to_string())
            .collect()
    };
    // Newest first.
    let all = log(&app, &admin, json!({})).await;
    assert_eq!(ids(&all), ["evt_ok", "evt_u2", "evt_u1", "evt_u0"]);
    let unknown = log(&app, &admin, json!({ "o": ["unknown_product"] })).await;
    assert_eq!(ids(&unknown), ["evt_u2", "evt_u1", "evt_u0"]);
    let two = log(&app, &admin, json!({ "o": ["applied", "no_customer"] })).await;
    assert_eq!(ids(&two), ["evt_ok"]);
    assert_eq!(
        ids(&log(&app, &admin, json!({ "s": "STRIPE" })).await).len(),
        4
    );
    assert!(ids(&log(&app, &admin, json!({ "s": "APP_STORE" })).await).is_empty());
    assert_eq!(
        ids(&log(&app, &admin, json!({ "c": "cust-0" })).await),
        ["evt_ok", "evt_u0"]
    );
    assert_eq!(
        ids(&log(&app, &admin, json!({ "since": since.to_rfc3339() })).await),
        ["evt_ok"]
    );
    assert_eq!(
        ids(&log(&app, &admin, json!({ "since": t0.to_rfc3339(), "r": true })).await),
        ["evt_u2", "evt_u1", "evt_u0"]
    );
    assert_eq!(
        ids(&log(
            &app,
            &admin,
            json!({ "r": false, "o": ["applied", "unknown_product"] })
        )
        .await),
        ["evt_ok"]
    );
    // Pages of two.
    let p1 = log(&app, &admin, json!({ "first": 2 })).await;
    assert_eq!(ids(&p1), ["evt_ok", "evt_u2"]);
    assert_eq!(p1["pageInfo"]["hasNextPage"], true);
    let p2 = log(
        &app,
        &admin,
        json!({ "first": 2, "after": p1["pageInfo"]["endCursor"] }),
    )
    .await;
    assert_eq!(ids(&p2), ["evt_u1", "evt_u0"]);
    assert_eq!(p2["pageInfo"]["hasNextPage"], false);
    // Bounds.
    let (_, r) = app.gql(&admin, LOG, json!({ "first": 101 })).await;
    assert!(r["errors"].is_array(), "{r}");
    let (_, r) = app
        .gql(&admin, LOG, json!({ "after": "not a cursor" }))
        .await;
    assert_eq!(error_code(&r), Some("BAD_USER_INPUT"), "{r}");
    let (_, r) = app.gql(&admin, REPLAY, json!({ "id": "999999" })).await;
    assert_eq!(error_code(&r), Some("NOT_FOUND"), "{r}");
}

fn jwt(sub: &str) -> Auth {
    let now = chrono::Utc::now().timestamp();
    Auth::Bearer(sign_hs(&json!({
        "sub": sub, "iss": "https://auth.test/", "aud": "entitle", "iat": now, "exp": now + 600
    })))
}

/// Only an admin reads the log, replays, or reads the overview; a service
/// key reads a customer's deliveries but not their payloads; client keys
/// and customer tokens (even the customer's own) get none of it.
async fn only_admins_see_the_log(b: Backend) {
    let app = spawn_with(b, |c| {
        c.auth.jwt = Some(hs_config());
        configure(c, None);
    })
    .await;
    app.sign_up("victim").await;
    let ev = event(
        "evt_secret",
        "checkout.session.completed",
        link_session("cs_secret", Some("victim"), NEW_LINK),
        app.state.core.now(),
    );
    deliver(&app, &ev).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let id = log(&app, &admin, json!({})).await["nodes"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let client = app.key(ApiKeyRole::Client).await;
    let service = app.key(ApiKeyRole::Service).await;
    let own = jwt("victim");
    let probes: [(&str, Value); 5] = [
        ("{ webhookEvents { nodes { id } } }", json!({})),
        ("{ overview { now { customersWithAccess } } }", json!({})),
        (REPLAY, json!({ "id": id })),
        (
            "{ customer(id: \"victim\") { webhookEvents { outcome } } }",
            json!({}),
        ),
        (
            "{ customer(id: \"victim\") { webhookEvents { payload } } }",
            json!({}),
        ),
    ];
    for (who, auth) in [
        ("client key", &client),
        ("own JWT", &own),
        ("nobody", &Auth::None),
    ] {
        for (q, v) in &probes {
            let (_, r) = app.gql(auth, q, v.clone()).await;
            let code = error_code(&r);
            assert!(
                matches!(code, Some("FORBIDDEN" | "UNAUTHENTICATED")),
                "{who}: {q}: {r}"
            );
            assert!(!r.to_string().contains("cs_secret"), "{who}: {r}");
        }
    }
    // The service key: the customer's deliveries, never the payload, no log.
    for (i, (q, v)) in probes.iter().enumerate() {
        let (_, r) = app.gql(&service, q, v.clone()).await;
        if i == 3 {
            assert!(r["errors"].is_null(), "{r}");
            assert_eq!(
                r["data"]["customer"]["webhookEvents"][0]["outcome"],
                "unknown_product"
            );
        } else {
            assert_eq!(error_code(&r), Some("FORBIDDEN"), "{q}: {r}");
            assert!(!r.to_string().contains("cs_secret"), "{r}");
        }
    }
    // Nothing was replayed by anyone refused.
    let n = &log(&app, &admin, json!({})).await["nodes"][0];
    assert_eq!(n["replayedAt"], Value::Null, "{n}");
}

/// The overview: customers with access now per store, in trial, and the
/// change log per day (trials, trial to paid, ...).
async fn overview_counts_and_series(b: Backend) {
    let app = spawn_with(b, |c| configure(c, None)).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let client = app.key(ApiKeyRole::Client).await;
    let t0 = app.state.core.now();
    // Two watches start trials; eight days later both have lapsed.
    for w in ["watch-a", "watch-b"] {
        assert_eq!(app.post_user(&client, w).await.0, StatusCode::OK);
    }
    app.clock.advance(Duration::days(8));
    let now = app.state.core.now();
    // A third starts one now, the first pays, bob is granted access.
    assert_eq!(app.post_user(&client, "watch-c").await.0, StatusCode::OK);
    let mut sub = subscription(
        "sub_conv",
        "cus_conv",
        None,
        "price_pro_monthly",
        "active",
        now,
        now + Duration::days(30),
    );
    sub["metadata"] = json!({ "customer_id": "watch-a" });
    let (_, r) = deliver(
        &app,
        &event("evt_conv", "customer.subscription.created", sub, now),
    )
    .await;
    assert_eq!(r["outcome"], "applied", "{r}");
    app.sign_up("bob").await;
    let (_, r) = app
        .gql(
            &admin,
            "mutation { grantEntitlement(customerId: \"bob\", entitlement: \"pro\") { id } }",
            json!({}),
        )
        .await;
    assert!(r["errors"].is_null(), "{r}");

    let (_, r) = app
        .gql(
            &admin,
            "{ overview(days: 10) { now { customersWithAccess byStore { store customers } inTrial inGracePeriod inBillingRetry } days { day newTrials trialConversions renewals cancellations refunds } } }",
            json!({}),
        )
        .await;
    assert!(r["errors"].is_null(), "{r}");
    let o = &r["data"]["overview"];
    assert_eq!(
        o["now"],
        json!({
            "customersWithAccess": 3,
            "byStore": [
                { "store": "PROMOTIONAL", "customers": 1 },
                { "store": "STRIPE", "customers": 1 },
                { "store": "TRIAL", "customers": 1 },
            ],
            "inTrial": 1,
            "inGracePeriod": 0,
            "inBillingRetry": 0,
        }),
        "{o}"
    );
    let days = o["days"].as_array().unwrap();
    assert_eq!(days.len(), 10);
    let day = |t: chrono::DateTime<chrono::Utc>| {
        let d = t.format("%Y-%m-%d").to_string();
        days.iter().find(|x| x["day"] == d).cloned().unwrap()
    };
    assert_eq!(
        days.last().unwrap()["day"],
        now.format("%Y-%m-%d").to_string()
    );
    assert_eq!(
        day(t0),
        json!({ "day": t0.format("%Y-%m-%d").to_string(), "newTrials": 2, "trialConversions": 0, "renewals": 0, "cancellations": 0, "refunds": 0 })
    );
    assert_eq!(
        day(now),
        json!({ "day": now.format("%Y-%m-%d").to_string(), "newTrials": 1, "trialConversions": 1, "renewals": 0, "cancellations": 0, "refunds": 0 })
    );
    let total: i64 = days.iter().map(|d| d["newTrials"].as_i64().unwrap()).sum();
    assert_eq!(total, 3);
    // Bounded: at most 90 days.
    let (_, r) = app
        .gql(&admin, "{ overview(days: 91) { days { day } } }", json!({}))
        .await;
    assert!(r["errors"].is_array(), "{r}");
}

/// `entitle webhooks replay`: prints a summary, applies what now matches,
/// and a second run changes nothing.
async fn cli_replay(b: Backend) {
    let app = spawn_with(b, |c| configure(c, None)).await;
    for (i, who) in ["cli-1", "cli-2"].iter().enumerate() {
        let ev = event(
            &format!("evt_cli{i}"),
            "checkout.session.completed",
            link_session(&format!("cs_cli{i}"), Some(who), NEW_LINK),
            app.state.core.now(),
        );
        assert_eq!(deliver(&app, &ev).await.1["outcome"], "unknown_product");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("entitle.toml"),
        format!(
            "[stripe]\nwebhook_secret = \"{WEBHOOK_SECRET}\"\n\n[[catalog.entitlements]]\nkey = \"pro\"\n\n[[catalog.products]]\nid = \"pro_forever\"\nkind = \"lifetime\"\nentitlements = [\"pro\"]\nstripe_payment_link = \"{NEW_LINK}\"\n"
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_entitle"));
        cmd.args(args)
            .current_dir(dir.path())
            .env_remove("DATABASE_URL")
            .env("ENTITLE_DATABASE_URL", &app.database_url)
            .env("ENTITLE_LOG", "info");
        if app.database_url.starts_with("postgres") {
            cmd.env(
                "ENTITLE_TOKENS__ENCRYPTION_KEY",
                common::TEST_ENCRYPTION_KEY,
            );
        }
        cmd.output().unwrap()
    };
    let out = run(&[
        "webhooks",
        "replay",
        "--outcome",
        "unknown_product",
        "--since",
        "7d",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stdout.trim(),
        "replayed 2: 2 now applied, 0 still unmatched, 0 failed (store unavailable), 0 skipped"
    );
    assert!(
        stderr.trim().is_empty(),
        "quiet without --verbose: {stderr}"
    );
    assert_eq!(changes_of(&app, "cli-1").await, 1);
    assert_eq!(changes_of(&app, "cli-2").await, 1);
    let out = run(&["webhooks", "replay"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "replayed 0: 0 now applied, 0 still unmatched, 0 failed (store unavailable), 0 skipped"
    );
    let out = run(&["webhooks", "replay", "--outcome", "applied"]);
    assert!(!out.status.success(), "applied events are not replayable");
    assert_eq!(changes_of(&app, "cli-1").await, 1);
}

on_all_backends!(
    unknown_product_checkout_replays_once_after_the_catalog_learns_it,
    concurrent_replays_apply_once,
    paid_checkout_naming_nobody_is_no_customer,
    failed_delivery_is_kept_and_replayed_when_the_store_is_back,
    filters_and_paging,
    only_admins_see_the_log,
    overview_counts_and_series,
    cli_replay,
);
