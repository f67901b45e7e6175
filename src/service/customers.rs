use chrono::{DateTime, Duration, Utc};
use entities::devices;

use super::Core;
use crate::{
    db::{self, purchase::PurchaseFields},
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
    /// The device's secret, when this call issued it (once per device).
    pub device_secret: Option<String>,
}

/// Trials and grants are keyed one per (customer, entitlement), so the
/// unique (store, store_purchase_id) index makes "at most one" a database fact.
pub(super) fn own_purchase_key(store: Store, customer_id: &str, entitlement: &str) -> String {
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
) -> PurchaseFields {
    PurchaseFields {
        customer_id: customer_id.to_string(),
        store: store.as_str().into(),
        store_purchase_id: own_purchase_key(store, customer_id, entitlement),
        product_id: entitlement.to_string(),
        environment: Environment::Production.as_str().into(),
        status: PurchaseStatus::Active.as_str().into(),
        period_type: period_type.as_str().into(),
        purchased_at: now,
        expires_at,
        grace_expires_at: None,
        auto_renew: false,
        canceled_at: None,
        revoked_at: None,
        renewal_count: 0,
        source_updated_at: now,
        raw: None,
        order_id: None,
    }
}

/// Check-in times of known devices not yet written: one transaction every
/// few seconds writes them all, instead of one per polling request.
#[derive(Default)]
pub struct SeenBuffer {
    pending: std::sync::Mutex<std::collections::HashMap<i64, DateTime<Utc>>>,
}

/// Rows written per transaction when flushing, so the writer is never held long.
const SEEN_FLUSH_CHUNK: usize = 500;

impl SeenBuffer {
    fn record(&self, device_row: i64, at: DateTime<Utc>) {
        self.pending
            .lock()
            .expect("seen buffer")
            .insert(device_row, at);
    }

