//! Issue 16 point 4: operators find a customer by what a store or Stripe
//! told them: a Play order id, a Stripe customer id, the e-mail Stripe
//! reported, a store purchase id, a device id. Each searched key gets an
//! index; the new columns are filled from what is already stored.
use sea_orm_migration::{
    prelude::*,
    schema::*,
    sea_orm::{ConnectionTrait, JsonValue, Statement},
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Customers {
    Table,
    /// The Stripe customer (`cus_…`) this customer pays as.
    StripeCustomerId,
    /// The e-mail Stripe reported for the buyer, lower-cased.
    Email,
}

#[derive(DeriveIden)]
enum Purchases {
    Table,
    Id,
    /// Play: the order id without its renewal suffix (`GPA.…`, not `GPA.…..3`).
    OrderId,
}

/// A Play payload's order id, as the payloads stood when this migration
/// was written (the server fills the column itself from then on).
fn play_order_id(raw: &JsonValue) -> Option<String> {
    let s = |v: &JsonValue| v.as_str().filter(|x| !x.is_empty()).map(str::to_string);
    s(&raw["orderId"])
        .or_else(|| s(&raw["latestOrderId"]))
        .or_else(|| s(&raw["lineItems"][0]["latestSuccessfulOrderId"]))
        .map(|o| o.split("..").next().unwrap_or_default().to_string())
}

const INDEXES: [(&str, &str, &str); 6] = [
    (
        "idx_customers_stripe_customer_id",
        "customers",
        "stripe_customer_id",
    ),
    ("idx_customers_email", "customers", "email"),
    ("idx_purchases_order_id", "purchases", "order_id"),
    (
        "idx_purchases_store_purchase_id",
        "purchases",
        "store_purchase_id",
    ),
    ("idx_devices_device_id", "devices", "device_id"),
    (
        "idx_purchase_aliases_store_purchase_id",
        "purchase_aliases",
        "store_purchase_id",
    ),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one at a time.
        for (col, len) in [(Customers::StripeCustomerId, 256), (Customers::Email, 320)] {
            m.alter_table(
                Table::alter()
                    .table(Customers::Table)
                    .add_column(string_len_null(col, len))
                    .to_owned(),
            )
            .await?;
        }
        m.alter_table(
            Table::alter()
                .table(Purchases::Table)
                .add_column(string_len_null(Purchases::OrderId, 256))
                .to_owned(),
        )
        .await?;
        for (name, table, col) in INDEXES {
            m.create_index(
                Index::create()
                    .name(name)
                    .table(Alias::new(table))
                    .col(Alias::new(col))
                    .to_owned(),
            )
            .await?;
        }

        let db = m.get_connection();
        let backend = db.get_database_backend();
        let pg = backend == sea_orm_migration::sea_orm::DbBackend::Postgres;
        // The Stripe customer each customer was remembered as (until now a
        // JSON attribute only, found by scanning).
        db.execute_unprepared(if pg {
            "UPDATE customers SET stripe_customer_id = attributes->>'stripe_customer_id' \
             WHERE attributes->>'stripe_customer_id' IS NOT NULL"
        } else {
            "UPDATE customers SET stripe_customer_id = json_extract(attributes, '$.stripe_customer_id') \
             WHERE json_extract(attributes, '$.stripe_customer_id') IS NOT NULL"
        })
        .await?;
        // Play order ids from the stored payloads, a page at a time.
        let mut after = 0_i64;
        loop {
            let rows = db
                .query_all_raw(Statement::from_sql_and_values(
                    backend,
                    if pg {
                        "SELECT id, raw FROM purchases WHERE id > $1 AND store = 'play_store' AND raw IS NOT NULL ORDER BY id LIMIT 500"
                    } else {
                        "SELECT id, raw FROM purchases WHERE id > ? AND store = 'play_store' AND raw IS NOT NULL ORDER BY id LIMIT 500"
                    },
                    [after.into()],
                ))
                .await?;
            let Some(last) = rows.last() else { break };
            after = last.try_get("", "id")?;
            for row in &rows {
                let id: i64 = row.try_get("", "id")?;
                let raw: JsonValue = row.try_get("", "raw")?;
                let Some(order) = play_order_id(&raw) else {
                    continue;
                };
                let q = Query::update()
                    .table(Purchases::Table)
                    .value(Purchases::OrderId, order)
                    .and_where(Expr::col(Purchases::Id).eq(id))
                    .to_owned();
                db.execute(&q).await?;
            }
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for (name, table, _) in INDEXES {
            m.drop_index(Index::drop().name(name).table(Alias::new(table)).to_owned())
                .await?;
        }
        m.alter_table(
            Table::alter()
                .table(Purchases::Table)
                .drop_column(Purchases::OrderId)
                .to_owned(),
        )
        .await?;
        for col in [Customers::Email, Customers::StripeCustomerId] {
            m.alter_table(
                Table::alter()
                    .table(Customers::Table)
                    .drop_column(col)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn play_order_ids_lose_their_renewal_suffix() {
        let raw: JsonValue = r#"{"latestOrderId": "GPA.1234-5678-9012-34567..2"}"#
            .parse()
            .unwrap();
        assert_eq!(
            play_order_id(&raw).as_deref(),
            Some("GPA.1234-5678-9012-34567")
        );
        let raw: JsonValue = r#"{"orderId": "GPA.1"}"#.parse().unwrap();
        assert_eq!(play_order_id(&raw).as_deref(), Some("GPA.1"));
    }
}
