use sea_orm::entity::prelude::*;

/// A verified purchase the store binds to no customer we know yet; it
/// becomes a purchase of the first customer its binding names.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "held_purchases")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub store: String,
    pub store_purchase_id: String,
    /// The store's binding (Apple account token, Play obfuscated account id).
    pub bound_key: Option<String>,
    /// The store purchase id this one supersedes (Play `linkedPurchaseToken`).
    pub replaces: Option<String>,
    /// The verified purchase state, as the provider produced it.
    pub state: Json,
    pub source_updated_at: DateTimeUtc,
    pub held_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
