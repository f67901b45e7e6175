//! Issue 13 point 10: pairing a watch with an account, and customers merged
//! into others. A device proves possession with a secret it was answered
//! once (only its hash is kept); a pairing code is short-lived and single
//! use (only its hash is kept); a merged-away customer id stays an alias.
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Devices {
    Table,
    SecretHash,
}

#[derive(DeriveIden)]
enum Customers {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum CustomerAliases {
    Table,
    AliasId,
    CustomerId,
    MergedAt,
}

#[derive(DeriveIden)]
enum PairingCodes {
    Table,
    CodeHash,
    Platform,
    DeviceId,
    CreatedAt,
    ExpiresAt,
    UsedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // Null: a device seen before secrets existed; it is answered one on
        // its next call.
        m.alter_table(
            Table::alter()
                .table(Devices::Table)
                .add_column(string_len_null(Devices::SecretHash, 64))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(CustomerAliases::Table)
                .col(string_len(CustomerAliases::AliasId, 256).primary_key())
                .col(string_len(CustomerAliases::CustomerId, 256))
                .col(timestamp_with_time_zone(CustomerAliases::MergedAt))
                .foreign_key(
                    ForeignKey::create()
                        .from(CustomerAliases::Table, CustomerAliases::CustomerId)
                        .to(Customers::Table, Customers::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        // A later merge of the account re-points the aliases that name it.
        m.create_index(
            Index::create()
                .name("idx_customer_aliases_customer")
                .table(CustomerAliases::Table)
                .col(CustomerAliases::CustomerId)
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(PairingCodes::Table)
                .col(string_len(PairingCodes::CodeHash, 64).primary_key())
                .col(string_len(PairingCodes::Platform, 16))
                .col(string_len(PairingCodes::DeviceId, 256))
                .col(timestamp_with_time_zone(PairingCodes::CreatedAt))
                .col(timestamp_with_time_zone(PairingCodes::ExpiresAt))
                .col(timestamp_with_time_zone_null(PairingCodes::UsedAt))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_pairing_codes_device")
                .table(PairingCodes::Table)
                .col(PairingCodes::Platform)
                .col(PairingCodes::DeviceId)
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(PairingCodes::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(CustomerAliases::Table).to_owned())
            .await?;
        m.alter_table(
            Table::alter()
                .table(Devices::Table)
                .drop_column(Devices::SecretHash)
                .to_owned(),
        )
        .await?;
        Ok(())
    }
}
