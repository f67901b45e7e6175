use chrono::{DateTime, Duration, Utc};
use entities::{customers, devices, purchases};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter,
    TryInsertResult, sea_query::OnConflict,
};

use super::Core;
use crate::{
    db,
    domain::{Environment, ExternalId, PeriodType, Platform, PurchaseStatus, Snapshot, Store},
    error::{AppError, AppResult},
};

/// `last_seen_at` is kept to this resolution so a device polling every few
/// seconds costs a read, not a write.
const LAST_SEEN_RESOLUTION: Duration = Duration::seconds(60);

/// Whether a registration that names another customer than the one a known
/// device is bound to may move it. A bound device stays bound unless the
/// caller may move devices: otherwise whoever knows a paying watch's id
/// could take its access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rebind {
    Refuse,
    Allow,
}

pub struct Registration {
    pub customer_id: String,
    pub device: devices::Model,
    /// True when this call saw the device for the first time.
    pub created: bool,
    pub snapshot: Snapshot,
}

/// Trials and grants are keyed one per (customer, entitlement), so the
/// unique (store, store_purchase_id) index makes "at most one" a database fact.
fn own_purchase_key(store: Store, customer_id: &str, entitlement: &str) -> String {
    format!("{store}:{entitlement}:{customer_id}")
}

