//! Writes and lookups of purchase rows, the store ids a purchase line
//! replaced (`purchase_aliases`), and the App Store transactions a
//! purchase's renewals are counted from.

use chrono::{DateTime, Utc};
use entities::{purchase_aliases, purchase_transactions, purchases};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, sea_query::Expr, sea_query::OnConflict,
};

use crate::{
    domain::{PurchaseStatus, Store},
    error::AppResult,
};

/// Every column a purchase's state sets: a verified store state, or access
/// this server gives itself (a trial, a promotional grant).
#[derive(Clone, Debug)]
pub struct PurchaseFields {
    pub customer_id: String,
    pub store: String,
    pub store_purchase_id: String,
    pub product_id: String,
    pub environment: String,
    pub status: String,
    pub period_type: String,
    pub purchased_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub grace_expires_at: Option<DateTime<Utc>>,
    pub auto_renew: bool,
    pub canceled_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub renewal_count: i32,
    pub source_updated_at: DateTime<Utc>,
    pub raw: Option<serde_json::Value>,
    /// Written only when known: a later payload without it does not erase it.
    pub order_id: Option<String>,
}

fn fill(am: &mut purchases::ActiveModel, f: PurchaseFields) {
    am.customer_id = Set(f.customer_id);
    am.store = Set(f.store);
    am.store_purchase_id = Set(f.store_purchase_id);
    am.product_id = Set(f.product_id);
    am.environment = Set(f.environment);
    am.status = Set(f.status);
    am.period_type = Set(f.period_type);
    am.purchased_at = Set(f.purchased_at);
    am.expires_at = Set(f.expires_at);
    am.grace_expires_at = Set(f.grace_expires_at);
    am.auto_renew = Set(f.auto_renew);
    am.canceled_at = Set(f.canceled_at);
    am.revoked_at = Set(f.revoked_at);
    am.renewal_count = Set(f.renewal_count);
    am.source_updated_at = Set(f.source_updated_at);
    am.raw = Set(f.raw);
    if let Some(order) = f.order_id {
        am.order_id = Set(Some(order));
    }
}

/// A new purchase row.
pub async fn insert(c: &impl ConnectionTrait, f: PurchaseFields) -> AppResult<purchases::Model> {
    let mut am = <purchases::ActiveModel as Default>::default();
    fill(&mut am, f);
    Ok(am.insert(c).await?)
}

/// Replaces the state a purchase row holds.
pub async fn overwrite(
    c: &impl ConnectionTrait,
    row: purchases::Model,
    f: PurchaseFields,
) -> AppResult<purchases::Model> {
    let mut am = row.into_active_model();
    fill(&mut am, f);
    Ok(am.update(c).await?)
}

/// [`overwrite`], held back to travel with the transaction's last
/// statement (see [`crate::db::WriteTxn::defer_ordered`]): the row as it
/// will read, without a round trip for it. The row was read under this
/// transaction's locks, so the update finds it.
pub async fn overwrite_deferred(
    txn: &crate::db::WriteTxn,
    row: purchases::Model,
    f: PurchaseFields,
) -> AppResult<purchases::Model> {
    use sea_orm::{QueryTrait, TryIntoModel};
    let mut am = row.into_active_model();
    fill(&mut am, f);
    let written = as_stored(txn, am.clone().try_into_model()?);
    let stmt = purchases::Entity::update_many()
        .set(am)
        .filter(purchases::Column::Id.eq(written.id))
        .build(txn.get_database_backend());
    txn.defer_ordered(stmt).await?;
    Ok(written)
}

/// [`insert`], held back like [`overwrite_deferred`], under an id taken
/// beforehand ([`StoreIdLookup::next_id`]): the row as it will read.
pub async fn insert_deferred(
    txn: &crate::db::WriteTxn,
    id: i64,
    f: PurchaseFields,
) -> AppResult<purchases::Model> {
    use sea_orm::{QueryTrait, TryIntoModel};
    let mut am = <purchases::ActiveModel as Default>::default();
    am.id = Set(id);
    fill(&mut am, f);
    if matches!(am.order_id, sea_orm::ActiveValue::NotSet) {
        am.order_id = Set(None);
    }
    let written = as_stored(txn, am.clone().try_into_model()?);
    let stmt = purchases::Entity::insert(am).build(txn.get_database_backend());
    txn.defer_ordered(stmt).await?;
    Ok(written)
}

