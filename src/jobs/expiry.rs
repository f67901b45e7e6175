//! The expiry sweep: an entitlement that lapses with no store message (a
//! trial ending, a canceled period or a grace period running out, a grant
//! reaching its end) gets its `expired` change-log row within one interval.

use chrono::{DateTime, Duration, Utc};

use crate::{db, error::AppResult, service::Core};

pub const JOB: &str = "expiry";

/// Periods that ended this long before the last sweep are looked at again:
/// a write that set such an end may have committed after that sweep read.
/// Rows are written only when the change log lacks them, so this costs reads.
const OVERLAP: Duration = Duration::minutes(5);

/// Logs every lapse since the previous sweep; returns the rows written.
pub async fn sweep(core: &Core) -> AppResult<usize> {
    let now = core.now();
    let since = super::read_cursor(&core.db().conn, JOB)
        .await?
        .and_then(|v| DateTime::parse_from_rfc3339(&v).ok())
        .map_or(DateTime::<Utc>::UNIX_EPOCH, |t| {
            t.with_timezone(&Utc) - OVERLAP
        });
    let customers = db::jobs::customers_with_ends_between(&core.db().conn, since, now).await?;
    let mut written = 0;
    for customer in customers {
        written += core.customers().log_lapses(&customer, now).await?;
    }
    super::write_cursor(&core.db().conn, JOB, &now.to_rfc3339(), now).await?;
    if written > 0 {
        tracing::info!(rows = written, "expiry sweep logged lapsed entitlements");
    }
    Ok(written)
}
