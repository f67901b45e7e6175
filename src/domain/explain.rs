//! The plain sentence behind an entitlement: why it is active and until
//! when, or why it is not. It reads the state the engine computed (and the
//! purchase that state names); for a sandbox purchase the server ignores, it
//! asks the engine what that purchase would have given. Nothing here decides
//! access on its own.

use chrono::{DateTime, Utc};

use super::{
    Catalog, EntitlementState, Environment, PeriodType, PurchaseFacts, PurchaseStatus, Store,
    compute,
};

/// The sentence for `state` (one entitlement of the snapshot that
/// `compute(catalog, facts, now, accept_sandbox)` gave).
pub fn explain(
    catalog: &Catalog,
    facts: &[PurchaseFacts],
    state: &EntitlementState,
    now: DateTime<Utc>,
    accept_sandbox: bool,
) -> String {
    let by_id = |id: Option<i64>| id.and_then(|id| facts.iter().find(|p| p.id == id));
    let source = by_id(state.purchase_id);
    if !accept_sandbox && !state.is_active {
        // What the engine would say if sandbox purchases counted.
        let with_sandbox = compute(catalog, facts, now, true);
        if let Some(e) = with_sandbox.entitlement(&state.key)
            && let Some(p) = by_id(e.purchase_id)
            && p.environment == Environment::Sandbox
            && (e.is_active || state.status.is_none())
        {
            return ignored_sandbox(e, p);
        }
    }
    sentence(state, source)
}

/// `2026-12-30 14:05 UTC`.
fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

fn store_name(s: Store) -> &'static str {
    match s {
        Store::AppStore => "App Store",
        Store::PlayStore => "Google Play",
        Store::Stripe => "Stripe",
        Store::Promotional => "promotional",
        Store::Trial => "trial",
    }
}

/// "the free trial", "the promotional grant", "the App Store subscription
/// com.example.pro.monthly", "the Stripe sandbox lifetime purchase price_1".
fn label(state: &EntitlementState, source: Option<&PurchaseFacts>) -> String {
    let store = source.map(|p| p.store).or(state.store);
    match store {
        None => "its source".into(),
        Some(Store::Trial) => "the free trial".into(),
        Some(Store::Promotional) => "the promotional grant".into(),
        Some(s) => {
            let lifetime = match source {
                Some(p) => p.expires_at.is_none(),
                None => state.is_active && state.expires_at.is_none(),
            };
            let sandbox = if source.is_some_and(|p| p.environment == Environment::Sandbox) {
                " sandbox"
            } else {
                ""
            };
            let kind = if lifetime {
                "lifetime purchase"
            } else {
                "subscription"
            };
            let product = source
                .map(|p| p.product_id.as_str())
                .or(state.product_id.as_deref())
                .unwrap_or("");
            format!("the {}{sandbox} {kind} {product}", store_name(s))
                .trim_end()
                .to_string()
        }
    }
}

fn sentence(state: &EntitlementState, source: Option<&PurchaseFacts>) -> String {
    let Some(status) = state.status else {
        return "Not active: no purchase, trial or grant has ever given this entitlement.".into();
    };
    let what = label(state, source);
    let store = source.map(|p| p.store).or(state.store);
    if state.is_active {
        return active(state, source, status, store, &what);
    }
    let revoked_on = source
        .and_then(|p| p.revoked_at)
        .map(|r| format!(" on {}", when(r)))
        .unwrap_or_default();
    let period_end = source.and_then(|p| p.expires_at).or(state.expires_at);
    let since = period_end
        .map(|t| format!(" since {}", when(t)))
        .unwrap_or_default();
    match status {
        PurchaseStatus::Refunded => format!("Not active: {what} was refunded{revoked_on}."),
        PurchaseStatus::Revoked => match store {
            Some(Store::Promotional | Store::Trial) => {
                format!("Not active: {what} was revoked{revoked_on}.")
            }
            _ => format!(
                "Not active: {what} was revoked{revoked_on} (by the store, or moved to another customer)."
            ),
        },
        PurchaseStatus::InBillingRetry => format!(
            "Not active: {what} could not be renewed; the store is retrying the payment (billing retry{since})."
        ),
        PurchaseStatus::OnHold => format!(
            "Not active: {what} is on account hold after a failed payment{since}; access returns when the payment method is fixed."
        ),
        PurchaseStatus::Paused => format!("Not active: {what} is paused by the customer{since}."),
        PurchaseStatus::Pending => {
            format!("Not active: the payment for {what} is still pending.")
        }
        // `Expired`, and any granting status whose time ran out (the engine
        // reports those as expired).
        _ => {
            let stored = source.map(|p| p.status);
            let grace_end = source
                .filter(|p| p.status == PurchaseStatus::InGracePeriod)
                .and_then(|p| p.grace_expires_at);
            match (store, grace_end, stored, period_end) {
                (_, Some(g), _, _) => format!(
                    "Not active: {what} could not be renewed and its grace period ended on {}.",
                    when(g)
                ),
                (Some(Store::Trial | Store::Promotional), _, _, Some(end)) => {
                    format!("Not active: {what} ended on {}.", when(end))
                }
                (_, _, Some(PurchaseStatus::Canceled), Some(end)) => format!(
                    "Not active: {what} was canceled and its paid period ended on {}.",
                    when(end)
                ),
                (_, _, _, Some(end)) => format!("Not active: {what} expired on {}.", when(end)),
                (_, _, _, None) => format!("Not active: {what} no longer gives access."),
            }
        }
    }
}