/// `row` as the database will store it, and would have returned it: on
/// PostgreSQL, its timestamps to the microsecond.
fn as_stored(txn: &crate::db::WriteTxn, mut row: purchases::Model) -> purchases::Model {
    if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
        let micros = |t: DateTime<Utc>| {
            use chrono::Timelike;
            t.with_nanosecond(t.nanosecond() / 1_000 * 1_000)
                .unwrap_or(t)
        };
        row.purchased_at = micros(row.purchased_at);
        row.source_updated_at = micros(row.source_updated_at);
        for t in [
            &mut row.expires_at,
            &mut row.grace_expires_at,
            &mut row.canceled_at,
            &mut row.revoked_at,
        ] {
            *t = t.map(micros);
        }
    }
    row
}

/// Gives the purchase to another customer, its state unchanged.
pub async fn move_to(
    c: &impl ConnectionTrait,
    row: purchases::Model,
    customer_id: &str,
) -> AppResult<()> {
    let mut am = row.into_active_model();
    am.customer_id = Set(customer_id.to_string());
    am.update(c).await?;
    Ok(())
}

/// Ends a purchase its replacement superseded: expired at `end`, renewing no more.
pub async fn expire_superseded(
    c: &impl ConnectionTrait,
    row: purchases::Model,
    end: DateTime<Utc>,
    source_updated_at: DateTime<Utc>,
) -> AppResult<()> {
    let mut am = row.into_active_model();
    am.status = Set(PurchaseStatus::Expired.as_str().into());
    am.expires_at = Set(Some(end));
    am.auto_renew = Set(false);
    am.source_updated_at = Set(source_updated_at);
    am.update(c).await?;
    Ok(())
}

/// The row of one store purchase, by the store's own id for it.
pub async fn find_by_store_id(
    c: &impl ConnectionTrait,
    store: &str,
    store_purchase_id: &str,
) -> AppResult<Option<purchases::Model>> {
    Ok(purchases::Entity::find()
        .filter(purchases::Column::Store.eq(store))
        .filter(purchases::Column::StorePurchaseId.eq(store_purchase_id))
        .one(c)
        .await?)
}

/// Where a store id stands, read in one statement (it is on every store
/// message's path): the row stored under it, the line a later token of it
/// was merged into, whether a purchase under it is held for an owner not
/// known yet, and what the customer id its store binding names resolves to.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreIdLookup {
    pub row: Option<purchases::Model>,
    pub replaced_by: Option<i64>,
    pub held: bool,
    /// `(bound, resolved)`: the customer `bound` names after following a
    /// merge (itself when it was not merged).
    pub bound: Option<(String, String)>,
    /// PostgreSQL, with the facts: an id taken from the purchases' sequence
    /// when no row is stored under the store id, so a new row's insert can
    /// be held back ([`insert_deferred`]) without a round trip for its id.
    /// Unused, it is only a gap in the sequence.
    pub next_id: Option<i64>,
}

impl StoreIdLookup {
    /// What `bound` resolves to, when it is the id this lookup resolved.
    pub fn resolved(&self, id: &str) -> Option<&str> {
        self.bound
            .as_ref()
            .filter(|(b, _)| b == id)
            .map(|(_, r)| r.as_str())
    }

    /// Whose purchase this is before anything is written: the stored row's
    /// owner, else the customer the binding names.
    pub fn candidate_owner(&self) -> Option<&str> {
        match (&self.row, &self.bound) {
            (Some(r), _) => Some(r.customer_id.as_str()),
            (None, Some((_, resolved))) => Some(resolved.as_str()),
            (None, None) => None,
        }
    }
}

/// One row whether or not a purchase is stored under the id. `$n`
/// placeholders read the same on both backends.
const LOOKUP_SQL: &str = "SELECT p.*, \
    (SELECT a.purchase_id FROM purchase_aliases a \
      WHERE a.store = $1 AND a.store_purchase_id = $2) AS lookup_replaced_by, \
    EXISTS (SELECT 1 FROM held_purchases h \
      WHERE h.store = $1 AND h.store_purchase_id = $2) AS lookup_held, \
    (SELECT ca.customer_id FROM customer_aliases ca WHERE ca.alias_id = $3) AS lookup_alias \
    FROM (SELECT 1 AS one) k \
    LEFT JOIN purchases p ON p.store = $1 AND p.store_purchase_id = $2";

