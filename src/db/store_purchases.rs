//! Lookups and small writes of the store ingest paths (Stripe, App Store,
//! Google Play): purchases by their store's id, purchases held for an owner
//! not known yet, and the Stripe customer a customer pays as.

use chrono::{DateTime, Utc};
use entities::{customers, held_purchases, purchases};
use sea_orm::{
    ActiveModelTrait,
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, IntoActiveModel, QueryFilter,
    sea_query::{Expr, ExprTrait},
};
use serde_json::Value;

use crate::{
    domain::{PurchaseStatus, Store},
    error::AppResult,
};

/// A purchase by its row id.
pub async fn purchase(c: &impl ConnectionTrait, id: i64) -> AppResult<Option<purchases::Model>> {
    Ok(purchases::Entity::find_by_id(id).one(c).await?)
}

/// The purchase we hold under the store's own id.
pub async fn store_purchase(
    c: &impl ConnectionTrait,
    store: Store,
    store_purchase_id: &str,
) -> AppResult<Option<purchases::Model>> {
    super::purchase::find_by_store_id(c, store.as_str(), store_purchase_id).await
}

/// A purchase held, under the store's own id, for an owner not known yet.
pub async fn held_purchase(
    c: &impl ConnectionTrait,
    store: Store,
    store_purchase_id: &str,
) -> AppResult<Option<held_purchases::Model>> {
    Ok(held_purchases::Entity::find()
        .filter(held_purchases::Column::Store.eq(store.as_str()))
        .filter(held_purchases::Column::StorePurchaseId.eq(store_purchase_id))
        .one(c)
        .await?)
}

/// The store's purchases made since `since` that are in one of `statuses`.
pub async fn purchases_since(
    c: &impl ConnectionTrait,
    store: Store,
    since: DateTime<Utc>,
    statuses: &[PurchaseStatus],
) -> AppResult<Vec<purchases::Model>> {
    Ok(purchases::Entity::find()
        .filter(purchases::Column::Store.eq(store.as_str()))
        .filter(purchases::Column::PurchasedAt.gte(since))
        .filter(purchases::Column::Status.is_in(statuses.iter().map(|s| s.as_str())))
        .all(c)
        .await?)
}

/// Replaces the purchase's stored store payload; nothing else changes.
pub async fn replace_raw(
    c: &impl ConnectionTrait,
    row: purchases::Model,
    raw: Value,
) -> AppResult<()> {
    let mut am = row.into_active_model();
    am.raw = Set(Some(raw));
    am.update(c).await?;
    Ok(())
}

/// A Stripe purchase whose stored payload has `value` at its top-level
/// `key` (`payment_intent`, `latest_invoice`).
pub async fn stripe_purchase_by_raw(
    c: &impl ConnectionTrait,
    key: &'static str,
    value: &str,
) -> AppResult<Option<purchases::Model>> {
    let expr = match c.get_database_backend() {
        DbBackend::Postgres => format!("raw->>'{key}' = $1"),
        _ => format!("json_extract(raw, '$.{key}') = ?"),
    };
    Ok(purchases::Entity::find()
        .filter(purchases::Column::Store.eq(Store::Stripe.as_str()))
        .filter(Expr::cust_with_values(expr, [value]))
        .one(c)
        .await?)
}

/// Counts one more renewal on the purchase `id`.
pub async fn add_renewal(c: &impl ConnectionTrait, id: i64) -> AppResult<()> {
    purchases::Entity::update_many()
        .col_expr(
            purchases::Column::RenewalCount,
            Expr::col(purchases::Column::RenewalCount).add(1),
        )
        .filter(purchases::Column::Id.eq(id))
        .exec(c)
        .await?;
    Ok(())
}

/// Our customer whose Stripe customer id is `stripe_customer`.
pub async fn customer_of_stripe_customer(
    c: &impl ConnectionTrait,
    stripe_customer: &str,
) -> AppResult<Option<String>> {
    Ok(customers::Entity::find()
        .filter(customers::Column::StripeCustomerId.eq(stripe_customer))
        .one(c)
        .await?
        .map(|c| c.id))
}

/// Saves the customer's attributes and Stripe customer id, and the e-mail
/// when one is given (a customer keeps the one it has otherwise).
/// Records on the customer the Stripe customer that pays for them (in
/// their attributes, under `attr`, and in the indexed column) and the
/// e-mail Stripe gave, in one statement that changes nothing when both are
/// already there (a renewal names the same Stripe customer every time).
pub async fn remember_stripe_customer(
    txn: &crate::db::WriteTxn,
    customer_id: &str,
    attr: &str,
    stripe_customer: &str,
    email: Option<&str>,
) -> AppResult<()> {
    let backend = txn.get_database_backend();
    let (sc, email, id): (sea_orm::Value, sea_orm::Value, sea_orm::Value) = (
        stripe_customer.into(),
        email.map(str::to_string).into(),
        customer_id.into(),
    );
    let stmt = match backend {
        sea_orm::DbBackend::Postgres => sea_orm::Statement::from_sql_and_values(
            backend,
            format!(
                "UPDATE customers SET \
                   attributes = ((CASE WHEN json_typeof(attributes) = 'object' THEN attributes::jsonb ELSE '{{}}'::jsonb END) \
                     || jsonb_build_object('{attr}', $1::text))::json, \
                   stripe_customer_id = $1, email = COALESCE($2, email) \
                 WHERE id = $3 AND NOT (json_typeof(attributes) = 'object' \
                   AND attributes->>'{attr}' IS NOT DISTINCT FROM $1 \
                   AND stripe_customer_id IS NOT DISTINCT FROM $1 \
                   AND ($2::text IS NULL OR email IS NOT DISTINCT FROM $2))"
            ),
            [sc, email, id],
        ),
        // Positional parameters, each value in the order it appears: the
        // statement may travel with others in one call (see `defer`).
        _ => sea_orm::Statement::from_sql_and_values(
            backend,
            format!(
                "UPDATE customers SET \
                   attributes = json_set(CASE WHEN json_type(attributes) = 'object' THEN attributes ELSE '{{}}' END, \
                     '$.{attr}', ?), \
                   stripe_customer_id = ?, email = COALESCE(?, email) \
                 WHERE id = ? AND NOT (json_type(attributes) = 'object' \
                   AND json_extract(attributes, '$.{attr}') IS ? \
                   AND stripe_customer_id IS ? \
                   AND (? IS NULL OR email IS ?))"
            ),
            [
                sc.clone(),
                sc.clone(),
                email.clone(),
                id,
                sc.clone(),
                sc,
                email.clone(),
                email,
            ],
        ),
    };
    // Nothing in the rest of a notification's work reads it back.
    txn.defer(stmt).await
}
