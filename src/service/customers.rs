use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use entities::{devices, purchases};

use super::{Ctx, Purchases, Reads};
use crate::{
    db::{self, WriteTxn, purchase::PurchaseFields},
    domain::{
        Environment, EventKind, ExternalId, PeriodType, Platform, PurchaseStatus, Snapshot, Store,
        TrialPolicy, diff,
    },
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

/// Customers and their devices: first sight and check-ins, the trial a
/// first sight starts, promotional grants, merges, and lapses by time.
pub struct Customers {
    ctx: Arc<Ctx>,
    reads: Reads,
    purchases: Arc<Purchases>,
    trial: Option<TrialPolicy>,
    /// Device check-ins waiting to be written.
    seen: SeenBuffer,
}

impl Customers {
    pub(super) fn new(
        ctx: Arc<Ctx>,
        reads: Reads,
        purchases: Arc<Purchases>,
        trial: Option<TrialPolicy>,
    ) -> Customers {
        Customers {
            ctx,
            reads,
            purchases,
            trial,
            seen: SeenBuffer::default(),
        }
    }

    /// Device check-ins not yet written.
    pub fn seen(&self) -> &SeenBuffer {
        &self.seen
    }

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
        let now = self.ctx.now();
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
        let now = self.ctx.now();
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
        let now = self.ctx.now();
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

/// Which of two own-store rows (trial or grant) for one entitlement survives
/// a merge: the earliest-started trial, so a trial is never had twice; the
/// grant that lasts longer, so a merge never shortens access.
fn first_survives(store: Store, a: &purchases::Model, b: &purchases::Model) -> bool {
    match store {
        Store::Trial => (a.purchased_at, a.id) <= (b.purchased_at, b.id),
        _ => {
            let term = |r: &purchases::Model| {
                (
                    r.revoked_at.is_none() && r.status != PurchaseStatus::Revoked.as_str(),
                    r.expires_at.is_none(),
                    r.expires_at,
                )
            };
            term(a) >= term(b)
        }
    }
}

impl Customers {
    /// Merges customer `from` into `into` (the operator's tool). Returns the
    /// surviving customer's id and entitlements.
    pub async fn merge_customers(&self, from: &str, into: &str) -> AppResult<(String, Snapshot)> {
        let parse = |what: &str, s: &str| {
            ExternalId::parse(s).map_err(|e| AppError::bad_input(format!("invalid {what}: {e}")))
        };
        let (from, into) = (parse("from", from)?, parse("into", into)?);
        let now = self.ctx.now();
        let txn = self.ctx.db.write().await?;
        // Lock both in one order (two opposite merges must not deadlock),
        // then check no merge moved either meanwhile.
        let mut ids = (
            db::resolve_customer(&*txn, from.as_str()).await?,
            db::resolve_customer(&*txn, into.as_str()).await?,
        );
        let mut settled = false;
        for _ in 0..4 {
            let (a, b) = if ids.0 <= ids.1 {
                (&ids.0, &ids.1)
            } else {
                (&ids.1, &ids.0)
            };
            db::hold_customer(&txn, a).await?;
            db::hold_customer(&txn, b).await?;
            let again = (
                db::resolve_customer(&*txn, &ids.0).await?,
                db::resolve_customer(&*txn, &ids.1).await?,
            );
            if again == ids {
                settled = true;
                break;
            }
            ids = again;
        }
        if !settled {
            return Err(AppError::Internal(anyhow::anyhow!(
                "customer aliases do not settle"
            )));
        }
        let (from, into) = ids;
        if from == into {
            return Err(AppError::bad_input(
                "cannot merge a customer into itself (or into an account it was merged into)",
            ));
        }
        for id in [&from, &into] {
            db::customer::find(&*txn, id)
                .await?
                .ok_or(AppError::NotFound("customer"))?;
        }
        let snapshot = self.merge_in(&txn, &from, &into, now).await?;
        txn.commit().await?;
        Ok((into, snapshot))
    }

    /// Moves everything of `from` to `into` in the caller's transaction
    /// (both already locked and resolved): purchases with their change-log
    /// rows, devices, receipts and aliases; `from` becomes an alias. Its row
    /// stays, so that a concurrent writer naming it waits on its lock and
    /// then resolves it, instead of re-creating it.
    pub(super) async fn merge_in(
        &self,
        txn: &WriteTxn,
        from: &str,
        into: &str,
        now: DateTime<Utc>,
    ) -> AppResult<Snapshot> {
        let (before_from, _) = self.ctx.state_before_write(&**txn, from, now).await?;
        let (before_into, _) = self.ctx.state_before_write(&**txn, into, now).await?;

        // Trials and grants are keyed by customer, which is what makes "one
        // trial per customer" a database fact: re-key them to `into`, and of
        // two for one entitlement keep one.
        let theirs = db::purchases_of(&**txn, into).await?;
        for row in db::purchases_of(&**txn, from).await? {
            let Ok(store) = row.store.parse::<Store>() else {
                continue;
            };
            if !matches!(store, Store::Trial | Store::Promotional)
                || row.store_purchase_id != own_purchase_key(store, from, &row.product_id)
            {
                continue;
            }
            let key = own_purchase_key(store, into, &row.product_id);
            let existing = theirs.iter().find(|t| t.store_purchase_id == key).cloned();
            let (winner, loser) = match existing {
                None => (row, None),
                Some(mine) if first_survives(store, &row, &mine) => (row, Some(mine)),
                Some(mine) => (mine, Some(row)),
            };
            if let Some(loser) = loser {
                // First, to free the key for the winner.
                let set_aside = format!("{key}:merged:{}", loser.id);
                let still_grants =
                    loser.revoked_at.is_none() && loser.expires_at.is_none_or(|e| e > now);
                let end = still_grants.then_some(now);
                db::purchase::set_aside_merged(&**txn, loser, set_aside, end, now).await?;
            }
            if winner.store_purchase_id != key {
                db::purchase::rekey(&**txn, winner, key).await?;
            }
        }
        db::purchase::move_all(&**txn, from, into).await?;
        for d in db::devices_of(&**txn, from).await? {
            txn.touch_device(&d.platform, &d.device_id);
        }
        db::device::move_all(&**txn, from, into).await?;
        db::receipt::move_all(&**txn, from, into).await?;
        // Aliases stay one hop: those naming `from` now name `into`.
        db::customer::move_aliases(&**txn, from, into).await?;
        db::customer::add_alias(&**txn, from, into, now).await?;
        // Attributes `into` lacks (its Stripe customer, for one) come along.
        let from_row = db::customer::find(&**txn, from).await?;
        let into_row = db::customer::find(&**txn, into).await?;
        if let (Some(f), Some(i)) = (from_row, into_row)
            && let (Some(fa), Some(ia)) = (f.attributes.as_object(), i.attributes.as_object())
            && fa.keys().any(|k| !ia.contains_key(k))
        {
            let mut merged = ia.clone();
            for (k, v) in fa {
                merged.entry(k.clone()).or_insert_with(|| v.clone());
            }
            db::customer::set_attributes(&**txn, i, serde_json::Value::Object(merged)).await?;
        }

        let after_from = self.ctx.snapshot_in(&**txn, from, now).await?;
        let mut changes = diff(&before_from, &after_from);
        // What the old id lost, it lost to the account.
        for ch in changes.iter_mut().filter(|ch| ch.new_status != "ACTIVE") {
            ch.kind = EventKind::Transferred;
        }
        db::record_changes(&**txn, from, &changes, now).await?;
        self.ctx
            .record_transition(&**txn, into, &before_into, now)
            .await
    }
}