/// The purchase facts of [`StoreIdLookup::candidate_owner`], with the
/// lookup's own parameters, in the order [`super::purchase_facts_of`] reads
/// them.
const CANDIDATE_FACTS_SQL: &str = "SELECT id, store, product_id, environment, status, \
    period_type, purchased_at, expires_at, grace_expires_at, auto_renew, revoked_at \
    FROM purchases WHERE customer_id = COALESCE(\
      (SELECT customer_id FROM purchases WHERE store = $1 AND store_purchase_id = $2), \
      (SELECT customer_id FROM customer_aliases WHERE alias_id = $3), $3) \
    ORDER BY id";

fn lookup_statement(
    backend: sea_orm::DbBackend,
    sql: &str,
    store: &str,
    store_purchase_id: &str,
    bound: Option<&str>,
) -> sea_orm::Statement {
    sea_orm::Statement::from_sql_and_values(
        backend,
        sql,
        [
            store.into(),
            store_purchase_id.into(),
            bound.map(str::to_string).into(),
        ],
    )
}

fn lookup_from_row(row: &sea_orm::QueryResult, bound: Option<&str>) -> AppResult<StoreIdLookup> {
    let present = row.try_get::<Option<i64>>("", "id")?.is_some();
    let alias: Option<String> = row.try_get("", "lookup_alias")?;
    Ok(StoreIdLookup {
        row: match present {
            true => {
                Some(<purchases::Model as sea_orm::FromQueryResult>::from_query_result(row, "")?)
            }
            false => None,
        },
        replaced_by: row.try_get("", "lookup_replaced_by")?,
        held: row.try_get("", "lookup_held")?,
        bound: bound.map(|b| (b.to_string(), alias.unwrap_or_else(|| b.to_string()))),
        next_id: None,
    })
}

/// PostgreSQL: the lookup's row joined with the facts of its candidate
/// owner, one row per purchase (one with no facts when there is none), in
/// the order [`super::purchase_facts_of`] reads them. A statement returns
/// one set of rows there, so the facts travel as prefixed columns.
const LOOKUP_WITH_FACTS_PG: &str = "SELECT l.*, f.id AS fact_id, f.store AS fact_store, \
    f.product_id AS fact_product_id, f.environment AS fact_environment, \
    f.status AS fact_status, f.period_type AS fact_period_type, \
    f.purchased_at AS fact_purchased_at, f.expires_at AS fact_expires_at, \
    f.grace_expires_at AS fact_grace_expires_at, f.auto_renew AS fact_auto_renew, \
    f.revoked_at AS fact_revoked_at FROM (SELECT found.*, \
    CASE WHEN found.id IS NULL THEN nextval(pg_get_serial_sequence('purchases', 'id')) END \
    AS lookup_next_id FROM (";
// The lookup is the outer side of the join: its one row, and its one
// `nextval`, are computed once however many facts rows follow.
const LOOKUP_WITH_FACTS_PG_TAIL: &str = ") found) l LEFT JOIN LATERAL (SELECT * FROM purchases q \
    WHERE q.customer_id = COALESCE(l.customer_id, l.lookup_alias, $3)) f ON true \
    ORDER BY f.id";

