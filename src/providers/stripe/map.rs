//! Stripe objects onto [`PurchaseState`] (DESIGN §4).

use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use stripe_shared::{CheckoutSession, Subscription, SubscriptionStatus};

use crate::{
    domain::{Environment, PeriodType, PurchaseStatus, Store},
    providers::PurchaseState,
};

pub fn ts(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(t, 0).unwrap_or(DateTime::UNIX_EPOCH)
}

fn environment(livemode: bool) -> Environment {
    if livemode {
        Environment::Production
    } else {
        Environment::Sandbox
    }
}

/// The customer a Stripe object names in its metadata under the first of
/// `keys` it carries (our `createCheckoutSession` sets `customer_id`; other
/// set-ups use their own key); a value that is not a valid id is ignored.
pub fn metadata_customer(
    m: Option<&std::collections::HashMap<String, String>>,
    keys: &[String],
) -> Option<String> {
    let m = m?;
    keys.iter()
        .filter_map(|k| m.get(k))
        .find(|s| crate::domain::ExternalId::parse(s).is_ok())
        .cloned()
}

/// The same for an object held as JSON (invoices, charges, disputes): its
/// own metadata, then the subscription metadata an invoice copies.
pub fn json_metadata_customer(object: &Value, keys: &[String]) -> Option<String> {
    [
        "/metadata",
        "/parent/subscription_details/metadata",
        "/subscription_details/metadata",
    ]
    .iter()
    .filter_map(|p| object.pointer(p)?.as_object())
    .find_map(|m| {
        keys.iter()
            .filter_map(|k| m.get(k)?.as_str())
            .find(|s| crate::domain::ExternalId::parse(s).is_ok())
            .map(str::to_string)
    })
}

/// The subscription's state. `observed_at` is when we read it (the API
/// request's start, or the event's `created` for an embedded object): the
/// subscription object has no "updated" time of its own.
pub fn subscription_state(
    sub: &Subscription,
    grace: Option<Duration>,
    observed_at: DateTime<Utc>,
    bound_customer: Option<String>,
) -> Option<PurchaseState> {
    // Stripe moved the billing period onto the items; one item carries the
    // catalog price.
    let item = sub.items.data.first()?;
    let period_start = sub
        .items
        .data
        .iter()
        .map(|i| i.current_period_start)
        .min()
        .map(ts)?;
    let period_end = sub
        .items
        .data
        .iter()
        .map(|i| i.current_period_end)
        .max()
        .map(ts)?;
    // A `cancel_at` beyond this period still renews until then.
    let ends_at_period_end =
        sub.cancel_at_period_end || sub.cancel_at.is_some_and(|c| ts(c) <= period_end);
    let access_end = match sub.cancel_at.map(ts) {
        Some(c) if c < period_end => c,
        _ => period_end,
    };
    let mut period_type = PeriodType::Normal;
    let mut grace_expires_at = None;
    let mut auto_renew = !ends_at_period_end;
    let (status, expires_at) = match &sub.status {
        SubscriptionStatus::Trialing => {
            period_type = PeriodType::Trial;
            let end = sub.trial_end.map(ts).unwrap_or(access_end);
            if ends_at_period_end {
                (PurchaseStatus::Canceled, end)
            } else {
                (PurchaseStatus::Trialing, end)
            }
        }
        SubscriptionStatus::Active if ends_at_period_end => (PurchaseStatus::Canceled, access_end),
        SubscriptionStatus::Active => (PurchaseStatus::Active, period_end),
        // The renewal failed: the new period started unpaid, Stripe retries.
        SubscriptionStatus::PastDue => match grace.filter(|g| *g > Duration::zero()) {
            Some(g) => {
                grace_expires_at = Some(period_start + g);
                (PurchaseStatus::InGracePeriod, period_end)
            }
            None => (PurchaseStatus::InBillingRetry, period_end),
        },
        SubscriptionStatus::Unpaid => (PurchaseStatus::OnHold, period_start),
        SubscriptionStatus::Paused => (PurchaseStatus::Paused, period_start),
        SubscriptionStatus::Incomplete => (PurchaseStatus::Pending, period_end),
        SubscriptionStatus::IncompleteExpired => {
            auto_renew = false;
            (PurchaseStatus::Expired, ts(sub.created))
        }
        SubscriptionStatus::Canceled => {
            auto_renew = false;
            let end = sub
                .ended_at
                .or(sub.canceled_at)
                .map(ts)
                .unwrap_or(observed_at);
            (PurchaseStatus::Expired, end)
        }
        _ => return None,
    };
    let customer = sub.customer.id().to_string();
    Some(PurchaseState {
        store: Store::Stripe,
        store_purchase_id: sub.id.to_string(),
        product_id: item.price.id.to_string(),
        environment: environment(sub.livemode),
        status,
        period_type,
        purchased_at: ts(sub.start_date),
        expires_at: Some(expires_at),
        grace_expires_at,
        auto_renew,
        canceled_at: sub.canceled_at.map(ts),
        revoked_at: None,
        renewal_count: None,
        transaction_id: None,
        source_updated_at: observed_at,
        bound_customer,
        replaces: None,
        raw: json!({
            "object": "subscription",
            "id": sub.id.as_str(),
            "customer": customer,
            "status": sub.status.as_str(),
            "price": item.price.id.as_str(),
            "current_period_start": period_start.timestamp(),
            "current_period_end": period_end.timestamp(),
            "cancel_at_period_end": sub.cancel_at_period_end,
            "cancel_at": sub.cancel_at,
            "canceled_at": sub.canceled_at,
            "ended_at": sub.ended_at,
            "trial_end": sub.trial_end,
            "latest_invoice": sub.latest_invoice.as_ref().and_then(|i| i.id().as_ref().map(|id| id.to_string())),
            "livemode": sub.livemode,
            "metadata": sub.metadata,
        }),
    })
}

