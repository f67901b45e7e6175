use sea_orm::entity::prelude::*;

/// A customer id merged into another: everything naming `alias_id` lands on
/// `customer_id`. Always one hop (a later merge re-points older aliases).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "customer_aliases")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub alias_id: String,
    pub customer_id: String,
    pub merged_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