fn active(
    state: &EntitlementState,
    source: Option<&PurchaseFacts>,
    status: PurchaseStatus,
    store: Option<Store>,
    what: &str,
) -> String {
    let Some(end) = state.expires_at else {
        return match store {
            Some(Store::Promotional) => "Active: the promotional grant has no end date.".into(),
            _ => format!(
                "Active: {what} gives access for life; it ends only if refunded or revoked."
            ),
        };
    };
    let until = when(end);
    let renews = if state.will_renew {
        "it will renew then"
    } else {
        "it will not renew"
    };
    let period = source.map(|p| p.period_type).or(state.period_type);
    match (store, status) {
        (Some(Store::Trial | Store::Promotional), _) => {
            format!("Active: {what} runs until {until}; it does not renew.")
        }
        (_, PurchaseStatus::Refunded | PurchaseStatus::Revoked) => format!(
            "Active until {until}: {what} was {}, effective then.",
            status.as_str()
        ),
        (_, PurchaseStatus::InGracePeriod) => format!(
            "Active in a grace period: {what} could not be renewed; access continues until {until} while the store retries the payment."
        ),
        (_, PurchaseStatus::Canceled) => format!(
            "Active: {what} was canceled; the paid period runs until {until}, then access ends."
        ),
        _ if status == PurchaseStatus::Trialing || period == Some(PeriodType::Trial) => {
            format!(
                "Active: {what} is in its store free trial until {until}; {}.",
                if state.will_renew {
                    "it then renews as paid"
                } else {
                    "it will not renew"
                }
            )
        }
        _ if period == Some(PeriodType::Intro) => {
            format!("Active: {what} is at its introductory price until {until}; {renews}.")
        }
        _ => format!("Active: {what} is paid until {until}; {renews}."),
    }
}

