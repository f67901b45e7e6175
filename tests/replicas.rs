//! Several server processes on one database, and the faults the event
//! pipeline must survive: a replica killed mid-burst, the database going away.
//! These run the real binary, as an operator would.

mod common;
mod events_support;
mod stripe_support;

use std::{
    collections::{BTreeSet, HashMap},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use common::{Backend, TEST_ENCRYPTION_KEY};
use entitle::jobs::Leases;
use events_support::*;
use futures_util::{StreamExt, stream};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use serde_json::Value;
use stripe_support::{WEBHOOK_SECRET, event, sign, subscription};

on_all_backends!(
    sigkill_mid_burst_loses_no_acknowledged_webhook,
    leases_have_one_holder,
    a_run_longer_than_its_lease_keeps_it,
);

/// A server process of the real binary.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(dir: &std::path::Path, database_url: &str, stream: &str) -> Server {
        let port = free_port();
        let redis = redis_url();
        let config = dir.join(format!("entitle-{port}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"bind = "127.0.0.1:{port}"
database_url = "{database_url}"
database_max_connections = 8
redis_url = "{redis}"
log = "warn"
[events]
stream_key = "{stream}"
relay_poll_ms = 100
[jobs]
expiry_interval_ms = 200
[stripe]
webhook_secret = "{WEBHOOK_SECRET}"
[tokens]
encryption_key = "{TEST_ENCRYPTION_KEY}"
[[catalog.entitlements]]
key = "pro"
[[catalog.products]]
id = "pro_monthly"
kind = "subscription"
entitlements = ["pro"]
stripe_price_id = "price_pro_monthly"
"#
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_entitle"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = reqwest::Client::new();
        loop {
            if let Ok(r) = client.get(format!("{}/ready", self.base)).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server at {} never ready",
                self.base
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        self.child.kill().ok(); // SIGKILL
        self.child.wait().ok();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A signed `customer.subscription.created` for customer `cust-{n}`.
fn webhook(n: usize) -> (String, String) {
    let now = Utc::now();
    let sub = subscription(
        &format!("sub_r{n}"),
        &format!("cus_r{n}"),
        Some(&format!("cust-{n}")),
        "price_pro_monthly",
        "active",
        now - chrono::Duration::days(1),
        now + chrono::Duration::days(29),
    );
    let id = format!("evt_r{n}");
    (
        id.clone(),
        event(&id, "customer.subscription.created", sub, now),
    )
}

async fn post(client: &reqwest::Client, base: &str, body: &str) -> Option<reqwest::StatusCode> {
    let sig = sign(body, WEBHOOK_SECRET, Utc::now().timestamp());
    client
        .post(format!("{base}/webhooks/stripe"))
        .header("content-type", "application/json")
        .header("Stripe-Signature", sig)
        .body(body.to_string())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .ok()
        .map(|r| r.status())
}

async fn scalar(db: &DatabaseConnection, sql: &str) -> i64 {
    db.query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap()
}

async fn strings(db: &DatabaseConnection, sql: &str) -> Vec<String> {
    db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", "v").unwrap())
        .collect()
}

async fn wait_all_published(db: &DatabaseConnection) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while scalar(
        db,
        "SELECT COUNT(*) AS n FROM entitlement_events WHERE published_at IS NULL",
    )
    .await
        > 0
    {
        assert!(Instant::now() < deadline, "rows left unpublished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stream_ids(evs: &[Value]) -> Vec<i64> {
    evs.iter()
        .map(|e| e["eventId"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// Two server processes on one PostgreSQL, 500 webhooks spread over both
/// (plus 50 sent to both): every change is on the stream exactly once and
/// every customer ends up entitled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_publish_each_event_once() {
    let Some(backend) = Backend::postgres() else {
        eprintln!("ENTITLE_TEST_POSTGRES_URL not set: two-replica test not run");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = common::fresh_database(&backend, &dir).await;
    let stream = unique("test:replicas:");
    let a = Server::start(dir.path(), &url, &stream);
    a.ready().await;
    let b = Server::start(dir.path(), &url, &stream);
    b.ready().await;

    let client = reqwest::Client::new();
    let bases = [a.base.clone(), b.base.clone()];
    let mut jobs: Vec<(String, String)> = (0..500)
        .map(|n| (bases[n % 2].clone(), webhook(n).1))
        .collect();
    // The first 50 are delivered again, to the other replica.
    jobs.extend((0..50).map(|n| (bases[(n + 1) % 2].clone(), webhook(n).1)));
    let statuses: Vec<Option<reqwest::StatusCode>> = stream::iter(jobs)
        .map(|(base, body)| {
            let client = client.clone();
            async move { post(&client, &base, &body).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| s.is_some_and(|s| s.is_success())),
        "every delivery acknowledged: {:?}",
        statuses
            .iter()
            .filter(|s| !s.is_some_and(|s| s.is_success()))
            .collect::<Vec<_>>()
    );

    let db = Database::connect(url.as_str()).await.unwrap();
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) AS n FROM webhook_events").await,
        500
    );
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) AS n FROM entitlement_events").await,
        500
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT COUNT(DISTINCT customer_id) AS n FROM purchases WHERE status = 'active'"
        )
        .await,
        500
    );
    wait_all_published(&db).await;
    let mut conn = connect(&redis_url()).await;
    wait_stream(&mut conn, &stream, 30, |e| e.len() >= 500).await;
    // Let any straggling duplicate arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let evs = stream_events(&mut conn, &stream).await;
    let ids = stream_ids(&evs);
    let unique_ids: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 500, "each event id exactly once");
    assert_eq!(unique_ids.len(), 500);
    let logged: BTreeSet<i64> =
        strings(&db, "SELECT CAST(id AS TEXT) AS v FROM entitlement_events")
            .await
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
    assert_eq!(unique_ids, logged);
    // Per customer: one granted ACTIVE.
    let mut per_user: HashMap<String, Vec<&str>> = HashMap::new();
    for e in &evs {
        per_user
            .entry(e["userId"].as_str().unwrap().to_string())
            .or_default()
            .push(e["newStatus"].as_str().unwrap());
    }
    assert_eq!(per_user.len(), 500);
    assert!(per_user.values().all(|v| v == &["ACTIVE"]));
    // Every replica-wide job has at most one holder.
    let holders = scalar(
        &db,
        "SELECT COUNT(DISTINCT holder) AS n FROM job_leases WHERE name = 'expiry'",
    )
    .await;
    assert_eq!(holders, 1);
    let _: Result<i64, _> = redis::AsyncCommands::del(&mut conn, &stream).await;
}

/// A replica SIGKILLed in the middle of 1,000 webhooks, then restarted:
/// every acknowledged webhook's effect is in the database, every change-log
/// row reaches the stream, and the store's retries of the rest apply once.
async fn sigkill_mid_burst_loses_no_acknowledged_webhook(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = common::fresh_database(&b, &dir).await;
    let stream = unique("test:sigkill:");
    let mut server = Server::start(dir.path(), &url, &stream);
    server.ready().await;

    let client = reqwest::Client::new();
    let acked = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let base = server.base.clone();
    let burst = {
        let acked = acked.clone();
        let client = client.clone();
        tokio::spawn(async move {
            stream::iter(0..1000)
                .map(|n| {
                    let client = client.clone();
                    let base = base.clone();
                    let acked = acked.clone();
                    async move {
                        let (id, body) = webhook(n);
                        if post(&client, &base, &body)
                            .await
                            .is_some_and(|s| s.is_success())
                        {
                            acked.lock().unwrap().insert(id);
                        }
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<()>>()
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 300 {
        assert!(Instant::now() < deadline, "the burst got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    burst.await.unwrap();
    let acked: BTreeSet<String> = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 300 && acked.len() < 1000,
        "killed mid-burst: {}",
        acked.len()
    );

    let db = Database::connect(url.as_str()).await.unwrap();
    let recorded: BTreeSet<String> = strings(&db, "SELECT event_id AS v FROM webhook_events")
        .await
        .into_iter()
        .collect();
    let missing: Vec<&String> = acked.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not recorded: {missing:?}"
    );
    let customers: BTreeSet<String> = strings(&db, "SELECT customer_id AS v FROM purchases")
        .await
        .into_iter()
        .collect();
    for id in &acked {
        let n = id.trim_start_matches("evt_r");
        assert!(
            customers.contains(&format!("cust-{n}")),
            "{id}'s effect is missing"
        );
    }

    // Restarted, the replica publishes what the dead one left.
    let server = Server::start(dir.path(), &url, &stream);
    server.ready().await;
    wait_all_published(&db).await;
    let mut conn = connect(&redis_url()).await;
    let logged: BTreeSet<i64> =
        strings(&db, "SELECT CAST(id AS TEXT) AS v FROM entitlement_events")
            .await
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
    let on_stream: BTreeSet<i64> = stream_ids(&stream_events(&mut conn, &stream).await)
        .into_iter()
        .collect();
    assert!(
        logged.is_subset(&on_stream),
        "change-log rows missing from the stream: {:?}",
        logged.difference(&on_stream).take(10).collect::<Vec<_>>()
    );

    // Stripe retries everything it did not get a 2xx for (and, to be
    // thorough, some it did): each applies exactly once.
    let statuses: Vec<Option<reqwest::StatusCode>> = stream::iter(0..1000)
        .map(|n| {
            let client = client.clone();
            let base = server.base.clone();
            async move { post(&client, &base, &webhook(n).1).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| s.is_some_and(|s| s.is_success())));
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) AS n FROM webhook_events").await,
        1000
    );
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) AS n FROM purchases").await,
        1000
    );
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) AS n FROM entitlement_events").await,
        1000
    );
    wait_all_published(&db).await;
    let on_stream: BTreeSet<i64> = stream_ids(&stream_events(&mut conn, &stream).await)
        .into_iter()
        .collect();
    assert_eq!(on_stream.len(), 1000);
    let _: Result<i64, _> = redis::AsyncCommands::del(&mut conn, &stream).await;
}

/// Database down: webhooks get 5xx (the store retries), never 2xx, and
/// nothing is half-applied once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_answers_webhooks_with_5xx() {
    let Some(backend) = Backend::postgres() else {
        eprintln!("ENTITLE_TEST_POSTGRES_URL not set: database-down test not run");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = common::fresh_database(&backend, &dir).await;
    let name = url::Url::parse(&url)
        .unwrap()
        .path()
        .trim_start_matches('/')
        .to_string();
    let server = Server::start(dir.path(), &url, &unique("test:dbdown:"));
    server.ready().await;
    let client = reqwest::Client::new();
    assert!(
        post(&client, &server.base, &webhook(1).1)
            .await
            .unwrap()
            .is_success()
    );

    let Backend::Postgres(admin_url) = &backend else {
        unreachable!()
    };
    let admin = Database::connect(admin_url.as_str()).await.unwrap();
    let exec = |sql: String| {
        let admin = admin.clone();
        async move {
            admin
                .execute_raw(Statement::from_string(admin.get_database_backend(), sql))
                .await
                .unwrap();
        }
    };
    exec(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false")).await;
    exec(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    ))
    .await;

    for n in 2..6 {
        let status = post(&client, &server.base, &webhook(n).1)
            .await
            .expect("an answer");
        assert!(
            status.is_server_error(),
            "webhook {n} while the database is down: {status}"
        );
    }
    let ready = client
        .get(format!("{}/ready", server.base))
        .send()
        .await
        .unwrap();
    assert!(
        ready.status().is_server_error(),
        "not ready without a database"
    );

    exec(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).await;
    // The store's retries now land, once.
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 2..6 {
        loop {
            let s = post(&client, &server.base, &webhook(n).1).await;
            if s.is_some_and(|s| s.is_success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "webhook {n} never accepted after recovery: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let db = Database::connect(url.as_str()).await.unwrap();
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) AS n FROM webhook_events").await,
        5
    );
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) AS n FROM entitlement_events").await,
        5
    );
    drop(server);
    db.close().await.ok();
}

/// Two lease holders on one database: only one holds a job at a time; the
/// other takes it when it expires or is released.
async fn leases_have_one_holder(b: Backend) {
    let app = common::spawn_with(b, |c| c.jobs.enabled = false).await;
    let one = Leases::new(app.state.core.db().clone());
    let two = Leases::new(app.state.core.db().clone());
    let ttl = Duration::from_millis(300);
    let (x, y) = tokio::join!(one.try_acquire("job", ttl), two.try_acquire("job", ttl));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert!(x ^ y, "exactly one holder");
    let (holder, other) = if x { (&one, &two) } else { (&two, &one) };
    assert!(
        holder.try_acquire("job", ttl).await.unwrap(),
        "the holder renews"
    );
    assert!(!other.try_acquire("job", ttl).await.unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        other.try_acquire("job", ttl).await.unwrap(),
        "expired: taken over"
    );
    assert!(!holder.try_acquire("job", ttl).await.unwrap());
    other.release("job").await.unwrap();
    assert!(
        holder.try_acquire("job", ttl).await.unwrap(),
        "released: taken at once"
    );
}

/// A job run that outlasts its lease's time to live renews the lease as it
/// goes: no other replica gets the job meanwhile.
async fn a_run_longer_than_its_lease_keeps_it(b: Backend) {
    let app = common::spawn_with(b, |c| c.jobs.enabled = false).await;
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ttl = Duration::from_millis(300);
    {
        let runs = runs.clone();
        entitle::jobs::spawn_leased_for(
            Leases::new(app.state.core.db().clone()),
            "long-job",
            Duration::from_millis(50),
            ttl,
            move || {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // Four times the lease's time to live.
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    Ok(())
                }
            },
        );
    }
    let other = Leases::new(app.state.core.db().clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while runs.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the job started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..10 {
        assert!(
            !other.try_acquire("long-job", ttl).await.unwrap(),
            "taken while the first holder was still running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Replicas started at the same moment against a fresh database all come
/// up: migrations take turns instead of racing to create the same tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_together_on_a_fresh_database_all_start() {
    let Some(backend) = Backend::postgres() else {
        eprintln!("ENTITLE_TEST_POSTGRES_URL not set: concurrent migration test not run");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = common::fresh_database(&backend, &dir).await;
    let stream = unique("test:migrate:");
    let mut servers: Vec<Server> = (0..3)
        .map(|_| Server::start(dir.path(), &url, &stream))
        .collect();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for s in &mut servers {
        loop {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("a replica exited during start-up: {status}");
            }
            if let Ok(r) = client.get(format!("{}/ready", s.base)).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica at {} never ready",
                s.base
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let db = Database::connect(url.as_str()).await.unwrap();
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) AS n FROM seaql_migrations").await,
        <migration::Migrator as migration::MigratorTrait>::migrations().len() as i64
    );
}
