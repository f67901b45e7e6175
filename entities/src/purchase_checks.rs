use sea_orm::entity::prelude::*;

/// When a purchase was last re-read from its store by the scheduler.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "purchase_checks")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub purchase_id: i64,
    pub checked_at: DateTimeUtc,
    pub outcome: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
