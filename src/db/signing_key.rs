//! Token-signing keys (`signing_keys`), their private halves sealed.

use chrono::{DateTime, Utc};
use entities::signing_keys;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, QueryFilter,
    Statement, sea_query::Expr,
};

use crate::error::AppResult;

/// Serialises, on PostgreSQL, the transactions that create a first key, so
/// that replicas started together agree on one instead of each making its
/// own. (SQLite's write transactions are already exclusive.)
pub async fn lock(c: &impl ConnectionTrait) -> AppResult<()> {
    if c.get_database_backend() == DbBackend::Postgres {
        c.execute_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock(hashtextextended('signing_keys', 0))",
        ))
        .await?;
    }
    Ok(())
}

pub async fn all(c: &impl ConnectionTrait) -> AppResult<Vec<signing_keys::Model>> {
    Ok(signing_keys::Entity::find().all(c).await?)
}

pub async fn find(c: &impl ConnectionTrait, kid: &str) -> AppResult<Option<signing_keys::Model>> {
    Ok(signing_keys::Entity::find_by_id(kid.to_string())
        .one(c)
        .await?)
}

pub async fn insert(c: &impl ConnectionTrait, row: signing_keys::Model) -> AppResult<()> {
    signing_keys::Entity::insert(signing_keys::ActiveModel {
        kid: Set(row.kid),
        algorithm: Set(row.algorithm),
        public_jwk: Set(row.public_jwk),
        private_key: Set(row.private_key),
        created_at: Set(row.created_at),
        retired_at: Set(row.retired_at),
        verify_until: Set(row.verify_until),
    })
    .exec_without_returning(c)
    .await?;
    Ok(())
}

/// Retires, from `at`, every key that would sign after it.
pub async fn retire_all_from(c: &impl ConnectionTrait, at: DateTime<Utc>) -> AppResult<()> {
    signing_keys::Entity::update_many()
        .col_expr(signing_keys::Column::RetiredAt, Expr::value(at))
        .filter(
            Condition::any()
                .add(signing_keys::Column::RetiredAt.is_null())
                .add(signing_keys::Column::RetiredAt.gt(at)),
        )
        .exec(c)
        .await?;
    Ok(())
}

/// Retires, at `at`, those of `kids` not retired yet.
pub async fn retire(
    c: &impl ConnectionTrait,
    kids: Vec<String>,
    at: DateTime<Utc>,
) -> AppResult<()> {
    signing_keys::Entity::update_many()
        .col_expr(signing_keys::Column::RetiredAt, Expr::value(at))
        .filter(signing_keys::Column::Kid.is_in(kids))
        .filter(signing_keys::Column::RetiredAt.is_null())
        .exec(c)
        .await?;
    Ok(())
}

/// Extends how long the key stays published to at least `verify_until`,
/// while it still signs at `now`; returns 0 only when it no longer does.
/// A replica that leased it further meanwhile keeps its longer lease, and
/// counts as done: the key is published as long as this caller needs.
pub async fn extend_verify_until(
    c: &impl ConnectionTrait,
    kid: &str,
    now: DateTime<Utc>,
    verify_until: DateTime<Utc>,
) -> AppResult<u64> {
    let col = signing_keys::Column::VerifyUntil;
    let res = signing_keys::Entity::update_many()
        .col_expr(
            col,
            Expr::case(
                Condition::any()
                    .add(col.is_null())
                    .add(col.lt(verify_until)),
                Expr::value(verify_until),
            )
            .finally(Expr::col(col))
            .into(),
        )
        .filter(signing_keys::Column::Kid.eq(kid))
        .filter(
            Condition::any()
                .add(signing_keys::Column::RetiredAt.is_null())
                .add(signing_keys::Column::RetiredAt.gt(now)),
        )
        .exec(c)
        .await?;
    Ok(res.rows_affected)
}
