//! Issue 14: outbound webhooks are fed from the change log on their own, so
//! Redis being down holds back only the Redis stream. Each sink marks the
//! rows it has taken in a column of its own.
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum EntitlementEvents {
    Table,
    PublishedAt,
    OutboundQueuedAt,
    Id,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(EntitlementEvents::Table)
                .add_column(timestamp_with_time_zone_null(
                    EntitlementEvents::OutboundQueuedAt,
                ))
                .to_owned(),
        )
        .await?;
        // Until now one relay queued deliveries when it published: what it
        // published it had queued.
        m.exec_stmt(
            Query::update()
                .table(EntitlementEvents::Table)
                .value(
                    EntitlementEvents::OutboundQueuedAt,
                    Expr::col(EntitlementEvents::PublishedAt),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_entitlement_events_unqueued")
                .table(EntitlementEvents::Table)
                .col(EntitlementEvents::OutboundQueuedAt)
                .col(EntitlementEvents::Id)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name("idx_entitlement_events_unqueued")
                .table(EntitlementEvents::Table)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(EntitlementEvents::Table)
                .drop_column(EntitlementEvents::OutboundQueuedAt)
                .to_owned(),
        )
        .await
    }
}
