//! Issue 13: change-log statuses become the access level (`ACTIVE` or
//! `EXPIRED`) and the store status behind a change moves to `reason`, so a
//! consumer that gates on the status alone is right for every change.
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum EntitlementEvents {
    Table,
    Reason,
}

/// Upper-case statuses the change log held before, and their reason.
const OLD_STATUSES: &[(&str, &str)] = &[
    ("ACTIVE", "active"),
    ("TRIALING", "trialing"),
    ("CANCELED", "canceled"),
    ("IN_GRACE_PERIOD", "grace_period"),
    ("IN_BILLING_RETRY", "billing_retry"),
    ("ON_HOLD", "on_hold"),
    ("PAUSED", "paused"),
    ("EXPIRED", "expired"),
    ("REFUNDED", "refunded"),
    ("REVOKED", "revoked"),
    ("PENDING", "pending"),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(EntitlementEvents::Table)
                .add_column(ColumnDef::new(EntitlementEvents::Reason).string().null())
                .to_owned(),
        )
        .await?;
        // Rows already written keep their meaning: the old status names the
        // reason, and every status but ACTIVE meant no access.
        let db = m.get_connection();
        let mut case = String::from("CASE new_status");
        for (status, reason) in OLD_STATUSES {
            case.push_str(&format!(" WHEN '{status}' THEN '{reason}'"));
        }
        case.push_str(" END");
        db.execute_unprepared(&format!(
            "UPDATE entitlement_events SET reason = {case} WHERE reason IS NULL"
        ))
        .await?;
        db.execute_unprepared(
            "UPDATE entitlement_events SET \
             new_status = CASE WHEN new_status = 'ACTIVE' THEN 'ACTIVE' ELSE 'EXPIRED' END, \
             old_status = CASE WHEN old_status IS NULL THEN NULL \
                               WHEN old_status = 'ACTIVE' THEN 'ACTIVE' ELSE 'EXPIRED' END",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(EntitlementEvents::Table)
                .drop_column(EntitlementEvents::Reason)
                .to_owned(),
        )
        .await
    }
}
