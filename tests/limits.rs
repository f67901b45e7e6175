//! Bounded cost (issue 12): every request, connection and stored row has a
//! limit, each attack of the issue is refused, and nothing is written for a
//! refused request.

mod common;

use std::time::{Duration, Instant};

use common::{Auth, Backend, TestApp, error_code, spawn_with};
use entitle::{
    config::{AppleConfig, AppleEnvironment},
    domain::ApiKeyRole,
};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

on_all_backends!(
    amplification_query_is_refused_before_execution,
    writes_past_the_rate_limit_get_429_and_write_nothing,
    unverified_receipts_are_capped_per_customer,
    retention_deletes_old_invalid_receipts_and_clears_old_payloads,
);

async fn register(app: &TestApp, auth: &Auth, device: &str) {
    let (status, body) = app.post_user(auth, device).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn amplification_query_is_refused_before_execution(b: Backend) {
    let app = spawn_with(b, |_| {}).await;
    let client = app.key(ApiKeyRole::Client).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    register(&app, &client, "alice").await;
    // The query: 249 aliases of 500 receipts each stayed under a
    // field-counting limit. Counting rows, it is far over.
    let aliases: String = (0..249)
        .map(|i| format!("r{i}: receipts(limit: 500) {{ payload }} "))
        .collect();
    let query = format!("{{ customer(id: \"alice\") {{ {aliases} }} }}");
    assert!(query.len() < 20_000);
    let started = Instant::now();
    let (status, r) = app.gql(&admin, &query, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(error_code(&r), Some("BAD_USER_INPUT"), "{r}");
    assert!(
        r["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("too complex"),
        "{r}"
    );
    assert!(r["data"].is_null(), "refused in validation, nothing ran");
    assert!(started.elapsed() < Duration::from_secs(5));
    // One list of 500 rows already costs 500: over the default limit.
    let (_, r) = app
        .gql(
            &admin,
            "{ customer(id: \"alice\") { receipts(limit: 500) { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&r), Some("BAD_USER_INPUT"), "{r}");
    // The same multiplication for the change log and the customer list.
    let (_, r) = app
        .gql(
            &admin,
            "{ a: customer(id: \"alice\") { events(limit: 300) { kind newStatus } } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&r), Some("BAD_USER_INPUT"), "{r}");
    let (_, r) = app
        .gql(
            &admin,
            "{ customers(first: 100) { nodes { id paidStatus trialEndsAt createdAt entitlements { key isActive } } } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&r), Some("BAD_USER_INPUT"), "{r}");
    // Ordinary queries are untouched.
    let (_, r) = app
        .gql(
            &admin,
            "{ customer(id: \"alice\") { paidStatus receipts { id outcome } events { kind newStatus } } customers(first: 20) { nodes { id } } }",
            json!({}),
        )
        .await;
    assert!(r["errors"].is_null(), "{r}");
    assert_eq!(r["data"]["customer"]["paidStatus"], "TRIAL");
    assert_eq!(r["data"]["customer"]["events"][0]["kind"], "GRANTED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_size_cap_is_an_error() {
    let app = spawn_with(Backend::Sqlite, |c| c.graphql.max_response_bytes = 300).await;
    let client = app.key(ApiKeyRole::Client).await;
    let (_, small) = app.gql(&client, "{ products { id } }", json!({})).await;
    assert!(small["errors"].is_null(), "{small}");
    let (status, r) = app
        .gql(
            &client,
            "{ products { id displayName entitlements stripePriceId appStoreProductId playStoreProductId kind } }",
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(error_code(&r), Some("RESPONSE_TOO_LARGE"), "{r}");
    assert!(r["data"].is_null());
}

async fn writes_past_the_rate_limit_get_429_and_write_nothing(b: Backend) {
    let app = spawn_with(b, |c| {
        c.rate_limit.per_ip_burst = 3;
        c.rate_limit.per_ip_per_minute = 1;
    })
    .await;
    let client = app.key(ApiKeyRole::Client).await;
    for d in ["d1", "d2", "d3"] {
        register(&app, &client, d).await;
    }
    let before = app.counts().await;
    let resp = client
        .apply(
            app.client
                .post(app.url("/user"))
                .json(&json!({ "id": "d4" })),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "RATE_LIMITED");
    assert_eq!(app.counts().await, before, "nothing written");
    // Known devices write nothing new and are not limited.
    register(&app, &client, "d1").await;
    // Mutations count against the same address.
    let (status, r) = app
        .gql(
            &client,
            "mutation { registerDevice(input: { platform: IOS, deviceId: \"phone-9\" }) { created } }",
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(error_code(&r), Some("RATE_LIMITED"), "{r}");
    assert_eq!(r["errors"][0]["extensions"]["retryable"], true);
    assert!(r["data"].is_null());
    assert_eq!(app.counts().await, before, "nothing written");
    // Reads are not writes.
    let (_, r) = app
        .gql(
            &client,
            "{ customer(id: \"d1\") { paidStatus } }",
            json!({}),
        )
        .await;
    assert!(r["errors"].is_null(), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_key_limit_applies_across_addresses_and_can_be_switched_off() {
    let app = spawn_with(Backend::Sqlite, |c| {
        c.rate_limit.per_key_burst = 2;
        c.rate_limit.per_key_per_minute = 1;
    })
    .await;
    let client = app.key(ApiKeyRole::Client).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    register(&app, &client, "k1").await;
    register(&app, &client, "k2").await;
    let (status, _) = app.post_user(&client, "k3").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Operators are not limited.
    register(&app, &admin, "k3").await;

    let off = spawn_with(Backend::Sqlite, |c| {
        c.rate_limit.enabled = false;
        c.rate_limit.per_key_burst = 1;
    })
    .await;
    let client = off.key(ApiKeyRole::Client).await;
    for d in ["a", "b", "c"] {
        register(&off, &client, d).await;
    }
}

fn apple_sandbox() -> AppleConfig {
    AppleConfig {
        bundle_id: "com.example.app".into(),
        app_apple_id: None,
        environment: AppleEnvironment::Sandbox,
        root_certificates: vec![],
        issuer_id: None,
        key_id: None,
        private_key: None,
        api_base: None,
    }
}

const VERIFY: &str = "mutation($c: ID!, $t: String!) { verifyPurchase(customerId: $c, input: { appStore: { signedTransaction: $t } }) { customer { id } } }";

async fn receipts_of(app: &TestApp, customer: &str) -> Vec<Value> {
    let admin = app.key(ApiKeyRole::Admin).await;
    let (_, r) = app
        .gql(
            &admin,
            "query($c: ID!) { customer(id: $c) { receipts(limit: 100) { outcome payload } } }",
            json!({ "c": customer }),
        )
        .await;
    assert!(r["errors"].is_null(), "{r}");
    r["data"]["customer"]["receipts"]
        .as_array()
        .unwrap()
        .clone()
}

async fn unverified_receipts_are_capped_per_customer(b: Backend) {
    let app = spawn_with(b, |c| {
        c.apple = Some(apple_sandbox());
        c.receipts.max_unverified_per_customer = 3;
        c.receipts.max_payload_bytes = 1024;
    })
    .await;
    let client = app.key(ApiKeyRole::Client).await;
    register(&app, &client, "alice").await;
    for i in 0..5 {
        let (_, r) = app
            .gql(
                &client,
                VERIFY,
                json!({ "c": "alice", "t": format!("junk.{i}.jws") }),
            )
            .await;
        assert_eq!(error_code(&r), Some("INVALID_RECEIPT"), "{r}");
    }
    let kept = receipts_of(&app, "alice").await;
    assert_eq!(kept.len(), 3, "older invalid ones dropped: {kept:?}");
    assert!(kept.iter().all(|r| r["outcome"] == "invalid"));
    assert_eq!(
        kept[0]["payload"]["signedTransaction"], "junk.4.jws",
        "the newest kept"
    );
    // A large submission is kept as its size and digest only.
    let big = "x".repeat(20_000);
    let (_, r) = app
        .gql(&client, VERIFY, json!({ "c": "alice", "t": big }))
        .await;
    assert_eq!(error_code(&r), Some("INVALID_RECEIPT"), "{r}");
    let kept = receipts_of(&app, "alice").await;
    assert_eq!(kept.len(), 3);
    assert_eq!(kept[0]["payload"]["truncated"], true, "{:?}", kept[0]);
    assert!(kept[0]["payload"]["bytes"].as_u64().unwrap() > 20_000);
    // For a customer that does not exist only a digest stays on record.
    let before = app.counts().await;
    for i in 0..3 {
        let (_, r) = app
            .gql(
                &client,
                VERIFY,
                json!({ "c": format!("ghost-{i}"), "t": "junk.jws" }),
            )
            .await;
        assert_eq!(error_code(&r), Some("INVALID_RECEIPT"), "{r}");
    }
    let after = app.counts().await;
    for ((t, b), (_, a)) in before.iter().zip(after.iter()) {
        let grew = if *t == "receipts" { 3 } else { 0 };
        assert_eq!(*a, b + grew, "{t}: no customers made, nothing granted");
    }
    let db = &app.state.core.db().conn;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    let ghosts = entities::receipts::Entity::find()
        .filter(entities::receipts::Column::CustomerId.starts_with("ghost-"))
        .all(db)
        .await
        .unwrap();
    assert_eq!(ghosts.len(), 3);
    for g in ghosts {
        assert_eq!(g.outcome, "invalid");
        assert_eq!(g.payload["truncated"], true, "{:?}", g.payload);
        assert!(g.payload.get("signedTransaction").is_none());
    }
}

async fn retention_deletes_old_invalid_receipts_and_clears_old_payloads(b: Backend) {
    use entities::{receipts, webhook_events};
    use sea_orm::{ActiveModelTrait, ActiveValue::Set, EntityTrait};
    let app = spawn_with(b, |c| c.jobs.enabled = false).await;
    let db = &app.state.core.db().conn;
    let now = app.state.core.now();
    let receipt = |outcome: &str, days: i64| receipts::ActiveModel {
        customer_id: Set("alice".into()),
        store: Set("app_store".into()),
        payload: Set(json!({ "signedTransaction": "x" })),
        received_at: Set(now - chrono::Duration::days(days)),
        outcome: Set(outcome.into()),
        error: Set(None),
        purchase_id: Set(None),
        ..Default::default()
    };
    let old_invalid = receipt("invalid", 40).insert(db).await.unwrap().id;
    let recent_invalid = receipt("invalid", 5).insert(db).await.unwrap().id;
    let old_valid = receipt("valid", 40).insert(db).await.unwrap().id;
    let event = |id: &str, days: i64| webhook_events::ActiveModel {
        source: Set("stripe".into()),
        event_id: Set(id.into()),
        received_at: Set(now - chrono::Duration::days(days)),
        payload: Set(json!({ "secret": "payload" })),
        outcome: Set("applied".into()),
        processed_at: Set(Some(now - chrono::Duration::days(days))),
        ..Default::default()
    };
    let old_event = event("evt_old", 40).insert(db).await.unwrap().id;
    let new_event = event("evt_new", 2).insert(db).await.unwrap().id;

    let cfg = app.state.config.retention.clone();
    assert_eq!(
        (cfg.invalid_receipt_days, cfg.webhook_payload_days),
        (30, 30),
        "documented defaults"
    );
    let swept = entitle::jobs::retention::run(&app.state.core, &cfg)
        .await
        .unwrap();
    assert_eq!(swept.receipts_deleted, 1);
    assert_eq!(swept.webhook_payloads_cleared, 1);
    assert!(
        receipts::Entity::find_by_id(old_invalid)
            .one(db)
            .await
            .unwrap()
            .is_none()
    );
    for id in [recent_invalid, old_valid] {
        assert!(
            receipts::Entity::find_by_id(id)
                .one(db)
                .await
                .unwrap()
                .is_some()
        );
    }
    let old = webhook_events::Entity::find_by_id(old_event)
        .one(db)
        .await
        .unwrap()
        .expect("the dedupe row stays");
    assert_eq!(old.event_id, "evt_old");
    assert!(old.payload.get("secret").is_none(), "{:?}", old.payload);
    let new = webhook_events::Entity::find_by_id(new_event)
        .one(db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(new.payload["secret"], "payload");
    // A second run finds nothing more.
    let again = entitle::jobs::retention::run(&app.state.core, &cfg)
        .await
        .unwrap();
    assert_eq!(again.receipts_deleted, 0);
    assert_eq!(again.webhook_payloads_cleared, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_labels_stay_bounded_under_random_methods() {
    use rand::Rng;
    let app = spawn_with(Backend::Sqlite, |_| {}).await;
    app.client.get(app.url("/health")).send().await.unwrap();
    let before = app.metrics_text().await.len();
    let mut rng = rand::rng();
    for i in 0..2_000 {
        let method: String = (0..8)
            .map(|_| rng.random_range(b'A'..=b'Z') as char)
            .collect();
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let path = if i % 2 == 0 {
            format!("/random/{i}")
        } else {
            "/health".to_string()
        };
        app.client
            .request(method, app.url(&path))
            .send()
            .await
            .unwrap();
    }
    let after = app.metrics_text().await.len();
    let text = app.metrics_text().await;
    assert!(text.contains("method=\"other\""), "{text}");
    assert!(text.contains("route=\"unmatched\""), "{text}");
    assert!(
        after < before + 8 * 1024,
        "metrics grew from {before} to {after} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_jwts_are_refused() {
    let app = spawn_with(Backend::Sqlite, |c| c.auth.jwt = Some(common::hs_config())).await;
    let now = chrono::Utc::now().timestamp();
    let token = |claims: Value| Auth::Bearer(common::sign_hs(&claims));
    let base = json!({ "sub": "alice", "iss": "https://auth.test/", "aud": "entitle" });
    let with = |extra: Value| {
        let mut c = base.clone();
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let me = "{ me { id } }";
    let hundred_years = 100 * 365 * 86_400;
    for claims in [
        with(json!({ "iat": now, "exp": now + hundred_years })),
        with(json!({ "exp": now + hundred_years })),
        with(json!({ "iat": now + hundred_years, "exp": now + hundred_years + 60 })),
        with(json!({ "iat": now, "exp": now + 86_400 + 120 })),
    ] {
        let (status, r) = app.gql(&token(claims.clone()), me, json!({})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{claims} {r}");
        assert_eq!(r["error"]["code"], "UNAUTHENTICATED", "{r}");
    }
    // A day-long token, with or without iat, is fine (its customer does not
    // exist yet: NOT_FOUND, not UNAUTHENTICATED).
    for claims in [
        with(json!({ "iat": now, "exp": now + 86_400 })),
        with(json!({ "exp": now + 3_600 })),
    ] {
        let (status, r) = app.gql(&token(claims.clone()), me, json!({})).await;
        assert_eq!(status, StatusCode::OK, "{claims} {r}");
        assert_eq!(error_code(&r), Some("NOT_FOUND"), "{r}");
    }
}

/// Reads until the server closes the connection; the time it took.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_connections_are_closed() {
    let app = spawn_with(Backend::Sqlite, |c| {
        c.http.header_read_timeout_secs = 1;
        c.http.idle_timeout_secs = 2;
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_string();
    // Half-sent headers.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    // Nothing at all.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // A kept-alive connection after one answered request.
    let mut kept = tokio::net::TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    for conn in [&mut slow, &mut silent, &mut kept] {
        let took = closed_within(conn, Duration::from_secs(6)).await;
        assert!(took <= Duration::from_secs(4), "{took:?}");
    }
    // The server still serves.
    let r = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_idle_connections_ends_within_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config();
    config.database_url =
        entitle::config::Secret::new(common::fresh_database(&Backend::Sqlite, &dir).await);
    config.http.shutdown_grace_secs = 2;
    config.http.header_read_timeout_secs = 60;
    config.http.idle_timeout_secs = 60;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = entitle::app::start(
        config,
        std::sync::Arc::new(entitle::clock::SystemClock),
        async move {
            let _ = rx.await;
        },
    )
    .await
    .unwrap();
    let addr = running.addr;
    let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\nHo").await.unwrap();
    let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(kept.read(&mut buf).await.unwrap() > 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), running.task)
        .await
        .expect("server task ended within the grace")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(4));
    // New connections are refused once it has stopped.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

fn entitle_bin() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_entitle"));
    cmd.env_remove("DATABASE_URL").env("ENTITLE_LOG", "info");
    cmd
}

#[test]
fn sigterm_with_an_idle_connection_exits_within_the_grace() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut child = entitle_bin()
        .current_dir(dir.path())
        .env(
            "ENTITLE_DATABASE_URL",
            format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display()),
        )
        .env("ENTITLE_BIND", "127.0.0.1:0")
        .env("ENTITLE_HTTP__SHUTDOWN_GRACE_SECS", "2")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server logs its address").unwrap();
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Drain the rest of the log so the server never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    let _idle = std::net::TcpStream::connect(&addr).unwrap();
    let mut half = std::net::TcpStream::connect(&addr).unwrap();
    half.write_all(b"POST /graphql HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        if started.elapsed() > Duration::from_secs(6) {
            let _ = child.kill();
            panic!("still running 6 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[test]
fn a_malformed_database_url_never_prints_its_password() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        "postgres://entitle:hunter2-secret-pw@db.invalid:notaport/entitle",
        "postgres://entitle:hunter2-secret-pw@127.0.0.1:1/entitle",
        "postgres://entitle:hunter2-secret-pw@[::1/entitle",
    ] {
        let out = entitle_bin()
            .arg("migrate")
            .current_dir(dir.path())
            .env("DATABASE_URL", url)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{url}");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains("hunter2"), "{url}: {all}");
        assert!(all.contains("database_url"), "names the setting: {all}");
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_open(app: &TestApp) -> Ws {
    let url = app.url("/graphql/ws").replacen("http://", "ws://", 1);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next text message as JSON; `None` once the server closed.
async fn ws_next(ws: &mut Ws, within: Duration) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(within, ws.next())
            .await
            .expect("the server answered or closed in time");
        match msg {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
            Some(Ok(_)) => continue,
        }
    }
}

fn subscribe(id: &str) -> Value {
    json!({
        "id": id,
        "type": "subscribe",
        "payload": { "query": "subscription($c: ID) { entitlementChanged(customerId: $c) { eventId } }", "variables": { "c": "alice" } }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_need_a_credential_in_time_and_stay_within_limits() {
    let app = spawn_with(Backend::Sqlite, |c| {
        c.graphql.ws_init_timeout_secs = 1;
        c.graphql.ws_max_subscriptions = 2;
        c.http.body_limit_bytes = 4096;
    })
    .await;
    let key = match app.key(ApiKeyRole::Service).await {
        Auth::Key(k) => k,
        _ => unreachable!(),
    };
    // Anonymous: closed without an ack.
    let mut anon = ws_open(&app).await;
    ws_send(
        &mut anon,
        json!({ "type": "connection_init", "payload": {} }),
    )
    .await;
    assert!(ws_next(&mut anon, Duration::from_secs(5)).await.is_none());
    // Silent before init: closed after the init deadline.
    let started = Instant::now();
    let mut idle = ws_open(&app).await;
    assert!(ws_next(&mut idle, Duration::from_secs(5)).await.is_none());
    assert!(started.elapsed() >= Duration::from_millis(900));
    // With a credential: at most two subscriptions; the third is refused,
    // the socket stays usable.
    let mut ws = ws_open(&app).await;
    ws_send(
        &mut ws,
        json!({ "type": "connection_init", "payload": { "api-key": key } }),
    )
    .await;
    assert_eq!(
        ws_next(&mut ws, Duration::from_secs(5)).await.unwrap()["type"],
        "connection_ack"
    );
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    for id in ["s1", "s2", "s3"] {
        ws_send(&mut ws, subscribe(id)).await;
    }
    let m = ws_next(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["id"], "s3");
    assert_eq!(m["payload"][0]["extensions"]["code"], "RATE_LIMITED");
    // Completing one frees its slot.
    ws_send(&mut ws, json!({ "id": "s1", "type": "complete" })).await;
    let m = ws_next(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (m["type"].as_str(), m["id"].as_str()),
        (Some("complete"), Some("s1"))
    );
    ws_send(&mut ws, subscribe("s4")).await;
    ws_send(&mut ws, json!({ "type": "ping" })).await;
    let m = ws_next(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(m["type"], "pong", "s4 was accepted silently: {m}");
    // A message over the body limit closes the socket.
    let huge =
        json!({ "id": "big", "type": "subscribe", "payload": { "query": "x".repeat(8192) } });
    ws_send(&mut ws, huge).await;
    assert!(ws_next(&mut ws, Duration::from_secs(5)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_that_stop_answering_pings_are_closed() {
    let app = spawn_with(Backend::Sqlite, |c| c.graphql.ws_ping_interval_secs = 1).await;
    let key = match app.key(ApiKeyRole::Service).await {
        Auth::Key(k) => k,
        _ => unreachable!(),
    };
    let addr = app.base.trim_start_matches("http://").to_string();
    // A raw client that completes the handshake and init, then never reads
    // again (so never answers a ping).
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let url = format!("ws://{addr}/graphql/ws");
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    ws.send(Message::text(
        json!({ "type": "connection_init", "payload": { "api-key": key } }).to_string(),
    ))
    .await
    .unwrap();
    // Stop reading entirely, so no ping is answered (tungstenite answers
    // a ping only while reading).
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    // Now read what is left: the server has given up and closed.
    let mut closed = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
            Err(_) => break,
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => {
                closed = true;
                break;
            }
            Ok(Some(Ok(_))) => {}
        }
    }
    assert!(closed, "a socket that never answered a ping is closed");
}

/// The dashboard's own queries fit the default complexity limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_queries_fit_the_complexity_limit() {
    let app = spawn_with(Backend::Sqlite, |_| {}).await;
    let client = app.key(ApiKeyRole::Client).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    register(&app, &client, "alice").await;
    let js = include_str!("../playground/app.js");
    for (name, vars) in [
        ("CUSTOMER_QUERY", json!({ "id": "alice" })),
        ("LIST_QUERY", json!({ "first": 20 })),
        ("DELIVERIES_QUERY", json!({ "id": "alice" })),
        ("WEBHOOKS_QUERY", json!({ "replayable": true })),
        ("OVERVIEW_QUERY", json!({})),
    ] {
        let start = js.find(&format!("const {name} = `")).expect(name) + name.len() + 10;
        let len = js[start..].find('`').unwrap();
        let (_, r) = app.gql(&admin, &js[start..start + len], vars).await;
        assert!(r["errors"].is_null(), "{name}: {r}");
    }
}

/// graphql-ws carries mutations too: they count against the write limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_over_the_websocket_are_rate_limited() {
    let app = spawn_with(Backend::Sqlite, |c| {
        c.rate_limit.per_ip_burst = 1;
        c.rate_limit.per_ip_per_minute = 1;
    })
    .await;
    let key = match app.key(ApiKeyRole::Client).await {
        Auth::Key(k) => k,
        _ => unreachable!(),
    };
    let mut ws = ws_open(&app).await;
    ws_send(
        &mut ws,
        json!({ "type": "connection_init", "payload": { "api-key": key } }),
    )
    .await;
    assert_eq!(
        ws_next(&mut ws, Duration::from_secs(5)).await.unwrap()["type"],
        "connection_ack"
    );
    let register = |id: &str, device: &str| {
        json!({ "id": id, "type": "subscribe", "payload": {
            "query": format!("mutation {{ registerDevice(input: {{ platform: IOS, deviceId: \"{device}\" }}) {{ created }} }}")
        } })
    };
    ws_send(&mut ws, register("m1", "ws-phone-1")).await;
    let m = ws_next(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(m["type"], "next", "{m}");
    assert_eq!(m["payload"]["data"]["registerDevice"]["created"], true);
    let before = app.counts().await;
    ws_send(&mut ws, register("m2", "ws-phone-2")).await;
    loop {
        let m = ws_next(&mut ws, Duration::from_secs(5)).await.unwrap();
        if m["id"] == "m2" {
            assert_eq!(m["type"], "error", "{m}");
            assert_eq!(m["payload"][0]["extensions"]["code"], "RATE_LIMITED");
            break;
        }
    }
    assert_eq!(app.counts().await, before, "nothing written");
}
