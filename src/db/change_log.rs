//! Reads and marks of the change log (`entitlement_events`) as the relay
//! and the live feed consume it, and the relay's turn-taking between
//! replicas.

use chrono::{DateTime, Utc};
use entities::{entitlement_events, outbound_deliveries};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement, TransactionTrait,
    sea_query::{Expr, SimpleExpr},
};

use super::Db;
use crate::error::AppResult;

/// Where the relay hands change-log rows; each marks the rows it took in a
/// column of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outlet {
    /// The Redis stream (`published_at`).
    Stream,
    /// The outbound webhook queue (`outbound_queued_at`).
    OutboundQueue,
}

impl Outlet {
    fn column(self) -> entitlement_events::Column {
        match self {
            Outlet::Stream => entitlement_events::Column::PublishedAt,
            Outlet::OutboundQueue => entitlement_events::Column::OutboundQueuedAt,
        }
    }

    /// Shared by every replica: the PostgreSQL advisory lock that lets one
    /// relay per outlet at a time take rows, so rows leave in order and
    /// never twice concurrently.
    fn lock(self) -> i64 {
        match self {
            Outlet::Stream => 0x656e_7469_746c_6501,
            Outlet::OutboundQueue => 0x656e_7469_746c_6502,
        }
    }
}

/// Whether this relay may feed its outlet now.
pub enum Turn {
    /// PostgreSQL: this transaction holds the outlet's lock until it ends.
    Held(DatabaseTransaction),
    /// PostgreSQL: another replica is feeding the outlet.
    Busy,
    /// SQLite: one process owns the file; there is no lock to take.
    Alone,
}

/// Takes the outlet's turn for one batch (see [`Turn`]).
pub async fn take_turn(db: &Db, outlet: Outlet) -> AppResult<Turn> {
    if db.backend() != DbBackend::Postgres {
        return Ok(Turn::Alone);
    }
    let txn = db.conn.begin().await?;
    let locked = txn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_try_advisory_xact_lock($1) AS locked",
            [outlet.lock().into()],
        ))
        .await?
        .map(|r| r.try_get::<bool>("", "locked"))
        .transpose()?
        .unwrap_or(false);
    Ok(if locked { Turn::Held(txn) } else { Turn::Busy })
}

/// The oldest rows the outlet has not taken yet.
pub async fn untaken(
    c: &impl ConnectionTrait,
    outlet: Outlet,
    limit: u64,
) -> AppResult<Vec<entitlement_events::Model>> {
    Ok(entitlement_events::Entity::find()
        .filter(outlet.column().is_null())
        .order_by_asc(entitlement_events::Column::Id)
        .limit(limit)
        .all(c)
        .await?)
}

/// Records that the outlet took the rows `ids` at `at`.
pub async fn mark_taken(
    c: &impl ConnectionTrait,
    outlet: Outlet,
    ids: Vec<i64>,
    at: DateTime<Utc>,
) -> AppResult<()> {
    entitlement_events::Entity::update_many()
        .col_expr(outlet.column(), Expr::value(at))
        .filter(entitlement_events::Column::Id.is_in(ids))
        .exec(c)
        .await?;
    Ok(())
}

/// Queues one delivery per (event, endpoint URL), due at `now`; a pair
/// already queued stays as it is.
pub async fn queue_deliveries(
    c: &impl ConnectionTrait,
    event_ids: &[i64],
    urls: &[String],
    now: DateTime<Utc>,
) -> AppResult<()> {
    let queued = event_ids.iter().flat_map(|&id| {
        urls.iter()
            .map(move |url| outbound_deliveries::ActiveModel {
                event_id: Set(id),
                endpoint_url: Set(url.clone()),
                attempts: Set(0),
                next_attempt_at: Set(now),
                delivered_at: Set(None),
                last_error: Set(None),
                created_at: Set(now),
                ..Default::default()
            })
    });
    outbound_deliveries::Entity::insert_many(queued)
        .on_conflict_do_nothing_on([
            outbound_deliveries::Column::EventId,
            outbound_deliveries::Column::EndpointUrl,
        ])
        .exec_without_returning(c)
        .await?;
    Ok(())
}

/// The highest id in the change log, `None` while it is empty.
pub async fn last_id(c: &impl ConnectionTrait) -> AppResult<Option<i64>> {
    Ok(entitlement_events::Entity::find()
        .select_only()
        .column_as(entitlement_events::Column::Id.max(), "max")
        .into_tuple::<Option<i64>>()
        .one(c)
        .await?
        .flatten())
}

/// Which change-log rows the feed asks for, in id order.
#[derive(Clone, Debug)]
pub enum Span {
    /// These ids (those committed by now).
    Ids(Vec<i64>),
    /// At most `limit` rows after `id`.
    After { id: i64, limit: u64 },
}

impl Span {
    fn filter(self) -> (SimpleExpr, Option<u64>) {
        use entitlement_events::Column;
        match self {
            Span::Ids(ids) => (Column::Id.is_in(ids), None),
            Span::After { id, limit } => (Column::Id.gt(id), Some(limit)),
        }
    }
}

fn span_query(span: Span) -> sea_orm::Select<entitlement_events::Entity> {
    let (filter, limit) = span.filter();
    entitlement_events::Entity::find()
        .filter(filter)
        .order_by_asc(entitlement_events::Column::Id)
        .limit(limit)
}

/// The rows of `span`, whole.
pub async fn rows_in(
    c: &impl ConnectionTrait,
    span: Span,
) -> AppResult<Vec<entitlement_events::Model>> {
    Ok(span_query(span).all(c).await?)
}

/// The ids of the rows of `span` only, for keeping a place in the log.
pub async fn ids_in(c: &impl ConnectionTrait, span: Span) -> AppResult<Vec<i64>> {
    Ok(span_query(span)
        .select_only()
        .column(entitlement_events::Column::Id)
        .into_tuple::<i64>()
        .all(c)
        .await?)
}