/// A paid one-time Checkout Session for a lifetime product: access with no
/// end until refunded. Keyed by the session id.
pub fn lifetime_state(
    session: &CheckoutSession,
    price_id: &str,
    bound_customer: String,
    observed_at: DateTime<Utc>,
) -> PurchaseState {
    PurchaseState {
        store: Store::Stripe,
        store_purchase_id: session.id.to_string(),
        product_id: price_id.to_string(),
        environment: environment(session.livemode),
        status: PurchaseStatus::Active,
        period_type: PeriodType::Normal,
        purchased_at: ts(session.created),
        expires_at: None,
        grace_expires_at: None,
        auto_renew: false,
        canceled_at: None,
        revoked_at: None,
        renewal_count: None,
        transaction_id: None,
        source_updated_at: observed_at,
        bound_customer: Some(bound_customer),
        replaces: None,
        raw: json!({
            "object": "checkout.session",
            "id": session.id.as_str(),
            "customer": session.customer.as_ref().map(|c| c.id().to_string()),
            "mode": session.mode.as_str(),
            "payment_status": session.payment_status.as_str(),
            "payment_intent": session.payment_intent.as_ref().map(|p| p.id().to_string()),
            "price": price_id,
            "livemode": session.livemode,
            "metadata": session.metadata,
        }),
    }
}

/// The stored purchase, refunded at `refunded_at`. Its `source_updated_at`
/// never goes backwards, so the refund is not mistaken for stale state.
pub fn refunded_state(
    p: &entities::purchases::Model,
    refunded_at: DateTime<Utc>,
    charge: &Value,
) -> Option<PurchaseState> {
    Some(PurchaseState {
        store: Store::Stripe,
        store_purchase_id: p.store_purchase_id.clone(),
        product_id: p.product_id.clone(),
        environment: p.environment.parse().ok()?,
        status: PurchaseStatus::Refunded,
        period_type: p.period_type.parse().ok()?,
        purchased_at: p.purchased_at,
        expires_at: p.expires_at,
        grace_expires_at: None,
        auto_renew: false,
        canceled_at: p.canceled_at.or(Some(refunded_at)),
        revoked_at: Some(refunded_at),
        renewal_count: None,
        transaction_id: None,
        source_updated_at: p.source_updated_at.max(refunded_at),
        bound_customer: None,
        replaces: None,
        raw: {
            let mut raw = p.raw.clone().unwrap_or_else(|| json!({}));
            if let Some(o) = raw.as_object_mut() {
                o.insert(
                    "refund".into(),
                    json!({ "charge": charge.get("id"), "refunded_at": refunded_at.timestamp() }),
                );
            }
            raw
        },
    })
}

/// The stored purchase with its `raw.dispute` set to `dispute`'s id and
/// status, remembering the status the purchase had before any dispute.
fn with_dispute(p: &entities::purchases::Model, dispute: &Value) -> Value {
    let mut raw = p.raw.clone().unwrap_or_else(|| json!({}));
    // A purchase a dispute already revoked keeps the status it had before.
    let previous = raw
        .pointer("/dispute/previous_status")
        .filter(|_| p.status == PurchaseStatus::Revoked.as_str())
        .cloned()
        .unwrap_or_else(|| json!(p.status));
    if let Some(o) = raw.as_object_mut() {
        o.insert(
            "dispute".into(),
            json!({
                "id": dispute.get("id"),
                "status": dispute.get("status"),
                "previous_status": previous,
            }),
        );
    }
    raw
}

