//! The refresh scheduler: purchases whose period ends soon are re-read from
//! their store, as the stores advise (ask at renewal time, not on every
//! read), so a renewal, a lapse into billing retry or an expiry is known
//! even when its webhook never comes.

use chrono::{DateTime, Duration, Utc};
use entities::purchases;

use crate::{
    config::JobsConfig,
    db::{self, jobs::RefreshDue},
    domain::{PurchaseStatus, Store},
    error::AppResult,
    service::Core,
};

pub const JOB: &str = "refresh";

/// Purchases re-read per run; the rest wait for the next run.
const BATCH: u64 = 100;
/// A period that ended this long ago is still asked about: the store may
/// settle it (renewed late, retry, expiry) a while after the end.
const LOOKBACK: Duration = Duration::days(1);
/// How long after its period a purchase in billing retry, on hold or paused
/// may still come back (Apple retries for 60 days; Play pauses for up to
/// three months).
const SETTLE_WINDOW: Duration = Duration::days(100);

/// The stores whose API this deployment can ask.
pub fn stores(core: &Core) -> Vec<Store> {
    let mut out = Vec::new();
    let stores = core.stores();
    if stores.stripe().is_ok_and(|s| s.api().is_some()) {
        out.push(Store::Stripe);
    }
    if stores.apple().is_ok_and(|a| a.api().is_some()) {
        out.push(Store::AppStore);
    }
    if stores.google().is_ok_and(|g| g.has_api()) {
        out.push(Store::PlayStore);
    }
    out
}

/// What one run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    pub checked: usize,
    pub failed: usize,
}

/// Re-reads one batch of purchases due for a check; returns how many.
pub async fn run(core: &Core, cfg: &JobsConfig) -> AppResult<Refreshed> {
    let stores = stores(core);
    if stores.is_empty() {
        return Ok(Refreshed::default());
    }
    let now = core.now();
    let due = due(core, cfg, &stores, now).await?;
    let mut done = Refreshed::default();
    for p in due {
        let outcome = match core.stores().refresh_purchase(&p).await {
            Ok(o) => o.to_string(),
            Err(e) => {
                done.failed += 1;
                tracing::warn!(purchase = p.id, store = %p.store, error = e.for_log(), "refresh failed");
                // Said without the cause: it may quote a store's answer.
                format!("error:{}", e.code())
            }
        };
        record(core, p.id, &outcome, now).await?;
        done.checked += 1;
    }
    Ok(done)
}

/// Purchases of `stores` not checked within `refresh_every_secs` whose
/// period (or grace) ends within `refresh_ahead_secs` or ended less than a
/// day ago, and those still in billing retry, on hold or paused; soonest
/// first.
async fn due(
    core: &Core,
    cfg: &JobsConfig,
    stores: &[Store],
    now: DateTime<Utc>,
) -> AppResult<Vec<purchases::Model>> {
    let ahead = now + secs(cfg.refresh_ahead_secs);
    let from = now - LOOKBACK;
    let checked_since = now - secs(cfg.refresh_every_secs);
    // Canceled purchases too: a lost un-cancel would otherwise end them.
    let by_period_end = [
        PurchaseStatus::Active,
        PurchaseStatus::Trialing,
        PurchaseStatus::Canceled,
        PurchaseStatus::InGracePeriod,
        PurchaseStatus::InBillingRetry,
    ];
    // Their end is the store's (a retry succeeding, a hold or pause
    // lifting) and no date of ours says when: asked every
    // `refresh_every_secs` for as long as the store may still settle them.
    let until_settled = [
        PurchaseStatus::InBillingRetry,
        PurchaseStatus::OnHold,
        PurchaseStatus::Paused,
    ];
    db::jobs::due_for_refresh(
        &core.db().conn,
        &RefreshDue {
            stores,
            by_period_end: &by_period_end,
            ends_from: from,
            ends_until: ahead,
            until_settled: &until_settled,
            settle_from: now - SETTLE_WINDOW,
            checked_since,
        },
        BATCH,
    )
    .await
}

/// A configured number of seconds, at most ten years.
fn secs(n: u64) -> Duration {
    let ten_years = Duration::days(3650);
    i64::try_from(n)
        .ok()
        .and_then(Duration::try_seconds)
        .map_or(ten_years, |d| std::cmp::min(d, ten_years))
}

async fn record(core: &Core, purchase_id: i64, outcome: &str, now: DateTime<Utc>) -> AppResult<()> {
    db::jobs::record_check(&core.db().conn, purchase_id, outcome, now).await
}
