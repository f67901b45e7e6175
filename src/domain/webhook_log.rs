//! What the webhook log's outcomes mean: which recorded store notifications
//! changed nothing for want of something an operator can fix (a product in
//! the catalog, a customer, the store's API being up), and so are worth
//! running again.

/// The store's API failed while the notification was processed; the store
/// delivers it again, and an operator may replay it.
pub const FAILED: &str = "failed";
/// A paid event for a product the catalog does not map.
pub const UNKNOWN_PRODUCT: &str = "unknown_product";
/// A paid event that names no customer we know.
pub const NO_CUSTOMER: &str = "no_customer";

/// Outcomes a replay may change: the event was verified and recorded, but
/// matched nothing. Every other outcome applied (or deliberately ignored)
/// the event, and replaying it changes nothing.
pub const REPLAYABLE: &[&str] = &[
    FAILED,
    UNKNOWN_PRODUCT,
    NO_CUSTOMER,
    "unmatched",
    "unmatched_refund",
    "unmatched_dispute",
    "unattributed",
    "unknown_purchase",
];

pub fn is_replayable(outcome: &str) -> bool {
    REPLAYABLE.contains(&outcome)
}

/// Whether a stored payload is still the event (retention replaces it with
/// a marker once the event is old).
pub fn payload_kept(payload: &serde_json::Value) -> bool {
    payload.get("cleared").and_then(serde_json::Value::as_bool) != Some(true)
}

/// The longest window the overview charts.
pub const OVERVIEW_MAX_DAYS: i32 = 90;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_events_are_not_replayable() {
        for o in [
            "applied",
            "refunded",
            "renewal_counted",
            "duplicate",
            "held",
        ] {
            assert!(!is_replayable(o), "{o}");
        }
        for o in [FAILED, UNKNOWN_PRODUCT, NO_CUSTOMER, "unmatched"] {
            assert!(is_replayable(o), "{o}");
        }
    }

    #[test]
    fn cleared_payloads_are_recognised() {
        assert!(!payload_kept(&serde_json::json!({ "cleared": true })));
        assert!(payload_kept(&serde_json::json!({ "id": "evt_1" })));
    }
}
