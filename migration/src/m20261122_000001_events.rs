//! Issue 6: leases that keep replicas from running one job twice, cursors of
//! the jobs that walk forward in time, outbound webhook deliveries, and when
//! each purchase was last re-read from its store.
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum JobLeases {
    Table,
    Name,
    Holder,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum JobCursors {
    Table,
    Name,
    Value,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum OutboundEndpoints {
    Table,
    Url,
    FailingSince,
    DisabledAt,
    LastSuccessAt,
}

#[derive(DeriveIden)]
enum OutboundDeliveries {
    Table,
    Id,
    EventId,
    EndpointUrl,
    Attempts,
    NextAttemptAt,
    DeliveredAt,
    LastError,
    CreatedAt,
}

#[derive(DeriveIden)]
enum PurchaseChecks {
    Table,
    PurchaseId,
    CheckedAt,
    Outcome,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(JobLeases::Table)
                .col(string_len(JobLeases::Name, 64).primary_key())
                .col(string_len(JobLeases::Holder, 64))
                .col(timestamp_with_time_zone(JobLeases::ExpiresAt))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(JobCursors::Table)
                .col(string_len(JobCursors::Name, 64).primary_key())
                .col(string_len(JobCursors::Value, 1024))
                .col(timestamp_with_time_zone(JobCursors::UpdatedAt))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(OutboundEndpoints::Table)
                .col(string_len(OutboundEndpoints::Url, 2048).primary_key())
                .col(timestamp_with_time_zone_null(
                    OutboundEndpoints::FailingSince,
                ))
                .col(timestamp_with_time_zone_null(OutboundEndpoints::DisabledAt))
                .col(timestamp_with_time_zone_null(
                    OutboundEndpoints::LastSuccessAt,
                ))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(OutboundDeliveries::Table)
                .col(big_pk_auto(OutboundDeliveries::Id))
                .col(big_integer(OutboundDeliveries::EventId))
                .col(string_len(OutboundDeliveries::EndpointUrl, 2048))
                .col(integer(OutboundDeliveries::Attempts))
                .col(timestamp_with_time_zone(OutboundDeliveries::NextAttemptAt))
                .col(timestamp_with_time_zone_null(
                    OutboundDeliveries::DeliveredAt,
                ))
                .col(string_len_null(OutboundDeliveries::LastError, 512))
                .col(timestamp_with_time_zone(OutboundDeliveries::CreatedAt))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_outbound_deliveries_event_endpoint")
                .table(OutboundDeliveries::Table)
                .col(OutboundDeliveries::EventId)
                .col(OutboundDeliveries::EndpointUrl)
                .unique()
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_outbound_deliveries_due")
                .table(OutboundDeliveries::Table)
                .col(OutboundDeliveries::DeliveredAt)
                .col(OutboundDeliveries::NextAttemptAt)
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(PurchaseChecks::Table)
                .col(big_integer(PurchaseChecks::PurchaseId).primary_key())
                .col(timestamp_with_time_zone(PurchaseChecks::CheckedAt))
                .col(string_len(PurchaseChecks::Outcome, 256))
                .to_owned(),
        )
        .await?;
        // The expiry sweep looks for periods ending inside a window (the
        // first migration indexed `expires_at`).
        for (name, col) in [
            ("idx_purchases_grace_expires_at", "grace_expires_at"),
            ("idx_purchases_revoked_at", "revoked_at"),
        ] {
            m.create_index(
                Index::create()
                    .name(name)
                    .table(Alias::new("purchases"))
                    .col(Alias::new(col))
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for name in ["idx_purchases_grace_expires_at", "idx_purchases_revoked_at"] {
            m.drop_index(
                Index::drop()
                    .name(name)
                    .table(Alias::new("purchases"))
                    .to_owned(),
            )
            .await?;
        }
        for t in [
            PurchaseChecks::Table.into_iden(),
            OutboundDeliveries::Table.into_iden(),
            OutboundEndpoints::Table.into_iden(),
            JobCursors::Table.into_iden(),
            JobLeases::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(t).to_owned()).await?;
        }
        Ok(())
    }
}