/// [`lookup_store_id`] and the purchase facts of its candidate owner, in
/// one call: on SQLite two statements (the second shares the first's
/// parameters), on PostgreSQL one. The facts are those a write applying
/// the purchase reads next, unless it writes first.
pub async fn lookup_store_id_with_facts(
    c: &impl ConnectionTrait,
    store: &str,
    store_purchase_id: &str,
    bound: Option<&str>,
) -> AppResult<(StoreIdLookup, Vec<crate::domain::PurchaseFacts>)> {
    // Joined once, rather than formatted again on every write.
    static SQLITE: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!("{LOOKUP_SQL}; {CANDIDATE_FACTS_SQL}"));
    static POSTGRES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!("{LOOKUP_WITH_FACTS_PG}{LOOKUP_SQL}{LOOKUP_WITH_FACTS_PG_TAIL}")
    });
    let backend = c.get_database_backend();
    let sql = match backend {
        sea_orm::DbBackend::Postgres => &POSTGRES,
        _ => &SQLITE,
    };
    let rows = c
        .query_all_raw(lookup_statement(
            backend,
            sql,
            store,
            store_purchase_id,
            bound,
        ))
        .await?;
    let facts = |r: &sea_orm::QueryResult, prefix: &str| {
        <super::FactsRow as sea_orm::FromQueryResult>::from_query_result(r, prefix)
            .map_err(crate::error::AppError::from)
            .and_then(super::FactsRow::into_facts)
    };
    let mut rows = rows.into_iter().peekable();
    let first = rows
        .peek()
        .ok_or_else(|| crate::error::AppError::Internal(anyhow::anyhow!("lookup gave no row")))?;
    let mut lookup = lookup_from_row(first, bound)?;
    if backend == sea_orm::DbBackend::Postgres {
        lookup.next_id = first.try_get("", "lookup_next_id")?;
    }
    let facts = match backend {
        sea_orm::DbBackend::Postgres => rows
            .filter_map(|r| match r.try_get::<Option<i64>>("", "fact_id") {
                Ok(None) => None,
                Ok(Some(_)) => Some(facts(&r, "fact_")),
                Err(e) => Some(Err(e.into())),
            })
            .collect::<AppResult<Vec<_>>>()?,
        _ => rows
            .skip(1)
            .map(|r| facts(&r, ""))
            .collect::<AppResult<Vec<_>>>()?,
    };
    Ok((lookup, facts))
}

pub async fn lookup_store_id(
    c: &impl ConnectionTrait,
    store: &str,
    store_purchase_id: &str,
    bound: Option<&str>,
) -> AppResult<StoreIdLookup> {
    let row = c
        .query_one_raw(lookup_statement(
            c.get_database_backend(),
            LOOKUP_SQL,
            store,
            store_purchase_id,
            bound,
        ))
        .await?
        .ok_or_else(|| crate::error::AppError::Internal(anyhow::anyhow!("lookup gave no row")))?;
    lookup_from_row(&row, bound)
}

pub async fn find(c: &impl ConnectionTrait, id: i64) -> AppResult<Option<purchases::Model>> {
    Ok(purchases::Entity::find_by_id(id).one(c).await?)
}

/// How many purchase rows there are, of every customer.
pub async fn count_all(c: &impl ConnectionTrait) -> AppResult<u64> {
    Ok(purchases::Entity::find().count(c).await?)
}

/// The purchase line a store id was replaced by, when it was.
pub async fn replaced_by(
    c: &impl ConnectionTrait,
    store: &str,
    store_purchase_id: &str,
) -> AppResult<Option<i64>> {
    Ok(purchase_aliases::Entity::find()
        .filter(purchase_aliases::Column::Store.eq(store))
        .filter(purchase_aliases::Column::StorePurchaseId.eq(store_purchase_id))
        .one(c)
        .await?
        .map(|a| a.purchase_id))
}

/// Records that a store id now names the purchase line `purchase_id`; a
/// store id recorded before keeps the line it named.
pub async fn add_replaced_id(
    c: &impl ConnectionTrait,
    store: &str,
    store_purchase_id: &str,
    purchase_id: i64,
) -> AppResult<()> {
    purchase_aliases::Entity::insert(purchase_aliases::ActiveModel {
        store: Set(store.into()),
        store_purchase_id: Set(store_purchase_id.to_string()),
        purchase_id: Set(purchase_id),
        ..Default::default()
    })
    .on_conflict_do_nothing_on([
        purchase_aliases::Column::Store,
        purchase_aliases::Column::StorePurchaseId,
    ])
    .exec_without_returning(c)
    .await?;
    Ok(())
}

/// Notes a store transaction of a purchase; one seen before is not counted twice.
pub async fn record_transaction(
    c: &impl ConnectionTrait,
    store: &str,
    store_purchase_id: &str,
    transaction_id: &str,
) -> AppResult<()> {
    purchase_transactions::Entity::insert(purchase_transactions::ActiveModel {
        store: Set(store.into()),
        store_purchase_id: Set(store_purchase_id.to_string()),
        transaction_id: Set(transaction_id.to_string()),
        ..Default::default()
    })
    .on_conflict_do_nothing_on([
        purchase_transactions::Column::Store,
        purchase_transactions::Column::StorePurchaseId,
        purchase_transactions::Column::TransactionId,
    ])
    .exec_without_returning(c)
    .await?;
    Ok(())
}

