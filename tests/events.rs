//! Entitlement change events: the Redis stream a billing consumer reads,
//! time-driven expiry, the relay's behaviour without and across a Redis
//! outage, and `entitlementChanged` over graphql-ws.

mod common;
mod events_support;

use std::time::{Duration as StdDuration, Instant};

use chrono::{DateTime, Duration, Utc};
use common::{Auth, Backend, TestApp, spawn_with};
use entitle::{config::Secret, domain::ApiKeyRole};
use events_support::*;
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, Statement};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

on_all_backends!(
    trial_start_and_end_reach_a_billing_consumer,
    lapses_are_logged_once_whoever_notices_first,
    without_redis_events_stay_in_the_change_log,
    redis_outage_loses_nothing,
    a_lost_mark_republishes_the_same_event,
    subscriptions_over_graphql_ws,
);

fn fast(c: &mut entitle::config::Config) {
    c.events.relay_poll_ms = 50;
    c.events.feed_poll_ms = 50;
    c.jobs.expiry_interval_ms = 50;
}

async fn trial_ends_at(app: &TestApp, key: &Auth, device: &str) -> DateTime<Utc> {
    let (s, body) = app.post_user(key, device).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    DateTime::parse_from_rfc3339(body["trial_ends_at"].as_str().unwrap())
        .unwrap()
        .to_utc()
}

/// Change-log rows of one customer, oldest first: (kind, old, new, occurred_at, published).
async fn change_log(
    app: &TestApp,
    customer: &str,
) -> Vec<(String, Option<String>, String, DateTime<Utc>, bool)> {
    let db = &app.state.core.db().conn;
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            match db.get_database_backend() {
                sea_orm::DbBackend::Postgres => "SELECT kind, old_status, new_status, occurred_at, published_at IS NOT NULL AS published FROM entitlement_events WHERE customer_id = $1 ORDER BY id",
                _ => "SELECT kind, old_status, new_status, occurred_at, published_at IS NOT NULL AS published FROM entitlement_events WHERE customer_id = ? ORDER BY id",
            },
            [customer.into()],
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            (
                r.try_get::<String>("", "kind").unwrap(),
                r.try_get::<Option<String>>("", "old_status").unwrap(),
                r.try_get::<String>("", "new_status").unwrap(),
                r.try_get::<DateTime<Utc>>("", "occurred_at").unwrap(),
                r.try_get::<bool>("", "published").unwrap(),
            )
        })
        .collect()
}

async fn wait_log(
    app: &TestApp,
    customer: &str,
    n: usize,
) -> Vec<(String, Option<String>, String, DateTime<Utc>, bool)> {
    let deadline = Instant::now() + StdDuration::from_secs(10);
    loop {
        let log = change_log(app, customer).await;
        if log.len() >= n {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "change log of {customer}: {log:?}"
        );
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
}

/// The issue's "done when": a consumer group on `billing:events`, written
/// for the original billing service's format, sees ACTIVE then EXPIRED for a
/// trial that starts and ends with no request in between.
async fn trial_start_and_end_reach_a_billing_consumer(b: Backend) {
    let mut consumer = GroupConsumer::join(&redis_url(), "billing:events").await;
    let app = spawn_with(b, |c| {
        fast(c);
        c.redis_url = Some(Secret::new(redis_url()));
    })
    .await;
    assert_eq!(app.state.config.events.stream_key, "billing:events");
    let key = app.key(ApiKeyRole::Client).await;
    let device = unique("watch-");
    let ends = trial_ends_at(&app, &key, &device).await;

    let mine = |e: &Value| e["userId"] == device.as_str();
    let started = consumer.read_until(1, 10, mine).await;
    assert_eq!(started[0]["newStatus"], "ACTIVE");
    assert_eq!(started[0]["kind"], "granted");
    assert_eq!(started[0]["entitlement"], "pro");
    assert!(started[0]["oldStatus"].is_null());

    // The trial runs out; nobody calls the server.
    app.clock.advance(Duration::days(7) + Duration::seconds(1));
    let ended = consumer.read_until(1, 10, mine).await;
    assert_eq!(ended[0]["newStatus"], "EXPIRED", "{ended:?}");
    assert_eq!(ended[0]["oldStatus"], "ACTIVE");
    assert_eq!(ended[0]["kind"], "expired");
    assert_eq!(started[0]["reason"], "active");
    assert_eq!(ended[0]["reason"], "expired");
    // Dated at the instant access ended, not when the sweep noticed.
    let at = DateTime::parse_from_rfc3339(ended[0]["occurredAt"].as_str().unwrap()).unwrap();
    assert!(
        (at.to_utc() - ends).num_milliseconds().abs() < 1000,
        "{at} vs {ends}"
    );
    assert_ne!(started[0]["eventId"], ended[0]["eventId"]);
    for e in started.iter().chain(&ended) {
        let keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys.len(),
            8,
            "eventId userId entitlement kind reason oldStatus newStatus occurredAt: {e}"
        );
    }
    consumer.leave().await;
    // Counted once the relay has also marked the rows, just after Redis got them.
    let deadline = Instant::now() + StdDuration::from_secs(10);
    loop {
        let metrics = app.metrics_text().await;
        let published: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("entitle_events_published_total "))
            .expect("published counter exported")
            .parse()
            .unwrap();
        if published >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
}

