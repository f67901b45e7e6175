//! Entitlement change events: the change log (`entitlement_events`) is the
//! transactional outbox. After commit, the relay publishes its rows to the
//! Redis stream and queues outbound webhooks; the feed hands them to GraphQL
//! subscribers. Consumers deduplicate on `eventId`.

use chrono::{DateTime, SecondsFormat, Utc};
use entities::entitlement_events;
use serde::Serialize;

pub mod feed;
pub mod outbound;
pub mod relay;

/// The shortest time between two reads of the change log by one tail (the
/// relay's sinks, the subscribers' feed) when local commits wake it.
const WAKE_GAP: std::time::Duration = std::time::Duration::from_millis(5);

/// The same for the relay's sinks. A wake after a quiet spell is taken up at
/// once whatever the gap (the last read is long past), so the gap only
/// spaces reads under a steady stream of commits, where each read costs a
/// transaction of its own (on PostgreSQL: begin, turn, read, mark, commit)
/// and a longer one carries more rows: 20 ms adds at most that much to an
/// event's way out under load, where a webhook's own answer takes longer.
const RELAY_GAP: std::time::Duration = std::time::Duration::from_millis(20);

/// The same for the subscribers' feed while nobody subscribes: it only
/// keeps its place in the log then, which a read every 100 ms does as well
/// as one every 5 ms, for a twentieth of the statements under a burst. A
/// subscriber attaching meanwhile waits that much longer for its first
/// event, once.
const IDLE_GAP: std::time::Duration = std::time::Duration::from_millis(100);

/// The feed's gap between reads with `subscribers` listening.
fn feed_gap(subscribers: usize) -> std::time::Duration {
    match subscribers {
        0 => IDLE_GAP,
        _ => WAKE_GAP,
    }
}

/// Waits for a local commit, or `poll` for rows other replicas wrote; then,
/// when the tail's last read began less than `gap` ([`WAKE_GAP`]) ago, for
/// the rest of the gap. Under a burst of commits a tail reads once per gap rather
/// than once per commit (each read is a statement on a reader), and a
/// change still leaves within the gap. `false`: the process is stopping.
async fn next_turn(
    wake: &mut tokio::sync::watch::Receiver<u64>,
    poll: std::time::Duration,
    last_read: tokio::time::Instant,
    gap: std::time::Duration,
) -> bool {
    tokio::select! {
        r = wake.changed() => if r.is_err() { return false },
        _ = tokio::time::sleep(poll) => {}
    }
    tokio::time::sleep_until(last_read + gap).await;
    // Commits during the gap are covered by the read that follows.
    wake.borrow_and_update();
    true
}

/// The published form of one change-log row (DESIGN §5). Statuses are the
/// access level, `ACTIVE` or `EXPIRED`; `oldStatus` is null for a first
/// grant; `reason` is the store status behind the change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntitlementEvent {
    pub event_id: String,
    pub user_id: String,
    pub entitlement: String,
    pub kind: String,
    pub reason: Option<String>,
    pub old_status: Option<String>,
    pub new_status: String,
    #[serde(serialize_with = "rfc3339_millis")]
    pub occurred_at: DateTime<Utc>,
    /// The change-log row id, for ordering; not part of the published JSON.
    #[serde(skip)]
    pub seq: i64,
}

fn rfc3339_millis<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

impl From<&entitlement_events::Model> for EntitlementEvent {
    fn from(m: &entitlement_events::Model) -> Self {
        EntitlementEvent {
            event_id: m.id.to_string(),
            user_id: m.customer_id.clone(),
            entitlement: m.entitlement.clone(),
            kind: m.kind.clone(),
            reason: m.reason.clone(),
            old_status: m.old_status.clone(),
            new_status: m.new_status.clone(),
            occurred_at: m.occurred_at,
            seq: m.id,
        }
    }
}

impl EntitlementEvent {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an event always serialises")
    }
}

#[cfg(test)]
mod tests {
    /// A commit right after a read is taken up only once the gap since
    /// that read has passed: 100 ms for the feed while nobody subscribes to
    /// it, 5 ms while someone does, 20 ms for the relay.
    #[tokio::test]
    async fn a_tail_woken_right_after_a_read_waits_out_its_gap() {
        for (name, gap, at_least) in [
            ("idle feed", super::feed_gap(0), 100),
            ("feed", super::feed_gap(1), 5),
            ("relay", super::RELAY_GAP, 20),
        ] {
            assert_eq!(gap, std::time::Duration::from_millis(at_least), "{name}");
            let (tx, mut rx) = tokio::sync::watch::channel(0u64);
            let read = tokio::time::Instant::now();
            tx.send(1).unwrap();
            assert!(super::next_turn(&mut rx, std::time::Duration::from_secs(60), read, gap).await);
            assert!(read.elapsed() >= gap, "{name}: {:?}", read.elapsed());
        }
    }

    use super::*;
    use chrono::TimeZone;

    #[test]
    fn published_json_has_the_design_fields_and_nothing_else() {
        let ev = EntitlementEvent {
            event_id: "42".into(),
            user_id: "garmin-abc".into(),
            entitlement: "pro".into(),
            kind: "expired".into(),
            reason: Some("expired".into()),
            old_status: Some("ACTIVE".into()),
            new_status: "EXPIRED".into(),
            occurred_at: Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap(),
            seq: 42,
        };
        let v: serde_json::Value = serde_json::from_str(&ev.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "eventId": "42", "userId": "garmin-abc", "entitlement": "pro",
                "kind": "expired", "reason": "expired", "oldStatus": "ACTIVE", "newStatus": "EXPIRED",
                "occurredAt": "2026-11-22T10:00:00.000Z"
            })
        );
    }
}
