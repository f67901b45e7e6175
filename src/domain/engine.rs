use chrono::{DateTime, Utc};

use super::{
    Catalog, Environment, EventKind, PaidStatus, PeriodType, PurchaseStatus, STATUS_ACTIVE,
    STATUS_EXPIRED, Store,
};

/// What the engine needs to know of one purchase, whatever its store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PurchaseFacts {
    pub id: i64,
    pub store: Store,
    pub product_id: String,
    pub environment: Environment,
    pub status: PurchaseStatus,
    pub period_type: PeriodType,
    pub purchased_at: DateTime<Utc>,
    /// `None` is a lifetime purchase.
    pub expires_at: Option<DateTime<Utc>>,
    pub grace_expires_at: Option<DateTime<Utc>>,
    pub auto_renew: bool,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// How long a purchase grants access from `now`. Ordered: no access, then
/// access until an instant (later is greater), then access with no end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    None,
    Until(DateTime<Utc>),
    Forever,
}

impl PurchaseFacts {
    /// DESIGN §4's status table. Access intervals are half-open: at the exact
    /// expiry instant access has ended.
    pub fn access(&self, now: DateTime<Utc>) -> Access {
        let revoked_by = self.revoked_at.filter(|r| *r <= now);
        if revoked_by.is_some() {
            return Access::None;
        }
        let until = |end: Option<DateTime<Utc>>| match end {
            None => Access::Forever,
            Some(e) if now < e => Access::Until(e),
            Some(_) => Access::None,
        };
        // A revocation scheduled for later still cuts the period short.
        let cap = |a: Access| match (a, self.revoked_at) {
            (Access::Until(e), Some(r)) => Access::Until(e.min(r)),
            (Access::Forever, Some(r)) => Access::Until(r),
            (a, _) => a,
        };
        match self.status {
            PurchaseStatus::Active | PurchaseStatus::Trialing | PurchaseStatus::Canceled => {
                cap(until(self.expires_at))
            }
            PurchaseStatus::InGracePeriod => match self.grace_expires_at.or(self.expires_at) {
                Some(g) if now < g => cap(Access::Until(g)),
                _ => Access::None,
            },
            PurchaseStatus::Refunded | PurchaseStatus::Revoked => match self.revoked_at {
                // Refund recorded ahead of its effective time: access until then.
                Some(r) if now < r => cap(until(self.expires_at)),
                _ => Access::None,
            },
            PurchaseStatus::InBillingRetry
            | PurchaseStatus::OnHold
            | PurchaseStatus::Paused
            | PurchaseStatus::Expired
            | PurchaseStatus::Pending => Access::None,
        }
    }

    /// The status to show for this purchase at `now`: a period that ran out
    /// reads as expired even when the store has not said so yet.
    pub fn effective_status(&self, now: DateTime<Utc>) -> PurchaseStatus {
        if self.revoked_at.is_some_and(|r| r <= now)
            && !matches!(
                self.status,
                PurchaseStatus::Refunded | PurchaseStatus::Revoked
            )
        {
            return PurchaseStatus::Revoked;
        }
        match (self.status, self.access(now)) {
            (
                PurchaseStatus::Active
                | PurchaseStatus::Trialing
                | PurchaseStatus::Canceled
                | PurchaseStatus::InGracePeriod,
                Access::None,
            ) => PurchaseStatus::Expired,
            (s, _) => s,
        }
    }

    /// When this purchase last mattered, to pick the most telling lapsed one.
    fn last_relevant_at(&self) -> DateTime<Utc> {
        [self.revoked_at, self.grace_expires_at, self.expires_at]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(self.purchased_at)
    }
}

/// One entitlement's state at an instant, with the purchase it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntitlementState {
    pub key: String,
    pub is_active: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub will_renew: bool,
    pub store: Option<Store>,
    pub product_id: Option<String>,
    pub period_type: Option<PeriodType>,
    /// `None` when no purchase ever granted this entitlement.
    pub status: Option<PurchaseStatus>,
    pub grace_period_expires_at: Option<DateTime<Utc>>,
    pub purchase_id: Option<i64>,
}

