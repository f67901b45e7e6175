use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "entitlement_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub customer_id: String,
    pub entitlement: String,
    pub kind: String,
    pub old_status: Option<String>,
    pub new_status: String,
    pub purchase_id: Option<i64>,
    pub occurred_at: DateTimeUtc,
    /// When the Redis relay took the row.
    pub published_at: Option<DateTimeUtc>,
    /// When the row's outbound deliveries were queued.
    pub outbound_queued_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
