//! Outbound webhooks end to end, with a fake receiving endpoint: Standard
//! Webhooks signatures checked independently, retry with backoff on the
//! business clock, disabling after days of failures and re-enabling, and a
//! dead or slow endpoint not holding back a healthy one.

mod common;
mod events_support;

use std::time::{Duration as StdDuration, Instant};

use base64::{Engine, engine::general_purpose::STANDARD};
use chrono::Duration;
use common::{Backend, TestApp, spawn_with};
use entities::{outbound_deliveries as deliveries, outbound_endpoints as endpoints};
use entitle::{
    config::{OutboundEndpoint, Secret},
    domain::ApiKeyRole,
};
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::Value;
use sha2::Sha256;
use wiremock::{
    Mock, MockServer, Request, ResponseTemplate,
    matchers::{method, path},
};

/// The Standard Webhooks specification's example secret.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OTHER_SECRET: &str = "whsec_c2VjcmV0LW9mLWFub3RoZXItZW5kcG9pbnQ=";

fn endpoint(server: &MockServer, route: &str, secret: &str) -> OutboundEndpoint {
    OutboundEndpoint {
        url: format!("{}{route}", server.uri()),
        secret: Secret::new(secret),
    }
}

async fn spawn_sending_to(b: Backend, targets: Vec<OutboundEndpoint>) -> TestApp {
    spawn_with(b, |c| {
        c.outbound.endpoints = targets;
        c.outbound.timeout_secs = 1;
        c.events.relay_poll_ms = 50;
        c.jobs.outbound_interval_ms = 50;
    })
    .await
}

/// A receiver's check, written from the specification alone: HMAC-SHA256
/// keyed with the base64 after `whsec_`, over "{id}.{timestamp}.{body}".
fn expected_signature(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

fn header<'a>(r: &'a Request, name: &str) -> &'a str {
    r.headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

fn verifies(secret: &str, r: &Request) -> bool {
    let expected = expected_signature(
        secret,
        header(r, "webhook-id"),
        header(r, "webhook-timestamp"),
        &r.body,
    );
    // The header may list several space-separated signatures.
    header(r, "webhook-signature")
        .split(' ')
        .any(|s| s == expected)
}

async fn received(server: &MockServer, route: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.url.path() == route)
        .collect()
}

/// Polls `check` until it holds, for at most ten seconds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + StdDuration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(StdDuration::from_millis(25)).await;
    }
}

/// Long enough for several dispatcher runs (every 50 ms) to have happened.
async fn several_runs() {
    tokio::time::sleep(StdDuration::from_millis(400)).await;
}

async fn rows(app: &TestApp, url: &str) -> Vec<deliveries::Model> {
    deliveries::Entity::find()
        .filter(deliveries::Column::EndpointUrl.eq(url))
        .order_by_asc(deliveries::Column::Id)
        .all(&app.state.core.db().conn)
        .await
        .unwrap()
}

async fn endpoint_row(app: &TestApp, url: &str) -> Option<endpoints::Model> {
    endpoints::Entity::find_by_id(url.to_string())
        .one(&app.state.core.db().conn)
        .await
        .unwrap()
}

async fn register(app: &TestApp, device: &str) {
    let key = app.key(ApiKeyRole::Client).await;
    let (s, body) = app.post_user(&key, device).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["paid_status"], "trial", "{body}");
}

