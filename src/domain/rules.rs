//! The rules every ingest path applies to a store's report before it
//! touches a stored purchase, whichever way the report came (webhook,
//! submission, reconciliation, refresh, replay): stores deliver late, twice
//! and out of order, so what a report may overwrite is decided here, once.

use chrono::{DateTime, Utc};

use super::PurchaseStatus;

/// A purchase's state as far as ordering is concerned: what it is, as of
/// when the store said so, and when it was refunded or revoked.
#[derive(Clone, Copy, Debug)]
pub struct Version {
    pub status: PurchaseStatus,
    /// The store's own timestamp of this state.
    pub source_updated_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A refund or revocation is final: no later report of the same purchase
/// undoes it, short of a new period the store says was paid after it.
pub fn is_final(status: PurchaseStatus) -> bool {
    matches!(status, PurchaseStatus::Refunded | PurchaseStatus::Revoked)
}

/// Whether `incoming` must not overwrite `stored`: it is older, or it
/// predates the refund or revocation that made `stored` final (a
/// renewal notification delivered after the refund it preceded).
pub fn is_stale(stored: Version, incoming: Version) -> bool {
    stored.source_updated_at > incoming.source_updated_at
        || (is_final(stored.status)
            && !is_final(incoming.status)
            && stored
                .revoked_at
                .is_some_and(|r| incoming.source_updated_at <= r))
}

/// Stripe reports a subscription's state without a refund in it: a
/// refunded or disputed-and-lost subscription stands until Stripe reports a
/// period that ends after the refunded one (a period paid after it).
pub fn refund_stands(
    stored_status: PurchaseStatus,
    stored_expires_at: Option<DateTime<Utc>>,
    incoming_expires_at: Option<DateTime<Utc>>,
) -> bool {
    is_final(stored_status) && incoming_expires_at <= stored_expires_at
}

/// When a purchase already final is reported again, the refund keeps the
/// time it was first applied at: a second report of the same refund
/// (the notification, then the voided-purchases list) must not move it.
pub fn kept_revocation(
    stored_revoked_at: Option<DateTime<Utc>>,
    incoming: Version,
) -> Option<DateTime<Utc>> {
    if is_final(incoming.status) {
        stored_revoked_at.or(incoming.revoked_at)
    } else {
        stored_revoked_at
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};

    use super::*;

    fn t(h: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + Duration::hours(h)
    }

    fn v(status: PurchaseStatus, at: i64, revoked: Option<i64>) -> Version {
        Version {
            status,
            source_updated_at: t(at),
            revoked_at: revoked.map(t),
        }
    }

    #[test]
    fn older_reports_are_stale_newer_and_equal_are_not() {
        let stored = v(PurchaseStatus::Active, 10, None);
        assert!(is_stale(stored, v(PurchaseStatus::Expired, 9, None)));
        assert!(!is_stale(stored, v(PurchaseStatus::Expired, 10, None)));
        assert!(!is_stale(stored, v(PurchaseStatus::Expired, 11, None)));
    }

    #[test]
    fn a_refund_is_final_against_reports_from_before_it() {
        let refunded = v(PurchaseStatus::Refunded, 5, Some(8));
        // A renewal report signed before the refund: stale even though its
        // own timestamp is newer than the stored state's.
        assert!(is_stale(refunded, v(PurchaseStatus::Active, 7, None)));
        assert!(is_stale(refunded, v(PurchaseStatus::Active, 8, None)));
        // A period the store reports after the refund stands.
        assert!(!is_stale(refunded, v(PurchaseStatus::Active, 9, None)));
        // Another refund report is never held back by the first.
        assert!(!is_stale(refunded, v(PurchaseStatus::Revoked, 7, Some(7))));
        assert!(is_final(PurchaseStatus::Revoked));
        assert!(!is_final(PurchaseStatus::Expired));
    }

    #[test]
    fn a_stripe_refund_stands_until_a_later_period() {
        assert!(refund_stands(
            PurchaseStatus::Refunded,
            Some(t(30)),
            Some(t(30))
        ));
        assert!(!refund_stands(
            PurchaseStatus::Refunded,
            Some(t(30)),
            Some(t(60))
        ));
        assert!(!refund_stands(
            PurchaseStatus::Active,
            Some(t(30)),
            Some(t(1))
        ));
    }

    #[test]
    fn a_refund_reported_again_keeps_its_first_time() {
        let again = v(PurchaseStatus::Refunded, 20, Some(20));
        assert_eq!(kept_revocation(Some(t(5)), again), Some(t(5)));
        assert_eq!(kept_revocation(None, again), Some(t(20)));
        let renewal = v(PurchaseStatus::Active, 20, None);
        assert_eq!(kept_revocation(Some(t(5)), renewal), Some(t(5)));
    }
}
