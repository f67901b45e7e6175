//! Reconciliation: recovers store notifications our webhooks missed.
//!
//! - Stripe: events whose delivery failed (`delivery_success=false`),
//!   processed as a verified webhook would be.
//! - App Store: the notification history (failed sends only), each
//!   `signedPayload` verified and applied as `POST /webhooks/apple` does.
//! - Google Play: the voided-purchases list, each one a refund of the
//!   purchase we hold.
//!
//! Each is deduplicated with the webhooks (`webhook_events`), so a rerun,
//! or an overlap with a webhook that did arrive, changes nothing twice. Each
//! keeps in `job_cursors` the instant up to which it has reconciled.

use chrono::{DateTime, Duration, Utc};

use crate::{
    config::ReconcileConfig,
    domain::webhook_log::WebhookOutcome,
    error::{AppError, AppResult},
    service::Core,
};

pub const JOB: &str = "reconcile";

/// Each run starts this long before where the last one ended: a failed
/// delivery is listed only once its first attempt failed.
const OVERLAP: Duration = Duration::minutes(10);
/// Where a store without a cursor starts.
const FIRST_LOOKBACK: Duration = Duration::days(3);
/// Pages read per store and run; more are left to the next run.
const MAX_PAGES: usize = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Stripe,
    Apple,
    Google,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Stripe => "stripe",
            Source::Apple => "apple",
            Source::Google => "google",
        }
    }

    pub fn cursor(self) -> &'static str {
        match self {
            Source::Stripe => "reconcile:stripe",
            Source::Apple => "reconcile:apple",
            Source::Google => "reconcile:google",
        }
    }

    /// How far back the store keeps what we ask for.
    fn retention(self) -> Duration {
        match self {
            Source::Stripe | Source::Google => Duration::days(30),
            Source::Apple => Duration::days(180),
        }
    }
}

/// What one store's reconciliation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Events the store listed.
    pub seen: usize,
    /// Events that changed a purchase (or bound a customer).
    pub applied: usize,
    /// Events already processed (as a webhook or by an earlier run).
    pub duplicates: usize,
    /// Events recorded or passed over without an effect: types that change
    /// nothing, purchases nobody here holds, older than the stored state.
    pub skipped: usize,
}

/// The reconciliations that are both enabled and possible (the store's API
/// configured).
pub fn enabled(core: &Core, cfg: &ReconcileConfig) -> Vec<Source> {
    let mut out = Vec::new();
    let stores = core.stores();
    if cfg.stripe && stores.stripe().is_ok_and(|s| s.api().is_some()) {
        out.push(Source::Stripe);
    }
    if cfg.apple && stores.apple().is_ok_and(|a| a.api().is_some()) {
        out.push(Source::Apple);
    }
    if cfg.google && stores.google().is_ok_and(|g| g.has_api()) {
        out.push(Source::Google);
    }
    out
}

/// Runs every enabled reconciliation once. `since` overrides the saved
/// cursors. One store failing does not stop the others; its cursor stays.
pub async fn run(
    core: &Core,
    cfg: &ReconcileConfig,
    since: Option<DateTime<Utc>>,
) -> Vec<(Source, AppResult<Counts>)> {
    let mut out = Vec::new();
    for source in enabled(core, cfg) {
        let r = run_one(core, source, since).await;
        match &r {
            Ok(c) if c.seen > 0 => tracing::info!(
                store = source.name(),
                seen = c.seen,
                applied = c.applied,
                duplicates = c.duplicates,
                skipped = c.skipped,
                "reconciled"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(
                    store = source.name(),
                    error = e.for_log(),
                    "reconciliation failed"
                )
            }
        }
        out.push((source, r));
    }
    out
}

/// The job's run: every enabled store, failing if any failed.
pub async fn run_job(core: &Core, cfg: &ReconcileConfig) -> AppResult<()> {
    let failed: Vec<&str> = run(core, cfg, None)
        .await
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(s, _)| s.name())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(AppError::Internal(anyhow::anyhow!(
            "reconciliation failed for {}",
            failed.join(", ")
        )))
    }
}

async fn start_of(core: &Core, source: Source, now: DateTime<Utc>) -> AppResult<DateTime<Utc>> {
    Ok(super::read_cursor(&core.db().conn, source.cursor())
        .await?
        .and_then(|v| DateTime::parse_from_rfc3339(&v).ok())
        .map_or(now - FIRST_LOOKBACK, |t| t.with_timezone(&Utc) - OVERLAP))
}

