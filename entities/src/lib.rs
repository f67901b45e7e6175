//! SeaORM entities for Entitle's tables. Shape only: no business rules and no
//! GraphQL derives live here; `migration/` is the only place the schema changes.

pub mod api_keys;
pub mod customers;
pub mod devices;
pub mod entitlement_events;
pub mod job_cursors;
pub mod job_leases;
pub mod outbound_deliveries;
pub mod outbound_endpoints;
pub mod purchase_checks;
pub mod purchases;
pub mod receipts;
pub mod signing_keys;
pub mod webhook_events;

pub mod prelude {
    pub use super::api_keys::Entity as ApiKeys;
    pub use super::customers::Entity as Customers;
    pub use super::devices::Entity as Devices;
    pub use super::entitlement_events::Entity as EntitlementEvents;
    pub use super::job_cursors::Entity as JobCursors;
    pub use super::job_leases::Entity as JobLeases;
    pub use super::outbound_deliveries::Entity as OutboundDeliveries;
    pub use super::outbound_endpoints::Entity as OutboundEndpoints;
    pub use super::purchase_checks::Entity as PurchaseChecks;
    pub use super::purchases::Entity as Purchases;
    pub use super::receipts::Entity as Receipts;
    pub use super::signing_keys::Entity as SigningKeys;
    pub use super::webhook_events::Entity as WebhookEvents;
}
