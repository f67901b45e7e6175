//! A write whose client goes away before the answer still runs to its end.
//! A store that gave up on a slow delivery redelivers it later; the work it
//! started must neither be cut off halfway through its transaction nor
//! depend on that redelivery.

mod common;
mod stripe_support;

use std::time::Duration;

use common::{Backend, spawn_with};
use entitle::domain::ApiKeyRole;
use sea_orm::ConnectionTrait;
use serde_json::json;
use stripe_support::*;
use tokio::io::AsyncWriteExt;

async fn recorded_outcome(app: &common::TestApp, event_id: &str) -> Option<String> {
    let db = &app.state.core.db().conn;
    let row = db
        .query_one_raw(sea_orm::Statement::from_sql_and_values(
            db.get_database_backend(),
            match db.get_database_backend() {
                sea_orm::DbBackend::Postgres => {
                    "SELECT outcome FROM webhook_events WHERE event_id = $1"
                }
                _ => "SELECT outcome FROM webhook_events WHERE event_id = ?",
            },
            [event_id.into()],
        ))
        .await
        .unwrap()?;
    row.try_get::<String>("", "outcome").ok()
}

async fn webhook_finishes_after_its_client_left(b: Backend) {
    let postgres = matches!(b, Backend::Postgres(_));
    let app = spawn_with(b, |c| configure(c, None)).await;

    // Another writer holds what the delivery needs, so the delivery's
    // transaction waits: on SQLite for the one writer, on PostgreSQL for
    // the dedupe table.
    let held = app.state.core.db().write().await.unwrap();
    if postgres {
        held.execute_unprepared("LOCK TABLE webhook_events IN EXCLUSIVE MODE")
            .await
            .unwrap();
    }

    let mut session = checkout_session("cs_gone_1", "payment", Some("gone-1"), None, None);
    session["metadata"] = json!({ "product_id": "pro_lifetime" });
    let body = event(
        "evt_gone_1",
        "checkout.session.completed",
        session,
        app.state.core.now(),
    );
    let sig = sign(&body, WEBHOOK_SECRET, app.state.core.now().timestamp());
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "POST /webhooks/stripe HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         stripe-signature: {sig}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    // The delivery is now waiting inside the server; the client gives up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(recorded_outcome(&app, "evt_gone_1").await, None);
    conn.shutdown().await.unwrap();
    drop(conn);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);

    let mut outcome = None;
    for _ in 0..100 {
        outcome = recorded_outcome(&app, "evt_gone_1").await;
        if outcome.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        outcome.as_deref(),
        Some("applied"),
        "the delivery whose client left was not applied"
    );
    let c = entitlements(&app, "gone-1").await;
    assert_eq!(entitlement(&c, "pro")["isActive"], true, "{c}");

    // The server is sound afterwards: the same connection pool serves the
    // next request, and Stripe's redelivery is a duplicate.
    let (s, r) = deliver(&app, &body).await;
    assert_eq!(s, reqwest::StatusCode::OK, "{r}");
    assert_eq!(r["outcome"], "duplicate", "{r}");
    let key = app.key(ApiKeyRole::Client).await;
    let (s, _) = app.post_user(&key, "gone-2").await;
    assert_eq!(s, reqwest::StatusCode::OK);
}

on_all_backends!(webhook_finishes_after_its_client_left);