/// Not active only because the server refuses sandbox purchases.
fn ignored_sandbox(with_sandbox: &EntitlementState, p: &PurchaseFacts) -> String {
    let what = label(with_sandbox, Some(p));
    if with_sandbox.is_active {
        let until = with_sandbox
            .expires_at
            .map_or_else(|| "for life".to_string(), |t| format!("until {}", when(t)));
        format!(
            "Not active: {what} would give access {until}, but sandbox purchases are ignored in production (accept_sandbox = false)."
        )
    } else {
        format!(
            "Not active: only {what} was ever seen, and sandbox purchases are ignored in production (accept_sandbox = false)."
        )
    }
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
            vec![EntitlementDef {
                key: "pro".into(),
                description: None,
            }],
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
                    id: "life".into(),
                    entitlements: vec!["pro".into()],
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

    fn sub(status: PurchaseStatus) -> PurchaseFacts {
        PurchaseFacts {
            id: 1,
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

    /// The engine's state of `pro` at `now` and its sentence.
    fn say(ps: &[PurchaseFacts], now: DateTime<Utc>, sandbox: bool) -> (bool, String) {
        let c = catalog();
        let s = compute(&c, ps, now, sandbox);
        let e = s.entitlement("pro").unwrap();
        (e.is_active, explain(&c, ps, e, now, sandbox))
    }

    fn day(n: i64) -> String {
        when(t0() + Duration::days(n))
    }

    #[track_caller]
    fn expect(ps: &[PurchaseFacts], at_day: i64, active: bool, want: &str) {
        for sandbox in [true, false] {
            let (a, s) = say(ps, t0() + Duration::days(at_day), sandbox);
            assert_eq!(a, active, "{s}");
            assert_eq!(s, want, "accept_sandbox = {sandbox}");
        }
    }

    #[test]
    fn every_status_row_has_its_sentence() {
        use PurchaseStatus::*;
        expect(
            &[sub(Active)],
            1,
            true,
            &format!(
                "Active: the App Store subscription com.x.pro.monthly is paid until {}; it will renew then.",
                day(30)
            ),
        );
        let no_renew = PurchaseFacts {
            auto_renew: false,
            ..sub(Active)
        };
        expect(
            &[no_renew],
            1,
            true,
            &format!(
                "Active: the App Store subscription com.x.pro.monthly is paid until {}; it will not renew.",
                day(30)
            ),
        );
        expect(
            &[sub(Trialing)],
            1,
            true,
            &format!(
                "Active: the App Store subscription com.x.pro.monthly is in its store free trial until {}; it then renews as paid.",
                day(30)
            ),
        );
        let intro = PurchaseFacts {
            period_type: PeriodType::Intro,
            ..sub(Active)
        };
        expect(
            &[intro],
            1,
            true,
            &format!(
                "Active: the App Store subscription com.x.pro.monthly is at its introductory price until {}; it will renew then.",
                day(30)
            ),
        );
        expect(
            &[sub(Canceled)],
            1,
            true,
            &format!(
                "Active: the App Store subscription com.x.pro.monthly was canceled; the paid period runs until {}, then access ends.",
                day(30)
            ),
        );
        expect(
            &[sub(Canceled)],
            31,
            false,
            &format!(
                "Not active: the App Store subscription com.x.pro.monthly was canceled and its paid period ended on {}.",
                day(30)
            ),
        );
        let grace = PurchaseFacts {
            grace_expires_at: Some(t0() + Duration::days(36)),
            ..sub(InGracePeriod)
        };
        expect(
            std::slice::from_ref(&grace),
            32,
            true,
            &format!(
                "Active in a grace period: the App Store subscription com.x.pro.monthly could not be renewed; access continues until {} while the store retries the payment.",
                day(36)
            ),
        );
        expect(
            &[grace],
            37,
            false,
            &format!(
                "Not active: the App Store subscription com.x.pro.monthly could not be renewed and its grace period ended on {}.",
                day(36)
            ),
        );
        expect(
            &[sub(InBillingRetry)],
            31,
            false,
            &format!(
                "Not active: the App Store subscription com.x.pro.monthly could not be renewed; the store is retrying the payment (billing retry since {}).",
                day(30)
            ),
        );
        expect(
            &[sub(OnHold)],
            31,
            false,
            &format!(
                "Not active: the App Store subscription com.x.pro.monthly is on account hold after a failed payment since {}; access returns when the payment method is fixed.",
                day(30)
            ),
        );
        expect(
            &[sub(Paused)],
            31,
            false,
            &format!(
                "Not active: the App Store subscription com.x.pro.monthly is paused by the customer since {}.",
                day(30)
            ),
        );
        expect(
            &[sub(Pending)],
            1,
            false,
            "Not active: the payment for the App Store subscription com.x.pro.monthly is still pending.",
        );
        expect(
            &[sub(Expired)],
            31,
            false,
            &format!(
                "Not active: the App Store subscription com.x.pro.monthly expired on {}.",
                day(30)
            ),
        );
        // A period that ran out with no word from the store reads as expired.
        expect(
            &[sub(Active)],
            30,
            false,
            &format!(
                "Not active: the App Store subscription com.x.pro.monthly expired on {}.",
                day(30)
            ),
        );
        let refunded = PurchaseFacts {
            revoked_at: Some(t0() + Duration::days(5)),
            ..sub(Refunded)
        };
        expect(
            std::slice::from_ref(&refunded),
            6,
            false,
            &format!(
                "Not active: the App Store subscription com.x.pro.monthly was refunded on {}.",
                day(5)
            ),
        );
        // Recorded ahead of its effective time: access until then.
        expect(
            &[refunded],
            4,
            true,
            &format!(
                "Active until {}: the App Store subscription com.x.pro.monthly was refunded, effective then.",
                day(5)
            ),
        );
        let revoked = PurchaseFacts {
            revoked_at: Some(t0() + Duration::days(5)),
            ..sub(Revoked)
        };
        expect(
            &[revoked],
            6,
            false,
            &format!(
                "Not active: the App Store subscription com.x.pro.monthly was revoked on {} (by the store, or moved to another customer).",
                day(5)
            ),
        );
        expect(
            &[],
            1,
            false,
            "Not active: no purchase, trial or grant has ever given this entitlement.",
        );
    }

    #[test]
    fn lifetime_trial_and_grants() {
        let life = PurchaseFacts {
            store: Store::Stripe,
            product_id: "price_life".into(),
            expires_at: None,
            auto_renew: false,
            ..sub(PurchaseStatus::Active)
        };
        expect(
            std::slice::from_ref(&life),
            400,
            true,
            "Active: the Stripe lifetime purchase price_life gives access for life; it ends only if refunded or revoked.",
        );
        let refunded = PurchaseFacts {
            status: PurchaseStatus::Refunded,
            revoked_at: Some(t0() + Duration::days(3)),
            ..life
        };
        expect(
            &[refunded],
            4,
            false,
            &format!(
                "Not active: the Stripe lifetime purchase price_life was refunded on {}.",
                day(3)
            ),
        );
        let trial = PurchaseFacts {
            store: Store::Trial,
            product_id: "pro".into(),
            period_type: PeriodType::Trial,
            auto_renew: false,
            expires_at: Some(t0() + Duration::days(7)),
            ..sub(PurchaseStatus::Active)
        };
        expect(
            std::slice::from_ref(&trial),
            1,
            true,
            &format!(
                "Active: the free trial runs until {}; it does not renew.",
                day(7)
            ),
        );
        expect(
            &[trial],
            8,
            false,
            &format!("Not active: the free trial ended on {}.", day(7)),
        );
        let promo = PurchaseFacts {
            store: Store::Promotional,
            product_id: "pro".into(),
            auto_renew: false,
            expires_at: Some(t0() + Duration::days(14)),
            ..sub(PurchaseStatus::Active)
        };
        expect(
            std::slice::from_ref(&promo),
            1,
            true,
            &format!(
                "Active: the promotional grant runs until {}; it does not renew.",
                day(14)
            ),
        );
        expect(
            std::slice::from_ref(&promo),
            15,
            false,
            &format!("Not active: the promotional grant ended on {}.", day(14)),
        );
        let forever = PurchaseFacts {
            expires_at: None,
            ..promo.clone()
        };
        expect(
            &[forever],
            900,
            true,
            "Active: the promotional grant has no end date.",
        );
        let revoked = PurchaseFacts {
            status: PurchaseStatus::Revoked,
            revoked_at: Some(t0() + Duration::days(2)),
            ..promo
        };
        expect(
            &[revoked],
            3,
            false,
            &format!(
                "Not active: the promotional grant was revoked on {}.",
                day(2)
            ),
        );
    }

    #[test]
    fn sandbox_purchases_read_as_ignored_only_when_refused() {
        let p = PurchaseFacts {
            environment: Environment::Sandbox,
            ..sub(PurchaseStatus::Active)
        };
        let now = t0() + Duration::days(1);
        let (active, s) = say(std::slice::from_ref(&p), now, true);
        assert!(active);
        assert_eq!(
            s,
            format!(
                "Active: the App Store sandbox subscription com.x.pro.monthly is paid until {}; it will renew then.",
                day(30)
            )
        );
        let (active, s) = say(std::slice::from_ref(&p), now, false);
        assert!(!active, "the engine refuses it");
        assert_eq!(
            s,
            format!(
                "Not active: the App Store sandbox subscription com.x.pro.monthly would give access until {}, but sandbox purchases are ignored in production (accept_sandbox = false).",
                day(30)
            )
        );
        // A lapsed sandbox purchase beside nothing else.
        let (_, s) = say(std::slice::from_ref(&p), t0() + Duration::days(40), false);
        assert_eq!(
            s,
            "Not active: only the App Store sandbox subscription com.x.pro.monthly was ever seen, and sandbox purchases are ignored in production (accept_sandbox = false)."
        );
        // A production purchase that grants wins over any sandbox story.
        let prod = PurchaseFacts {
            id: 2,
            ..sub(PurchaseStatus::Active)
        };
        let (active, s) = say(&[p, prod], now, false);
        assert!(active);
        assert!(s.starts_with("Active: the App Store subscription"), "{s}");
    }
}
