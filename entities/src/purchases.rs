use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "purchases")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub customer_id: String,
    pub store: String,
    pub store_purchase_id: String,
    pub product_id: String,
    pub environment: String,
    pub status: String,
    pub period_type: String,
    pub purchased_at: DateTimeUtc,
    pub expires_at: Option<DateTimeUtc>,
    pub grace_expires_at: Option<DateTimeUtc>,
    pub auto_renew: bool,
    pub canceled_at: Option<DateTimeUtc>,
    pub revoked_at: Option<DateTimeUtc>,
    pub renewal_count: i32,
    pub source_updated_at: DateTimeUtc,
    pub raw: Option<Json>,
    /// Play: the order id without its renewal suffix, for search.
    pub order_id: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