/// How many distinct store transactions a purchase has had.
pub async fn transactions_seen(
    c: &impl ConnectionTrait,
    store: &str,
    store_purchase_id: &str,
) -> AppResult<u64> {
    Ok(purchase_transactions::Entity::find()
        .filter(purchase_transactions::Column::Store.eq(store))
        .filter(purchase_transactions::Column::StorePurchaseId.eq(store_purchase_id))
        .count(c)
        .await?)
}

/// Starts a trial unless its row exists: the key names one per customer
/// and entitlement, so no reinstall or race starts it twice.
pub async fn add_trial(c: &impl ConnectionTrait, f: PurchaseFields) -> AppResult<()> {
    let mut am = <purchases::ActiveModel as Default>::default();
    fill(&mut am, f);
    purchases::Entity::insert(am)
        .on_conflict_do_nothing_on([purchases::Column::Store, purchases::Column::StorePurchaseId])
        .exec_without_returning(c)
        .await?;
    Ok(())
}

/// Writes a promotional grant; one given before takes this one's term.
pub async fn put_grant(c: &impl ConnectionTrait, f: PurchaseFields) -> AppResult<()> {
    let mut am = <purchases::ActiveModel as Default>::default();
    fill(&mut am, f);
    purchases::Entity::insert(am)
        .on_conflict(
            OnConflict::columns([purchases::Column::Store, purchases::Column::StorePurchaseId])
                .update_columns([
                    purchases::Column::Status,
                    purchases::Column::PurchasedAt,
                    purchases::Column::ExpiresAt,
                    purchases::Column::RevokedAt,
                    purchases::Column::SourceUpdatedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(c)
        .await?;
    Ok(())
}

/// The promotional grant a key names, unless it was revoked.
pub async fn find_live_grant(
    c: &impl ConnectionTrait,
    store_purchase_id: &str,
) -> AppResult<Option<purchases::Model>> {
    Ok(purchases::Entity::find()
        .filter(purchases::Column::Store.eq(Store::Promotional.as_str()))
        .filter(purchases::Column::StorePurchaseId.eq(store_purchase_id))
        .filter(purchases::Column::RevokedAt.is_null())
        .one(c)
        .await?)
}

/// Revokes a purchase from `at` on.
pub async fn revoke(
    c: &impl ConnectionTrait,
    row: purchases::Model,
    at: DateTime<Utc>,
) -> AppResult<()> {
    let mut am = row.into_active_model();
    am.status = Set(PurchaseStatus::Revoked.as_str().into());
    am.revoked_at = Set(Some(at));
    am.source_updated_at = Set(at);
    am.update(c).await?;
    Ok(())
}

/// Sets aside the own-store row that lost to another in a merge: under a
/// key of its own, so the winner can take the shared one, and ended at
/// `end` when it still granted.
pub async fn set_aside_merged(
    c: &impl ConnectionTrait,
    row: purchases::Model,
    key: String,
    end: Option<DateTime<Utc>>,
    at: DateTime<Utc>,
) -> AppResult<()> {
    let mut am = row.into_active_model();
    am.store_purchase_id = Set(key);
    if let Some(end) = end {
        am.status = Set(PurchaseStatus::Expired.as_str().into());
        am.expires_at = Set(Some(end));
        am.auto_renew = Set(false);
    }
    am.source_updated_at = Set(at);
    am.update(c).await?;
    Ok(())
}

/// Gives a row another store purchase id.
pub async fn rekey(c: &impl ConnectionTrait, row: purchases::Model, key: String) -> AppResult<()> {
    let mut am = row.into_active_model();
    am.store_purchase_id = Set(key);
    am.update(c).await?;
    Ok(())
}

/// Gives every purchase of `from` to `into`.
pub async fn move_all(c: &impl ConnectionTrait, from: &str, into: &str) -> AppResult<()> {
    purchases::Entity::update_many()
        .col_expr(purchases::Column::CustomerId, Expr::value(into))
        .filter(purchases::Column::CustomerId.eq(from))
        .exec(c)
        .await?;
    Ok(())
}
