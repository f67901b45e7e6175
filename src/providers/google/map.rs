//! `SubscriptionPurchaseV2` and `ProductPurchase` onto [`PurchaseState`].

use chrono::{DateTime, TimeZone, Utc};
use serde::Deserialize;

use super::GoogleError;
use crate::{
    domain::{Environment, PeriodType, PurchaseStatus, Store},
    providers::PurchaseState,
};

pub(super) struct Mapped {
    pub state: PurchaseState,
    pub needs_ack: bool,
    pub bare_product_id: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct SubscriptionV2 {
    subscription_state: Option<String>,
    acknowledgement_state: Option<String>,
    start_time: Option<DateTime<Utc>>,
    line_items: Vec<LineItem>,
    linked_purchase_token: Option<String>,
    test_purchase: Option<serde_json::Value>,
    canceled_state_context: Option<CanceledStateContext>,
    external_account_identifiers: Option<ExternalAccountIdentifiers>,
    latest_order_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct LineItem {
    product_id: Option<String>,
    expiry_time: Option<DateTime<Utc>>,
    auto_renewing_plan: Option<AutoRenewingPlan>,
    offer_details: Option<OfferDetails>,
    offer_phase: Option<OfferPhase>,
    latest_successful_order_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct AutoRenewingPlan {
    auto_renew_enabled: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct OfferDetails {
    base_plan_id: Option<String>,
    offer_id: Option<String>,
    offer_tags: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct OfferPhase {
    free_trial: Option<serde_json::Value>,
    introductory_price: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct CanceledStateContext {
    user_initiated_cancellation: Option<UserInitiatedCancellation>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct UserInitiatedCancellation {
    cancel_time: Option<DateTime<Utc>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ExternalAccountIdentifiers {
    obfuscated_external_account_id: Option<String>,
}

/// Renewals an order id says happened: Play numbers a subscription's
/// renewal orders `<first order>..0`, `..1`, ..., so `..N` is renewal N + 1
/// and an id without the suffix is the first purchase.
pub(super) fn renewals_of_order(order_id: &str) -> Option<i32> {
    match order_id.rsplit_once("..") {
        None => Some(0),
        Some((base, n)) if !base.is_empty() => n.parse::<i32>().ok()?.checked_add(1),
        Some(_) => None,
    }
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

fn period_type(item: &LineItem) -> PeriodType {
    if let Some(phase) = &item.offer_phase {
        if phase.free_trial.is_some() {
            return PeriodType::Trial;
        }
        if phase.introductory_price.is_some() {
            return PeriodType::Intro;
        }
        return PeriodType::Normal;
    }
    // Older answers have no offerPhase: an offer's tags are all there is.
    match &item.offer_details {
        Some(o) if o.offer_id.is_some() => {
            let tagged = |w: &str| {
                o.offer_tags
                    .iter()
                    .any(|t| t.to_ascii_lowercase().contains(w))
            };
            if tagged("trial") {
                PeriodType::Trial
            } else if tagged("intro") {
                PeriodType::Intro
            } else {
                PeriodType::Normal
            }
        }
        _ => PeriodType::Normal,
    }
}

/// `read_at` stands in for times Google does not give (a pending purchase's
/// start, a cancellation without a time) and is the state's timestamp.
pub(super) fn subscription(
    token: &str,
    raw: serde_json::Value,
    read_at: DateTime<Utc>,
) -> Result<Mapped, GoogleError> {
    let sub = SubscriptionV2::deserialize(&raw)
        .map_err(|e| GoogleError::Malformed(format!("SubscriptionPurchaseV2: {e}")))?;
    // Items of one purchase share a state; the one lasting longest decides
    // how long it grants.
    let item = sub
        .line_items
        .iter()
        .max_by_key(|i| i.expiry_time)
        .ok_or_else(|| GoogleError::Malformed("SubscriptionPurchaseV2 without lineItems".into()))?;
    let bare = non_empty(item.product_id.clone())
        .ok_or_else(|| GoogleError::Malformed("line item without productId".into()))?;
    // `product:basePlan` matches a catalog entry for either form.
    let product_id = match item
        .offer_details
        .as_ref()
        .and_then(|o| non_empty(o.base_plan_id.clone()))
    {
        Some(plan) => format!("{bare}:{plan}"),
        None => bare.clone(),
    };
    let auto_renew = item
        .auto_renewing_plan
        .as_ref()
        .and_then(|p| p.auto_renew_enabled)
        .unwrap_or(false);
    let period_type = period_type(item);
    let state = sub
        .subscription_state
        .as_deref()
        .unwrap_or("SUBSCRIPTION_STATE_UNSPECIFIED");
    let status = match state {
        "SUBSCRIPTION_STATE_ACTIVE" if period_type == PeriodType::Trial => PurchaseStatus::Trialing,
        "SUBSCRIPTION_STATE_ACTIVE" => PurchaseStatus::Active,
        "SUBSCRIPTION_STATE_CANCELED" => PurchaseStatus::Canceled,
        "SUBSCRIPTION_STATE_IN_GRACE_PERIOD" => PurchaseStatus::InGracePeriod,
        "SUBSCRIPTION_STATE_ON_HOLD" => PurchaseStatus::OnHold,
        "SUBSCRIPTION_STATE_PAUSED" => PurchaseStatus::Paused,
        "SUBSCRIPTION_STATE_EXPIRED" | "SUBSCRIPTION_STATE_PENDING_PURCHASE_CANCELED" => {
            PurchaseStatus::Expired
        }
        "SUBSCRIPTION_STATE_PENDING" => PurchaseStatus::Pending,
        other => {
            return Err(GoogleError::Malformed(format!(
                "unknown subscriptionState {other}"
            )));
        }
    };
    let canceled_at = match status {
        PurchaseStatus::Canceled | PurchaseStatus::Expired => {
            sub.canceled_state_context.as_ref().map(|c| {
                c.user_initiated_cancellation
                    .as_ref()
                    .and_then(|u| u.cancel_time)
                    .unwrap_or(read_at)
            })
        }
        _ => None,
    };
    let expires_at = item.expiry_time.or(match status {
        // A pending purchase has no period yet; it grants nothing anyway.
        PurchaseStatus::Pending | PurchaseStatus::Expired => Some(read_at),
        _ => None,
    });
    let expires_at = expires_at.ok_or_else(|| {
        GoogleError::Malformed("subscription line item without expiryTime".into())
    })?;
    let order_id = non_empty(item.latest_successful_order_id.clone())
        .or_else(|| non_empty(sub.latest_order_id.clone()));
    let needs_ack = sub.acknowledgement_state.as_deref() == Some("ACKNOWLEDGEMENT_STATE_PENDING")
        && matches!(
            status,
            PurchaseStatus::Active
                | PurchaseStatus::Trialing
                | PurchaseStatus::Canceled
                | PurchaseStatus::InGracePeriod
        );
    Ok(Mapped {
        state: PurchaseState {
            store: Store::PlayStore,
            store_purchase_id: token.to_string(),
            product_id,
            environment: if sub.test_purchase.is_some() {
                Environment::Sandbox
            } else {
                Environment::Production
            },
            status,
            period_type,
            purchased_at: sub.start_time.unwrap_or(read_at),
            expires_at: Some(expires_at),
            grace_expires_at: (status == PurchaseStatus::InGracePeriod).then_some(expires_at),
            auto_renew: auto_renew
                && matches!(
                    status,
                    PurchaseStatus::Active
                        | PurchaseStatus::Trialing
                        | PurchaseStatus::InGracePeriod
                        | PurchaseStatus::OnHold
                        | PurchaseStatus::Paused
                ),
            canceled_at,
            revoked_at: None,
            renewal_count: order_id.as_deref().and_then(renewals_of_order),
            transaction_id: order_id,
            source_updated_at: read_at,
            bound_customer: non_empty(
                sub.external_account_identifiers
                    .and_then(|e| e.obfuscated_external_account_id),
            ),
            replaces: non_empty(sub.linked_purchase_token).filter(|t| t != token),
            raw,
        },
        needs_ack,
        bare_product_id: bare,
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ProductPurchase {
    purchase_state: Option<i64>,
    acknowledgement_state: Option<i64>,
    purchase_time_millis: Option<String>,
    purchase_type: Option<i64>,
    obfuscated_external_account_id: Option<String>,
    order_id: Option<String>,
}

pub(super) fn millis(s: &str) -> Option<DateTime<Utc>> {
    s.trim()
        .parse::<i64>()
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
}

pub(super) fn product(
    product_id: &str,
    token: &str,
    raw: serde_json::Value,
    read_at: DateTime<Utc>,
) -> Result<Mapped, GoogleError> {
    let p = ProductPurchase::deserialize(&raw)
        .map_err(|e| GoogleError::Malformed(format!("ProductPurchase: {e}")))?;
    let status = match p.purchase_state {
        Some(0) => PurchaseStatus::Active,
        // A one-time product is canceled only by a refund or a void.
        Some(1) => PurchaseStatus::Refunded,
        Some(2) => PurchaseStatus::Pending,
        other => {
            return Err(GoogleError::Malformed(format!(
                "unknown purchaseState {other:?}"
            )));
        }
    };
    Ok(Mapped {
        state: PurchaseState {
            store: Store::PlayStore,
            store_purchase_id: token.to_string(),
            product_id: product_id.to_string(),
            // purchaseType 0: bought from a license-testing account.
            environment: if p.purchase_type == Some(0) {
                Environment::Sandbox
            } else {
                Environment::Production
            },
            status,
            period_type: PeriodType::Normal,
            purchased_at: p
                .purchase_time_millis
                .as_deref()
                .and_then(millis)
                .unwrap_or(read_at),
            expires_at: None,
            grace_expires_at: None,
            auto_renew: false,
            canceled_at: None,
            revoked_at: (status == PurchaseStatus::Refunded).then_some(read_at),
            renewal_count: None,
            transaction_id: non_empty(p.order_id),
            source_updated_at: read_at,
            bound_customer: non_empty(p.obfuscated_external_account_id),
            replaces: None,
            raw,
        },
        needs_ack: p.acknowledgement_state == Some(0) && status == PurchaseStatus::Active,
        bare_product_id: product_id.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn order_id_suffix_counts_renewals() {
        assert_eq!(renewals_of_order("GPA.3345-1234-5678-91234"), Some(0));
        assert_eq!(renewals_of_order("GPA.3345-1234-5678-91234..0"), Some(1));
        assert_eq!(renewals_of_order("GPA.3345-1234-5678-91234..11"), Some(12));
        assert_eq!(renewals_of_order("GPA.3345..x"), None);
        assert_eq!(renewals_of_order("..3"), None);
    }

    #[test]
    fn active_trial_with_base_plan() {
        let m = subscription(
            "tok",
            json!({
                "kind": "androidpublisher#subscriptionPurchaseV2",
                "subscriptionState": "SUBSCRIPTION_STATE_ACTIVE",
                "acknowledgementState": "ACKNOWLEDGEMENT_STATE_PENDING",
                "startTime": "2026-01-01T00:00:00Z",
                "testPurchase": {},
                "externalAccountIdentifiers": {"obfuscatedExternalAccountId": "user-1"},
                "lineItems": [{
                    "productId": "pro_sub",
                    "expiryTime": "2026-01-08T00:00:00.123Z",
                    "autoRenewingPlan": {"autoRenewEnabled": true},
                    "offerDetails": {"basePlanId": "monthly", "offerId": "trial7", "offerTags": []},
                    "offerPhase": {"freeTrial": {}}
                }]
            }),
            at("2026-01-02T00:00:00Z"),
        )
        .unwrap();
        let s = &m.state;
        assert_eq!(s.product_id, "pro_sub:monthly");
        assert_eq!(m.bare_product_id, "pro_sub");
        assert_eq!(s.status, PurchaseStatus::Trialing);
        assert_eq!(s.period_type, PeriodType::Trial);
        assert_eq!(s.environment, Environment::Sandbox);
        assert_eq!(s.bound_customer.as_deref(), Some("user-1"));
        assert!(s.auto_renew && m.needs_ack);
        assert_eq!(s.expires_at, Some(at("2026-01-08T00:00:00.123Z")));
    }

    #[test]
    fn canceled_grace_and_linked() {
        let m = subscription(
            "new",
            json!({
                "subscriptionState": "SUBSCRIPTION_STATE_CANCELED",
                "acknowledgementState": "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED",
                "linkedPurchaseToken": "old",
                "canceledStateContext": {"userInitiatedCancellation": {"cancelTime": "2026-01-03T00:00:00Z"}},
                "lineItems": [{"productId": "pro_sub", "expiryTime": "2026-02-01T00:00:00Z",
                               "autoRenewingPlan": {"autoRenewEnabled": false}}]
            }),
            at("2026-01-04T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(m.state.status, PurchaseStatus::Canceled);
        assert_eq!(m.state.canceled_at, Some(at("2026-01-03T00:00:00Z")));
        assert_eq!(m.state.replaces.as_deref(), Some("old"));
        assert!(!m.needs_ack && !m.state.auto_renew);

        let g = subscription(
            "t",
            json!({"subscriptionState": "SUBSCRIPTION_STATE_IN_GRACE_PERIOD",
                   "lineItems": [{"productId": "p", "expiryTime": "2026-02-01T00:00:00Z",
                                  "autoRenewingPlan": {"autoRenewEnabled": true}}]}),
            at("2026-01-04T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(g.state.status, PurchaseStatus::InGracePeriod);
        assert_eq!(g.state.grace_expires_at, Some(at("2026-02-01T00:00:00Z")));
        assert!(
            subscription(
                "t",
                json!({"subscriptionState": "X", "lineItems": []}),
                Utc::now()
            )
            .is_err()
        );
    }

    #[test]
    fn products() {
        let p = product(
            "pro_lifetime",
            "tok",
            json!({"kind": "androidpublisher#productPurchase", "purchaseState": 0,
                   "acknowledgementState": 0, "purchaseTimeMillis": "1767225600000",
                   "purchaseType": 0, "obfuscatedExternalAccountId": "u"}),
            at("2026-01-02T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(p.state.status, PurchaseStatus::Active);
        assert_eq!(p.state.expires_at, None);
        assert_eq!(p.state.purchased_at, at("2026-01-01T00:00:00Z"));
        assert_eq!(p.state.environment, Environment::Sandbox);
        assert!(p.needs_ack);
        let r = product(
            "x",
            "t",
            json!({"purchaseState": 1, "acknowledgementState": 1}),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(r.state.status, PurchaseStatus::Refunded);
        assert!(r.state.revoked_at.is_some() && !r.needs_ack);
    }
}
