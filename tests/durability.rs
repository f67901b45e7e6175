//! A webhook answered 2xx survives a SIGKILL of the server (DESIGN §8): the
//! real binary takes a burst of signed Stripe deliveries, is killed while
//! the burst is still in flight, and is started again on the same database.
//! Every event it acknowledged is recorded with its effect; none is applied
//! twice; nothing is half applied (an effect without its dedupe row, or the
//! other way round); and when Stripe redelivers everything, what was applied
//! answers as a duplicate and the rest applies once.

mod common;
mod stripe_support;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::{Duration as ChronoDuration, Utc};
use common::{Backend, TEST_ENCRYPTION_KEY, fresh_database};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use serde_json::{Value, json};
use stripe_support::{WEBHOOK_SECRET, checkout_session, event, sign, subscription};
use tokio::sync::{Notify, Semaphore};

/// Deliveries in the burst; the server is killed after `KILL_AFTER` of them
/// were acknowledged, with `CONCURRENCY` requests in flight.
const EVENTS: usize = 300;
const CONCURRENCY: usize = 16;
const KILL_AFTER: usize = 100;

/// Generous: two cores shared with other builds and tests.
const START_DEADLINE: Duration = Duration::from_secs(90);

/// One event of the burst. Each has a customer of its own, so its effect
/// can be told apart from every other event's.
struct Delivery {
    event_id: String,
    customer: String,
    body: String,
    /// The purchase it creates (`store_purchase_id`).
    purchase: String,
    /// The change-log rows it writes: (entitlement, kind).
    changes: Vec<(String, String)>,
}

fn burst() -> Vec<Delivery> {
    let now = Utc::now();
    (0..EVENTS)
        .map(|n| {
            let customer = format!("dur-{n}");
            let event_id = format!("evt_dur_{n}");
            if n % 2 == 0 {
                // A one-time payment for the lifetime product (pro + maps).
                let id = format!("cs_dur_{n}");
                let mut s = checkout_session(&id, "payment", Some(&customer), None, None);
                s["metadata"] = json!({ "product_id": "pro_lifetime" });
                Delivery {
                    body: event(&event_id, "checkout.session.completed", s, now),
                    event_id,
                    customer,
                    purchase: id,
                    changes: vec![
                        ("maps".into(), "granted".into()),
                        ("pro".into(), "granted".into()),
                    ],
                }
            } else {
                let id = format!("sub_dur_{n}");
                let s = subscription(
                    &id,
                    &format!("cus_dur_{n}"),
                    Some(&customer),
                    "price_pro_monthly",
                    "active",
                    now - ChronoDuration::days(1),
                    now + ChronoDuration::days(29),
                );
                Delivery {
                    body: event(&event_id, "customer.subscription.updated", s, now),
                    event_id,
                    customer,
                    purchase: id,
                    changes: vec![("pro".into(), "granted".into())],
                }
            }
        })
        .collect()
}

