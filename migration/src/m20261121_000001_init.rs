use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Customers {
    Table,
    Id,
    CreatedAt,
    Attributes,
}

#[derive(DeriveIden)]
enum Devices {
    Table,
    Id,
    Platform,
    DeviceId,
    CustomerId,
    FirstSeenAt,
    LastSeenAt,
}

#[derive(DeriveIden)]
enum Purchases {
    Table,
    Id,
    CustomerId,
    Store,
    StorePurchaseId,
    ProductId,
    Environment,
    Status,
    PeriodType,
    PurchasedAt,
    ExpiresAt,
    GraceExpiresAt,
    AutoRenew,
    CanceledAt,
    RevokedAt,
    RenewalCount,
    SourceUpdatedAt,
    Raw,
}

#[derive(DeriveIden)]
enum Receipts {
    Table,
    Id,
    CustomerId,
    Store,
    Payload,
    ReceivedAt,
    Outcome,
    Error,
    PurchaseId,
}

#[derive(DeriveIden)]
enum WebhookEvents {
    Table,
    Id,
    Source,
    EventId,
    ReceivedAt,
    Payload,
    Outcome,
    ProcessedAt,
}

#[derive(DeriveIden)]
enum EntitlementEvents {
    Table,
    Id,
    CustomerId,
    Entitlement,
    Kind,
    OldStatus,
    NewStatus,
    PurchaseId,
    OccurredAt,
    PublishedAt,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    Name,
    Role,
    Prefix,
    Hash,
    CreatedAt,
    RevokedAt,
}

fn fk(
    from: (impl IntoIden, impl IntoIden),
    to: (impl IntoIden, impl IntoIden),
) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .from(from.0, from.1)
        .to(to.0, to.1)
        .on_delete(ForeignKeyAction::Cascade)
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Customers::Table)
                .col(string_len(Customers::Id, 256).primary_key())
                .col(timestamp_with_time_zone(Customers::CreatedAt))
                .col(json(Customers::Attributes))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_customers_created_at")
                .table(Customers::Table)
                .col(Customers::CreatedAt)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Devices::Table)
                .col(big_pk_auto(Devices::Id))
                .col(string_len(Devices::Platform, 16))
                .col(string_len(Devices::DeviceId, 256))
                .col(string_len(Devices::CustomerId, 256))
                .col(timestamp_with_time_zone(Devices::FirstSeenAt))
                .col(timestamp_with_time_zone(Devices::LastSeenAt))
                .foreign_key(&mut fk(
                    (Devices::Table, Devices::CustomerId),
                    (Customers::Table, Customers::Id),
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ux_devices_platform_device")
                .table(Devices::Table)
                .col(Devices::Platform)
                .col(Devices::DeviceId)
                .unique()
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_devices_customer")
                .table(Devices::Table)
                .col(Devices::CustomerId)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Purchases::Table)
                .col(big_pk_auto(Purchases::Id))
                .col(string_len(Purchases::CustomerId, 256))
                .col(string_len(Purchases::Store, 16))
                .col(string_len(Purchases::StorePurchaseId, 512))
                .col(string_len(Purchases::ProductId, 256))
                .col(string_len(Purchases::Environment, 16))
                .col(string_len(Purchases::Status, 32))
                .col(string_len(Purchases::PeriodType, 16))
                .col(timestamp_with_time_zone(Purchases::PurchasedAt))
                .col(timestamp_with_time_zone_null(Purchases::ExpiresAt))
                .col(timestamp_with_time_zone_null(Purchases::GraceExpiresAt))
                .col(boolean(Purchases::AutoRenew))
                .col(timestamp_with_time_zone_null(Purchases::CanceledAt))
                .col(timestamp_with_time_zone_null(Purchases::RevokedAt))
                .col(integer(Purchases::RenewalCount).default(0))
                .col(timestamp_with_time_zone(Purchases::SourceUpdatedAt))
                .col(json_null(Purchases::Raw))
                .foreign_key(&mut fk(
                    (Purchases::Table, Purchases::CustomerId),
                    (Customers::Table, Customers::Id),
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ux_purchases_store_purchase")
                .table(Purchases::Table)
                .col(Purchases::Store)
                .col(Purchases::StorePurchaseId)
                .unique()
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_purchases_customer")
                .table(Purchases::Table)
                .col(Purchases::CustomerId)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_purchases_expires_at")
                .table(Purchases::Table)
                .col(Purchases::ExpiresAt)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Receipts::Table)
                .col(big_pk_auto(Receipts::Id))
                .col(string_len(Receipts::CustomerId, 256))
                .col(string_len(Receipts::Store, 16))
                .col(json(Receipts::Payload))
                .col(timestamp_with_time_zone(Receipts::ReceivedAt))
                .col(string_len(Receipts::Outcome, 16))
                .col(text_null(Receipts::Error))
                .col(big_integer_null(Receipts::PurchaseId))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_receipts_customer")
                .table(Receipts::Table)
                .col(Receipts::CustomerId)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(WebhookEvents::Table)
                .col(big_pk_auto(WebhookEvents::Id))
                .col(string_len(WebhookEvents::Source, 16))
                .col(string_len(WebhookEvents::EventId, 256))
                .col(timestamp_with_time_zone(WebhookEvents::ReceivedAt))
                .col(json(WebhookEvents::Payload))
                .col(string_len(WebhookEvents::Outcome, 32))
                .col(timestamp_with_time_zone_null(WebhookEvents::ProcessedAt))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ux_webhook_events_source_event")
                .table(WebhookEvents::Table)
                .col(WebhookEvents::Source)
                .col(WebhookEvents::EventId)
                .unique()
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(EntitlementEvents::Table)
                .col(big_pk_auto(EntitlementEvents::Id))
                .col(string_len(EntitlementEvents::CustomerId, 256))
                .col(string_len(EntitlementEvents::Entitlement, 128))
                .col(string_len(EntitlementEvents::Kind, 32))
                .col(string_len_null(EntitlementEvents::OldStatus, 32))
                .col(string_len(EntitlementEvents::NewStatus, 32))
                .col(big_integer_null(EntitlementEvents::PurchaseId))
                .col(timestamp_with_time_zone(EntitlementEvents::OccurredAt))
                .col(timestamp_with_time_zone_null(
                    EntitlementEvents::PublishedAt,
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_entitlement_events_customer")
                .table(EntitlementEvents::Table)
                .col(EntitlementEvents::CustomerId)
                .col(EntitlementEvents::Id)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_entitlement_events_unpublished")
                .table(EntitlementEvents::Table)
                .col(EntitlementEvents::PublishedAt)
                .col(EntitlementEvents::Id)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(ApiKeys::Table)
                .col(string_len(ApiKeys::Id, 64).primary_key())
                .col(string_len(ApiKeys::Name, 256))
                .col(string_len(ApiKeys::Role, 16))
                .col(string_len_uniq(ApiKeys::Prefix, 32))
                .col(string_len(ApiKeys::Hash, 64))
                .col(timestamp_with_time_zone(ApiKeys::CreatedAt))
                .col(timestamp_with_time_zone_null(ApiKeys::RevokedAt))
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            ApiKeys::Table.into_iden(),
            EntitlementEvents::Table.into_iden(),
            WebhookEvents::Table.into_iden(),
            Receipts::Table.into_iden(),
            Purchases::Table.into_iden(),
            Devices::Table.into_iden(),
            Customers::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(t).to_owned()).await?;
        }
        Ok(())
    }
}