async fn trial_grant_is_posted_once_and_signed(b: Backend) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hooks"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    let target = endpoint(&server, "/hooks", SECRET);
    let url = target.url.clone();
    let app = spawn_sending_to(b, vec![target]).await;
    // The attempt is stamped by the business clock, not the wall clock.
    app.clock.advance(Duration::days(1));

    register(&app, "watch-1").await;
    eventually("the endpoint is called", || async {
        !received(&server, "/hooks").await.is_empty()
    })
    .await;
    eventually("the delivery is recorded", || async {
        rows(&app, &url)
            .await
            .iter()
            .all(|r| r.delivered_at.is_some())
    })
    .await;
    several_runs().await;

    let reqs = received(&server, "/hooks").await;
    assert_eq!(reqs.len(), 1, "delivered exactly once");
    let r = &reqs[0];
    assert!(verifies(SECRET, r), "signature must verify");
    assert!(!verifies(OTHER_SECRET, r));
    assert_eq!(header(r, "content-type"), "application/json");
    let ts: i64 = header(r, "webhook-timestamp").parse().unwrap();
    let business_now = app.state.core.now().timestamp();
    assert!(
        (business_now - ts).abs() < 60,
        "timestamp {ts} vs business clock {business_now}"
    );

    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["type"], "entitlement.granted", "{body}");
    let data = &body["data"];
    assert_eq!(data["userId"], "watch-1");
    assert_eq!(data["entitlement"], "pro");
    assert_eq!(data["kind"], "granted");
    assert_eq!(data["oldStatus"], Value::Null);
    assert_eq!(data["newStatus"], "ACTIVE");
    assert_eq!(data["reason"], "active");
    assert_eq!(body["timestamp"], data["occurredAt"]);
    assert_eq!(header(r, "webhook-id"), data["eventId"].as_str().unwrap());

    let rows = rows(&app, &url).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].attempts, 1);
    assert_eq!(
        rows[0].event_id.to_string(),
        data["eventId"].as_str().unwrap()
    );
    let ep = endpoint_row(&app, &url).await.unwrap();
    assert!(ep.last_success_at.is_some() && ep.failing_since.is_none());
}

async fn a_failed_attempt_is_retried_after_the_backoff(b: Backend) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hooks"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/hooks"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let target = endpoint(&server, "/hooks", SECRET);
    let url = target.url.clone();
    let app = spawn_sending_to(b, vec![target]).await;

    register(&app, "watch-1").await;
    eventually("the failure is recorded", || async {
        rows(&app, &url)
            .await
            .first()
            .is_some_and(|r| r.attempts == 1)
            && endpoint_row(&app, &url)
                .await
                .is_some_and(|e| e.failing_since.is_some())
    })
    .await;
    let row = rows(&app, &url).await.remove(0);
    assert!(row.delivered_at.is_none());
    assert_eq!(row.last_error.as_deref(), Some("HTTP 500"));
    let failed_at = endpoint_row(&app, &url).await.unwrap().failing_since;
    assert!(failed_at.is_some(), "the endpoint is marked failing");
    let wait = row.next_attempt_at - failed_at.unwrap();
    assert!(
        wait >= Duration::seconds(4) && wait <= Duration::seconds(6),
        "first backoff is 5 s, got {wait}"
    );

    app.clock.advance(Duration::seconds(10));
    eventually("the retry is delivered", || async {
        rows(&app, &url).await[0].delivered_at.is_some()
    })
    .await;
    several_runs().await;

    let reqs = received(&server, "/hooks").await;
    assert_eq!(reqs.len(), 2, "one failure, then exactly one delivery");
    assert_eq!(
        header(&reqs[0], "webhook-id"),
        header(&reqs[1], "webhook-id"),
        "a retry carries the same id"
    );
    assert!(verifies(SECRET, &reqs[1]));
    let row = rows(&app, &url).await.remove(0);
    assert_eq!(row.attempts, 2);
    assert!(row.delivered_at.is_some());
    let ep = endpoint_row(&app, &url).await.unwrap();
    assert!(ep.failing_since.is_none(), "a success clears the failure");
    assert!(ep.last_success_at.is_some());
}