/// Stripe with a webhook secret only: events apply from their verified
/// payload, as in the benchmark.
fn write_config(dir: &Path, database_url: &str) -> std::path::PathBuf {
    let mut toml = format!(
        r#"database_url = "{database_url}"
bind = "127.0.0.1:0"
log = "info"

[[catalog.entitlements]]
key = "pro"

[[catalog.entitlements]]
key = "maps"

[[catalog.products]]
id = "pro_monthly"
kind = "subscription"
entitlements = ["pro"]
stripe_price_id = "price_pro_monthly"

[[catalog.products]]
id = "pro_lifetime"
kind = "lifetime"
entitlements = ["pro", "maps"]
stripe_price_id = "price_pro_lifetime"

[stripe]
webhook_secret = "{WEBHOOK_SECRET}"
"#
    );
    if database_url.starts_with("postgres") {
        toml.push_str(&format!(
            "\n[tokens]\nencryption_key = \"{TEST_ENCRYPTION_KEY}\"\n"
        ));
    }
    let path = dir.join("entitle.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// The compiled server as a child process.
struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    async fn start(config: &Path, dir: &Path) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_entitle"));
        // Only the file configures it, whatever this environment holds.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ENTITLE_") {
                cmd.env_remove(&k);
            }
        }
        let mut child = cmd
            .arg("--config")
            .arg(config)
            .arg("serve")
            .current_dir(dir)
            .env_remove("DATABASE_URL")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the server binary starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let stderr = child.stderr.take().unwrap();
        let kept = log.clone();
        // Reads the log to its end, so the server never blocks writing it.
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("entitle listening")
                    && let Some(rest) = line.split("addr=").nth(1)
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
                kept.lock().unwrap().push(line);
            }
        });
        let addr = match tokio::time::timeout(START_DEADLINE, addr_rx).await {
            Ok(Ok(addr)) => addr,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server did not report its address:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        let server = Server {
            child,
            base: format!("http://{addr}"),
            log,
        };
        server.wait_healthy().await;
        server
    }

    async fn wait_healthy(&self) {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        loop {
            let ok = client
                .get(format!("{}/health", self.base))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/health never answered:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGKILL: no shutdown hook, no flush, no graceful anything.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the server");
        let status = self.child.wait().unwrap();
        assert!(!status.success(), "killed, not exited: {status:?}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a delivery got back: an HTTP answer, or none (the connection died).
enum Answer {
    Http(u16, Value),
    Lost(String),
}

async fn deliver(client: &reqwest::Client, base: &str, body: &str) -> Answer {
    let signature = sign(body, WEBHOOK_SECRET, Utc::now().timestamp());
    let sent = client
        .post(format!("{base}/webhooks/stripe"))
        .header("content-type", "application/json")
        .header("Stripe-Signature", signature)
        .body(body.to_string())
        .send()
        .await;
    match sent {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.bytes().await {
                Ok(b) => Answer::Http(status, serde_json::from_slice(&b).unwrap_or(Value::Null)),
                // The head arrived but the body did not: not an answer.
                Err(e) => Answer::Lost(e.to_string()),
            }
        }
        Err(e) => Answer::Lost(e.to_string()),
    }
}

/// The database as it is now, per customer of the burst.
#[derive(Debug, Default)]
struct Stored {
    /// event id -> outcome.
    webhooks: BTreeMap<String, String>,
    /// customer -> its Stripe purchases' store ids.
    purchases: BTreeMap<String, Vec<String>>,
    /// customer -> its change-log rows (entitlement, kind).
    changes: BTreeMap<String, Vec<(String, String)>>,
}

async fn read_stored(db: &DatabaseConnection) -> Stored {
    let rows = |sql: &'static str| async move {
        db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
            .await
            .unwrap()
    };
    let s = |r: &sea_orm::QueryResult, c: &str| r.try_get::<String>("", c).unwrap();
    let mut out = Stored::default();
    for r in rows("SELECT event_id, outcome FROM webhook_events WHERE source = 'stripe'").await {
        let previous = out.webhooks.insert(s(&r, "event_id"), s(&r, "outcome"));
        assert!(previous.is_none(), "one row per event id");
    }
    for r in
        rows("SELECT customer_id, store_purchase_id FROM purchases WHERE store = 'stripe'").await
    {
        out.purchases
            .entry(s(&r, "customer_id"))
            .or_default()
            .push(s(&r, "store_purchase_id"));
    }
    for r in rows("SELECT customer_id, entitlement, kind FROM entitlement_events").await {
        out.changes
            .entry(s(&r, "customer_id"))
            .or_default()
            .push((s(&r, "entitlement"), s(&r, "kind")));
    }
    for v in out.changes.values_mut() {
        v.sort();
    }
    out
}

/// Each event is either applied once, effect and record together, or not
/// at all. Returns the applied ones.
fn applied_once_or_not_at_all(stored: &Stored, deliveries: &[Delivery]) -> BTreeSet<String> {
    let mut applied = BTreeSet::new();
    let mut wrong = Vec::new();
    for d in deliveries {
        let purchases = stored
            .purchases
            .get(&d.customer)
            .cloned()
            .unwrap_or_default();
        let changes = stored.changes.get(&d.customer).cloned().unwrap_or_default();
        match stored.webhooks.get(&d.event_id).map(String::as_str) {
            Some("applied") => {
                if purchases != [d.purchase.clone()] || changes != d.changes {
                    wrong.push(format!(
                        "{} recorded as applied, but purchases {purchases:?} and changes {changes:?}",
                        d.event_id
                    ));
                }
                applied.insert(d.event_id.clone());
            }
            None => {
                if !purchases.is_empty() || !changes.is_empty() {
                    wrong.push(format!(
                        "{} not recorded, yet purchases {purchases:?} and changes {changes:?}",
                        d.event_id
                    ));
                }
            }
            Some(other) => wrong.push(format!("{} recorded as {other}", d.event_id)),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    applied
}

async fn sigkill_mid_burst_loses_no_acknowledged_event(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let database_url = fresh_database(&backend, &dir).await;
    let config = write_config(dir.path(), &database_url);
    let deliveries = Arc::new(burst());

    let mut server = Server::start(&config, dir.path()).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let lost = Arc::new(AtomicUsize::new(0));
    let enough = Arc::new(Notify::new());
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..deliveries.len() {
        let (deliveries, client, base) = (deliveries.clone(), client.clone(), server.base.clone());
        let (acked, refused, lost, enough, gate) = (
            acked.clone(),
            refused.clone(),
            lost.clone(),
            enough.clone(),
            gate.clone(),
        );
        tasks.spawn(async move {
            let _slot = gate.acquire_owned().await.unwrap();
            let d = &deliveries[i];
            match deliver(&client, &base, &d.body).await {
                Answer::Http(status, _) if (200..300).contains(&status) => {
                    let mut a = acked.lock().unwrap();
                    a.push(d.event_id.clone());
                    if a.len() == KILL_AFTER {
                        enough.notify_one();
                    }
                }
                Answer::Http(status, body) => refused
                    .lock()
                    .unwrap()
                    .push(format!("{}: {status} {body}", d.event_id)),
                Answer::Lost(_) => {
                    lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    if tokio::time::timeout(Duration::from_secs(120), enough.notified())
        .await
        .is_err()
    {
        panic!(
            "fewer than {KILL_AFTER} acknowledgements; refused: {:?}\n{}",
            refused.lock().unwrap(),
            server.log()
        );
    }
    server.kill();
    while tasks.join_next().await.is_some() {}
    let acked: Vec<String> = acked.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    assert!(
        refused.is_empty(),
        "deliveries refused before the kill: {refused:?}"
    );
    assert!(acked.len() >= KILL_AFTER);
    assert!(
        acked.len() < EVENTS && lost.load(Ordering::Relaxed) > 0,
        "the kill landed after the burst ({} acknowledged): nothing was in flight",
        acked.len()
    );

    // Started again on the same database: what it had acknowledged is there.
    let server = Server::start(&config, dir.path()).await;
    let db = Database::connect(database_url.as_str()).await.unwrap();
    let stored = read_stored(&db).await;
    let applied = applied_once_or_not_at_all(&stored, &deliveries);
    eprintln!(
        "{} of {EVENTS} acknowledged before the kill, {} applied after the restart",
        acked.len(),
        applied.len()
    );
    let missing: Vec<&String> = acked.iter().filter(|id| !applied.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged with 2xx, then lost to the kill: {missing:?}"
    );

    // Stripe redelivers everything: the applied ones are duplicates, the
    // rest apply now, each once.
    let mut answers = Vec::new();
    for d in deliveries.iter() {
        answers.push((d, deliver(&client, &server.base, &d.body).await));
    }
    let mut unexpected = Vec::new();
    for (d, answer) in &answers {
        let want = if applied.contains(&d.event_id) {
            "duplicate"
        } else {
            "applied"
        };
        match answer {
            Answer::Http(200, body) if body["outcome"] == want => {}
            Answer::Http(status, body) => unexpected.push(format!(
                "{}: wanted {want}, got {status} {body}",
                d.event_id
            )),
            Answer::Lost(e) => {
                unexpected.push(format!("{}: wanted {want}, no answer: {e}", d.event_id))
            }
        }
    }
    assert!(unexpected.is_empty(), "{}", unexpected.join("\n"));
    let stored = read_stored(&db).await;
    let applied = applied_once_or_not_at_all(&stored, &deliveries);
    assert_eq!(
        applied.len(),
        EVENTS,
        "every event applied after redelivery"
    );
    db.close().await.ok();
}

on_all_backends!(sigkill_mid_burst_loses_no_acknowledged_event);
