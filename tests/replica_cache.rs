//! Replicas on one PostgreSQL database each keep a read cache. A write
//! through one replica must show through the others long before the cache
//! TTL, and a replica that cannot hear the others must not serve from
//! memory what it was not told about.

mod common;
mod stripe_support;

use std::time::{Duration, Instant};

use common::{Auth, Backend, TestApp, respawn, spawn_with};
use entitle::domain::ApiKeyRole;
use sea_orm::{ConnectionTrait, Statement};
use serde_json::{Value, json};

async fn paid(app: &TestApp, service: &Auth, customer: &str) -> String {
    let r: Value = service
        .apply(
            app.client
                .get(app.url(&format!("/api/subscriptions/check/{customer}"))),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["paid_status"].as_str().unwrap().to_string()
}

async fn listening(app: &TestApp) -> bool {
    let m = app.metrics_text().await;
    m.lines()
        .any(|l| l.trim() == "entitle_read_cache_listening 1")
}

async fn until(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> bool) {
    let t0 = Instant::now();
    while !check().await {
        assert!(t0.elapsed() < deadline, "{what}: not within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn sql(app: &TestApp, q: &str) {
    let db = &app.state.core.db().conn;
    db.execute_raw(Statement::from_string(db.get_database_backend(), q))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_replica_shows_through_the_others() {
    let Some(pg) = Backend::postgres() else {
        eprintln!("ENTITLE_TEST_POSTGRES_URL not set: PostgreSQL-only test not run");
        return;
    };
    // A TTL far beyond the test: only the notices can make B see A's writes.
    let ttl = |c: &mut entitle::config::Config| c.cache_ttl_ms = Some(600_000);
    let a = spawn_with(pg, ttl).await;
    let b = respawn(&a, ttl).await;
    until("A listens", Duration::from_secs(10), async || {
        listening(&a).await
    })
    .await;
    until("B listens", Duration::from_secs(10), async || {
        listening(&b).await
    })
    .await;

    let client = a.key(ApiKeyRole::Client).await;
    let service = a.key(ApiKeyRole::Service).await;
    let admin = a.key(ApiKeyRole::Admin).await;
    a.post_user(&client, "rc-1").await;
    assert_eq!(paid(&b, &service, "rc-1").await, "trial");

    // B serves rc-1 from memory: a change behind every server's back (no
    // notice) is not seen...
    sql(
        &a,
        "UPDATE purchases SET status = 'revoked', revoked_at = purchased_at \
         WHERE customer_id = 'rc-1'",
    )
    .await;
    assert_eq!(paid(&b, &service, "rc-1").await, "trial", "cached on B");
    sql(
        &a,
        "UPDATE purchases SET status = 'active', revoked_at = NULL WHERE customer_id = 'rc-1'",
    )
    .await;

    // ...but a write through A is, as soon as A commits.
    let (s, body) = a
        .gql(
            &admin,
            "mutation { grantEntitlement(customerId: \"rc-1\", entitlement: \"pro\") { id } }",
            json!({}),
        )
        .await;
    assert_eq!(s, reqwest::StatusCode::OK, "{body}");
    until("B sees A's grant", Duration::from_secs(5), async || {
        paid(&b, &service, "rc-1").await == "paid"
    })
    .await;

    // B loses its listening connection: notices sent meanwhile are lost,
    // so B serves from the database until it listens again.
    sql(
        &a,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%' \
         AND pid <> pg_backend_pid()",
    )
    .await;
    a.post_user(&client, "rc-2").await;
    assert_eq!(paid(&b, &service, "rc-2").await, "trial");
    let (s, body) = a
        .gql(
            &admin,
            "mutation { grantEntitlement(customerId: \"rc-2\", entitlement: \"pro\") { id } }",
            json!({}),
        )
        .await;
    assert_eq!(s, reqwest::StatusCode::OK, "{body}");
    until(
        "B sees the grant made while it was deaf",
        Duration::from_secs(5),
        async || paid(&b, &service, "rc-2").await == "paid",
    )
    .await;
    until(
        "A and B listen again",
        Duration::from_secs(10),
        async || listening(&a).await && listening(&b).await,
    )
    .await;
}

/// A store's webhook through A shows through B too: the notice that tells B
/// travels in the statement that claims the event, not on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_through_one_replica_shows_through_the_others() {
    let Some(pg) = Backend::postgres() else {
        eprintln!("ENTITLE_TEST_POSTGRES_URL not set: PostgreSQL-only test not run");
        return;
    };
    let setup = |c: &mut entitle::config::Config| {
        c.cache_ttl_ms = Some(600_000);
        stripe_support::configure(c, None);
    };
    let a = spawn_with(pg, setup).await;
    let b = respawn(&a, setup).await;
    until("both listen", Duration::from_secs(10), async || {
        listening(&a).await && listening(&b).await
    })
    .await;
    let client = a.key(ApiKeyRole::Client).await;
    let service = a.key(ApiKeyRole::Service).await;
    a.post_user(&client, "rc-w").await;
    assert_eq!(paid(&b, &service, "rc-w").await, "trial", "cached on B");

    let now = a.state.core.now();
    let sub = stripe_support::subscription(
        "sub_rc_w",
        "cus_rc_w",
        Some("rc-w"),
        "price_pro_monthly",
        "active",
        now - chrono::Duration::days(1),
        now + chrono::Duration::days(29),
    );
    let ev = stripe_support::event("evt_rc_w", "customer.subscription.created", sub, now);
    let (s, r) = stripe_support::deliver(&a, &ev).await;
    assert_eq!(s, reqwest::StatusCode::OK, "{r}");
    assert_eq!(r["outcome"], "applied", "{r}");
    until("B sees A's webhook", Duration::from_secs(5), async || {
        paid(&b, &service, "rc-w").await == "paid"
    })
    .await;
}