async fn an_endpoint_failing_for_days_is_disabled_until_enabled(b: Backend) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hooks"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&server)
        .await;
    let target = endpoint(&server, "/hooks", SECRET);
    let url = target.url.clone();
    let app = spawn_sending_to(b, vec![target]).await;
    let core = &app.state.core;

    register(&app, "watch-1").await;
    eventually("the first failure is recorded", || async {
        endpoint_row(&app, &url)
            .await
            .is_some_and(|e| e.failing_since.is_some())
    })
    .await;
    assert!(
        endpoint_row(&app, &url)
            .await
            .unwrap()
            .disabled_at
            .is_none()
    );

    // Five days (the default) of failures: the next failed attempt disables it.
    app.clock.advance(Duration::days(5) + Duration::hours(1));
    eventually("the endpoint is disabled", || async {
        endpoint_row(&app, &url)
            .await
            .is_some_and(|e| e.disabled_at.is_some())
    })
    .await;
    let calls = received(&server, "/hooks").await.len();

    // Events keep being queued for it, but nothing is sent.
    register(&app, "watch-2").await;
    eventually("the second event is queued", || async {
        rows(&app, &url).await.len() == 2
    })
    .await;
    app.clock.advance(Duration::days(1));
    several_runs().await;
    assert_eq!(received(&server, "/hooks").await.len(), calls);
    assert!(
        rows(&app, &url)
            .await
            .iter()
            .all(|r| r.delivered_at.is_none())
    );

    let status = core
        .outbound()
        .outbound_status(std::slice::from_ref(&url))
        .await
        .unwrap();
    assert_eq!(status.len(), 1);
    assert!(status[0].disabled_at.is_some() && status[0].configured);
    assert_eq!(status[0].pending, 2);
    assert!(status[0].describe().starts_with("disabled since"));

    // The receiver is fixed; the operator re-enables the endpoint.
    server.reset().await;
    Mock::given(method("POST"))
        .and(path("/hooks"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    assert_eq!(
        core.outbound()
            .enable_outbound_endpoint(&url)
            .await
            .unwrap(),
        2
    );
    eventually("the backlog is delivered", || async {
        rows(&app, &url)
            .await
            .iter()
            .all(|r| r.delivered_at.is_some())
    })
    .await;
    let reqs = received(&server, "/hooks").await;
    assert_eq!(reqs.len(), 2);
    let users: Vec<Value> = reqs
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["data"]["userId"].clone())
        .collect();
    assert_eq!(users, ["watch-1", "watch-2"], "oldest first");
    let status = core
        .outbound()
        .outbound_status(std::slice::from_ref(&url))
        .await
        .unwrap();
    assert_eq!(status[0].pending, 0);
    assert_eq!(status[0].describe(), "healthy");
    assert!(status[0].last_success_at.is_some());

    assert!(matches!(
        core.outbound()
            .enable_outbound_endpoint("https://unknown.example.com/hooks")
            .await,
        Err(entitle::error::AppError::NotFound(_))
    ));
}

async fn a_tampered_message_does_not_verify(b: Backend) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hooks"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let app = spawn_sending_to(b, vec![endpoint(&server, "/hooks", SECRET)]).await;
    register(&app, "watch-1").await;
    eventually("the endpoint is called", || async {
        !received(&server, "/hooks").await.is_empty()
    })
    .await;
    let r = received(&server, "/hooks").await.remove(0);
    assert!(verifies(SECRET, &r));

    let id = header(&r, "webhook-id");
    let ts = header(&r, "webhook-timestamp");
    let sent = header(&r, "webhook-signature");
    let tampered = String::from_utf8(r.body.clone())
        .unwrap()
        .replace("ACTIVE", "EXPIRED");
    assert_ne!(tampered.as_bytes(), r.body.as_slice());
    assert_ne!(
        sent,
        expected_signature(SECRET, id, ts, tampered.as_bytes())
    );
    let later = (ts.parse::<i64>().unwrap() + 1).to_string();
    assert_ne!(sent, expected_signature(SECRET, id, &later, &r.body));
    assert_ne!(sent, expected_signature(SECRET, "other-id", ts, &r.body));
    assert_ne!(sent, expected_signature(OTHER_SECRET, id, ts, &r.body));
}