impl EntitlementState {
    /// Access level for the change log and the event stream: `ACTIVE`
    /// whenever the entitlement is on, `EXPIRED` whenever it is off, so a
    /// consumer can gate on that alone; `None` when nothing ever granted it.
    pub fn event_status(&self) -> Option<&'static str> {
        match self.status {
            None => None,
            Some(_) if self.is_active => Some(STATUS_ACTIVE),
            Some(_) => Some(STATUS_EXPIRED),
        }
    }

    /// The store status behind the access level (`refunded`, `billing_retry`, ...).
    pub fn reason(&self) -> Option<&'static str> {
        self.status.map(PurchaseStatus::reason)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub entitlements: Vec<EntitlementState>,
    pub paid_status: PaidStatus,
    /// End of the server-side trial, if the customer ever had one.
    pub trial_ends_at: Option<DateTime<Utc>>,
}

impl Snapshot {
    pub fn entitlement(&self, key: &str) -> Option<&EntitlementState> {
        self.entitlements.iter().find(|e| e.key == key)
    }
}

/// Every configured entitlement of one customer at `now`.
pub fn compute(
    catalog: &Catalog,
    purchases: &[PurchaseFacts],
    now: DateTime<Utc>,
    accept_sandbox: bool,
) -> Snapshot {
    let counts = |p: &&PurchaseFacts| accept_sandbox || p.environment == Environment::Production;
    let mut paid = false;
    let mut trial = false;
    let mut entitlements = Vec::with_capacity(catalog.entitlements().len());
    for def in catalog.entitlements() {
        let mut best_active: Option<(&PurchaseFacts, Access)> = None;
        let mut best_lapsed: Option<&PurchaseFacts> = None;
        for p in purchases.iter().filter(counts) {
            if !catalog
                .entitlements_for(p.store, &p.product_id)
                .contains(&def.key.as_str())
            {
                continue;
            }
            match p.access(now) {
                Access::None => {
                    if best_lapsed
                        .is_none_or(|b| (p.last_relevant_at(), p.id) > (b.last_relevant_at(), b.id))
                    {
                        best_lapsed = Some(p);
                    }
                }
                a => {
                    if p.store.is_paid() {
                        paid = true;
                    } else {
                        trial = true;
                    }
                    // Longest access wins; on a tie a paid source beats a trial.
                    let rank = |p: &PurchaseFacts, a: Access| (a, p.store.is_paid(), p.id);
                    if best_active.is_none_or(|(b, ba)| rank(p, a) > rank(b, ba)) {
                        best_active = Some((p, a));
                    }
                }
            }
        }
        let state = match (best_active, best_lapsed) {
            (Some((p, a)), _) => EntitlementState {
                key: def.key.clone(),
                is_active: true,
                expires_at: match a {
                    Access::Until(t) => Some(t),
                    _ => None,
                },
                will_renew: p.auto_renew
                    && p.expires_at.is_some()
                    && matches!(
                        p.status,
                        PurchaseStatus::Active
                            | PurchaseStatus::Trialing
                            | PurchaseStatus::InGracePeriod
                    ),
                store: Some(p.store),
                product_id: Some(p.product_id.clone()),
                period_type: Some(p.period_type),
                status: Some(p.effective_status(now)),
                grace_period_expires_at: p
                    .grace_expires_at
                    .filter(|_| p.status == PurchaseStatus::InGracePeriod),
                purchase_id: Some(p.id),
            },
            (None, Some(p)) => EntitlementState {
                key: def.key.clone(),
                is_active: false,
                expires_at: p.expires_at,
                will_renew: false,
                store: Some(p.store),
                product_id: Some(p.product_id.clone()),
                period_type: Some(p.period_type),
                status: Some(p.effective_status(now)),
                grace_period_expires_at: p.grace_expires_at,
                purchase_id: Some(p.id),
            },
            (None, None) => EntitlementState {
                key: def.key.clone(),
                is_active: false,
                expires_at: None,
                will_renew: false,
                store: None,
                product_id: None,
                period_type: None,
                status: None,
                grace_period_expires_at: None,
                purchase_id: None,
            },
        };
        entitlements.push(state);
    }
    let paid_status = if paid {
        PaidStatus::Paid
    } else if trial {
        PaidStatus::Trial
    } else {
        PaidStatus::Expired
    };
    let trial_ends_at = purchases
        .iter()
        .filter(|p| p.store == Store::Trial)
        .filter_map(|p| p.expires_at)
        .max();
    Snapshot {
        entitlements,
        paid_status,
        trial_ends_at,
    }
}

