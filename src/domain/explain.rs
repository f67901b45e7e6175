//! The plain sentences behind an entitlement (why it is active and until
//! when, or why it is not) and behind one purchase (what it grants now, or
//! why it grants nothing). They read the state the engine computed (and the
//! purchase that state names); for a sandbox purchase the server ignores, they
//! ask the engine what that purchase would have given. Nothing here decides
//! access on its own.

use chrono::{DateTime, Utc};

use super::{
    Catalog, EntitlementState, Environment, PeriodType, PurchaseFacts, PurchaseStatus, Snapshot,
    Store, compute,
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
            return ignored_sandbox(e, p, &Lead::Entitlement);
        }
    }
    sentence(state, source, &Lead::Entitlement)
}

/// The sentence for one purchase: which entitlements it grants now and until
/// when, or why it grants nothing. The engine is asked about this purchase
/// alone, so the answer is what the purchase itself gives, whichever source
/// the customer's entitlements are reported from.
pub fn explain_purchase(
    catalog: &Catalog,
    p: &PurchaseFacts,
    now: DateTime<Utc>,
    accept_sandbox: bool,
) -> String {
    let alone = std::slice::from_ref(p);
    let from_it = |s: Snapshot| -> Vec<EntitlementState> {
        s.entitlements
            .into_iter()
            .filter(|e| e.purchase_id == Some(p.id))
            .collect()
    };
    let counted = from_it(compute(catalog, alone, now, accept_sandbox));
    if let Some(state) = counted.first() {
        let keys = key_list(&counted);
        return sentence(state, Some(p), &Lead::Purchase { keys: &keys });
    }
    // The engine did not count it: either the server refuses it as a sandbox
    // purchase, or the catalog maps it to nothing.
    let with_sandbox = if accept_sandbox {
        Vec::new()
    } else {
        from_it(compute(catalog, alone, now, true))
    };
    if let Some(state) = with_sandbox.first() {
        let keys = key_list(&with_sandbox);
        return ignored_sandbox(state, p, &Lead::Purchase { keys: &keys });
    }
    match p.store {
        Store::Trial | Store::Promotional => format!(
            "Grants nothing: {} is not an entitlement of the catalog.",
            p.product_id
        ),
        s => format!(
            "Grants nothing: the {} product {} is not in the catalog.",
            store_name(s),
            p.product_id
        ),
    }
}

/// How a sentence opens: an entitlement is active or not; a purchase
/// grants its entitlements or nothing.
enum Lead<'a> {
    Entitlement,
    Purchase { keys: &'a str },
}

impl Lead<'_> {
    fn on(&self) -> String {
        match self {
            Lead::Entitlement => "Active".into(),
            Lead::Purchase { keys } => format!("Grants {keys}"),
        }
    }

    fn off(&self) -> &'static str {
        match self {
            Lead::Entitlement => "Not active",
            Lead::Purchase { .. } => "Grants nothing",
        }
    }
}

