//! The outbound webhook queue as the dispatcher works it: due deliveries,
//! their outcomes, and the health of each endpoint.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use entities::{
    entitlement_events, outbound_deliveries as deliveries, outbound_endpoints as endpoints,
};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, sea_query::Expr,
};

use crate::error::AppResult;

/// Of these endpoint URLs, the ones disabled.
pub async fn disabled_endpoints(
    c: &impl ConnectionTrait,
    urls: Vec<String>,
) -> AppResult<Vec<String>> {
    Ok(endpoints::Entity::find()
        .select_only()
        .column(endpoints::Column::Url)
        .filter(endpoints::Column::Url.is_in(urls))
        .filter(endpoints::Column::DisabledAt.is_not_null())
        .into_tuple()
        .all(c)
        .await?)
}

/// Makes sure each URL has its endpoint row; existing rows stay as they are.
pub async fn ensure_endpoints(c: &impl ConnectionTrait, urls: &[String]) -> AppResult<()> {
    let rows = urls.iter().map(|url| endpoints::ActiveModel {
        url: Set(url.clone()),
        failing_since: Set(None),
        disabled_at: Set(None),
        last_success_at: Set(None),
    });
    endpoints::Entity::insert_many(rows)
        .on_conflict_do_nothing_on([endpoints::Column::Url])
        .exec_without_returning(c)
        .await?;
    Ok(())
}

/// The endpoint's undelivered rows due at `now`, in event order.
pub async fn due(
    c: &impl ConnectionTrait,
    endpoint_url: &str,
    now: DateTime<Utc>,
    limit: u64,
) -> AppResult<Vec<deliveries::Model>> {
    Ok(deliveries::Entity::find()
        .filter(deliveries::Column::EndpointUrl.eq(endpoint_url))
        .filter(deliveries::Column::DeliveredAt.is_null())
        .filter(deliveries::Column::NextAttemptAt.lte(now))
        .order_by_asc(deliveries::Column::EventId)
        .order_by_asc(deliveries::Column::Id)
        .limit(limit)
        .all(c)
        .await?)
}

/// The change-log rows these deliveries carry, by id.
pub async fn events_of(
    c: &impl ConnectionTrait,
    due: &[deliveries::Model],
) -> AppResult<HashMap<i64, entitlement_events::Model>> {
    Ok(entitlement_events::Entity::find()
        .filter(entitlement_events::Column::Id.is_in(due.iter().map(|d| d.event_id)))
        .all(c)
        .await?
        .into_iter()
        .map(|m| (m.id, m))
        .collect())
}

/// The delivery arrived (its `attempts`-th attempt), and its endpoint is
/// healthy again.
pub async fn record_delivered(
    c: &impl ConnectionTrait,
    row: &deliveries::Model,
    attempts: i32,
    now: DateTime<Utc>,
) -> AppResult<()> {
    deliveries::Entity::update_many()
        .col_expr(deliveries::Column::Attempts, Expr::value(attempts))
        .col_expr(deliveries::Column::DeliveredAt, Expr::value(Some(now)))
        .col_expr(deliveries::Column::LastError, Expr::value(None::<String>))
        .filter(deliveries::Column::Id.eq(row.id))
        .exec(c)
        .await?;
    endpoints::Entity::update_many()
        .col_expr(
            endpoints::Column::FailingSince,
            Expr::value(None::<DateTime<Utc>>),
        )
        .col_expr(endpoints::Column::LastSuccessAt, Expr::value(Some(now)))
        .filter(endpoints::Column::Url.eq(row.endpoint_url.as_str()))
        .exec(c)
        .await?;
    Ok(())
}

/// The delivery `id` failed (its `attempts`-th attempt) for `reason`; it is
/// tried again at `retry_at`.
pub async fn record_attempt_failed(
    c: &impl ConnectionTrait,
    id: i64,
    attempts: i32,
    reason: &str,
    retry_at: DateTime<Utc>,
) -> AppResult<()> {
    deliveries::Entity::update_many()
        .col_expr(deliveries::Column::Attempts, Expr::value(attempts))
        .col_expr(deliveries::Column::NextAttemptAt, Expr::value(retry_at))
        .col_expr(deliveries::Column::LastError, Expr::value(Some(reason)))
        .filter(deliveries::Column::Id.eq(id))
        .exec(c)
        .await?;
    Ok(())
}

/// The endpoint failed at `now` on the delivery `failed_row`: marks it
/// failing (since now, unless it already was), moves its other due rows to
/// `retry_at`, and disables it when it has been failing since
/// `disable_if_failing_since` or earlier. True when this disabled it.
pub async fn record_endpoint_failed(
    c: &impl ConnectionTrait,
    url: &str,
    failed_row: i64,
    now: DateTime<Utc>,
    retry_at: DateTime<Utc>,
    disable_if_failing_since: DateTime<Utc>,
) -> AppResult<bool> {
    endpoints::Entity::update_many()
        .col_expr(endpoints::Column::FailingSince, Expr::value(Some(now)))
        .filter(endpoints::Column::Url.eq(url))
        .filter(endpoints::Column::FailingSince.is_null())
        .exec(c)
        .await?;
    deliveries::Entity::update_many()
        .col_expr(deliveries::Column::NextAttemptAt, Expr::value(retry_at))
        .filter(deliveries::Column::EndpointUrl.eq(url))
        .filter(deliveries::Column::DeliveredAt.is_null())
        .filter(deliveries::Column::NextAttemptAt.lte(now))
        .filter(deliveries::Column::Id.ne(failed_row))
        .exec(c)
        .await?;
    let disabled = endpoints::Entity::update_many()
        .col_expr(endpoints::Column::DisabledAt, Expr::value(Some(now)))
        .filter(endpoints::Column::Url.eq(url))
        .filter(endpoints::Column::DisabledAt.is_null())
        .filter(endpoints::Column::FailingSince.lte(disable_if_failing_since))
        .exec(c)
        .await?;
    Ok(disabled.rows_affected > 0)
}
