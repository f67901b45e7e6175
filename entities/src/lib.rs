//! SeaORM entities for Entitle's tables. Shape only: no business rules and no
//! GraphQL derives live here; `migration/` is the only place the schema changes.

pub mod account_tokens;
pub mod api_keys;
pub mod customer_aliases;
pub mod customers;
pub mod devices;
pub mod entitlement_events;
pub mod held_purchases;
pub mod job_cursors;
pub mod job_leases;
pub mod outbound_deliveries;
pub mod outbound_endpoints;
pub mod pairing_codes;
pub mod purchase_aliases;
pub mod purchase_checks;
pub mod purchase_transactions;
pub mod purchases;
pub mod receipts;
pub mod signing_keys;
pub mod webhook_events;

pub mod prelude {
    pub use super::account_tokens::Entity as AccountTokens;
    pub use super::api_keys::Entity as ApiKeys;
    pub use super::customer_aliases::Entity as CustomerAliases;
    pub use super::customers::Entity as Customers;
    pub use super::devices::Entity as Devices;
    pub use super::entitlement_events::Entity as EntitlementEvents;
    pub use super::held_purchases::Entity as HeldPurchases;
    pub use super::job_cursors::Entity as JobCursors;
    pub use super::job_leases::Entity as JobLeases;
    pub use super::outbound_deliveries::Entity as OutboundDeliveries;
    pub use super::outbound_endpoints::Entity as OutboundEndpoints;
    pub use super::pairing_codes::Entity as PairingCodes;
    pub use super::purchase_aliases::Entity as PurchaseAliases;
    pub use super::purchase_checks::Entity as PurchaseChecks;
    pub use super::purchase_transactions::Entity as PurchaseTransactions;
    pub use super::purchases::Entity as Purchases;
    pub use super::receipts::Entity as Receipts;
    pub use super::signing_keys::Entity as SigningKeys;
    pub use super::webhook_events::Entity as WebhookEvents;
}
