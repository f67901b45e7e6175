//! Outbound webhook endpoints' state as the operator sees and resets it.

use chrono::{DateTime, Utc};
use entities::{outbound_deliveries as deliveries, outbound_endpoints as endpoints};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect, sea_query::Expr,
};

use crate::error::AppResult;

pub async fn all(c: &impl ConnectionTrait) -> AppResult<Vec<endpoints::Model>> {
    Ok(endpoints::Entity::find().all(c).await?)
}

/// Deliveries not yet made, counted by endpoint URL.
pub async fn pending_by_url(c: &impl ConnectionTrait) -> AppResult<Vec<(String, i64)>> {
    Ok(deliveries::Entity::find()
        .select_only()
        .column(deliveries::Column::EndpointUrl)
        .column_as(deliveries::Column::Id.count(), "n")
        .filter(deliveries::Column::DeliveredAt.is_null())
        .group_by(deliveries::Column::EndpointUrl)
        .into_tuple()
        .all(c)
        .await?)
}

/// Clears an endpoint's disabled and failing marks; returns the rows written.
pub async fn clear_failure(c: &impl ConnectionTrait, url: &str) -> AppResult<u64> {
    let res = endpoints::Entity::update_many()
        .col_expr(
            endpoints::Column::DisabledAt,
            Expr::value(None::<DateTime<Utc>>),
        )
        .col_expr(
            endpoints::Column::FailingSince,
            Expr::value(None::<DateTime<Utc>>),
        )
        .filter(endpoints::Column::Url.eq(url))
        .exec(c)
        .await?;
    Ok(res.rows_affected)
}

/// Makes an endpoint's undelivered rows due at `at`; returns how many.
pub async fn make_due(c: &impl ConnectionTrait, url: &str, at: DateTime<Utc>) -> AppResult<u64> {
    let res = deliveries::Entity::update_many()
        .col_expr(deliveries::Column::NextAttemptAt, Expr::value(at))
        .filter(deliveries::Column::EndpointUrl.eq(url))
        .filter(deliveries::Column::DeliveredAt.is_null())
        .exec(c)
        .await?;
    Ok(res.rows_affected)
}
