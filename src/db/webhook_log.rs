//! Queries over the webhook log (`webhook_events`) and the overview's
//! counts, which read purchases and the change log in aggregate.

use chrono::{DateTime, Utc};
use entities::webhook_events;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement, TryInsertResult, Value, sea_query::Expr,
};

use crate::{
    domain::{Store, webhook_log::WebhookOutcome},
    error::AppResult,
};

/// What to list.
#[derive(Clone, Debug, Default)]
pub struct WebhookFilter {
    pub source: Option<String>,
    /// Any of these outcomes; empty for all.
    pub outcomes: Vec<String>,
    pub customer_id: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Rows with an id below this one (the cursor: newest first).
    pub before_id: Option<i64>,
}

/// One page of the log, newest first, and whether more follow.
pub async fn webhook_events_page(
    c: &impl ConnectionTrait,
    f: &WebhookFilter,
    first: u64,
) -> AppResult<(Vec<webhook_events::Model>, bool)> {
    let mut q = webhook_events::Entity::find().order_by_desc(webhook_events::Column::Id);
    if let Some(s) = &f.source {
        q = q.filter(webhook_events::Column::Source.eq(s.as_str()));
    }
    if !f.outcomes.is_empty() {
        q = q.filter(webhook_events::Column::Outcome.is_in(f.outcomes.iter().map(String::as_str)));
    }
    if let Some(cid) = &f.customer_id {
        q = q.filter(webhook_events::Column::CustomerId.eq(cid.as_str()));
    }
    if let Some(t) = f.since {
        q = q.filter(webhook_events::Column::ReceivedAt.gte(t));
    }
    if let Some(id) = f.before_id {
        q = q.filter(webhook_events::Column::Id.lt(id));
    }
    let mut rows = q.limit(first + 1).all(c).await?;
    let more = rows.len() as u64 > first;
    rows.truncate(first as usize);
    Ok((rows, more))
}

/// The stored notifications that touched one customer, newest first.
pub async fn webhook_events_of(
    c: &impl ConnectionTrait,
    customer_id: &str,
    limit: u64,
) -> AppResult<Vec<webhook_events::Model>> {
    Ok(webhook_events::Entity::find()
        .filter(webhook_events::Column::CustomerId.eq(customer_id))
        .order_by_desc(webhook_events::Column::Id)
        .limit(limit)
        .all(c)
        .await?)
}

/// One stored notification by row id.
pub async fn webhook_event(
    c: &impl ConnectionTrait,
    id: i64,
) -> AppResult<Option<webhook_events::Model>> {
    Ok(webhook_events::Entity::find_by_id(id).one(c).await?)
}

/// One stored notification by the store's own event id.
pub async fn webhook_event_by_source(
    c: &impl ConnectionTrait,
    source: Store,
    event_id: &str,
) -> AppResult<Option<webhook_events::Model>> {
    Ok(webhook_events::Entity::find()
        .filter(webhook_events::Column::Source.eq(source.as_str()))
        .filter(webhook_events::Column::EventId.eq(event_id))
        .one(c)
        .await?)
}

/// The recorded outcome of a store's event, reading that column only.
pub async fn outcome_of(
    c: &impl ConnectionTrait,
    source: Store,
    event_id: &str,
) -> AppResult<Option<String>> {
    Ok(webhook_events::Entity::find()
        .filter(webhook_events::Column::Source.eq(source.as_str()))
        .filter(webhook_events::Column::EventId.eq(event_id))
        .select_only()
        .column(webhook_events::Column::Outcome)
        .into_tuple::<String>()
        .one(c)
        .await?)
}

/// Takes the row `id` for a replay, only while its outcome is still `was`:
/// sets the new outcome, clears the error, stamps it replayed and processed
/// at `now`, and sets its customer when one is given. False when the row
/// had moved on.
pub async fn claim_for_replay(
    c: &impl ConnectionTrait,
    id: i64,
    was: &str,
    outcome: &str,
    customer: Option<&str>,
    now: DateTime<Utc>,
) -> AppResult<bool> {
    let mut q = webhook_events::Entity::update_many();
    if let Some(customer) = customer {
        q = q.col_expr(webhook_events::Column::CustomerId, Expr::value(customer));
    }
    let res = q
        .col_expr(webhook_events::Column::Outcome, Expr::value(outcome))
        .col_expr(webhook_events::Column::ReplayedAt, Expr::value(now))
        .col_expr(webhook_events::Column::ProcessedAt, Expr::value(now))
        .col_expr(
            webhook_events::Column::Error,
            Expr::value(Option::<String>::None),
        )
        .filter(webhook_events::Column::Id.eq(id))
        .filter(webhook_events::Column::Outcome.eq(was))
        .exec(c)
        .await?;
    Ok(res.rows_affected > 0)
}