/// Reconciles one store from `since` (default: its cursor) up to now, and
/// saves now as its cursor once every page was processed.
pub async fn run_one(
    core: &Core,
    source: Source,
    since: Option<DateTime<Utc>>,
) -> AppResult<Counts> {
    let now = core.now();
    let start = match since {
        Some(s) => s,
        None => start_of(core, source, now).await?,
    };
    // Asking for more than the store keeps is refused by some stores.
    let oldest = now - source.retention() + Duration::minutes(1);
    if start < oldest {
        tracing::warn!(
            store = source.name(),
            "the store keeps {} days; reconciling from then",
            source.retention().num_days()
        );
    }
    let start = start.max(oldest);
    let mut counts = Counts::default();
    let complete = match source {
        Source::Stripe => stripe(core, start, &mut counts).await?,
        Source::Apple => apple(core, start, now, &mut counts).await?,
        Source::Google => google(core, start, &mut counts).await?,
    };
    if complete {
        super::write_cursor(&core.db().conn, source.cursor(), &now.to_rfc3339(), now).await?;
    } else {
        tracing::warn!(
            store = source.name(),
            "more to reconcile than one run reads; the next run continues"
        );
    }
    Ok(counts)
}

/// Whether an error is about one event (skip it) rather than the store or
/// our database (stop, keep the cursor, retry next run).
fn event_error(e: &AppError) -> bool {
    matches!(
        e,
        AppError::BadInput(_) | AppError::InvalidReceipt(_) | AppError::NotFound(_)
    )
}

async fn stripe(core: &Core, start: DateTime<Utc>, counts: &mut Counts) -> AppResult<bool> {
    let stores = core.stores();
    let p = stores.stripe()?;
    // Stripe lists newest first; collected, then processed oldest first as
    // they happened.
    let mut events = Vec::new();
    let mut after: Option<String> = None;
    let mut complete = false;
    for _ in 0..MAX_PAGES {
        let page = p.undelivered_events(start, after.as_deref()).await?;
        after = page.events.last().map(|e| e.id.clone());
        events.extend(page.events);
        if !page.has_more || after.is_none() {
            complete = true;
            break;
        }
    }
    for ev in events.iter().rev() {
        counts.seen += 1;
        match stores
            .receive::<crate::providers::stripe::StripeProvider>(ev)
            .await
        {
            Ok(WebhookOutcome::Duplicate) => counts.duplicates += 1,
            Ok(WebhookOutcome::Applied | WebhookOutcome::Bound | WebhookOutcome::Refunded) => {
                counts.applied += 1
            }
            Ok(_) => counts.skipped += 1,
            Err(e) if event_error(&e) => {
                tracing::warn!(event = %ev.id, error = e.message(), "Stripe event skipped");
                counts.skipped += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(complete)
}

async fn apple(
    core: &Core,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    counts: &mut Counts,
) -> AppResult<bool> {
    let stores = core.stores();
    let apple = stores.apple()?;
    let mut token: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let (payloads, next) = apple
            .undelivered_notifications(start, end, token.as_deref())
            .await?;
        for signed in payloads {
            counts.seen += 1;
            match stores.apple_signed_payload(apple, &signed).await {
                Ok(WebhookOutcome::Duplicate) => counts.duplicates += 1,
                Ok(WebhookOutcome::Applied) => counts.applied += 1,
                Ok(_) => counts.skipped += 1,
                Err(e) if event_error(&e) => {
                    tracing::warn!(error = e.message(), "App Store notification skipped");
                    counts.skipped += 1;
                }
                Err(e) => return Err(e),
            }
        }
        match next {
            Some(t) => token = Some(t),
            None => return Ok(true),
        }
    }
    Ok(false)
}

async fn google(core: &Core, start: DateTime<Utc>, counts: &mut Counts) -> AppResult<bool> {
    let stores = core.stores();
    let google = stores.google()?;
    let mut token: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let page = google
            .voided_purchases(start, token.as_deref())
            .await
            .map_err(AppError::from)?;
        for v in &page.purchases {
            counts.seen += 1;
            match stores.apply_play_voided(google, v).await {
                Ok(WebhookOutcome::Duplicate) => counts.duplicates += 1,
                Ok(WebhookOutcome::Applied) => counts.applied += 1,
                Ok(_) => counts.skipped += 1,
                Err(e) if event_error(&e) => {
                    tracing::warn!(error = e.message(), "Play voided purchase skipped");
                    counts.skipped += 1;
                }
                Err(e) => return Err(e),
            }
        }
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => return Ok(true),
        }
    }
    Ok(false)
}