async fn a_dead_or_slow_endpoint_does_not_hold_back_others(b: Backend) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/slow"))
        .respond_with(ResponseTemplate::new(200).set_delay(StdDuration::from_secs(5)))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/dead"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/ok"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let slow = endpoint(&server, "/slow", SECRET);
    let dead = endpoint(&server, "/dead", SECRET);
    let ok = endpoint(&server, "/ok", OTHER_SECRET);
    let (slow_url, dead_url, ok_url) = (slow.url.clone(), dead.url.clone(), ok.url.clone());
    let app = spawn_sending_to(b, vec![slow, dead, ok]).await;

    for device in ["watch-1", "watch-2", "watch-3"] {
        register(&app, device).await;
    }
    eventually("the healthy endpoint gets every event", || async {
        let rows = rows(&app, &ok_url).await;
        rows.len() == 3 && rows.iter().all(|r| r.delivered_at.is_some())
    })
    .await;
    for r in received(&server, "/ok").await {
        assert!(verifies(OTHER_SECRET, &r), "each endpoint has its own key");
    }

    eventually("the slow endpoint times out", || async {
        rows(&app, &slow_url)
            .await
            .first()
            .is_some_and(|r| r.last_error.as_deref() == Some("timed out"))
    })
    .await;
    // Every failure holds the endpoint's other due events until its retry,
    // so once none is due, the dead endpoint is left alone.
    eventually("the dead endpoint's events all wait", || async {
        let rows = rows(&app, &dead_url).await;
        let now = app.state.core.now();
        rows.len() == 3 && rows.iter().all(|r| r.next_attempt_at > now)
    })
    .await;
    let calls = received(&server, "/dead").await.len();
    several_runs().await;
    assert_eq!(received(&server, "/dead").await.len(), calls);
    let dead_rows = rows(&app, &dead_url).await;
    assert!(dead_rows.iter().all(|r| r.delivered_at.is_none()));
    assert!(
        dead_rows.iter().map(|r| r.attempts).sum::<i32>() <= 3,
        "{dead_rows:?}"
    );
    assert!(
        dead_rows
            .iter()
            .any(|r| r.last_error.as_deref() == Some("HTTP 503"))
    );
}

/// Each sink is fed from the change log on its own: with Redis down, a
/// change still reaches the outbound endpoint, and it reaches the stream
/// once Redis is back.
async fn redis_down_holds_back_only_the_stream(b: Backend) {
    use events_support::{PrivateRedis, connect, unique, wait_stream};
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hooks"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    let target = endpoint(&server, "/hooks", SECRET);
    let mut redis = PrivateRedis::start();
    let stream = unique("test:outbound:");
    let redis_url = redis.url();
    let stream_key = stream.clone();
    let app = spawn_with(b, move |c| {
        c.outbound.endpoints = vec![target];
        c.outbound.timeout_secs = 1;
        c.events.relay_poll_ms = 50;
        c.jobs.outbound_interval_ms = 50;
        c.redis_url = Some(Secret::new(redis_url));
        c.events.stream_key = stream_key;
    })
    .await;
    redis.kill();

    register(&app, "watch-1").await;
    eventually("the endpoint is called while Redis is down", || async {
        !received(&server, "/hooks").await.is_empty()
    })
    .await;
    let reqs = received(&server, "/hooks").await;
    let body: Value = serde_json::from_slice(&reqs[0].body).unwrap();
    assert_eq!(body["data"]["userId"], "watch-1", "{body}");
    let event_id = body["data"]["eventId"].as_str().unwrap().to_string();

    redis.restart();
    let mut conn = connect(&redis.url()).await;
    let evs = wait_stream(&mut conn, &stream, 20, |e| !e.is_empty()).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["eventId"].as_str(), Some(event_id.as_str()));
    several_runs().await;
    assert_eq!(received(&server, "/hooks").await.len(), 1, "delivered once");
}

on_all_backends!(
    redis_down_holds_back_only_the_stream,
    trial_grant_is_posted_once_and_signed,
    a_failed_attempt_is_retried_after_the_backoff,
    an_endpoint_failing_for_days_is_disabled_until_enabled,
    a_tampered_message_does_not_verify,
    a_dead_or_slow_endpoint_does_not_hold_back_others,
);
