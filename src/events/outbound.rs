//! Outbound webhooks, signed as the Standard Webhooks specification says:
//! `webhook-id`, `webhook-timestamp` and `webhook-signature` =
//! `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
//!
//! The relay queues one `outbound_deliveries` row per event and endpoint;
//! the dispatcher (a leased job) POSTs the due ones. At least once: a
//! consumer deduplicates on `webhook-id`, the event's id, as on the stream.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use chrono::{DateTime, SecondsFormat, Utc};
use entities::outbound_deliveries as deliveries;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use super::EntitlementEvent;
use crate::{
    clock::Clock,
    config::{OutboundConfig, Secret},
    db::{Db, delivery_queue},
    error::AppResult,
};

pub const JOB: &str = "outbound";

/// Deliveries read per endpoint and run.
const BATCH: u64 = 100;

/// No new request starts after an endpoint's round has lasted this long:
/// a replica that lost the job's lease stops soon after.
const RUN_BUDGET: Duration = Duration::from_secs(10);

/// The wait before the next attempt, after `attempts` failed ones: roughly
/// the schedule the Standard Webhooks reference implementation uses.
pub fn backoff(attempts: i32) -> chrono::Duration {
    match attempts {
        ..=1 => chrono::Duration::seconds(5),
        2 => chrono::Duration::minutes(5),
        3 => chrono::Duration::minutes(30),
        4 => chrono::Duration::hours(2),
        5 => chrono::Duration::hours(5),
        _ => chrono::Duration::hours(10),
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: String,
    timestamp: String,
    data: &'a EntitlementEvent,
}

/// The JSON body POSTed for one event.
pub fn message_body(ev: &EntitlementEvent) -> String {
    serde_json::to_string(&Envelope {
        kind: format!("entitlement.{}", ev.kind),
        timestamp: ev.occurred_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        data: ev,
    })
    .expect("an envelope always serialises")
}

/// The URL without credentials or query string, for logs.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            format!(
                "{}://{}{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.port().map(|p| format!(":{p}")).unwrap_or_default()
            ) + u.path()
        }
        Err(_) => "<invalid url>".into(),
    }
}

/// The signing key of a `whsec_…` secret; `None` when it is malformed.
pub fn signing_key(secret: &Secret) -> Option<Vec<u8>> {
    crate::keys::webhook_signing_key(secret.expose())
}

/// The `webhook-signature` header value for one message.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{msg_id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[derive(Clone)]
struct Target {
    url: String,
    key: Vec<u8>,
}

/// POSTs due deliveries. Endpoints are served independently, each in event
/// order; an endpoint that fails stops for the round and its other due rows
/// wait for the failed one's retry, so a dead endpoint costs one request per
/// backoff step, not one per queued event.
pub struct Dispatcher {
    db: Db,
    clock: Arc<dyn Clock>,
    http: reqwest::Client,
    targets: Vec<Target>,
    disable_after: chrono::Duration,
    endpoints_known: AtomicBool,
    /// Endpoints with a round under way in this process.
    in_flight: Mutex<HashSet<String>>,
}

/// An endpoint's round under way; dropping it (even on a panic) lets the
/// next tick start another.
struct InFlight {
    dispatcher: Arc<Dispatcher>,
    url: String,
}