/// Whether the sweep or a request sees the lapse first, the log gets exactly
/// one `expired` row, dated at the end of access.
async fn lapses_are_logged_once_whoever_notices_first(b: Backend) {
    // No sweep: a write must notice the lapse itself.
    let app = spawn_with(b, |c| c.jobs.enabled = false).await;
    let key = app.key(ApiKeyRole::Client).await;
    let ends = trial_ends_at(&app, &key, "watch-a").await;
    app.clock.advance(Duration::days(8));
    let admin = app.key(ApiKeyRole::Admin).await;
    // A grant after the lapse: the log says expired (at the trial's end), then granted.
    let (s, r) = app
        .gql(
            &admin,
            "mutation { grantEntitlement(customerId: \"watch-a\", entitlement: \"pro\", expiresAt: \"2099-01-01T00:00:00Z\") { paidStatus } }",
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(r["errors"].is_null(), "{r}");
    let log = change_log(&app, "watch-a").await;
    let kinds: Vec<(&str, &str)> = log.iter().map(|r| (r.0.as_str(), r.2.as_str())).collect();
    assert_eq!(
        kinds,
        [
            ("granted", "ACTIVE"),
            ("expired", "EXPIRED"),
            ("granted", "ACTIVE")
        ]
    );
    assert!((log[1].3 - ends).num_milliseconds().abs() < 1000);

    // The sweep, run by hand twice, finds nothing more to say.
    assert_eq!(
        entitle::jobs::expiry::sweep(&app.state.core).await.unwrap(),
        0
    );
    assert_eq!(
        entitle::jobs::expiry::sweep(&app.state.core).await.unwrap(),
        0
    );

    // Sweep first: one row, and a later write adds none.
    trial_ends_at(&app, &key, "watch-b").await;
    app.clock.advance(Duration::days(7) + Duration::seconds(1));
    assert_eq!(
        entitle::jobs::expiry::sweep(&app.state.core).await.unwrap(),
        1
    );
    assert_eq!(
        entitle::jobs::expiry::sweep(&app.state.core).await.unwrap(),
        0
    );
    app.post_user(&key, "watch-b").await;
    let log = change_log(&app, "watch-b").await;
    let kinds: Vec<&str> = log.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(kinds, ["granted", "expired"]);
}

async fn without_redis_events_stay_in_the_change_log(b: Backend) {
    let app = spawn_with(b, fast).await;
    assert!(app.state.config.redis_url.is_none());
    let key = app.key(ApiKeyRole::Client).await;
    trial_ends_at(&app, &key, "watch-1").await;
    app.clock.advance(Duration::days(7) + Duration::seconds(1));
    let log = wait_log(&app, "watch-1", 2).await;
    assert!(
        log.iter().all(|r| !r.4),
        "nothing marks rows published: {log:?}"
    );
    let admin = app.key(ApiKeyRole::Admin).await;
    let (_, r) = app
        .gql(
            &admin,
            "{ customer(id: \"watch-1\") { events { kind newStatus publishedAt } } }",
            json!({}),
        )
        .await;
    let evs = r["data"]["customer"]["events"].as_array().unwrap();
    assert_eq!(evs.len(), 2, "{r}");
    assert!(evs.iter().all(|e| e["publishedAt"].is_null()));
}

/// Redis killed, changes made while it is down, Redis back: every change
/// arrives, in order, and no id twice in a row.
async fn redis_outage_loses_nothing(b: Backend) {
    let mut redis = PrivateRedis::start();
    let stream = unique("test:events:");
    let app = spawn_with(b, |c| {
        fast(c);
        c.redis_url = Some(Secret::new(redis.url()));
        c.events.stream_key = stream.clone();
    })
    .await;
    let key = app.key(ApiKeyRole::Client).await;
    let mut conn = connect(&redis.url()).await;
    for i in 0..5 {
        trial_ends_at(&app, &key, &format!("before-{i}")).await;
    }
    wait_stream(&mut conn, &stream, 10, |e| e.len() >= 5).await;

    redis.kill();
    // The API keeps serving while events wait.
    for i in 0..20 {
        trial_ends_at(&app, &key, &format!("during-{i}")).await;
    }
    app.clock.advance(Duration::days(7) + Duration::seconds(1));
    // 25 trials end by time while Redis is still down.
    let deadline = Instant::now() + StdDuration::from_secs(10);
    while app.count("entitlement_events").await < 50 {
        assert!(Instant::now() < deadline, "the sweep wrote the expiries");
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    redis.restart();
    let mut conn = connect(&redis.url()).await;
    let evs = wait_stream(&mut conn, &stream, 20, |e| e.len() >= 50).await;

    let ids: Vec<i64> = evs
        .iter()
        .map(|e| e["eventId"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] != w[1]),
        "an id twice in a row: {ids:?}"
    );
    let mut unique_ids = ids.clone();
    unique_ids.sort();
    unique_ids.dedup();
    assert_eq!(unique_ids.len(), 50, "every change-log row arrived");
    assert_eq!(app.count("entitlement_events").await, 50);
    // In order per customer: granted before expired.
    for i in 0..20 {
        let user = format!("during-{i}");
        let kinds: Vec<&str> = evs
            .iter()
            .filter(|e| e["userId"] == user.as_str())
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds.first(), Some(&"granted"), "{user}: {kinds:?}");
        assert_eq!(kinds.last(), Some(&"expired"), "{user}: {kinds:?}");
    }
    // The relay marks rows just after Redis took them.
    let db = &app.state.core.db().conn;
    let deadline = Instant::now() + StdDuration::from_secs(10);
    loop {
        let unpublished = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT COUNT(*) AS n FROM entitlement_events WHERE published_at IS NULL",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "n")
            .unwrap();
        if unpublished == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{unpublished} rows never marked published"
        );
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
}

