//! What the webhook log's outcomes mean: which recorded store notifications
//! changed nothing for want of something an operator can fix (a product in
//! the catalog, a customer, the store's API being up), and so are worth
//! running again.

super::types::string_enum!(
    /// What became of one store notification: the value recorded in the
    /// webhook log, counted in the metrics and answered to the store. Every
    /// store's ingest path names its outcome with it, so the stores share
    /// one set of names.
    WebhookOutcome {
        /// The store's API failed while the notification was processed; the
        /// store delivers it again, and an operator may replay it.
        Failed => "failed",
        /// Seen before; nothing recorded or changed.
        Duplicate => "duplicate",
        Applied => "applied",
        /// Older than the state we hold; recorded, changed nothing.
        Stale => "stale",
        /// About a purchase no customer here owns or is named by: held for
        /// the first one who is, or who submits it.
        Held => "held",
        /// A kind of notification that changes no purchase.
        Ignored => "ignored",
        /// A store's test notification.
        Test => "test",
        /// A paid event for a product the catalog does not map.
        UnknownProduct => "unknown_product",
        /// A paid event that names no customer we know.
        NoCustomer => "no_customer",
        /// Names no purchase, product or customer we know.
        Unmatched => "unmatched",
        UnmatchedRefund => "unmatched_refund",
        UnmatchedDispute => "unmatched_dispute",
        /// A refund of a purchase neither stored nor held here.
        Unattributed => "unattributed",
        /// The store no longer knows the purchase.
        UnknownPurchase => "unknown_purchase",
        /// Which store customer a customer is, remembered; nothing applied.
        Bound => "bound",
        /// One more paid renewal counted on a subscription we hold.
        RenewalCounted => "renewal_counted",
        Refunded => "refunded",
        AlreadyRefunded => "already_refunded",
        /// A refunded purchase stays refunded whatever a later state says.
        RefundStands => "refund_stands",
        AlreadyEnded => "already_ended",
        Disputed => "disputed",
        DisputeWon => "dispute_won",
        DisputeLost => "dispute_lost",
        /// An asynchronous payment; its success or failure follows.
        AwaitingPayment => "awaiting_payment",
        PaymentFailed => "payment_failed",
        PartialRefund => "partial_refund",
        NoSubscription => "no_subscription",
        NotSubscription => "not_subscription",
        NotLifetime => "not_lifetime",
        UnknownStatus => "unknown_status",
        /// A hint the store's API would have to confirm, and it is not
        /// configured.
        HintWithoutApi => "hint_without_api",
    }
);

impl WebhookOutcome {
    /// Outcomes a replay may change: the event was verified and recorded,
    /// but matched nothing. Every other outcome applied (or deliberately
    /// ignored) the event, and replaying it changes nothing.
    pub const REPLAYABLE: &'static [WebhookOutcome] = &[
        WebhookOutcome::Failed,
        WebhookOutcome::UnknownProduct,
        WebhookOutcome::NoCustomer,
        WebhookOutcome::Unmatched,
        WebhookOutcome::UnmatchedRefund,
        WebhookOutcome::UnmatchedDispute,
        WebhookOutcome::Unattributed,
        WebhookOutcome::UnknownPurchase,
    ];

    pub fn is_replayable(self) -> bool {
        Self::REPLAYABLE.contains(&self)
    }

    /// A store's state applied to a purchase, or found older than ours.
    pub fn applied(stale: bool) -> Self {
        if stale {
            WebhookOutcome::Stale
        } else {
            WebhookOutcome::Applied
        }
    }
}

/// A recorded outcome, as stored: one this build does not name (an older
/// release's) is not replayable.
pub fn is_replayable(outcome: &str) -> bool {
    outcome
        .parse::<WebhookOutcome>()
        .is_ok_and(WebhookOutcome::is_replayable)
}

/// The replayable outcomes' names, for filters and messages.
pub fn replayable_names() -> impl Iterator<Item = &'static str> {
    WebhookOutcome::REPLAYABLE.iter().map(|o| o.as_str())
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
        for o in ["failed", "unknown_product", "no_customer", "unmatched"] {
            assert!(is_replayable(o), "{o}");
        }
        assert!(!is_replayable("processed"));
    }

    #[test]
    fn outcomes_round_trip_and_keep_their_recorded_names() {
        for o in WebhookOutcome::ALL {
            assert_eq!(o.as_str().parse::<WebhookOutcome>(), Ok(*o));
            assert_eq!(o.to_string(), o.as_str());
        }
        // The names already stored in webhook logs, counted in metrics and
        // answered to stores: renaming one orphans history.
        let mut names: Vec<&str> = WebhookOutcome::ALL.iter().map(|o| o.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "already_ended",
                "already_refunded",
                "applied",
                "awaiting_payment",
                "bound",
                "dispute_lost",
                "dispute_won",
                "disputed",
                "duplicate",
                "failed",
                "held",
                "hint_without_api",
                "ignored",
                "no_customer",
                "no_subscription",
                "not_lifetime",
                "not_subscription",
                "partial_refund",
                "payment_failed",
                "refund_stands",
                "refunded",
                "renewal_counted",
                "stale",
                "test",
                "unattributed",
                "unknown_product",
                "unknown_purchase",
                "unknown_status",
                "unmatched",
                "unmatched_dispute",
                "unmatched_refund",
            ]
        );
        assert_eq!(
            replayable_names().collect::<Vec<_>>(),
            [
                "failed",
                "unknown_product",
                "no_customer",
                "unmatched",
                "unmatched_refund",
                "unmatched_dispute",
                "unattributed",
                "unknown_purchase",
            ]
        );
    }

    #[test]
    fn unknown_names_do_not_parse() {
        assert!("processed".parse::<WebhookOutcome>().is_err());
        assert!("Applied".parse::<WebhookOutcome>().is_err());
        assert!("".parse::<WebhookOutcome>().is_err());
    }

    #[test]
    fn cleared_payloads_are_recognised() {
        assert!(!payload_kept(&serde_json::json!({ "cleared": true })));
        assert!(payload_kept(&serde_json::json!({ "id": "evt_1" })));
    }
}
