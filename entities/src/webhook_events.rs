use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "webhook_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub source: String,
    pub event_id: String,
    pub received_at: DateTimeUtc,
    pub payload: Json,
    pub outcome: String,
    pub processed_at: Option<DateTimeUtc>,
    /// The customer the notification touched or named.
    pub customer_id: Option<String>,
    /// Why processing failed (a `failed` row), safe to show an operator.
    #[sea_orm(column_type = "Text", nullable)]
    pub error: Option<String>,
    pub replayed_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