    fn take(&self) -> Vec<(i64, DateTime<Utc>)> {
        std::mem::take(&mut *self.pending.lock().expect("seen buffer"))
            .into_iter()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.pending.lock().expect("seen buffer").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Core {
    /// Writes the buffered check-in times (never moving one backwards);
    /// returns how many devices were written. Called periodically and at
    /// shutdown.
    pub async fn flush_last_seen(&self) -> AppResult<usize> {
        let pending = self.seen.take();
        let mut written = 0;
        for chunk in pending.chunks(SEEN_FLUSH_CHUNK) {
            let txn = self.ctx.db.write().await?;
            for (id, at) in chunk {
                written += db::device::advance_last_seen(&*txn, *id, *at).await? as usize;
            }
            txn.commit().await?;
        }
        Ok(written)
    }

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
        self.register(platform, device_id, customer_id, rebind, false)
            .await
    }

    /// Registers a device as `register_device` does and, with `issue_secret`,
    /// answers the device its secret once: at first sight, or on the first
    /// call of a device seen before it had one.
    pub async fn register(
        &self,
        platform: Platform,
        device_id: &ExternalId,
        customer_id: Option<&ExternalId>,
        rebind: Rebind,
        issue_secret: bool,
    ) -> AppResult<Registration> {
        let now = self.now();
        if let Some(device) = self.cached_device(platform, device_id).await? {
            return self
                .known_device(device, customer_id, rebind, issue_secret, now)
                .await;
        }

        let txn = self.ctx.db.write().await?;
        // A merged-away id (the device's own included) lands on its account.
        let customer =
            db::lock_resolved_customer(&txn, customer_id.unwrap_or(device_id).as_str()).await?;
        self.purchases
            .ensure_customer_in(&txn, &customer, now)
            .await?;
        db::hold_customer(&txn, &customer).await?;
        txn.touch_device(platform.as_str(), device_id.as_str());
        let device_secret = issue_secret.then(super::pairing::new_device_secret);
        let inserted = db::device::insert_if_new(
            &*txn,
            db::device::NewDevice {
                platform: platform.as_str(),
                device_id: device_id.as_str(),
                customer_id: &customer,
                seen_at: now,
                secret_hash: device_secret.as_deref().map(super::pairing::hash_secret),
            },
        )
        .await?;
        if !inserted {
            // Another request registered it first; it owns the first sight.
            // Read once that registration is committed.
            txn.abandon().await?;
            let device = db::find_device(&self.ctx.db.conn, platform.as_str(), device_id.as_str())
                .await?
                .ok_or_else(|| {
                    AppError::Internal(anyhow::anyhow!("device vanished after conflict"))
                })?;
            return self
                .known_device(device, customer_id, rebind, issue_secret, now)
                .await;
        }

        let (before, _) = self.ctx.state_before_write(&*txn, &customer, now).await?;
        if let Some(trial) = &self.trial {
            let row = granted_by_us(
                &customer,
                Store::Trial,
                &trial.entitlement,
                PeriodType::Trial,
                Some(now + Duration::days(i64::from(trial.days))),
                now,
            );
            db::purchase::add_trial(&*txn, row).await?;
        }
        let snapshot = self
            .ctx
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
            device_secret,
        })
    }

    /// Whether the device has been seen before (so registering it writes
    /// nothing new): the write limits count only first sightings.
    pub async fn device_known(
        &self,
        platform: Platform,
        device_id: &ExternalId,
    ) -> AppResult<bool> {
        Ok(self.cached_device(platform, device_id).await?.is_some())
    }

    /// A known device, from the read cache when fresh (unknown ones are not
    /// cached: their first sight goes through the write path).
    async fn cached_device(
        &self,
        platform: Platform,
        device_id: &ExternalId,
    ) -> AppResult<Option<devices::Model>> {
        let key = db::device_key(platform.as_str(), device_id.as_str());
        if let Some(d) = self.ctx.db.device_cache.get(&key) {
            return Ok(Some(d));
        }
        let epoch = self.ctx.db.device_cache.epoch(&key);
        let found =
            db::find_device(&self.ctx.db.conn, platform.as_str(), device_id.as_str()).await?;
        if let Some(d) = &found {
            self.ctx.db.device_cache.fill(&key, epoch, d.clone());
        }
        Ok(found)
    }

    async fn known_device(
        &self,
        device: devices::Model,
        customer_id: Option<&ExternalId>,
        may_rebind: Rebind,
        issue_secret: bool,
        now: DateTime<Utc>,
    ) -> AppResult<Registration> {
        // An id merged into an account names the account.
        let rebind = match customer_id {
            Some(c) => Some(db::resolve_customer(&self.ctx.db.conn, c.as_str()).await?)
                .filter(|c| *c != device.customer_id),
            None => None,
        };
        if rebind.is_some() && may_rebind == Rebind::Refuse {
            return Err(AppError::DeviceAlreadyBound);
        }
        let owes_secret = issue_secret && device.secret_hash.is_none();
        let mut device_secret = None;
        let device = if rebind.is_none()
            && !owes_secret
            && now - device.last_seen_at >= LAST_SEEN_RESOLUTION
        {
            // Only the check-in time moved: a device polling costs no write
            // in the request; the time is written with others in the background.
            let mut device = device;
            self.seen.record(device.id, now);
            device.last_seen_at = now;
            self.ctx
                .db
                .device_cache
                .update(&db::device_key(&device.platform, &device.device_id), |d| {
                    d.last_seen_at = now
                });
            device
        } else if rebind.is_some() || owes_secret {
            let txn = self.ctx.db.write().await?;
            let rebind = match rebind {
                // The device follows the customer now signed in on it; its
                // first sight (and so its trial) stays in the past.
                Some(c) => {
                    let c = db::lock_resolved_customer(&txn, &c).await?;
                    self.purchases.ensure_customer_in(&txn, &c, now).await?;
                    Some(c)
                }
                None => None,
            };
            txn.touch_device(&device.platform, &device.device_id);
            if owes_secret {
                device_secret = super::pairing::issue_missing_secret(&txn, device.id).await?;
            }
            let device = db::device::check_in(&*txn, device, now, rebind).await?;
            txn.commit().await?;
            device
        } else {
            device
        };
        let snapshot = self.reads.snapshot(&device.customer_id).await?;
        Ok(Registration {
            customer_id: device.customer_id.clone(),
            device,
            created: false,
            snapshot,
            device_secret,
        })
    }

    /// Logs the customer's lapses by time, in a transaction of their own.
    pub async fn log_lapses(&self, customer_id: &str, now: DateTime<Utc>) -> AppResult<usize> {
        let txn = self.ctx.db.write().await?;
        if db::lock_customer(&txn, customer_id).await?.is_none() {
            return Ok(0);
        }
        let (_, written) = self.ctx.state_before_write(&*txn, customer_id, now).await?;
        txn.commit().await?;
        Ok(written)
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
        if !self.ctx.catalog.has_entitlement(entitlement) {
            return Err(AppError::bad_input(format!(
                "unknown entitlement `{entitlement}`"
            )));
        }
        if expires_at.is_some_and(|e| e <= now) {
            return Err(AppError::bad_input("expiresAt must be in the future"));
        }
        let txn = self.ctx.db.write().await?;
        let customer_id = &db::lock_resolved_customer(&txn, customer_id).await?;
        db::lock_customer(&txn, customer_id)
            .await?
            .ok_or(AppError::NotFound("customer"))?;
        let (before, _) = self.ctx.state_before_write(&*txn, customer_id, now).await?;
        let row = granted_by_us(
            customer_id,
            Store::Promotional,
            entitlement,
            PeriodType::Normal,
            expires_at,
            now,
        );
        db::purchase::put_grant(&*txn, row).await?;
        let after = self
            .ctx
            .record_transition(&*txn, customer_id, &before, now)
            .await?;
        txn.commit().await?;
        Ok(after)
    }

    /// Ends a promotional grant now. Other sources of the entitlement stay.
    pub async fn revoke_grant(&self, customer_id: &str, entitlement: &str) -> AppResult<Snapshot> {
        let now = self.now();
        if !self.ctx.catalog.has_entitlement(entitlement) {
            return Err(AppError::bad_input(format!(
                "unknown entitlement `{entitlement}`"
            )));
        }
        let txn = self.ctx.db.write().await?;
        let customer_id = &db::lock_resolved_customer(&txn, customer_id).await?;
        db::lock_customer(&txn, customer_id)
            .await?
            .ok_or(AppError::NotFound("customer"))?;
        let key = own_purchase_key(Store::Promotional, customer_id, entitlement);
        let grant = db::purchase::find_live_grant(&*txn, &key)
            .await?
            .ok_or(AppError::NotFound("grant"))?;
        let (before, _) = self.ctx.state_before_write(&*txn, customer_id, now).await?;
        db::purchase::revoke(&*txn, grant, now).await?;
        let after = self
            .ctx
            .record_transition(&*txn, customer_id, &before, now)
            .await?;
        txn.commit().await?;
        Ok(after)
    }
}
