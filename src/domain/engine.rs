use chrono::{DateTime, Utc};

use super::{Catalog, Environment, EventKind, PaidStatus, PeriodType, PurchaseStatus, Store};

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
    fn effective_status(&self, now: DateTime<Utc>) -> PurchaseStatus {
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
    /// Status name for the change log and the event stream. Every state that
    /// grants access reads `ACTIVE`, so a consumer can gate on that alone.
    pub fn event_status(&self) -> Option<&'static str> {
        match self.status {
            None => None,
            Some(_) if self.is_active => Some("ACTIVE"),
            Some(s) => Some(s.event_name()),
        }
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
    pub old_status: Option<&'static str>,
    pub new_status: &'static str,
    pub purchase_id: Option<i64>,
}

/// What changed between two snapshots of one customer taken at the same
/// instant, one `Change` per entitlement whose state moved.
pub fn diff(before: &Snapshot, after: &Snapshot) -> Vec<Change> {
    let mut out = Vec::new();
    for new in &after.entitlements {
        let old = before.entitlement(&new.key);
        let old_status = old.and_then(EntitlementState::event_status);
        let (kind, new_status) = match (old.filter(|o| o.status.is_some()), new.event_status()) {
            (None, None) => continue,
            (None, Some(s)) => (Some(EventKind::Granted), s),
            // Its only source went away (e.g. transferred to another customer).
            (Some(_), None) => (
                Some(EventKind::Revoked),
                PurchaseStatus::Revoked.event_name(),
            ),
            (Some(old), Some(s)) => (classify(old, new), s),
        };
        if let Some(kind) = kind {
            out.push(Change {
                entitlement: new.key.clone(),
                kind,
                old_status,
                new_status,
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
        (false, false) => (old.event_status() != new.event_status()).then(|| lost(new.status)),
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
