//! Operator actions on outbound webhook endpoints: their state, and
//! re-enabling one that was disabled after failing for too long.

use chrono::{DateTime, Utc};
use entities::{outbound_deliveries as deliveries, outbound_endpoints as endpoints};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect, sea_query::Expr};

use super::Core;
use crate::error::{AppError, AppResult};

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

impl Core {
    /// Every configured endpoint, and every one the database still knows.
    pub async fn outbound_status(&self, configured: &[String]) -> AppResult<Vec<EndpointState>> {
        let db = &self.db.conn;
        let rows = endpoints::Entity::find().all(db).await?;
        let pending: Vec<(String, i64)> = deliveries::Entity::find()
            .select_only()
            .column(deliveries::Column::EndpointUrl)
            .column_as(deliveries::Column::Id.count(), "n")
            .filter(deliveries::Column::DeliveredAt.is_null())
            .group_by(deliveries::Column::EndpointUrl)
            .into_tuple()
            .all(db)
            .await?;
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
        let db = &self.db.conn;
        let now = self.now();
        let endpoint = endpoints::Entity::update_many()
            .col_expr(
                endpoints::Column::DisabledAt,
                Expr::value(None::<DateTime<Utc>>),
            )
            .col_expr(
                endpoints::Column::FailingSince,
                Expr::value(None::<DateTime<Utc>>),
            )
            .filter(endpoints::Column::Url.eq(url))
            .exec(db)
            .await?;
        let due = deliveries::Entity::update_many()
            .col_expr(deliveries::Column::NextAttemptAt, Expr::value(now))
            .filter(deliveries::Column::EndpointUrl.eq(url))
            .filter(deliveries::Column::DeliveredAt.is_null())
            .exec(db)
            .await?;
        if endpoint.rows_affected == 0 && due.rows_affected == 0 {
            return Err(AppError::NotFound("outbound endpoint"));
        }
        Ok(due.rows_affected)
    }
}