/// Records a verified event as failed with `error`, received at `now` and
/// not processed; a row already failed gets the latest error, and a row
/// with any other outcome is left alone.
pub async fn record_failed(
    c: &impl ConnectionTrait,
    source: Store,
    event_id: &str,
    payload: &serde_json::Value,
    customer: Option<&str>,
    error: &str,
    now: DateTime<Utc>,
) -> AppResult<()> {
    let res = webhook_events::Entity::insert(webhook_events::ActiveModel {
        source: Set(source.as_str().into()),
        event_id: Set(event_id.to_string()),
        received_at: Set(now),
        payload: Set(payload.clone()),
        outcome: Set(WebhookOutcome::Failed.as_str().into()),
        // Not processed: retention keeps the payload for the replay.
        processed_at: Set(None),
        customer_id: Set(customer.map(str::to_string)),
        error: Set(Some(error.to_string())),
        replayed_at: Set(None),
        ..Default::default()
    })
    .on_conflict_do_nothing_on([
        webhook_events::Column::Source,
        webhook_events::Column::EventId,
    ])
    .exec_without_returning(c)
    .await?;
    if !matches!(res, TryInsertResult::Inserted(n) if n > 0) {
        webhook_events::Entity::update_many()
            .col_expr(webhook_events::Column::Error, Expr::value(error))
            .filter(webhook_events::Column::Source.eq(source.as_str()))
            .filter(webhook_events::Column::EventId.eq(event_id))
            .filter(webhook_events::Column::Outcome.eq(WebhookOutcome::Failed.as_str()))
            .exec(c)
            .await?;
    }
    Ok(())
}

/// Marks the row `id` failed with `error` after a replay at `now`, only
/// while its outcome is still `was`.
pub async fn mark_replay_failed(
    c: &impl ConnectionTrait,
    id: i64,
    was: &str,
    error: &str,
    now: DateTime<Utc>,
) -> AppResult<()> {
    webhook_events::Entity::update_many()
        .col_expr(
            webhook_events::Column::Outcome,
            Expr::value(WebhookOutcome::Failed.as_str()),
        )
        .col_expr(webhook_events::Column::Error, Expr::value(error))
        .col_expr(webhook_events::Column::ReplayedAt, Expr::value(now))
        .filter(webhook_events::Column::Id.eq(id))
        .filter(webhook_events::Column::Outcome.eq(was))
        .exec(c)
        .await?;
    Ok(())
}

/// Customers with access now, per store, and the states worth watching.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NowCounts {
    /// Distinct customers with access, whatever the source.
    pub with_access: i64,
    /// (store, distinct customers it gives access to).
    pub by_store: Vec<(String, i64)>,
    /// Customers whose only access is a trial (ours or a store's).
    pub in_trial: i64,
    pub in_grace: i64,
    pub in_billing_retry: i64,
}

/// One day of the change log, in the overview's categories.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DayCounts {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub new_trials: i64,
    pub conversions: i64,
    pub renewals: i64,
    pub cancellations: i64,
    pub refunds: i64,
}

/// The SQL condition "purchase `p` gives access at $now" (DESIGN §4), with
/// `$n` placeholders numbered from `first`.
fn access_sql(backend: DbBackend, alias: &str, first: usize, sandbox: bool) -> String {
    let ph = |i: usize| placeholder(backend, first + i);
    let env = if sandbox {
        String::new()
    } else {
        format!(" AND {alias}.environment = 'production'")
    };
    format!(
        "((({alias}.status IN ('active', 'trialing', 'canceled') AND ({alias}.expires_at IS NULL OR {alias}.expires_at > {n0})) \
         OR ({alias}.status = 'in_grace_period' AND {alias}.grace_expires_at > {n1})) \
         AND ({alias}.revoked_at IS NULL OR {alias}.revoked_at > {n2}){env})",
        n0 = ph(0),
        n1 = ph(1),
        n2 = ph(2),
    )
}

fn placeholder(backend: DbBackend, i: usize) -> String {
    match backend {
        DbBackend::Postgres => format!("${i}"),
        _ => "?".into(),
    }
}

fn trial_sql(alias: &str) -> String {
    format!(
        "({alias}.store = 'trial' OR {alias}.period_type = 'trial' OR {alias}.status = 'trialing')"
    )
}

async fn count(c: &impl ConnectionTrait, sql: String, values: Vec<Value>) -> AppResult<i64> {
    let backend = c.get_database_backend();
    let row = c
        .query_one_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    Ok(match row {
        Some(r) => r.try_get::<i64>("", "n")?,
        None => 0,
    })
}