fn jwt(sub: &str) -> String {
    let now = Utc::now().timestamp();
    common::sign_hs(
        &json!({ "sub": sub, "iss": "https://auth.test/", "aud": "entitle", "iat": now, "exp": now + 600 }),
    )
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(app: &TestApp, init: Value) -> Ws {
    let url = app.url("/graphql/ws").replacen("http://", "ws://", 1);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "graphql-transport-ws"
    );
    ws.send(Message::text(
        json!({ "type": "connection_init", "payload": init }).to_string(),
    ))
    .await
    .unwrap();
    ws
}

/// The next JSON message, skipping pings; `None` when the server closed.
async fn ws_next(ws: &mut Ws) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(StdDuration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")?;
        match msg.ok()? {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "ping" || v["type"] == "ka" {
                    continue;
                }
                return Some(v);
            }
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

async fn ws_subscribe(ws: &mut Ws, id: &str, customer: Option<&str>) {
    assert_eq!(ws_next(ws).await.unwrap()["type"], "connection_ack");
    ws.send(Message::text(
        json!({
            "id": id,
            "type": "subscribe",
            "payload": {
                "query": "subscription($c: ID) { entitlementChanged(customerId: $c) { eventId customerId entitlement kind reason oldStatus newStatus occurredAt } }",
                "variables": { "c": customer }
            }
        })
        .to_string(),
    ))
    .await
    .unwrap();
}

/// A refused subscription: an `error` message, or a `next` carrying errors
/// (how async-graphql reports a resolver's refusal); either way, with a code.
fn error_code(m: &Value) -> Option<&str> {
    let errors = if m["type"] == "error" {
        &m["payload"]
    } else {
        &m["payload"]["errors"]
    };
    assert!(
        m["payload"]["data"].is_null(),
        "no data with a refusal: {m}"
    );
    errors[0]["extensions"]["code"].as_str()
}

async fn subscriptions_over_graphql_ws(b: Backend) {
    let app = spawn_with(b, |c| {
        fast(c);
        c.auth.jwt = Some(common::hs_config());
    })
    .await;
    let admin_key = match app.key(ApiKeyRole::Admin).await {
        Auth::Key(k) => k,
        _ => unreachable!(),
    };
    let client = app.key(ApiKeyRole::Client).await;

    // Alice watches herself; the admin watches everyone.
    let mut alice = ws_connect(
        &app,
        json!({ "Authorization": format!("Bearer {}", jwt("alice")) }),
    )
    .await;
    ws_subscribe(&mut alice, "a", None).await;
    let mut admin = ws_connect(&app, json!({ "api-key": admin_key })).await;
    ws_subscribe(&mut admin, "all", None).await;
    // Both subscriptions are attached to the feed before anything changes.
    let deadline = Instant::now() + StdDuration::from_secs(10);
    while app.state.core.feed().subscribers() < 2 {
        assert!(Instant::now() < deadline, "subscriptions attached");
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }

    trial_ends_at(&app, &client, "bob").await;
    trial_ends_at(&app, &client, "alice").await;

    let m = ws_next(&mut alice).await.unwrap();
    assert_eq!(m["type"], "next", "{m}");
    assert_eq!(m["id"], "a");
    let ev = &m["payload"]["data"]["entitlementChanged"];
    assert_eq!(ev["customerId"], "alice", "alice never sees bob: {m}");
    assert_eq!(ev["newStatus"], "ACTIVE");
    assert_eq!(ev["kind"], "GRANTED");
    assert_eq!(ev["reason"], "active");

    let mut seen = Vec::new();
    for _ in 0..2 {
        let m = ws_next(&mut admin).await.unwrap();
        seen.push(
            m["payload"]["data"]["entitlementChanged"]["customerId"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(seen, ["bob", "alice"]);

    // A customer may not watch someone else.
    let mut nosy = ws_connect(
        &app,
        json!({ "Authorization": format!("Bearer {}", jwt("alice")) }),
    )
    .await;
    ws_subscribe(&mut nosy, "x", Some("bob")).await;
    let m = ws_next(&mut nosy).await.unwrap();
    assert_eq!(error_code(&m), Some("FORBIDDEN"), "{m}");

    // No credential: no ack, the connection is closed (an anonymous socket
    // could only hold resources).
    let mut anon = ws_connect(&app, json!({})).await;
    assert!(
        ws_next(&mut anon).await.is_none(),
        "anonymous connection closed without ack"
    );

    // A bad credential: no ack, the connection is closed.
    let mut forged = ws_connect(&app, json!({ "api-key": "ent_forged_0000" })).await;
    assert!(
        ws_next(&mut forged).await.is_none(),
        "connection closed without ack"
    );
}

/// A crash between the publish and the mark leaves the row unpublished: it
/// goes out again, identical, with the same `eventId`, so consumers that
/// deduplicate on it see one change.
async fn a_lost_mark_republishes_the_same_event(b: Backend) {
    let stream = unique("test:republish:");
    let app = spawn_with(b, |c| {
        fast(c);
        c.redis_url = Some(Secret::new(redis_url()));
        c.events.stream_key = stream.clone();
    })
    .await;
    let key = app.key(ApiKeyRole::Client).await;
    trial_ends_at(&app, &key, "watch-r").await;
    let mut conn = connect(&redis_url()).await;
    let first = wait_stream(&mut conn, &stream, 10, |e| e.len() == 1).await;
    // Wait for the mark, then undo it as a crash before the mark would have.
    let deadline = Instant::now() + StdDuration::from_secs(10);
    while !change_log(&app, "watch-r").await[0].4 {
        assert!(Instant::now() < deadline, "row marked published");
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
    let db = &app.state.core.db().conn;
    db.execute_raw(Statement::from_string(
        db.get_database_backend(),
        "UPDATE entitlement_events SET published_at = NULL",
    ))
    .await
    .unwrap();
    let both = wait_stream(&mut conn, &stream, 10, |e| e.len() == 2).await;
    assert_eq!(both[0], first[0]);
    assert_eq!(both[1], both[0], "the same event, the same eventId");
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    assert_eq!(
        stream_events(&mut conn, &stream).await.len(),
        2,
        "and only once more"
    );
    let _: Result<i64, _> = redis::AsyncCommands::del(&mut conn, &stream).await;
}

/// On PostgreSQL an id is taken at insert and seen at commit, so a lower id
/// can commit after a higher one has been passed. The feed waits for such a
/// gap, whether or not anyone was listening when it opened, and delivers the
/// late row to subscribers. (SQLite has one writer: its ids commit in order,
/// so there is no gap to test there.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_into_an_id_gap_reaches_subscribers() {
    use entities::entitlement_events;
    use sea_orm::{ActiveModelTrait, ActiveValue::Set, TransactionTrait};

    let Some(b) = Backend::postgres() else {
        eprintln!("ENTITLE_TEST_POSTGRES_URL not set: PostgreSQL-only test not run");
        return;
    };
    let app = spawn_with(b, fast).await;
    let admin_key = match app.key(ApiKeyRole::Admin).await {
        Auth::Key(k) => k,
        _ => unreachable!(),
    };
    let row = |customer: &str| entitlement_events::ActiveModel {
        customer_id: Set(customer.to_string()),
        entitlement: Set("pro".into()),
        kind: Set("granted".into()),
        old_status: Set(None),
        new_status: Set("ACTIVE".into()),
        purchase_id: Set(None),
        occurred_at: Set(Utc::now()),
        published_at: Set(None),
        ..Default::default()
    };
    let db = &app.state.core.db().conn;
    let wake = || app.state.core.db().commits.send_modify(|n| *n += 1);
    let next = |m: Value| m["payload"]["data"]["entitlementChanged"].clone();

    // A gap opens while nobody listens; the feed passes it.
    let idle_slow = db.begin().await.unwrap();
    let idle_early = row("idle-slow").insert(&idle_slow).await.unwrap();
    let idle_quick = db.begin().await.unwrap();
    row("idle-quick").insert(&idle_quick).await.unwrap();
    idle_quick.commit().await.unwrap();
    wake();
    tokio::time::sleep(StdDuration::from_millis(300)).await;

    let mut admin = ws_connect(&app, json!({ "api-key": admin_key })).await;
    ws_subscribe(&mut admin, "all", None).await;
    let deadline = Instant::now() + StdDuration::from_secs(10);
    while app.state.core.feed().subscribers() < 1 {
        assert!(Instant::now() < deadline, "subscription attached");
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
    tokio::time::sleep(StdDuration::from_millis(200)).await;
    // Committed after the subscription attached: delivered, and nothing
    // committed before it.
    idle_slow.commit().await.unwrap();
    wake();
    let first = next(ws_next(&mut admin).await.unwrap());
    assert_eq!(first["customerId"], "idle-slow", "{first}");
    assert_eq!(first["eventId"], idle_early.id.to_string());

    // A gap opens while someone listens.
    let slow = db.begin().await.unwrap();
    let early = row("slow").insert(&slow).await.unwrap();
    let quick = db.begin().await.unwrap();
    let late = row("quick").insert(&quick).await.unwrap();
    assert!(early.id < late.id);
    quick.commit().await.unwrap();
    wake();
    let second = next(ws_next(&mut admin).await.unwrap());
    assert_eq!(second["customerId"], "quick");
    assert_eq!(second["eventId"], late.id.to_string());

    // Let the feed go past the gap a few times before the lower id commits.
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    slow.commit().await.unwrap();
    wake();
    let third = next(ws_next(&mut admin).await.unwrap());
    assert_eq!(third["customerId"], "slow", "the late row arrives");
    assert_eq!(third["eventId"], early.id.to_string());
}
