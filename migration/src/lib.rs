pub use sea_orm_migration::prelude::*;

mod m20261121_000001_init;
mod m20261122_000001_events;
mod m20261202_000002_retention;
mod m20261202_000003_event_reason;
pub mod m20261202_000004_store_bindings;
mod m20261202_000005_pairing;
mod m20261202_000006_signing_keys;
mod m20261202_000007_outbound_queue;
mod m20261203_000001_webhook_log;
mod m20261203_000002_search_keys;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_init::Migration),
            Box::new(m20261122_000001_events::Migration),
            Box::new(m20261202_000002_retention::Migration),
            Box::new(m20261202_000003_event_reason::Migration),
            Box::new(m20261202_000004_store_bindings::Migration),
            Box::new(m20261202_000005_pairing::Migration),
            Box::new(m20261202_000006_signing_keys::Migration),
            Box::new(m20261202_000007_outbound_queue::Migration),
            Box::new(m20261203_000001_webhook_log::Migration),
            Box::new(m20261203_000002_search_keys::Migration),
        ]
    }
}
