//! Operator actions on outbound webhook endpoints: their state, and
//! re-enabling one that was disabled after failing for too long.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::{
    clock::Clock,
    db::{self, Db},
    error::{AppError, AppResult},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointState {
    pub url: String,
    /// In the current configuration; rows of a removed endpoint are kept.
    pub configured: bool,
    pub failing_since: Option<DateTime<Utc>>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    /// Deliveries not yet made.
    pub pending: i64,
}

impl EndpointState {
    pub fn describe(&self) -> String {
        match (self.disabled_at, self.failing_since) {
            (Some(at), _) => format!("disabled since {}", at.to_rfc3339()),
            (None, Some(at)) => format!("failing since {}", at.to_rfc3339()),
            (None, None) => "healthy".into(),
        }
    }
}

/// The operator's view of outbound endpoints; delivery itself is the
/// event relay's.
pub struct Outbound {
    db: Db,
    clock: Arc<dyn Clock>,
}

impl Outbound {
    pub(super) fn new(db: Db, clock: Arc<dyn Clock>) -> Outbound {
        Outbound { db, clock }
    }

    /// Every configured endpoint, and every one the database still knows.
    pub async fn outbound_status(&self, configured: &[String]) -> AppResult<Vec<EndpointState>> {
        let conn = &self.db.conn;
        let rows = db::outbound_endpoint::all(conn).await?;
        let pending = db::outbound_endpoint::pending_by_url(conn).await?;
        // Every endpoint the configuration or the database knows, once, by URL.
        let urls: std::collections::BTreeSet<&String> = configured
            .iter()
            .chain(rows.iter().map(|r| &r.url))
            .chain(pending.iter().map(|(url, _)| url))
            .collect();
        Ok(urls
            .into_iter()
            .map(|url| {
                let row = rows.iter().find(|r| &r.url == url);
                EndpointState {
                    url: url.clone(),
                    configured: configured.contains(url),
                    failing_since: row.and_then(|r| r.failing_since),
                    disabled_at: row.and_then(|r| r.disabled_at),
                    last_success_at: row.and_then(|r| r.last_success_at),
                    pending: pending
                        .iter()
                        .find(|(u, _)| u == url)
                        .map_or(0, |(_, n)| *n),
                }
            })
            .collect())
    }

    /// Re-enables an endpoint and makes its undelivered rows due now, with
    /// a fresh failure window; returns how many rows that is.
    pub async fn enable_outbound_endpoint(&self, url: &str) -> AppResult<u64> {
        let conn = &self.db.conn;
        let now = self.clock.now();
        let endpoint = db::outbound_endpoint::clear_failure(conn, url).await?;
        let due = db::outbound_endpoint::make_due(conn, url, now).await?;
        if endpoint == 0 && due == 0 {
            return Err(AppError::NotFound("outbound endpoint"));
        }
        Ok(due)
    }
}