/// A purchase row for access we give ourselves: a trial or a promotional grant.
fn granted_by_us(
    customer_id: &str,
    store: Store,
    entitlement: &str,
    period_type: PeriodType,
    expires_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> purchases::ActiveModel {
    purchases::ActiveModel {
        customer_id: Set(customer_id.to_string()),
        store: Set(store.as_str().into()),
        store_purchase_id: Set(own_purchase_key(store, customer_id, entitlement)),
        product_id: Set(entitlement.to_string()),
        environment: Set(Environment::Production.as_str().into()),
        status: Set(PurchaseStatus::Active.as_str().into()),
        period_type: Set(period_type.as_str().into()),
        purchased_at: Set(now),
        expires_at: Set(expires_at),
        grace_expires_at: Set(None),
        auto_renew: Set(false),
        canceled_at: Set(None),
        revoked_at: Set(None),
        renewal_count: Set(0),
        source_updated_at: Set(now),
        raw: Set(None),
        ..Default::default()
    }
}

impl Core {
    /// Registers a device. First sight creates its customer (the device id
    /// unless one is given) and starts the configured trial; nothing that
    /// happens later (re-registration, reinstall, another client) restarts it.
    /// A known device bound to another customer than `customer_id` moves
    /// only with `Rebind::Allow`; otherwise `DEVICE_ALREADY_BOUND`, nothing written.
    pub async fn register_device(
        &self,
        platform: Platform,
        device_id: &ExternalId,
        customer_id: Option<&ExternalId>,
        rebind: Rebind,
    ) -> AppResult<Registration> {
        let now = self.now();
        if let Some(device) = self.cached_device(platform, device_id).await? {
            return self.known_device(device, customer_id, rebind, now).await;
        }

        let customer = customer_id.unwrap_or(device_id).as_str().to_string();
        let txn = self.db.write().await?;
        db::ensure_customer(&txn, &customer, now).await?;
        db::lock_customer(&txn, &customer).await?;
        txn.touch_device(platform.as_str(), device_id.as_str());
        let inserted = devices::Entity::insert(devices::ActiveModel {
            platform: Set(platform.as_str().to_string()),
            device_id: Set(device_id.as_str().to_string()),
            customer_id: Set(customer.clone()),
            first_seen_at: Set(now),
            last_seen_at: Set(now),
            ..Default::default()
        })
        .on_conflict_do_nothing_on([devices::Column::Platform, devices::Column::DeviceId])
        .exec_without_returning(&*txn)
        .await?;
        if !matches!(inserted, TryInsertResult::Inserted(n) if n > 0) {
            // Another request registered it first; it owns the first sight.
            drop(txn);
            let device = db::find_device(&self.db.conn, platform.as_str(), device_id.as_str())
                .await?
                .ok_or_else(|| {
                    AppError::Internal(anyhow::anyhow!("device vanished after conflict"))
                })?;
            return self.known_device(device, customer_id, rebind, now).await;
        }

        let (before, _) = self.state_before_write(&*txn, &customer, now).await?;
        if let Some(trial) = &self.trial {
            purchases::Entity::insert(granted_by_us(
                &customer,
                Store::Trial,
                &trial.entitlement,
                PeriodType::Trial,
                Some(now + Duration::days(i64::from(trial.days))),
                now,
            ))
            .on_conflict_do_nothing_on([
                purchases::Column::Store,
                purchases::Column::StorePurchaseId,
            ])
            .exec_without_returning(&*txn)
            .await?;
        }
        let snapshot = self
            .record_transition(&*txn, &customer, &before, now)
            .await?;
        let device = db::find_device(&*txn, platform.as_str(), device_id.as_str())
            .await?
            .ok_or_else(|| AppError::Internal(anyhow::anyhow!("device missing after insert")))?;
        txn.commit().await?;
        Ok(Registration {
            customer_id: customer,
            device,
            created: true,
            snapshot,
        })
    }

    /// A known device, from the read cache when fresh (unknown ones are not
    /// cached: their first sight goes through the write path).
    async fn cached_device(
        &self,
        platform: Platform,
        device_id: &ExternalId,
    ) -> AppResult<Option<devices::Model>> {
        let key = db::device_key(platform.as_str(), device_id.as_str());
        if let Some(d) = self.db.device_cache.get(&key) {
            return Ok(Some(d));
        }
        let epoch = self.db.device_cache.epoch();
        let found = db::find_device(&self.db.conn, platform.as_str(), device_id.as_str()).await?;
        if let Some(d) = &found {
            self.db.device_cache.fill(&key, epoch, d.clone());
        }
        Ok(found)
    }

    async fn known_device(
        &self,
        device: devices::Model,
        customer_id: Option<&ExternalId>,
        may_rebind: Rebind,
        now: DateTime<Utc>,
    ) -> AppResult<Registration> {
        let rebind = customer_id.filter(|c| c.as_str() != device.customer_id);
        if rebind.is_some() && may_rebind == Rebind::Refuse {
            return Err(AppError::DeviceAlreadyBound);
        }
        let device = if rebind.is_some() || now - device.last_seen_at >= LAST_SEEN_RESOLUTION {
            let txn = self.db.write().await?;
            if let Some(c) = rebind {
                // The device follows the customer now signed in on it; its
                // first sight (and so its trial) stays in the past.
                db::ensure_customer(&txn, c.as_str(), now).await?;
            }
            txn.touch_device(&device.platform, &device.device_id);
            let mut am = device.into_active_model();
            am.last_seen_at = Set(now);
            if let Some(c) = rebind {
                am.customer_id = Set(c.as_str().to_string());
            }
            let device = am.update(&*txn).await?;
            txn.commit().await?;
            device
        } else {
            device
        };
        let snapshot = self.snapshot(&device.customer_id).await?;
        Ok(Registration {
            customer_id: device.customer_id.clone(),
            device,
            created: false,
            snapshot,
        })
    }

    pub async fn find_customer(&self, id: &str) -> AppResult<Option<customers::Model>> {
        Ok(customers::Entity::find_by_id(id.to_string())
            .one(&self.db.conn)
            .await?)
    }

    /// Grants a promotional entitlement until `expires_at` (`None`: lifetime).
    /// Granting again replaces the previous grant's term.
    pub async fn grant_entitlement(
        &self,
        customer_id: &str,
        entitlement: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> AppResult<Snapshot> {
        let now = self.now();
        if !self.catalog.has_entitlement(entitlement) {
            return Err(AppError::bad_input(format!(
                "unknown entitlement `{entitlement}`"
            )));
        }
        if expires_at.is_some_and(|e| e <= now) {
            return Err(AppError::bad_input("expiresAt must be in the future"));
        }
        let txn = self.db.write().await?;
        db::lock_customer(&txn, customer_id)
            .await?
            .ok_or(AppError::NotFound("customer"))?;
        let (before, _) = self.state_before_write(&*txn, customer_id, now).await?;
        let row = granted_by_us(
            customer_id,
            Store::Promotional,
            entitlement,
            PeriodType::Normal,
            expires_at,
            now,
        );
        purchases::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([purchases::Column::Store, purchases::Column::StorePurchaseId])
                    .update_columns([
                        purchases::Column::Status,
                        purchases::Column::PurchasedAt,
                        purchases::Column::ExpiresAt,
                        purchases::Column::RevokedAt,
                        purchases::Column::SourceUpdatedAt,
                    ])
                    .to_owned(),
            )
            .exec_without_returning(&*txn)
            .await?;
        let after = self
            .record_transition(&*txn, customer_id, &before, now)
            .await?;
        txn.commit().await?;
        Ok(after)
    }

    /// Ends a promotional grant now. Other sources of the entitlement stay.
    pub async fn revoke_grant(&self, customer_id: &str, entitlement: &str) -> AppResult<Snapshot> {
        let now = self.now();
        if !self.catalog.has_entitlement(entitlement) {
            return Err(AppError::bad_input(format!(
                "unknown entitlement `{entitlement}`"
            )));
        }
        let txn = self.db.write().await?;
        db::lock_customer(&txn, customer_id)
            .await?
            .ok_or(AppError::NotFound("customer"))?;
        let grant = purchases::Entity::find()
            .filter(purchases::Column::Store.eq(Store::Promotional.as_str()))
            .filter(purchases::Column::StorePurchaseId.eq(own_purchase_key(
                Store::Promotional,
                customer_id,
                entitlement,
            )))
            .filter(purchases::Column::RevokedAt.is_null())
            .one(&*txn)
            .await?
            .ok_or(AppError::NotFound("grant"))?;
        let (before, _) = self.state_before_write(&*txn, customer_id, now).await?;
        let mut am = grant.into_active_model();
        am.status = Set(PurchaseStatus::Revoked.as_str().into());
        am.revoked_at = Set(Some(now));
        am.source_updated_at = Set(now);
        am.update(&*txn).await?;
        let after = self
            .record_transition(&*txn, customer_id, &before, now)
            .await?;
        txn.commit().await?;
        Ok(after)
    }
}
