//! Issue 16: the webhook log. Each recorded store notification says which
//! customer it touched and why it failed, and when it was replayed; the
//! log is listed by outcome and time, and per customer.
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum WebhookEvents {
    Table,
    Id,
    Outcome,
    ReceivedAt,
    CustomerId,
    Error,
    ReplayedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one at a time.
        m.alter_table(
            Table::alter()
                .table(WebhookEvents::Table)
                .add_column(string_len_null(WebhookEvents::CustomerId, 256))
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(WebhookEvents::Table)
                .add_column(text_null(WebhookEvents::Error))
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(WebhookEvents::Table)
                .add_column(timestamp_with_time_zone_null(WebhookEvents::ReplayedAt))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_webhook_events_outcome_received")
                .table(WebhookEvents::Table)
                .col(WebhookEvents::Outcome)
                .col(WebhookEvents::ReceivedAt)
                .col(WebhookEvents::Id)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_webhook_events_received")
                .table(WebhookEvents::Table)
                .col(WebhookEvents::ReceivedAt)
                .col(WebhookEvents::Id)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_webhook_events_customer")
                .table(WebhookEvents::Table)
                .col(WebhookEvents::CustomerId)
                .col(WebhookEvents::Id)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for name in [
            "idx_webhook_events_customer",
            "idx_webhook_events_received",
            "idx_webhook_events_outcome_received",
        ] {
            m.drop_index(
                Index::drop()
                    .name(name)
                    .table(WebhookEvents::Table)
                    .to_owned(),
            )
            .await?;
        }
        for col in [
            WebhookEvents::ReplayedAt,
            WebhookEvents::Error,
            WebhookEvents::CustomerId,
        ] {
            m.alter_table(
                Table::alter()
                    .table(WebhookEvents::Table)
                    .drop_column(col)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}