/// `pro`, `pro and maps`, `pro, maps and sync`.
fn key_list(states: &[EntitlementState]) -> String {
    let keys: Vec<&str> = states.iter().map(|e| e.key.as_str()).collect();
    match keys.split_last() {
        None => String::new(),
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
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

fn sentence(state: &EntitlementState, source: Option<&PurchaseFacts>, lead: &Lead) -> String {
    let off = lead.off();
    let Some(status) = state.status else {
        return format!("{off}: no purchase, trial or grant has ever given this entitlement.");
    };
    let what = label(state, source);
    let store = source.map(|p| p.store).or(state.store);
    if state.is_active {
        return active(state, source, status, store, &what, lead);
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
        PurchaseStatus::Refunded => format!("{off}: {what} was refunded{revoked_on}."),
        PurchaseStatus::Revoked => match store {
            Some(Store::Promotional | Store::Trial) => {
                format!("{off}: {what} was revoked{revoked_on}.")
            }
            _ => format!(
                "{off}: {what} was revoked{revoked_on} (by the store, or moved to another customer)."
            ),
        },
        PurchaseStatus::InBillingRetry => format!(
            "{off}: {what} could not be renewed; the store is retrying the payment (billing retry{since})."
        ),
        PurchaseStatus::OnHold => format!(
            "{off}: {what} is on account hold after a failed payment{since}; access returns when the payment method is fixed."
        ),
        PurchaseStatus::Paused => format!("{off}: {what} is paused by the customer{since}."),
        PurchaseStatus::Pending => {
            format!("{off}: the payment for {what} is still pending.")
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
                    "{off}: {what} could not be renewed and its grace period ended on {}.",
                    when(g)
                ),
                (Some(Store::Trial | Store::Promotional), _, _, Some(end)) => {
                    format!("{off}: {what} ended on {}.", when(end))
                }
                (_, _, Some(PurchaseStatus::Canceled), Some(end)) => format!(
                    "{off}: {what} was canceled and its paid period ended on {}.",
                    when(end)
                ),
                (_, _, _, Some(end)) => format!("{off}: {what} expired on {}.", when(end)),
                (_, _, _, None) => format!("{off}: {what} no longer gives access."),
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
    lead: &Lead,
) -> String {
    let on = lead.on();
    let Some(end) = state.expires_at else {
        return match store {
            Some(Store::Promotional) => format!("{on}: the promotional grant has no end date."),
            _ => {
                format!("{on}: {what} gives access for life; it ends only if refunded or revoked.")
            }
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
            format!("{on}: {what} runs until {until}; it does not renew.")
        }
        (_, PurchaseStatus::Refunded | PurchaseStatus::Revoked) => format!(
            "{on} until {until}: {what} was {}, effective then.",
            status.as_str()
        ),
        (_, PurchaseStatus::InGracePeriod) => format!(
            "{on} in a grace period: {what} could not be renewed; access continues until {until} while the store retries the payment."
        ),
        (_, PurchaseStatus::Canceled) => format!(
            "{on}: {what} was canceled; the paid period runs until {until}, then access ends."
        ),
        _ if status == PurchaseStatus::Trialing || period == Some(PeriodType::Trial) => {
            format!(
                "{on}: {what} is in its store free trial until {until}; {}.",
                if state.will_renew {
                    "it then renews as paid"
                } else {
                    "it will not renew"
                }
            )
        }
        _ if period == Some(PeriodType::Intro) => {
            format!("{on}: {what} is at its introductory price until {until}; {renews}.")
        }
        _ => format!("{on}: {what} is paid until {until}; {renews}."),
    }
}

/// Not counted only because the server refuses sandbox purchases.
fn ignored_sandbox(with_sandbox: &EntitlementState, p: &PurchaseFacts, lead: &Lead) -> String {
    const IGNORED: &str = "sandbox purchases are ignored in production (accept_sandbox = false)";
    let what = label(with_sandbox, Some(p));
    let off = lead.off();
    let until = with_sandbox
        .expires_at
        .map_or_else(|| "for life".to_string(), |t| format!("until {}", when(t)));
    match (lead, with_sandbox.is_active) {
        (Lead::Entitlement, true) => {
            format!("{off}: {what} would give access {until}, but {IGNORED}.")
        }
        (Lead::Entitlement, false) => {
            format!("{off}: only {what} was ever seen, and {IGNORED}.")
        }
        (Lead::Purchase { keys }, true) => {
            format!("{off}: {what} would grant {keys} {until}, but {IGNORED}.")
        }
        (Lead::Purchase { .. }, false) => {
            format!("{off}: {IGNORED}, and {what} would not give access now anyway.")
        }
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
                    kind: ProductKind::Subscription,
                    display_name: None,
                    stripe_price_id: None,
                    stripe_payment_link: None,
                    app_store_product_id: Some("com.x.bundle".into()),
                    play_store_product_id: None,
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

    /// One purchase's sentence at day `at_day`.
    fn purchase_says(p: &PurchaseFacts, at_day: i64, sandbox: bool) -> String {
        explain_purchase(&catalog(), p, t0() + Duration::days(at_day), sandbox)
    }

    #[track_caller]
    fn expect_purchase(p: &PurchaseFacts, at_day: i64, want: &str) {
        for sandbox in [true, false] {
            assert_eq!(
                purchase_says(p, at_day, sandbox),
                want,
                "accept_sandbox = {sandbox}"
            );
        }
    }

    #[test]
    fn a_purchase_says_what_it_grants_or_why_not() {
        use PurchaseStatus::*;
        expect_purchase(
            &sub(Active),
            1,
            &format!(
                "Grants pro: the App Store subscription com.x.pro.monthly is paid until {}; it will renew then.",
                day(30)
            ),
        );
        expect_purchase(
            &sub(Active),
            31,
            &format!(
                "Grants nothing: the App Store subscription com.x.pro.monthly expired on {}.",
                day(30)
            ),
        );
        expect_purchase(
            &sub(Expired),
            31,
            &format!(
                "Grants nothing: the App Store subscription com.x.pro.monthly expired on {}.",
                day(30)
            ),
        );
        let refunded = PurchaseFacts {
            revoked_at: Some(t0() + Duration::days(5)),
            ..sub(Refunded)
        };
        expect_purchase(
            &refunded,
            6,
            &format!(
                "Grants nothing: the App Store subscription com.x.pro.monthly was refunded on {}.",
                day(5)
            ),
        );
        expect_purchase(
            &refunded,
            4,
            &format!(
                "Grants pro until {}: the App Store subscription com.x.pro.monthly was refunded, effective then.",
                day(5)
            ),
        );
        let revoked = PurchaseFacts {
            revoked_at: Some(t0() + Duration::days(5)),
            ..sub(Revoked)
        };
        expect_purchase(
            &revoked,
            6,
            &format!(
                "Grants nothing: the App Store subscription com.x.pro.monthly was revoked on {} (by the store, or moved to another customer).",
                day(5)
            ),
        );
        expect_purchase(
            &sub(Pending),
            1,
            "Grants nothing: the payment for the App Store subscription com.x.pro.monthly is still pending.",
        );
        let grace = PurchaseFacts {
            grace_expires_at: Some(t0() + Duration::days(36)),
            ..sub(InGracePeriod)
        };
        expect_purchase(
            &grace,
            32,
            &format!(
                "Grants pro in a grace period: the App Store subscription com.x.pro.monthly could not be renewed; access continues until {} while the store retries the payment.",
                day(36)
            ),
        );
        let life = PurchaseFacts {
            store: Store::Stripe,
            product_id: "price_life".into(),
            expires_at: None,
            auto_renew: false,
            ..sub(Active)
        };
        expect_purchase(
            &life,
            400,
            "Grants pro: the Stripe lifetime purchase price_life gives access for life; it ends only if refunded or revoked.",
        );
        let promo = PurchaseFacts {
            store: Store::Promotional,
            product_id: "maps".into(),
            auto_renew: false,
            expires_at: None,
            ..sub(Active)
        };
        expect_purchase(
            &promo,
            1,
            "Grants maps: the promotional grant has no end date.",
        );
        let trial = PurchaseFacts {
            store: Store::Trial,
            product_id: "pro".into(),
            period_type: PeriodType::Trial,
            auto_renew: false,
            expires_at: Some(t0() + Duration::days(7)),
            ..sub(Active)
        };
        expect_purchase(
            &trial,
            8,
            &format!("Grants nothing: the free trial ended on {}.", day(7)),
        );
        let bundle = PurchaseFacts {
            product_id: "com.x.bundle".into(),
            ..sub(Canceled)
        };
        expect_purchase(
            &bundle,
            1,
            &format!(
                "Grants pro and maps: the App Store subscription com.x.bundle was canceled; the paid period runs until {}, then access ends.",
                day(30)
            ),
        );
    }

    #[test]
    fn a_purchase_of_a_product_the_catalog_does_not_map_grants_nothing() {
        let unknown = PurchaseFacts {
            product_id: "com.x.retired".into(),
            ..sub(PurchaseStatus::Active)
        };
        expect_purchase(
            &unknown,
            1,
            "Grants nothing: the App Store product com.x.retired is not in the catalog.",
        );
        // Sandbox or not, an unmapped product is the first thing to fix.
        let sandbox = PurchaseFacts {
            environment: Environment::Sandbox,
            ..unknown
        };
        expect_purchase(
            &sandbox,
            1,
            "Grants nothing: the App Store product com.x.retired is not in the catalog.",
        );
        let grant = PurchaseFacts {
            store: Store::Promotional,
            product_id: "gone".into(),
            ..sub(PurchaseStatus::Active)
        };
        expect_purchase(
            &grant,
            1,
            "Grants nothing: gone is not an entitlement of the catalog.",
        );
    }

    #[test]
    fn a_sandbox_purchase_grants_only_when_the_server_accepts_sandbox() {
        let p = PurchaseFacts {
            environment: Environment::Sandbox,
            ..sub(PurchaseStatus::Active)
        };
        assert_eq!(
            purchase_says(&p, 1, true),
            format!(
                "Grants pro: the App Store sandbox subscription com.x.pro.monthly is paid until {}; it will renew then.",
                day(30)
            )
        );
        assert_eq!(
            purchase_says(&p, 1, false),
            format!(
                "Grants nothing: the App Store sandbox subscription com.x.pro.monthly would grant pro until {}, but sandbox purchases are ignored in production (accept_sandbox = false).",
                day(30)
            )
        );
        // Lapsed as well as refused.
        assert_eq!(
            purchase_says(&p, 40, false),
            "Grants nothing: sandbox purchases are ignored in production (accept_sandbox = false), and the App Store sandbox subscription com.x.pro.monthly would not give access now anyway."
        );
        assert_eq!(
            purchase_says(&p, 40, true),
            format!(
                "Grants nothing: the App Store sandbox subscription com.x.pro.monthly expired on {}.",
                day(30)
            )
        );
        let life = PurchaseFacts {
            environment: Environment::Sandbox,
            store: Store::Stripe,
            product_id: "price_life".into(),
            expires_at: None,
            ..sub(PurchaseStatus::Active)
        };
        assert_eq!(
            purchase_says(&life, 1, false),
            "Grants nothing: the Stripe sandbox lifetime purchase price_life would grant pro for life, but sandbox purchases are ignored in production (accept_sandbox = false)."
        );
    }

    /// A purchase that is an entitlement's only source reads the same as
    /// the entitlement, bar the opening: one set of rules, one wording.
    #[test]
    fn a_sole_source_reads_as_its_entitlement() {
        use PurchaseStatus::*;
        for status in [
            Active,
            Trialing,
            Canceled,
            InGracePeriod,
            InBillingRetry,
            OnHold,
            Paused,
            Expired,
            Refunded,
            Revoked,
            Pending,
        ] {
            let p = PurchaseFacts {
                revoked_at: matches!(status, Refunded | Revoked).then(|| t0() + Duration::days(5)),
                grace_expires_at: Some(t0() + Duration::days(36)),
                ..sub(status)
            };
            for at_day in [1, 4, 6, 31, 33, 40] {
                for sandbox in [true, false] {
                    let (active, e) = say(
                        std::slice::from_ref(&p),
                        t0() + Duration::days(at_day),
                        sandbox,
                    );
                    let s = purchase_says(&p, at_day, sandbox);
                    let (lead, rest) = if active {
                        ("Grants pro", e.strip_prefix("Active").unwrap())
                    } else {
                        ("Grants nothing", e.strip_prefix("Not active").unwrap())
                    };
                    assert_eq!(s, format!("{lead}{rest}"), "{status:?} at day {at_day}");
                }
            }
        }
    }
}
