//! What an offline entitlement token says: a pure function of a snapshot and
//! the instant it is issued. Signing lives in `service::tokens`.

use std::{
    collections::BTreeMap,
    hash::{Hash, Hasher},
};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{PaidStatus, Snapshot};

/// The claims of an entitlement token. Deliberately nothing else: no
/// receipts, store or product ids, e-mail or attributes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenClaims {
    pub iss: String,
    pub aud: String,
    /// The customer.
    pub sub: String,
    /// The device, when the token was asked for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    pub iat: i64,
    pub exp: i64,
    pub paid_status: PaidStatus,
    /// Each active entitlement with the end of its access in unix seconds
    /// (`None`: lifetime). A verifier grants a key only while both `exp`
    /// and its own end lie ahead.
    pub ent: BTreeMap<String, Option<i64>>,
}

/// The part of a snapshot a token carries: what access there is and until when.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenState {
    pub paid_status: PaidStatus,
    pub ent: BTreeMap<String, Option<i64>>,
}

impl TokenState {
    pub fn of(snapshot: &Snapshot) -> TokenState {
        TokenState {
            paid_status: snapshot.paid_status,
            ent: snapshot
                .entitlements
                .iter()
                .filter(|e| e.is_active)
                .map(|e| (e.key.clone(), e.expires_at.map(|t| t.timestamp())))
                .collect(),
        }
    }

    /// Equal states give equal fingerprints, so a signed token can be reused
    /// until the state (or the time bucket) changes.
    pub fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }

    pub fn claims(
        &self,
        issuer: &str,
        audience: &str,
        customer_id: &str,
        device_id: Option<&str>,
        now: DateTime<Utc>,
        offline_secs: u64,
    ) -> TokenClaims {
        let iat = now.timestamp();
        TokenClaims {
            iss: issuer.to_string(),
            aud: audience.to_string(),
            sub: customer_id.to_string(),
            dev: device_id.map(str::to_string),
            iat,
            exp: iat.saturating_add(i64::try_from(offline_secs).unwrap_or(i64::MAX)),
            paid_status: self.paid_status,
            ent: self.ent.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};

    use super::*;
    use crate::domain::{EntitlementState, PeriodType, PurchaseStatus, Store};

    fn ent(key: &str, active: bool, end: Option<DateTime<Utc>>) -> EntitlementState {
        EntitlementState {
            key: key.into(),
            is_active: active,
            expires_at: end,
            will_renew: true,
            store: Some(Store::AppStore),
            product_id: Some("com.example.secret.product".into()),
            period_type: Some(PeriodType::Normal),
            status: Some(PurchaseStatus::Active),
            grace_period_expires_at: None,
            purchase_id: Some(42),
        }
    }

    #[test]
    fn claims_carry_active_entitlements_with_their_own_end_and_nothing_else() {
        let now = Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0).unwrap();
        let soon = now + Duration::hours(5);
        let snap = Snapshot {
            entitlements: vec![
                ent("pro", true, Some(soon)),
                ent("maps", true, None),
                ent("old", false, Some(now - Duration::days(1))),
            ],
            paid_status: PaidStatus::Paid,
            trial_ends_at: None,
        };
        let c = TokenState::of(&snap).claims("iss", "aud", "cust", Some("dev1"), now, 3 * 86_400);
        assert_eq!(c.exp - c.iat, 3 * 86_400);
        assert_eq!(c.ent.len(), 2, "lapsed entitlements are left out");
        assert_eq!(
            c.ent["pro"],
            Some(soon.timestamp()),
            "ends before exp: carried"
        );
        assert_eq!(c.ent["maps"], None, "lifetime");
        let json = serde_json::to_value(&c).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "aud",
                "dev",
                "ent",
                "exp",
                "iat",
                "iss",
                "paid_status",
                "sub"
            ]
        );
        assert_eq!(json["paid_status"], "paid");
        assert!(!json.to_string().contains("com.example.secret.product"));
        let no_dev = TokenState::of(&snap).claims("iss", "aud", "cust", None, now, 60);
        assert!(serde_json::to_value(&no_dev).unwrap().get("dev").is_none());
    }

    #[test]
    fn fingerprint_follows_the_state() {
        let now = Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0).unwrap();
        let mut snap = Snapshot {
            entitlements: vec![ent("pro", true, Some(now + Duration::days(1)))],
            paid_status: PaidStatus::Paid,
            trial_ends_at: None,
        };
        let a = TokenState::of(&snap).fingerprint();
        assert_eq!(a, TokenState::of(&snap.clone()).fingerprint());
        snap.entitlements[0].is_active = false;
        snap.paid_status = PaidStatus::Expired;
        assert_ne!(a, TokenState::of(&snap).fingerprint());
    }
}
