//! The read cache after a restart and under writes, and the buffered
//! check-in times of known devices.

mod common;

use chrono::Duration;
use common::{Auth, Backend, respawn, spawn};
use entitle::domain::ApiKeyRole;
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, Statement};
use serde_json::json;

async fn last_seen(app: &common::TestApp, device: &str) -> String {
    let db = &app.state.core.db().conn;
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT last_seen_at FROM devices WHERE device_id = '{device}'"),
        ))
        .await
        .unwrap()
        .expect("device row");
    match row.try_get::<chrono::DateTime<chrono::Utc>>("", "last_seen_at") {
        Ok(t) => t.to_rfc3339(),
        Err(_) => row.try_get::<String>("", "last_seen_at").unwrap(),
    }
}

async fn paid_status(app: &common::TestApp, auth: &Auth, id: &str) -> String {
    let (s, body) = app
        .gql(
            auth,
            "query($id: ID!) { customer(id: $id) { paidStatus } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body["data"]["customer"]["paidStatus"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string()
}

/// After a restart the most recent customers and devices are read into the
/// cache in one pass, and a write made after that is still seen at once.
async fn restart_warms_the_cache_and_writes_still_show(b: Backend) {
    let first = spawn(b.clone()).await;
    let client = first.key(ApiKeyRole::Client).await;
    for i in 0..30 {
        let (s, body) = first.post_user(&client, &format!("warm-{i}")).await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    let app = respawn(&first, |c| c.cache_warm = 0).await;
    let core = &app.state.core;
    // On PostgreSQL the cache comes on (empty) once the listener is in place.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while core.db().stats.cache_listening.get() != 1 {
        assert!(std::time::Instant::now() < deadline, "cache never came on");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (customers, devices) = core
        .reads()
        .warm_caches(20)
        .await
        .map_err(anyhow::Error::from)
        .unwrap();
    assert_eq!((customers, devices), (20, 20), "the limit bounds the pass");
    let (customers, devices) = core
        .reads()
        .warm_caches(1000)
        .await
        .map_err(anyhow::Error::from)
        .unwrap();
    assert_eq!((customers, devices), (30, 30));
    assert!(core.db().cache.get("warm-7").is_some(), "customer cached");
    let warmed = core
        .db()
        .cache
        .get("warm-7")
        .and_then(|c| c.customer)
        .expect("the customer row is cached, not a miss");
    assert_eq!(warmed.id, "warm-7");
    assert!(
        core.db()
            .device_cache
            .get(&entitle::db::device_key("garmin", "warm-7"))
            .is_some(),
        "device cached"
    );

    // A grant through the restarted server shows on the next read.
    let admin = app.key(ApiKeyRole::Admin).await;
    assert_eq!(paid_status(&app, &admin, "warm-7").await, "TRIAL");
    let (s, g) = app
        .gql(
            &admin,
            "mutation { grantEntitlement(customerId: \"warm-7\", entitlement: \"pro\") { paidStatus } }",
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{g}");
    assert_eq!(paid_status(&app, &admin, "warm-7").await, "PAID");
    let (s, body) = app.post_user(&client, "warm-7").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["paid_status"], "paid", "{body}");
    // Warming again never brings back what the write replaced.
    core.reads()
        .warm_caches(1000)
        .await
        .map_err(anyhow::Error::from)
        .unwrap();
    assert_eq!(paid_status(&app, &admin, "warm-7").await, "PAID");
    // Other customers kept their entries through that write (PostgreSQL
    // keeps entries a second only, so there a slow run could see them expire).
    if !app.database_url.starts_with("postgres") {
        assert!(core.db().cache.get("warm-3").is_some());
    }
}

/// The server warms its cache by itself after a restart: on PostgreSQL once
/// its listener is in place, with no request needed.
async fn restart_warms_the_cache_unasked(b: Backend) {
    let first = spawn(b.clone()).await;
    let client = first.key(ApiKeyRole::Client).await;
    for i in 0..10 {
        let (s, body) = first.post_user(&client, &format!("unasked-{i}")).await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    let app = respawn(&first, |c| c.cache_warm = 1000).await;
    let core = &app.state.core;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let device = entitle::db::device_key("garmin", "unasked-4");
    // Customers are warmed first, then devices.
    while core.db().cache.get("unasked-4").is_none()
        || core.db().device_cache.get(&device).is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the cache was not warmed after the restart"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        core.db()
            .device_cache
            .get(&entitle::db::device_key("garmin", "unasked-4"))
            .is_some(),
        "device cached"
    );
}

/// A known device's check-in time is written by the background writer, not
/// by the request, and never moves backwards.
async fn check_ins_are_written_in_the_background(b: Backend) {
    let app = spawn(b).await;
    let client = app.key(ApiKeyRole::Client).await;
    let (s, body) = app.post_user(&client, "poller").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let first = last_seen(&app, "poller").await;

    // Within the resolution: nothing to write.
    app.clock.advance(Duration::seconds(10));
    app.post_user(&client, "poller").await;
    assert!(app.state.core.customers().seen().is_empty());

    app.clock.advance(Duration::minutes(5));
    let (s, body) = app.post_user(&client, "poller").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["paid_status"], "trial");
    assert_eq!(app.state.core.customers().seen().len(), 1, "buffered");
    assert_eq!(
        last_seen(&app, "poller").await,
        first,
        "the request wrote nothing"
    );
    // Polling again before the flush buffers nothing new.
    app.post_user(&client, "poller").await;
    assert_eq!(app.state.core.customers().seen().len(), 1);

    let written = app
        .state
        .core
        .customers()
        .flush_last_seen()
        .await
        .map_err(anyhow::Error::from)
        .unwrap();
    assert_eq!(written, 1);
    assert!(app.state.core.customers().seen().is_empty());
    let after = last_seen(&app, "poller").await;
    assert_ne!(after, first, "the flush wrote the newer time");
    // Nothing pending: a second flush writes nothing.
    assert_eq!(
        app.state
            .core
            .customers()
            .flush_last_seen()
            .await
            .map_err(anyhow::Error::from)
            .unwrap(),
        0
    );
    assert_eq!(last_seen(&app, "poller").await, after);
}

on_all_backends!(
    restart_warms_the_cache_and_writes_still_show,
    restart_warms_the_cache_unasked,
    check_ins_are_written_in_the_background,
);