impl InFlight {
    fn claim(dispatcher: &Arc<Dispatcher>, url: &str) -> Option<InFlight> {
        let mut set = dispatcher.in_flight.lock().expect("in-flight lock");
        set.insert(url.to_string()).then(|| InFlight {
            dispatcher: dispatcher.clone(),
            url: url.to_string(),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut set) = self.dispatcher.in_flight.lock() {
            set.remove(&self.url);
        }
    }
}

impl Dispatcher {
    pub fn new(
        db: Db,
        clock: Arc<dyn Clock>,
        config: &OutboundConfig,
    ) -> anyhow::Result<Dispatcher> {
        let timeout = Duration::from_secs(config.timeout_secs.max(1));
        let http = reqwest::Client::builder()
            // A redirect is an answer that is not 2xx: the endpoint is
            // misconfigured, and the signed body must not go elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("entitle/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow::anyhow!("outbound webhooks: cannot build the HTTP client: {e}"))?;
        let targets = config
            .endpoints
            .iter()
            .map(|e| {
                signing_key(&e.secret)
                    .map(|key| Target {
                        url: e.url.clone(),
                        key,
                    })
                    .ok_or_else(|| {
                        anyhow::anyhow!("invalid configuration: outbound endpoint secret")
                    })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Dispatcher {
            db,
            clock,
            http,
            targets,
            disable_after: chrono::Duration::days(i64::from(config.disable_after_days)),
            endpoints_known: AtomicBool::new(false),
            in_flight: Mutex::new(HashSet::new()),
        })
    }

    /// Starts a round for every enabled endpoint that has none running and
    /// returns how many it started. Rounds are not awaited: an endpoint
    /// that answers slowly delays only its own deliveries.
    pub async fn run_once(self: &Arc<Self>) -> AppResult<usize> {
        self.ensure_endpoint_rows().await?;
        let urls: Vec<String> = self.targets.iter().map(|t| t.url.clone()).collect();
        let disabled = delivery_queue::disabled_endpoints(&self.db.conn, urls).await?;
        let mut started = 0;
        for t in self.targets.iter().filter(|t| !disabled.contains(&t.url)) {
            let Some(guard) = InFlight::claim(self, &t.url) else {
                continue;
            };
            let this = self.clone();
            let target = t.clone();
            tokio::spawn(async move {
                let _guard = guard;
                if let Err(e) = this.serve_endpoint(&target, Instant::now()).await {
                    tracing::warn!(
                        endpoint = %redacted(&target.url),
                        error = e.for_log(),
                        "outbound webhooks: round failed; retried at the next tick"
                    );
                }
            });
            started += 1;
        }
        Ok(started)
    }

    async fn ensure_endpoint_rows(&self) -> AppResult<()> {
        if self.endpoints_known.load(Ordering::Relaxed) {
            return Ok(());
        }
        let urls: Vec<String> = self.targets.iter().map(|t| t.url.clone()).collect();
        delivery_queue::ensure_endpoints(&self.db.conn, &urls).await?;
        self.endpoints_known.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn serve_endpoint(&self, target: &Target, started: Instant) -> AppResult<usize> {
        let db = &self.db.conn;
        let due = delivery_queue::due(db, &target.url, self.clock.now(), BATCH).await?;
        if due.is_empty() {
            return Ok(0);
        }
        let events: HashMap<i64, EntitlementEvent> = delivery_queue::events_of(db, &due)
            .await?
            .iter()
            .map(|(id, m)| (*id, EntitlementEvent::from(m)))
            .collect();
        let mut delivered = 0;
        for row in &due {
            if started.elapsed() > RUN_BUDGET {
                break;
            }
            let Some(ev) = events.get(&row.event_id) else {
                // Not the endpoint's fault: retried on the row's own schedule.
                self.record_failure(row, "event not in the change log", self.clock.now())
                    .await?;
                continue;
            };
            let now = self.clock.now();
            match self.post(target, ev, now).await {
                Ok(()) => {
                    self.record_success(row, now).await?;
                    delivered += 1;
                }
                Err(reason) => {
                    let retry_at = self.record_failure(row, &reason, now).await?;
                    self.endpoint_failed(target, row.id, now, retry_at).await?;
                    break;
                }
            }
        }
        Ok(delivered)
    }

    /// One signed POST; `Err` holds a short reason, free of secrets.
    async fn post(
        &self,
        target: &Target,
        ev: &EntitlementEvent,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let body = message_body(ev);
        let ts = now.timestamp();
        let signature = sign(&target.key, &ev.event_id, ts, &body);
        let resp = self
            .http
            .post(&target.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &ev.event_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    "timed out".to_string()
                } else if e.is_connect() {
                    "connection failed".to_string()
                } else {
                    "request failed".to_string()
                }
            })?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", status.as_u16()))
        }
    }

    async fn record_success(&self, row: &deliveries::Model, now: DateTime<Utc>) -> AppResult<()> {
        delivery_queue::record_delivered(&self.db.conn, row, row.attempts + 1, now).await
    }

    /// Counts the attempt and schedules the next; returns when it is due.
    async fn record_failure(
        &self,
        row: &deliveries::Model,
        reason: &str,
        now: DateTime<Utc>,
    ) -> AppResult<DateTime<Utc>> {
        let attempts = row.attempts + 1;
        let retry_at = now + backoff(attempts);
        delivery_queue::record_attempt_failed(&self.db.conn, row.id, attempts, reason, retry_at)
            .await?;
        Ok(retry_at)
    }

    /// Marks the endpoint failing, holds its other due rows until the failed
    /// one is retried, and disables it once it has failed for long enough.
    async fn endpoint_failed(
        &self,
        target: &Target,
        failed_row: i64,
        now: DateTime<Utc>,
        retry_at: DateTime<Utc>,
    ) -> AppResult<()> {
        let disabled = delivery_queue::record_endpoint_failed(
            &self.db.conn,
            &target.url,
            failed_row,
            now,
            retry_at,
            now - self.disable_after,
        )
        .await?;
        if disabled {
            tracing::warn!(
                endpoint = %redacted(&target.url),
                days = self.disable_after.num_days(),
                "outbound webhook endpoint disabled after failing every attempt; \
                 its deliveries are kept (`entitle outbound enable <url>` resumes them)"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_specifications_example() {
        // The example of the Standard Webhooks specification.
        let key = signing_key(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn backoff_grows_then_stays_at_ten_hours() {
        let steps: Vec<i64> = (1..=8).map(|n| backoff(n).num_seconds()).collect();
        assert_eq!(
            steps,
            [5, 300, 1_800, 7_200, 18_000, 36_000, 36_000, 36_000]
        );
    }

    #[test]
    fn body_wraps_the_published_event() {
        use chrono::TimeZone;
        let ev = EntitlementEvent {
            event_id: "7".into(),
            user_id: "watch-1".into(),
            entitlement: "pro".into(),
            kind: "granted".into(),
            reason: Some("active".into()),
            old_status: None,
            new_status: "ACTIVE".into(),
            occurred_at: Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap(),
            seq: 7,
        };
        let v: serde_json::Value = serde_json::from_str(&message_body(&ev)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "type": "entitlement.granted",
                "timestamp": "2026-11-22T10:00:00.000Z",
                "data": serde_json::from_str::<serde_json::Value>(&ev.to_json()).unwrap(),
            })
        );
    }

    #[test]
    fn logged_urls_lose_credentials_and_query() {
        assert_eq!(
            redacted("https://user:pw@hooks.example.com:8443/in/abc?token=s3cret"),
            "https://hooks.example.com:8443/in/abc"
        );
        assert_eq!(redacted("not a url"), "<invalid url>");
    }

    #[test]
    fn malformed_secrets_are_refused() {
        assert!(signing_key(&Secret::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).is_none());
        assert!(signing_key(&Secret::new("whsec_not base64!")).is_none());
        assert!(signing_key(&Secret::new("whsec_")).is_none());
    }
}
