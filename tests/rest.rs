//! REST routes beside GraphQL: subscription check, health, readiness,
//! metrics, unknown routes.

mod common;

use chrono::Duration;
use common::{Auth, Backend, spawn};
use entitle::domain::ApiKeyRole;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn get(app: &common::TestApp, auth: &Auth, path: &str) -> (StatusCode, Value) {
    let resp = auth
        .apply(app.client.get(app.url(path)))
        .send()
        .await
        .unwrap();
    let s = resp.status();
    (s, resp.json().await.unwrap_or(Value::Null))
}

async fn subscription_check(b: Backend) {
    let app = spawn(b).await;
    let client = app.key(ApiKeyRole::Client).await;
    let service = app.key(ApiKeyRole::Service).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    app.post_user(&client, "svc-1").await;

    let (s, r) = get(&app, &service, "/api/subscriptions/check/svc-1").await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["is_subscribed"], true);
    assert_eq!(r["paid_status"], "trial");
    assert_eq!(r["entitlements"][0]["key"], "pro");
    assert_eq!(r["entitlements"][0]["store"], "trial");

    app.clock.advance(Duration::days(8));
    let (_, r) = get(&app, &service, "/api/subscriptions/check/svc-1").await;
    assert_eq!(r["is_subscribed"], false);
    assert_eq!(r["entitlements"][0]["status"], "expired");

    app.gql(
        &admin,
        "mutation { grantEntitlement(customerId: \"svc-1\", entitlement: \"pro\") { id } }",
        json!({}),
    )
    .await;
    let (_, r) = get(&app, &admin, "/api/subscriptions/check/svc-1").await;
    assert_eq!(r["is_subscribed"], true);
    assert_eq!(r["paid_status"], "paid");
    assert_eq!(
        r["entitlements"][0]["expires_at"],
        Value::Null,
        "lifetime grant"
    );

    for (auth, path, status, code) in [
        (
            &service,
            "/api/subscriptions/check/unknown",
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        ),
        (
            &client,
            "/api/subscriptions/check/svc-1",
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
        ),
        (
            &Auth::None,
            "/api/subscriptions/check/svc-1",
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
        ),
        (
            &service,
            "/api/subscriptions/check/a%01b",
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
        ),
        (
            &service,
            "/no/such/route",
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        ),
    ] {
        let (s, r) = get(&app, auth, path).await;
        assert_eq!(s, status, "{path}: {r}");
        assert_eq!(r["error"]["code"], code, "{path}");
    }
}

async fn health_ready_metrics(b: Backend) {
    let app = spawn(b).await;
    let (s, r) = get(&app, &Auth::None, "/health").await;
    assert_eq!((s, r["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, r) = get(&app, &Auth::None, "/ready").await;
    assert_eq!((s, r["status"].as_str()), (StatusCode::OK, Some("ready")));
    let text = app.metrics_text().await;
    assert!(
        text.contains(
            "entitle_http_requests_total{method=\"GET\",route=\"/ready\",status=\"200\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("entitle_http_request_duration_seconds_bucket"),
        "{text}"
    );
    // The database's own counters: statements run (the readiness check ran
    // some) and write transactions committed (creating the keys above).
    let counter = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing: {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert!(counter("entitle_db_statements_total") > 0, "{text}");
    assert!(counter("entitle_db_write_transactions_total") > 0, "{text}");

    // With the database gone, readiness says so and liveness does not care.
    app.state.core.db().conn.clone().close().await.unwrap();
    let (s, _) = get(&app, &Auth::None, "/ready").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (s, _) = get(&app, &Auth::None, "/health").await;
    assert_eq!(s, StatusCode::OK);
}

async fn internal_errors_do_not_leak(b: Backend) {
    let app = spawn(b).await;
    let client = app.key(ApiKeyRole::Client).await;
    let Auth::Key(_) = &client else {
        unreachable!()
    };
    app.post_user(&client, "leak-1").await;
    app.state.core.db().conn.clone().close().await.unwrap();
    // The cached key still authenticates; the database read then fails.
    let (s, r) = app.post_user(&client, "leak-2").await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{r}");
    assert_eq!(
        r["error"],
        json!({ "code": "INTERNAL", "message": "internal error" })
    );
}

on_all_backends!(
    subscription_check,
    health_ready_metrics,
    internal_errors_do_not_leak
);

/// Reads come from memory, yet a write through the server is visible to the
/// very next read; a write behind the server's back (another replica) shows
/// once the cache TTL has passed.
async fn cached_reads_follow_writes(b: Backend) {
    let app = common::spawn_with(b, |c| c.cache_ttl_ms = Some(400)).await;
    let client = app.key(ApiKeyRole::Client).await;
    let service = app.key(ApiKeyRole::Service).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    app.post_user(&client, "cache-1").await;
    let paid = |app: &common::TestApp| {
        let service = service.clone();
        let url = app.url("/api/subscriptions/check/cache-1");
        let client = app.client.clone();
        async move {
            let r: Value = service
                .apply(client.get(url))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["paid_status"].as_str().unwrap().to_string()
        }
    };
    assert_eq!(paid(&app).await, "trial");
    assert_eq!(paid(&app).await, "trial", "served from the cache");
    app.gql(
        &admin,
        "mutation { grantEntitlement(customerId: \"cache-1\", entitlement: \"pro\") { id } }",
        json!({}),
    )
    .await;
    assert_eq!(paid(&app).await, "paid", "the grant is visible at once");
    assert_eq!(
        app.post_user(&client, "cache-1").await.1["paid_status"],
        "paid"
    );

    // Another process revokes the grant directly in the database.
    use sea_orm::{ConnectionTrait, Statement};
    let db = &app.state.core.db().conn;
    db.execute_raw(Statement::from_string(
        db.get_database_backend(),
        "UPDATE purchases SET status = 'revoked', revoked_at = purchased_at WHERE store = 'promotional'",
    ))
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(paid(&app).await, "trial", "seen within the TTL");
}

on_all_backends!(cached_reads_follow_writes);