pub async fn now_counts(
    c: &impl ConnectionTrait,
    now: DateTime<Utc>,
    accept_sandbox: bool,
) -> AppResult<NowCounts> {
    let b = c.get_database_backend();
    let v3 = || vec![Value::from(now), Value::from(now), Value::from(now)];
    let access = access_sql(b, "p", 1, accept_sandbox);
    let mut out = NowCounts {
        with_access: count(
            c,
            format!("SELECT COUNT(DISTINCT p.customer_id) AS n FROM purchases p WHERE {access}"),
            v3(),
        )
        .await?,
        ..Default::default()
    };
    let rows = c
        .query_all_raw(Statement::from_sql_and_values(
            b,
            format!(
                "SELECT p.store AS store, COUNT(DISTINCT p.customer_id) AS n FROM purchases p \
                 WHERE {access} GROUP BY p.store ORDER BY p.store"
            ),
            v3(),
        ))
        .await?;
    for r in rows {
        out.by_store.push((
            r.try_get::<String>("", "store")?,
            r.try_get::<i64>("", "n")?,
        ));
    }
    // In trial: access through a trial, and none through anything else.
    let paid = access_sql(b, "q", 4, accept_sandbox);
    let mut six = v3();
    six.extend(v3());
    out.in_trial = count(
        c,
        format!(
            "SELECT COUNT(DISTINCT p.customer_id) AS n FROM purchases p WHERE {access} AND {trial} \
             AND NOT EXISTS (SELECT 1 FROM purchases q WHERE q.customer_id = p.customer_id \
             AND {paid} AND NOT {qtrial})",
            trial = trial_sql("p"),
            qtrial = trial_sql("q"),
        ),
        six,
    )
    .await?;
    out.in_grace = count(
        c,
        format!(
            "SELECT COUNT(DISTINCT p.customer_id) AS n FROM purchases p \
             WHERE p.status = 'in_grace_period' AND p.grace_expires_at > {}",
            placeholder(b, 1)
        ),
        vec![now.into()],
    )
    .await?;
    out.in_billing_retry = count(
        c,
        "SELECT COUNT(DISTINCT p.customer_id) AS n FROM purchases p \
         WHERE p.status IN ('in_billing_retry', 'on_hold')"
            .to_string(),
        vec![],
    )
    .await?;
    Ok(out)
}

/// The change log since `since`, per UTC day. A change of one purchase
/// that moves several entitlements counts once.
pub async fn daily_counts(
    c: &impl ConnectionTrait,
    since: DateTime<Utc>,
) -> AppResult<Vec<DayCounts>> {
    let b = c.get_database_backend();
    let day = match b {
        DbBackend::Postgres => "to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        // Timestamps are stored as UTC text, date first.
        _ => "substr(e.occurred_at, 1, 10)",
    };
    let one = "COALESCE(e.purchase_id, -e.id)";
    let sql = format!(
        "SELECT {day} AS day, \
         COUNT(DISTINCT CASE WHEN e.kind = 'granted' AND {trial} THEN {one} END) AS new_trials, \
         COUNT(DISTINCT CASE WHEN e.kind = 'granted' AND p.store IN ('app_store', 'play_store', 'stripe') \
           AND NOT {trial} AND EXISTS (SELECT 1 FROM purchases t WHERE t.customer_id = e.customer_id \
           AND {ttrial}) THEN {one} END) AS conversions, \
         COUNT(DISTINCT CASE WHEN e.kind = 'renewed' THEN {one} END) AS renewals, \
         COUNT(DISTINCT CASE WHEN e.kind = 'canceled' THEN {one} END) AS cancellations, \
         COUNT(DISTINCT CASE WHEN e.kind = 'refunded' THEN {one} END) AS refunds \
         FROM entitlement_events e LEFT JOIN purchases p ON p.id = e.purchase_id \
         WHERE e.occurred_at >= {ph} GROUP BY {day} ORDER BY {day}",
        trial = trial_sql("p"),
        ttrial = trial_sql("t"),
        ph = placeholder(b, 1),
    );
    let rows = c
        .query_all_raw(Statement::from_sql_and_values(b, sql, vec![since.into()]))
        .await?;
    rows.into_iter()
        .map(|r| {
            Ok(DayCounts {
                day: r.try_get("", "day")?,
                new_trials: r.try_get("", "new_trials")?,
                conversions: r.try_get("", "conversions")?,
                renewals: r.try_get("", "renewals")?,
                cancellations: r.try_get("", "cancellations")?,
                refunds: r.try_get("", "refunds")?,
            })
        })
        .collect()
}
