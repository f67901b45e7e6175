use sea_orm::entity::prelude::*;

/// A store purchase id superseded by the purchase line it now names (Play
/// tokens replaced through `linkedPurchaseToken`).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "purchase_aliases")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub store: String,
    pub store_purchase_id: String,
    pub purchase_id: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