fn stored_state(p: &entities::purchases::Model) -> Option<PurchaseState> {
    Some(PurchaseState {
        store: Store::Stripe,
        store_purchase_id: p.store_purchase_id.clone(),
        product_id: p.product_id.clone(),
        environment: p.environment.parse().ok()?,
        status: p.status.parse().ok()?,
        period_type: p.period_type.parse().ok()?,
        purchased_at: p.purchased_at,
        expires_at: p.expires_at,
        grace_expires_at: p.grace_expires_at,
        auto_renew: p.auto_renew,
        canceled_at: p.canceled_at,
        revoked_at: p.revoked_at,
        renewal_count: None,
        transaction_id: None,
        source_updated_at: p.source_updated_at,
        bound_customer: None,
        replaces: None,
        raw: p.raw.clone().unwrap_or_else(|| json!({})),
    })
}

/// The stored purchase, revoked at `at` by a chargeback (`dispute`).
pub fn disputed_state(
    p: &entities::purchases::Model,
    at: DateTime<Utc>,
    dispute: &Value,
) -> Option<PurchaseState> {
    let mut s = stored_state(p)?;
    s.raw = with_dispute(p, dispute);
    s.status = PurchaseStatus::Revoked;
    s.revoked_at = Some(p.revoked_at.unwrap_or(at));
    s.auto_renew = false;
    s.grace_expires_at = None;
    s.source_updated_at = p.source_updated_at.max(at);
    Some(s)
}

/// The stored purchase as it stood before the dispute that revoked it,
/// which the merchant won at `at`.
pub fn dispute_won_state(
    p: &entities::purchases::Model,
    at: DateTime<Utc>,
    dispute: &Value,
) -> Option<PurchaseState> {
    let mut s = stored_state(p)?;
    s.raw = with_dispute(p, dispute);
    s.status = s
        .raw
        .pointer("/dispute/previous_status")
        .and_then(Value::as_str)
        .and_then(|st| st.parse().ok())
        .unwrap_or(PurchaseStatus::Active);
    s.auto_renew = s.status == PurchaseStatus::Active && s.expires_at.is_some();
    s.revoked_at = None;
    // Strictly after the revocation, so it is not taken for older state.
    let after_revoke = p.revoked_at.map(|r| r + Duration::seconds(1));
    s.source_updated_at = [Some(p.source_updated_at), Some(at), after_revoke]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(at);
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_sub(edit: impl FnOnce(&mut Value)) -> Subscription {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/vectors/stripe/object.subscription.json"
        );
        let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        v["status"] = json!("active");
        v["cancel_at"] = Value::Null;
        v["cancel_at_period_end"] = json!(false);
        v["items"]["data"][0]["current_period_start"] = json!(1_000);
        v["items"]["data"][0]["current_period_end"] = json!(2_000);
        edit(&mut v);
        miniserde::json::from_str(&v.to_string()).expect("fixture parses")
    }

    fn state(sub: &Subscription, grace: Option<Duration>) -> PurchaseState {
        subscription_state(sub, grace, ts(1_500), None).unwrap()
    }

    #[test]
    fn the_fixture_maps() {
        let s = state(&fixture_sub(|_| {}), None);
        assert_eq!(s.status, PurchaseStatus::Active);
        assert_eq!(s.expires_at, Some(ts(2_000)));
        assert!(s.auto_renew);
        assert_eq!(s.environment, Environment::Sandbox);
        assert_eq!(s.product_id, "price_1PgafmB7WZ01zgkW6dKueIc5");
    }

    #[test]
    fn cancel_at_in_this_period_ends_it_and_later_does_not() {
        let s = state(&fixture_sub(|v| v["cancel_at"] = json!(1_800)), None);
        assert_eq!(
            (s.status, s.expires_at, s.auto_renew),
            (PurchaseStatus::Canceled, Some(ts(1_800)), false)
        );
        let s = state(&fixture_sub(|v| v["cancel_at"] = json!(9_000)), None);
        assert_eq!((s.status, s.auto_renew), (PurchaseStatus::Active, true));
        let s = state(
            &fixture_sub(|v| v["cancel_at_period_end"] = json!(true)),
            None,
        );
        assert_eq!(
            (s.status, s.expires_at),
            (PurchaseStatus::Canceled, Some(ts(2_000)))
        );
    }

    #[test]
    fn past_due_is_retry_or_grace_from_the_unpaid_period_start() {
        let sub = fixture_sub(|v| v["status"] = json!("past_due"));
        assert_eq!(state(&sub, None).status, PurchaseStatus::InBillingRetry);
        let s = state(&sub, Some(Duration::seconds(100)));
        assert_eq!(s.status, PurchaseStatus::InGracePeriod);
        assert_eq!(s.grace_expires_at, Some(ts(1_100)));
    }

    #[test]
    fn ended_states_do_not_grant() {
        for (status, expected) in [
            ("canceled", PurchaseStatus::Expired),
            ("incomplete_expired", PurchaseStatus::Expired),
            ("unpaid", PurchaseStatus::OnHold),
            ("paused", PurchaseStatus::Paused),
            ("incomplete", PurchaseStatus::Pending),
        ] {
            let s = state(&fixture_sub(|v| v["status"] = json!(status)), None);
            assert_eq!(s.status, expected, "{status}");
        }
    }
}