/// One row of the change log: an entitlement whose state moved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub entitlement: String,
    pub kind: EventKind,
    /// `ACTIVE` or `EXPIRED`; `None` when the entitlement was never held.
    pub old_status: Option<&'static str>,
    /// `ACTIVE` or `EXPIRED`, whatever the cause.
    pub new_status: &'static str,
    /// The cause: the store status behind `new_status`, or how the source went.
    pub reason: &'static str,
    pub purchase_id: Option<i64>,
}

/// What changed between two snapshots of one customer taken at the same
/// instant, one `Change` per entitlement whose state moved.
pub fn diff(before: &Snapshot, after: &Snapshot) -> Vec<Change> {
    let mut out = Vec::new();
    for new in &after.entitlements {
        let old = before.entitlement(&new.key);
        let old_status = old.and_then(EntitlementState::event_status);
        let (kind, new_status, reason) =
            match (old.filter(|o| o.status.is_some()), new.event_status()) {
                (None, None) => continue,
                (None, Some(s)) => (Some(EventKind::Granted), s, new.reason()),
                // Its only source went away (e.g. transferred to another customer).
                (Some(_), None) => (
                    Some(EventKind::Revoked),
                    STATUS_EXPIRED,
                    Some(PurchaseStatus::Revoked.reason()),
                ),
                (Some(old), Some(s)) => (classify(old, new), s, new.reason()),
            };
        if let Some(kind) = kind {
            out.push(Change {
                entitlement: new.key.clone(),
                kind,
                old_status,
                new_status,
                reason: reason.unwrap_or(PurchaseStatus::Revoked.reason()),
                purchase_id: new.purchase_id,
            });
        }
    }
    out
}

fn classify(old: &EntitlementState, new: &EntitlementState) -> Option<EventKind> {
    let lost = |s: Option<PurchaseStatus>| match s {
        Some(PurchaseStatus::Refunded) => EventKind::Refunded,
        Some(PurchaseStatus::Revoked) => EventKind::Revoked,
        Some(PurchaseStatus::InBillingRetry | PurchaseStatus::OnHold | PurchaseStatus::Paused) => {
            EventKind::BillingIssue
        }
        _ => EventKind::Expired,
    };
    match (old.is_active, new.is_active) {
        (false, true) => Some(if old.purchase_id == new.purchase_id {
            EventKind::Renewed
        } else {
            EventKind::Granted
        }),
        (true, false) => Some(lost(new.status)),
        (false, false) => (old.status != new.status).then(|| lost(new.status)),
        (true, true) => {
            if old.purchase_id != new.purchase_id {
                if old.store != new.store {
                    Some(EventKind::Granted)
                } else if old.product_id != new.product_id {
                    Some(EventKind::ProductChanged)
                } else {
                    Some(EventKind::Renewed)
                }
            } else if old.product_id != new.product_id {
                Some(EventKind::ProductChanged)
            } else if new.status == Some(PurchaseStatus::InGracePeriod) && old.status != new.status
            {
                Some(EventKind::BillingIssue)
            } else if old.will_renew && !new.will_renew {
                Some(EventKind::Canceled)
            } else if !old.will_renew && new.will_renew {
                Some(EventKind::Uncanceled)
            } else if old.expires_at != new.expires_at || old.status != new.status {
                Some(EventKind::Renewed)
            } else {
                None
            }
        }
    }
}

