//! Customer rows, the ids merged into them (`customer_aliases`) and the
//! store account tokens that name them (`account_tokens`).

use chrono::{DateTime, Utc};
use entities::{account_tokens, customer_aliases, customers};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    QueryFilter, sea_query::Expr,
};

use crate::error::AppResult;

/// The customer row of exactly this id (no merge followed).
pub async fn find(c: &impl ConnectionTrait, id: &str) -> AppResult<Option<customers::Model>> {
    Ok(customers::Entity::find_by_id(id.to_string()).one(c).await?)
}

/// The customer a store account token (hyphenated UUID) was issued for.
pub async fn account_token_owner(
    c: &impl ConnectionTrait,
    token: &str,
) -> AppResult<Option<String>> {
    Ok(account_tokens::Entity::find_by_id(token.to_string())
        .one(c)
        .await?
        .map(|row| row.customer_id))
}

pub async fn set_attributes(
    c: &impl ConnectionTrait,
    row: customers::Model,
    attributes: serde_json::Value,
) -> AppResult<()> {
    let mut am = row.into_active_model();
    am.attributes = Set(attributes);
    am.update(c).await?;
    Ok(())
}

/// Makes the ids merged into `from` name `into`, keeping aliases one hop.
pub async fn move_aliases(c: &impl ConnectionTrait, from: &str, into: &str) -> AppResult<()> {
    customer_aliases::Entity::update_many()
        .col_expr(customer_aliases::Column::CustomerId, Expr::value(into))
        .filter(customer_aliases::Column::CustomerId.eq(from))
        .exec(c)
        .await?;
    Ok(())
}

/// Records that `alias` was merged into `into`.
pub async fn add_alias(
    c: &impl ConnectionTrait,
    alias: &str,
    into: &str,
    merged_at: DateTime<Utc>,
) -> AppResult<()> {
    customer_aliases::ActiveModel {
        alias_id: Set(alias.to_string()),
        customer_id: Set(into.to_string()),
        merged_at: Set(merged_at),
    }
    .insert(c)
    .await?;
    Ok(())
}
