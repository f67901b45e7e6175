//! Issue 13 (store bindings): the account-token index that resolves a
//! store's binding to a customer, purchases the store binds to no customer
//! we know yet (held until their owner appears), the Play tokens a purchase
//! line has superseded, and the store transactions seen per purchase (the
//! renewal count).
use sea_orm_migration::{
    prelude::*,
    schema::*,
    sea_orm::{ConnectionTrait, Statement},
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AccountTokens {
    Table,
    Token,
    CustomerId,
}

#[derive(DeriveIden)]
enum HeldPurchases {
    Table,
    Id,
    Store,
    StorePurchaseId,
    BoundKey,
    Replaces,
    State,
    SourceUpdatedAt,
    HeldAt,
}

#[derive(DeriveIden)]
enum PurchaseAliases {
    Table,
    Id,
    Store,
    StorePurchaseId,
    PurchaseId,
}

#[derive(DeriveIden)]
enum PurchaseTransactions {
    Table,
    Id,
    Store,
    StorePurchaseId,
    TransactionId,
}

#[derive(DeriveIden)]
enum Customers {
    Table,
}

#[derive(DeriveIden)]
enum Purchases {
    Table,
    Id,
}

/// The namespace apps derive the `appAccountToken` of a non-UUID customer id
/// in; must equal the server's, which a test of the server checks.
pub const ACCOUNT_TOKEN_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5d1e_46b0_65a3_5e07_9d0a_58e1_c8a4_2f31);

/// Every `appAccountToken` that names `customer_id`: the id itself when it is
/// a UUID, otherwise its UUID v5, and for a decimal integer id also the
/// `%08x-0000-0000-0000-000000000000` form some apps use.
pub fn account_tokens(customer_id: &str) -> Vec<uuid::Uuid> {
    if let Ok(u) = uuid::Uuid::parse_str(customer_id) {
        return vec![u];
    }
    let mut out = vec![uuid::Uuid::new_v5(
        &ACCOUNT_TOKEN_NAMESPACE,
        customer_id.as_bytes(),
    )];
    if let Ok(n) = customer_id.parse::<u32>()
        && n.to_string() == customer_id
    {
        out.push(uuid::Uuid::from_u128(u128::from(n) << 96));
    }
    out
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(AccountTokens::Table)
                .col(string_len(AccountTokens::Token, 64).primary_key())
                .col(string_len(AccountTokens::CustomerId, 256))
                .foreign_key(
                    ForeignKey::create()
                        .from(AccountTokens::Table, AccountTokens::CustomerId)
                        .to(Customers::Table, Alias::new("id"))
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_account_tokens_customer")
                .table(AccountTokens::Table)
                .col(AccountTokens::CustomerId)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(HeldPurchases::Table)
                .col(big_pk_auto(HeldPurchases::Id))
                .col(string_len(HeldPurchases::Store, 16))
                .col(string_len(HeldPurchases::StorePurchaseId, 512))
                .col(string_len_null(HeldPurchases::BoundKey, 256))
                .col(string_len_null(HeldPurchases::Replaces, 512))
                .col(json(HeldPurchases::State))
                .col(timestamp_with_time_zone(HeldPurchases::SourceUpdatedAt))
                .col(timestamp_with_time_zone(HeldPurchases::HeldAt))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_held_purchases_store_purchase")
                .table(HeldPurchases::Table)
                .col(HeldPurchases::Store)
                .col(HeldPurchases::StorePurchaseId)
                .unique()
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_held_purchases_bound_key")
                .table(HeldPurchases::Table)
                .col(HeldPurchases::BoundKey)
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_held_purchases_replaces")
                .table(HeldPurchases::Table)
                .col(HeldPurchases::Store)
                .col(HeldPurchases::Replaces)
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(PurchaseAliases::Table)
                .col(big_pk_auto(PurchaseAliases::Id))
                .col(string_len(PurchaseAliases::Store, 16))
                .col(string_len(PurchaseAliases::StorePurchaseId, 512))
                .col(big_integer(PurchaseAliases::PurchaseId))
                .foreign_key(
                    ForeignKey::create()
                        .from(PurchaseAliases::Table, PurchaseAliases::PurchaseId)
                        .to(Purchases::Table, Purchases::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_purchase_aliases_store_purchase")
                .table(PurchaseAliases::Table)
                .col(PurchaseAliases::Store)
                .col(PurchaseAliases::StorePurchaseId)
                .unique()
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(PurchaseTransactions::Table)
                .col(big_pk_auto(PurchaseTransactions::Id))
                .col(string_len(PurchaseTransactions::Store, 16))
                .col(string_len(PurchaseTransactions::StorePurchaseId, 512))
                .col(string_len(PurchaseTransactions::TransactionId, 256))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_purchase_transactions_unique")
                .table(PurchaseTransactions::Table)
                .col(PurchaseTransactions::Store)
                .col(PurchaseTransactions::StorePurchaseId)
                .col(PurchaseTransactions::TransactionId)
                .unique()
                .to_owned(),
        )
        .await?;

        // Customers from before the index: their tokens, so notifications
        // naming them resolve instead of being held.
        let db = m.get_connection();
        let backend = db.get_database_backend();
        let rows = db
            .query_all_raw(Statement::from_string(backend, "SELECT id FROM customers"))
            .await?;
        for row in rows {
            let id: String = row.try_get("", "id")?;
            for t in account_tokens(&id) {
                let q = Query::insert()
                    .into_table(AccountTokens::Table)
                    .columns([AccountTokens::Token, AccountTokens::CustomerId])
                    .values_panic([t.hyphenated().to_string().into(), id.clone().into()])
                    .on_conflict(
                        OnConflict::column(AccountTokens::Token)
                            .do_nothing()
                            .to_owned(),
                    )
                    .to_owned();
                db.execute(&q).await?;
            }
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            PurchaseTransactions::Table.into_iden(),
            PurchaseAliases::Table.into_iden(),
            HeldPurchases::Table.into_iden(),
            AccountTokens::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(t).to_owned()).await?;
        }
        Ok(())
    }
}