/// When a purchase that no longer grants access stopped granting it, as
/// seen at `now`: its revocation, else the end of its grace or period.
fn lapsed_at(p: &PurchaseFacts, now: DateTime<Utc>) -> DateTime<Utc> {
    if let Some(r) = p.revoked_at.filter(|r| *r <= now) {
        return r;
    }
    let grace = p
        .grace_expires_at
        .filter(|_| p.status == PurchaseStatus::InGracePeriod);
    [p.expires_at, grace]
        .into_iter()
        .flatten()
        .max()
        .map_or(now, |t| t.min(now))
}

/// Change-log rows for entitlements that lapsed by the passage of time
/// (a trial or a canceled period ending, a grace period running out, a grant
/// reaching its end) since the change log last said they were active. Each
/// row is dated at the instant access ended, not when it was noticed.
/// `last_logged` gives the newest logged status of an entitlement.
pub fn lapses(
    snapshot: &Snapshot,
    facts: &[PurchaseFacts],
    last_logged: impl Fn(&str) -> Option<String>,
    now: DateTime<Utc>,
) -> Vec<(Change, DateTime<Utc>)> {
    let mut out = Vec::new();
    for e in snapshot.entitlements.iter().filter(|e| !e.is_active) {
        let Some(new_status) = e.event_status() else {
            continue;
        };
        if last_logged(&e.key).as_deref() != Some(STATUS_ACTIVE) {
            continue;
        }
        let at = facts
            .iter()
            .find(|p| Some(p.id) == e.purchase_id)
            .map_or(now, |p| lapsed_at(p, now));
        let kind = match e.status {
            Some(PurchaseStatus::Refunded) => EventKind::Refunded,
            Some(PurchaseStatus::Revoked) => EventKind::Revoked,
            _ => EventKind::Expired,
        };
        out.push((
            Change {
                entitlement: e.key.clone(),
                kind,
                old_status: Some(STATUS_ACTIVE),
                new_status,
                reason: e.reason().unwrap_or(PurchaseStatus::Expired.reason()),
                purchase_id: e.purchase_id,
            },
            at,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};

    use super::*;
    use crate::domain::{EntitlementDef, ProductDef, ProductKind};

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    fn catalog() -> Catalog {
        Catalog::new(
            vec![
                EntitlementDef {
                    key: "pro".into(),
                    description: None,
                },
                EntitlementDef {
                    key: "maps".into(),
                    description: None,
                },
            ],
            vec![
                ProductDef {
                    id: "pro_monthly".into(),
                    entitlements: vec!["pro".into()],
                    kind: ProductKind::Subscription,
                    display_name: None,
                    stripe_price_id: Some("price_m".into()),
                    stripe_payment_link: None,
                    app_store_product_id: Some("com.x.pro.monthly".into()),
                    play_store_product_id: Some("pro_sub".into()),
                },
                ProductDef {
                    id: "bundle".into(),
                    entitlements: vec!["pro".into(), "maps".into()],
                    kind: ProductKind::Lifetime,
                    display_name: None,
                    stripe_price_id: Some("price_life".into()),
                    stripe_payment_link: None,
                    app_store_product_id: None,
                    play_store_product_id: None,
                },
            ],
        )
        .unwrap()
    }

    fn sub(id: i64, status: PurchaseStatus) -> PurchaseFacts {
        PurchaseFacts {
            id,
            store: Store::AppStore,
            product_id: "com.x.pro.monthly".into(),
            environment: Environment::Production,
            status,
            period_type: PeriodType::Normal,
            purchased_at: t0(),
            expires_at: Some(t0() + Duration::days(30)),
            grace_expires_at: None,
            auto_renew: true,
            revoked_at: None,
        }
    }

    fn trial(id: i64, days: i64) -> PurchaseFacts {
        PurchaseFacts {
            store: Store::Trial,
            product_id: "pro".into(),
            period_type: PeriodType::Trial,
            auto_renew: false,
            expires_at: Some(t0() + Duration::days(days)),
            ..sub(id, PurchaseStatus::Active)
        }
    }

    fn pro(ps: &[PurchaseFacts], now: DateTime<Utc>) -> (EntitlementState, PaidStatus) {
        let s = compute(&catalog(), ps, now, true);
        (s.entitlement("pro").unwrap().clone(), s.paid_status)
    }

    #[test]
    fn granting_statuses_last_until_expiry_exclusive() {
        let end = t0() + Duration::days(30);
        for st in [
            PurchaseStatus::Active,
            PurchaseStatus::Trialing,
            PurchaseStatus::Canceled,
        ] {
            let p = sub(1, st);
            let (e, paid) = pro(std::slice::from_ref(&p), end - Duration::seconds(1));
            assert!(e.is_active, "{st:?}");
            assert_eq!(e.expires_at, Some(end));
            assert_eq!(e.status, Some(st));
            assert_eq!(paid, PaidStatus::Paid);
            let (e, paid) = pro(&[p], end);
            assert!(!e.is_active, "{st:?} at the exact expiry instant");
            assert_eq!(e.status, Some(PurchaseStatus::Expired));
            assert_eq!(paid, PaidStatus::Expired);
        }
    }

    #[test]
    fn intro_period_grants_like_active() {
        let p = PurchaseFacts {
            period_type: PeriodType::Intro,
            ..sub(1, PurchaseStatus::Active)
        };
        let (e, _) = pro(&[p], t0() + Duration::days(1));
        assert!(e.is_active);
        assert_eq!(e.period_type, Some(PeriodType::Intro));
    }

    #[test]
    fn canceled_does_not_renew_but_keeps_paid_period() {
        let (e, _) = pro(
            &[sub(1, PurchaseStatus::Canceled)],
            t0() + Duration::days(29),
        );
        assert!(e.is_active);
        assert!(!e.will_renew);
        let (e, _) = pro(&[sub(1, PurchaseStatus::Active)], t0() + Duration::days(29));
        assert!(e.will_renew);
    }

    #[test]
    fn grace_period_grants_until_grace_end() {
        let grace_end = t0() + Duration::days(36);
        let p = PurchaseFacts {
            grace_expires_at: Some(grace_end),
            ..sub(1, PurchaseStatus::InGracePeriod)
        };
        let (e, _) = pro(std::slice::from_ref(&p), t0() + Duration::days(33));
        assert!(e.is_active, "past expires_at but inside grace");
        assert_eq!(e.expires_at, Some(grace_end));
        assert_eq!(e.grace_period_expires_at, Some(grace_end));
        let (e, _) = pro(&[p], grace_end);
        assert!(!e.is_active);
        assert_eq!(e.status, Some(PurchaseStatus::Expired));
    }

    #[test]
    fn no_access_statuses() {
        for st in [
            PurchaseStatus::InBillingRetry,
            PurchaseStatus::OnHold,
            PurchaseStatus::Paused,
            PurchaseStatus::Expired,
            PurchaseStatus::Pending,
        ] {
            let (e, paid) = pro(&[sub(1, st)], t0() + Duration::days(1));
            assert!(!e.is_active, "{st:?}");
            assert_eq!(e.status, Some(st));
            assert_eq!(paid, PaidStatus::Expired);
        }
    }

    #[test]
    fn refund_and_revoke_end_access_from_revoked_at_whatever_expiry_says() {
        for st in [PurchaseStatus::Refunded, PurchaseStatus::Revoked] {
            let r = t0() + Duration::days(10);
            let p = PurchaseFacts {
                revoked_at: Some(r),
                ..sub(1, st)
            };
            assert!(
                pro(std::slice::from_ref(&p), r - Duration::seconds(1))
                    .0
                    .is_active,
                "{st:?} before revoked_at"
            );
            let (e, _) = pro(&[p], r);
            assert!(!e.is_active, "{st:?} from revoked_at on");
            assert_eq!(e.status, Some(st));
        }
        // An active status with a past revocation still loses access.
        let p = PurchaseFacts {
            revoked_at: Some(t0() + Duration::days(1)),
            ..sub(1, PurchaseStatus::Active)
        };
        let (e, _) = pro(&[p], t0() + Duration::days(2));
        assert!(!e.is_active);
        assert_eq!(e.status, Some(PurchaseStatus::Revoked));
    }

    #[test]
    fn refund_after_expiry_reads_refunded() {
        let p = PurchaseFacts {
            revoked_at: Some(t0() + Duration::days(40)),
            ..sub(1, PurchaseStatus::Refunded)
        };
        let (e, _) = pro(&[p], t0() + Duration::days(41));
        assert!(!e.is_active);
        assert_eq!(e.status, Some(PurchaseStatus::Refunded));
    }

    #[test]
    fn lifetime_grants_forever_until_refunded() {
        let life = PurchaseFacts {
            store: Store::Stripe,
            product_id: "price_life".into(),
            expires_at: None,
            auto_renew: false,
            ..sub(1, PurchaseStatus::Active)
        };
        let far = t0() + Duration::days(365 * 50);
        let s = compute(&catalog(), std::slice::from_ref(&life), far, true);
        for key in ["pro", "maps"] {
            let e = s.entitlement(key).unwrap();
            assert!(
                e.is_active && e.expires_at.is_none() && !e.will_renew,
                "{key}"
            );
        }
        let refunded = PurchaseFacts {
            status: PurchaseStatus::Refunded,
            revoked_at: Some(t0() + Duration::days(3)),
            ..life
        };
        let s = compute(&catalog(), &[refunded], far, true);
        assert!(!s.entitlement("pro").unwrap().is_active);
    }

    #[test]
    fn sandbox_counts_only_when_accepted() {
        let p = PurchaseFacts {
            environment: Environment::Sandbox,
            ..sub(1, PurchaseStatus::Active)
        };
        let now = t0() + Duration::days(1);
        assert!(
            compute(&catalog(), std::slice::from_ref(&p), now, true)
                .entitlement("pro")
                .unwrap()
                .is_active
        );
        let s = compute(&catalog(), &[p], now, false);
        let e = s.entitlement("pro").unwrap();
        assert!(!e.is_active);
        assert_eq!(
            e.status, None,
            "an ignored sandbox purchase is no source at all"
        );
        assert_eq!(s.paid_status, PaidStatus::Expired);
    }

    #[test]
    fn longest_source_wins_and_paid_beats_trial_for_paid_status() {
        let now = t0() + Duration::days(1);
        // Trial lasts longer than the paid month: entitlement reports the trial,
        // paid_status still says paid.
        let (e, paid) = pro(&[sub(1, PurchaseStatus::Active), trial(2, 60)], now);
        assert_eq!(e.store, Some(Store::Trial));
        assert_eq!(e.expires_at, Some(t0() + Duration::days(60)));
        assert_eq!(paid, PaidStatus::Paid);
        // Paid lasts longer: reported.
        let (e, _) = pro(&[sub(1, PurchaseStatus::Active), trial(2, 7)], now);
        assert_eq!(e.store, Some(Store::AppStore));
        // Equal end: paid wins the tie.
        let (e, _) = pro(&[trial(2, 30), sub(1, PurchaseStatus::Active)], now);
        assert_eq!(e.store, Some(Store::AppStore));
        // Lifetime promo beats any dated source.
        let promo = PurchaseFacts {
            store: Store::Promotional,
            product_id: "pro".into(),
            expires_at: None,
            ..sub(3, PurchaseStatus::Active)
        };
        let (e, paid) = pro(&[sub(1, PurchaseStatus::Active), promo], now);
        assert_eq!(e.store, Some(Store::Promotional));
        assert_eq!(e.expires_at, None);
        assert_eq!(paid, PaidStatus::Paid);
    }

    #[test]
    fn paid_status_trial_only_and_expired() {
        let (_, paid) = pro(&[trial(1, 7)], t0() + Duration::days(6));
        assert_eq!(paid, PaidStatus::Trial);
        let s = compute(&catalog(), &[trial(1, 7)], t0() + Duration::days(7), true);
        assert_eq!(s.paid_status, PaidStatus::Expired);
        assert_eq!(s.trial_ends_at, Some(t0() + Duration::days(7)));
        assert_eq!(
            compute(&catalog(), &[], t0(), true).paid_status,
            PaidStatus::Expired
        );
    }

    #[test]
    fn lapsed_entitlement_reports_most_recent_source() {
        let old = PurchaseFacts {
            expires_at: Some(t0() + Duration::days(5)),
            ..sub(1, PurchaseStatus::Expired)
        };
        let newer = PurchaseFacts {
            revoked_at: Some(t0() + Duration::days(20)),
            ..sub(2, PurchaseStatus::Refunded)
        };
        let (e, _) = pro(&[old, newer], t0() + Duration::days(50));
        assert_eq!(e.purchase_id, Some(2));
        assert_eq!(e.status, Some(PurchaseStatus::Refunded));
    }

    #[test]
    fn unmapped_products_grant_nothing() {
        let p = PurchaseFacts {
            product_id: "com.x.unknown".into(),
            ..sub(1, PurchaseStatus::Active)
        };
        let (e, paid) = pro(&[p], t0());
        assert!(!e.is_active);
        assert_eq!(e.status, None);
        assert_eq!(paid, PaidStatus::Expired);
    }

    #[test]
    fn play_base_plan_maps_to_bare_product() {
        let p = PurchaseFacts {
            store: Store::PlayStore,
            product_id: "pro_sub:monthly".into(),
            ..sub(1, PurchaseStatus::Active)
        };
        assert!(pro(&[p], t0()).0.is_active);
    }

    fn kinds(
        before: &[PurchaseFacts],
        after: &[PurchaseFacts],
        now: DateTime<Utc>,
    ) -> Vec<(EventKind, Option<&'static str>, &'static str, &'static str)> {
        let c = catalog();
        diff(
            &compute(&c, before, now, true),
            &compute(&c, after, now, true),
        )
        .into_iter()
        .filter(|ch| ch.entitlement == "pro")
        .map(|ch| (ch.kind, ch.old_status, ch.new_status, ch.reason))
        .collect()
    }

    #[test]
    fn diff_classifies_transitions() {
        let now = t0() + Duration::days(1);
        let active = sub(1, PurchaseStatus::Active);
        assert_eq!(
            kinds(&[], std::slice::from_ref(&active), now),
            vec![(EventKind::Granted, None, "ACTIVE", "active")]
        );
        assert_eq!(
            kinds(
                std::slice::from_ref(&active),
                std::slice::from_ref(&active),
                now
            ),
            vec![],
            "no change, no event"
        );
        let renewed = PurchaseFacts {
            expires_at: Some(t0() + Duration::days(60)),
            ..active.clone()
        };
        assert_eq!(
            kinds(std::slice::from_ref(&active), &[renewed], now),
            vec![(EventKind::Renewed, Some("ACTIVE"), "ACTIVE", "active")]
        );
        let canceled = PurchaseFacts {
            auto_renew: false,
            ..sub(1, PurchaseStatus::Canceled)
        };
        assert_eq!(
            kinds(
                std::slice::from_ref(&active),
                std::slice::from_ref(&canceled),
                now
            ),
            vec![(EventKind::Canceled, Some("ACTIVE"), "ACTIVE", "canceled")]
        );
        assert_eq!(
            kinds(&[canceled], std::slice::from_ref(&active), now),
            vec![(EventKind::Uncanceled, Some("ACTIVE"), "ACTIVE", "active")]
        );
        let grace = PurchaseFacts {
            grace_expires_at: Some(t0() + Duration::days(40)),
            ..sub(1, PurchaseStatus::InGracePeriod)
        };
        assert_eq!(
            kinds(std::slice::from_ref(&active), &[grace], now),
            vec![(
                EventKind::BillingIssue,
                Some("ACTIVE"),
                "ACTIVE",
                "grace_period"
            )]
        );
        let retry = sub(1, PurchaseStatus::InBillingRetry);
        assert_eq!(
            kinds(
                std::slice::from_ref(&active),
                std::slice::from_ref(&retry),
                now
            ),
            vec![(
                EventKind::BillingIssue,
                Some("ACTIVE"),
                "EXPIRED",
                "billing_retry"
            )]
        );
        assert_eq!(
            kinds(&[retry], std::slice::from_ref(&active), now),
            vec![(EventKind::Renewed, Some("EXPIRED"), "ACTIVE", "active")]
        );
        let refunded = PurchaseFacts {
            revoked_at: Some(now),
            ..sub(1, PurchaseStatus::Refunded)
        };
        assert_eq!(
            kinds(
                std::slice::from_ref(&active),
                std::slice::from_ref(&refunded),
                now
            ),
            vec![(EventKind::Refunded, Some("ACTIVE"), "EXPIRED", "refunded")]
        );
        let expired = sub(1, PurchaseStatus::Expired);
        assert_eq!(
            kinds(
                std::slice::from_ref(&active),
                std::slice::from_ref(&expired),
                now
            ),
            vec![(EventKind::Expired, Some("ACTIVE"), "EXPIRED", "expired")]
        );
        // Already lapsed, then refunded: still a change of state.
        assert_eq!(
            kinds(&[expired], &[refunded], now),
            vec![(EventKind::Refunded, Some("EXPIRED"), "EXPIRED", "refunded")]
        );
        let other = PurchaseFacts {
            store: Store::Stripe,
            product_id: "price_m".into(),
            ..sub(2, PurchaseStatus::Active)
        };
        assert_eq!(
            kinds(std::slice::from_ref(&active), &[other], now),
            vec![(EventKind::Granted, Some("ACTIVE"), "ACTIVE", "active")]
        );
        assert_eq!(
            kinds(&[active], &[], now),
            vec![(EventKind::Revoked, Some("ACTIVE"), "EXPIRED", "revoked")]
        );
    }

    #[test]
    fn lapses_by_time_are_dated_at_the_end_of_access() {
        let cat = catalog();
        let t = trial(1, 7);
        let end = t.expires_at.unwrap();
        let logged = |status: Option<&'static str>| move |_: &str| status.map(str::to_string);
        // Still running: nothing to log.
        let snap = compute(
            &cat,
            std::slice::from_ref(&t),
            end - Duration::seconds(1),
            true,
        );
        assert!(lapses(&snap, std::slice::from_ref(&t), logged(Some("ACTIVE")), end).is_empty());
        // Ended, last logged active: one `expired` row at the trial's end.
        let later = end + Duration::hours(3);
        let snap = compute(&cat, std::slice::from_ref(&t), later, true);
        let rows = lapses(
            &snap,
            std::slice::from_ref(&t),
            logged(Some("ACTIVE")),
            later,
        );
        assert_eq!(rows.len(), 1);
        let (ch, at) = &rows[0];
        assert_eq!(
            (ch.kind, ch.old_status, ch.new_status),
            (EventKind::Expired, Some("ACTIVE"), "EXPIRED")
        );
        assert_eq!(ch.reason, "expired");
        assert_eq!(ch.entitlement, "pro");
        assert_eq!(*at, end);
        // Already logged as expired, or never logged: nothing more.
        assert!(
            lapses(
                &snap,
                std::slice::from_ref(&t),
                logged(Some("EXPIRED")),
                later
            )
            .is_empty()
        );
        assert!(lapses(&snap, std::slice::from_ref(&t), logged(None), later).is_empty());
    }

    #[test]
    fn lapses_of_grace_and_scheduled_revocation() {
        let cat = catalog();
        let mut g = sub(2, PurchaseStatus::InGracePeriod);
        let grace_end = g.expires_at.unwrap() + Duration::days(3);
        g.grace_expires_at = Some(grace_end);
        let later = grace_end + Duration::minutes(5);
        let snap = compute(&cat, std::slice::from_ref(&g), later, true);
        let rows = lapses(
            &snap,
            std::slice::from_ref(&g),
            |_| Some("ACTIVE".into()),
            later,
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1, grace_end);

        let mut r = sub(3, PurchaseStatus::Refunded);
        let cut = t0() + Duration::days(2);
        r.revoked_at = Some(cut);
        let later = cut + Duration::hours(1);
        let snap = compute(&cat, std::slice::from_ref(&r), later, true);
        let rows = lapses(
            &snap,
            std::slice::from_ref(&r),
            |_| Some("ACTIVE".into()),
            later,
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (
                rows[0].0.kind,
                rows[0].0.new_status,
                rows[0].0.reason,
                rows[0].1
            ),
            (EventKind::Refunded, "EXPIRED", "refunded", cut)
        );
    }
}
