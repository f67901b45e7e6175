//! Issue 12: the retention job finds old invalid submissions and processed
//! notifications by time; without these indexes each run scans both tables.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Receipts {
    Table,
    Outcome,
    ReceivedAt,
}

#[derive(DeriveIden)]
enum WebhookEvents {
    Table,
    ProcessedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .name("idx_receipts_outcome_received_at")
                .table(Receipts::Table)
                .col(Receipts::Outcome)
                .col(Receipts::ReceivedAt)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_webhook_events_processed_at")
                .table(WebhookEvents::Table)
                .col(WebhookEvents::ProcessedAt)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name("idx_webhook_events_processed_at")
                .table(WebhookEvents::Table)
                .to_owned(),
        )
        .await?;
        m.drop_index(
            Index::drop()
                .name("idx_receipts_outcome_received_at")
                .table(Receipts::Table)
                .to_owned(),
        )
        .await
    }
}
