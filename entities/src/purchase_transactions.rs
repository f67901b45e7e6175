use sea_orm::entity::prelude::*;

/// One store transaction seen for a purchase (Apple transaction ids per
/// original transaction): their count gives the renewal count.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "purchase_transactions")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub store: String,
    pub store_purchase_id: String,
    pub transaction_id: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
