//! Applying verified store state: the one path by which Stripe, App Store
//! and Play purchases change what a customer may use.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use entities::{
    account_tokens, customers, held_purchases, purchase_aliases, purchase_transactions, purchases,
    receipts, webhook_events,
};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, TryInsertResult, sea_query::Expr,
};

use super::Core;
use crate::{
    db::{self, WriteTxn},
    domain::{EventKind, PurchaseStatus, Snapshot, Store, TransferPolicy, diff, rules, tokens},
    error::{AppError, AppResult},
    providers::{PurchaseState, VerifiedPurchase, from_held},
};

/// The stored audit copy of a submission: itself up to `max` bytes of JSON,
/// else its size and SHA-256 (enough to match it against a store's record).
fn bounded_payload(payload: serde_json::Value, max: usize) -> serde_json::Value {
    let text = payload.to_string();
    if text.len() <= max {
        return payload;
    }
    use sha2::Digest;
    serde_json::json!({
        "truncated": true,
        "bytes": text.len(),
        "sha256": hex::encode(sha2::Sha256::digest(text.as_bytes())),
    })
}

/// Who is applying a purchase.
#[derive(Clone, Copy, Debug)]
pub enum Submitter<'a> {
    /// A customer submitted it (`verifyPurchase`, checkout): it becomes theirs,
    /// subject to the transfer policy.
    Customer(&'a str),
    /// A store told us (webhook, reconciliation): the purchase stays with its
    /// owner, or goes to the customer the store binds it to.
    Store,
}

#[derive(Debug)]
pub struct Applied {
    pub customer_id: String,
    pub purchase_id: i64,
    /// The owner's entitlements after the change.
    pub snapshot: Snapshot,
    /// True when the stored state was newer and the incoming one was ignored.
    pub stale: bool,
}

/// A stored status as the rules read it (an unknown one is not final).
fn is_final(status: &str) -> bool {
    status.parse::<PurchaseStatus>().is_ok_and(rules::is_final)
}

/// Whether `incoming` is older than the held state `h`.
fn is_stale_against_held(h: &held_purchases::Model, incoming: &PurchaseState) -> AppResult<bool> {
    let held = from_held(h.state.clone())
        .map_err(|e| AppError::Internal(anyhow::anyhow!("held purchase {}: {e}", h.id)))?;
    Ok(is_stale(
        held.status.as_str(),
        held.source_updated_at,
        held.revoked_at,
        incoming,
    ))
}

/// Whom the store binds a purchase to, as far as this server knows.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Binding {
    /// A customer here (or the submitter, whose token it is).
    Customer(String),
    /// Someone who is not a customer here, at least not yet.
    Unknown,
}

/// What a store message did to a purchase.
#[derive(Debug)]
pub enum StoreApplied {
    Applied(Applied),
    /// No customer here owns it or is named by its binding: kept aside for
    /// the first one its binding names (or who submits it). `stale` when the
    /// held state was newer.
    Held {
        stale: bool,
    },
}

/// Whether `incoming` is older than a stored state: older by the store's
/// clock, or a non-final state signed before a stored refund or revoke.
fn is_stale(
    stored_status: &str,
    stored_updated_at: DateTime<Utc>,
    stored_revoked_at: Option<DateTime<Utc>>,
    incoming: &PurchaseState,
) -> bool {
    let stored = rules::Version {
        // An unknown stored status orders by time alone.
        status: stored_status.parse().unwrap_or(PurchaseStatus::Active),
        source_updated_at: stored_updated_at,
        revoked_at: stored_revoked_at,
    };
    rules::is_stale(stored, version_of(incoming))
}

fn version_of(p: &PurchaseState) -> rules::Version {
    rules::Version {
        status: p.status,
        source_updated_at: p.source_updated_at,
        revoked_at: p.revoked_at,
    }
}

impl Submitter<'_> {
    fn customer(&self) -> Option<&str> {
        match self {
            Submitter::Customer(c) => Some(c),
            Submitter::Store => None,
        }
    }
}

impl Core {
    /// Applies a verified purchase state in the caller's write transaction,
    /// with its change-log rows. Older state (by the store's own timestamp)
    /// never overwrites newer; a refund is never undone by an older message.
    /// A store message about a purchase nobody here owns is
    /// `NotFound` and writes nothing (see [`Core::apply_store_in`] to hold it).
    pub async fn apply_purchase_in(
        &self,
        txn: &WriteTxn,
        vp: &VerifiedPurchase,
        submitter: Submitter<'_>,
        now: DateTime<Utc>,
    ) -> AppResult<Applied> {
        match self.apply_inner(txn, vp, submitter, false, now).await? {
            StoreApplied::Applied(a) => Ok(a),
            StoreApplied::Held { .. } => Err(AppError::Internal(anyhow::anyhow!(
                "purchase held though holding was not asked for"
            ))),
        }
    }

    /// Applies what a store told us. A purchase no customer here owns or is
    /// named by is held, not given to a made-up customer: later messages
    /// (refunds included) still update it, and the first customer its
    /// binding names, or who submits it, receives it as it then stands.
    pub async fn apply_store_in(
        &self,
        txn: &WriteTxn,
        vp: &VerifiedPurchase,
        now: DateTime<Utc>,
    ) -> AppResult<StoreApplied> {
        self.apply_inner(txn, vp, Submitter::Store, true, now).await
    }

    /// The customer the store binding `key` names. The submitter comes
    /// first (their own token needs no index); Apple tokens resolve through
    /// the account-token index; Play and Stripe ids may be the customer id.
    async fn resolve_binding(
        &self,
        c: &impl ConnectionTrait,
        store: Store,
        key: &str,
        submitter: Option<&str>,
    ) -> AppResult<Binding> {
        if let Some(s) = submitter.filter(|s| tokens::names(key, s)) {
            return Ok(Binding::Customer(s.to_string()));
        }
        if store == Store::Stripe {
            return Ok(Binding::Customer(key.to_string()));
        }
        if let Ok(t) = uuid::Uuid::parse_str(key)
            && let Some(row) = account_tokens::Entity::find_by_id(t.hyphenated().to_string())
                .one(c)
                .await?
        {
            return Ok(Binding::Customer(row.customer_id));
        }
        if store != Store::AppStore
            && customers::Entity::find_by_id(key.to_string())
                .one(c)
                .await?
                .is_some()
        {
            return Ok(Binding::Customer(key.to_string()));
        }
        Ok(Binding::Unknown)
    }

    /// The purchase line `id` names: its own row, or (`true`) the line a
    /// later token of it superseded it with.
    async fn find_line(
        &self,
        c: &impl ConnectionTrait,
        store: Store,
        id: &str,
    ) -> AppResult<Option<(purchases::Model, bool)>> {
        if let Some(p) = purchases::Entity::find()
            .filter(purchases::Column::Store.eq(store.as_str()))
            .filter(purchases::Column::StorePurchaseId.eq(id))
            .one(c)
            .await?
        {
            return Ok(Some((p, false)));
        }
        let Some(alias) = purchase_aliases::Entity::find()
            .filter(purchase_aliases::Column::Store.eq(store.as_str()))
            .filter(purchase_aliases::Column::StorePurchaseId.eq(id))
            .one(c)
            .await?
        else {
            return Ok(None);
        };
        Ok(purchases::Entity::find_by_id(alias.purchase_id)
            .one(c)
            .await?
            .map(|p| (p, true)))
    }

    async fn find_held(
        &self,
        c: &impl ConnectionTrait,
        store: Store,
        id: &str,
    ) -> AppResult<Option<held_purchases::Model>> {
        Ok(held_purchases::Entity::find()
            .filter(held_purchases::Column::Store.eq(store.as_str()))
            .filter(held_purchases::Column::StorePurchaseId.eq(id))
            .one(c)
            .await?)
    }

    /// Renewals of an App Store purchase: the distinct transactions seen
    /// for its original transaction, less the first. `None` for other
    /// stores or a state without a transaction id.
    async fn count_renewals(
        &self,
        c: &impl ConnectionTrait,
        vp: &PurchaseState,
    ) -> AppResult<Option<i32>> {
        if vp.renewal_count.is_some() {
            return Ok(vp.renewal_count);
        }
        let (Store::AppStore, Some(tx)) = (vp.store, vp.transaction_id.as_deref()) else {
            return Ok(None);
        };
        purchase_transactions::Entity::insert(purchase_transactions::ActiveModel {
            store: Set(vp.store.as_str().into()),
            store_purchase_id: Set(vp.store_purchase_id.clone()),
            transaction_id: Set(tx.to_string()),
            ..Default::default()
        })
        .on_conflict_do_nothing_on([
            purchase_transactions::Column::Store,
            purchase_transactions::Column::StorePurchaseId,
            purchase_transactions::Column::TransactionId,
        ])
        .exec_without_returning(c)
        .await?;
        let seen = purchase_transactions::Entity::find()
            .filter(purchase_transactions::Column::Store.eq(vp.store.as_str()))
            .filter(
                purchase_transactions::Column::StorePurchaseId.eq(vp.store_purchase_id.as_str()),
            )
            .count(c)
            .await?;
        Ok(Some(
            i32::try_from(seen.saturating_sub(1)).unwrap_or(i32::MAX),
        ))
    }

    /// Creates the customer if new; a new customer receives, with their
    /// change-log rows, the held purchases whose binding names them.
    pub async fn ensure_customer_in(
        &self,
        txn: &WriteTxn,
        customer_id: &str,
        now: DateTime<Utc>,
    ) -> AppResult<()> {
        if db::ensure_customer(txn, customer_id, now).await? {
            self.claim_held_in(txn, customer_id, now).await?;
        }
        Ok(())
    }

    async fn claim_held_in(
        &self,
        txn: &WriteTxn,
        customer_id: &str,
        now: DateTime<Utc>,
    ) -> AppResult<()> {
        let mut keys: Vec<String> = tokens::account_tokens(customer_id)
            .into_iter()
            .map(|t| t.hyphenated().to_string())
            .collect();
        keys.push(customer_id.to_string());
        let held = held_purchases::Entity::find()
            .filter(held_purchases::Column::BoundKey.is_in(keys))
            .all(&**txn)
            .await?;
        if held.is_empty() {
            return Ok(());
        }
        db::hold_customer(txn, customer_id).await?;
        let (before, _) = self.state_before_write(&**txn, customer_id, now).await?;
        for h in held {
            let vp = from_held(h.state.clone())
                .map_err(|e| AppError::Internal(anyhow::anyhow!("held purchase {}: {e}", h.id)))?;
            db::lock_store_purchase(&**txn, vp.store.as_str(), &vp.store_purchase_id).await?;
            held_purchases::Entity::delete_by_id(h.id)
                .exec(&**txn)
                .await?;
            if self
                .find_line(&**txn, vp.store, &vp.store_purchase_id)
                .await?
                .is_some()
            {
                continue;
            }
            let mut am = <purchases::ActiveModel as Default>::default();
            self.fill(&mut am, &vp, customer_id, vp.renewal_count.unwrap_or(0));
            am.insert(&**txn).await?;
        }
        self.record_transition(&**txn, customer_id, &before, now)
            .await?;
        Ok(())
    }

    /// Keeps (or updates) a purchase no customer here owns yet.
    async fn hold_in(
        &self,
        txn: &WriteTxn,
        vp: &VerifiedPurchase,
        held: Option<held_purchases::Model>,
        key: Option<String>,
        now: DateTime<Utc>,
    ) -> AppResult<StoreApplied> {
        let renewal_count = self.count_renewals(&**txn, vp).await?;
        if let Some(h) = &held
            && is_stale_against_held(h, vp)?
        {
            return Ok(StoreApplied::Held { stale: true });
        }
        let mut state: PurchaseState = (**vp).clone();
        state.renewal_count = renewal_count.or(state.renewal_count);
        let json = serde_json::to_value(&state)
            .map_err(|e| AppError::Internal(anyhow::anyhow!("held purchase: {e}")))?;
        match held {
            Some(h) => {
                let mut am = h.into_active_model();
                am.state = Set(json);
                am.bound_key = Set(key);
                am.replaces = Set(vp.replaces.clone());
                am.source_updated_at = Set(vp.source_updated_at);
                am.update(&**txn).await?;
            }
            None => {
                held_purchases::ActiveModel {
                    store: Set(vp.store.as_str().into()),
                    store_purchase_id: Set(vp.store_purchase_id.clone()),
                    bound_key: Set(key),
                    replaces: Set(vp.replaces.clone()),
                    state: Set(json),
                    source_updated_at: Set(vp.source_updated_at),
                    held_at: Set(now),
                    ..Default::default()
                }
                .insert(&**txn)
                .await?;
            }
        }
        // An unowned token this one replaced is this purchase now.
        if let Some(r) = vp.replaces.as_deref() {
            held_purchases::Entity::delete_many()
                .filter(held_purchases::Column::Store.eq(vp.store.as_str()))
                .filter(held_purchases::Column::StorePurchaseId.eq(r))
                .exec(&**txn)
                .await?;
        }
        Ok(StoreApplied::Held { stale: false })
    }

    async fn apply_inner(
        &self,
        txn: &WriteTxn,
        vp: &VerifiedPurchase,
        submitter: Submitter<'_>,
        may_hold: bool,
        now: DateTime<Utc>,
    ) -> AppResult<StoreApplied> {
        let store = vp.store;
        db::lock_store_purchase(&**txn, store.as_str(), &vp.store_purchase_id).await?;
        let replaces = vp
            .replaces
            .as_deref()
            .filter(|r| *r != vp.store_purchase_id);
        if let Some(r) = replaces {
            db::lock_store_purchase(&**txn, store.as_str(), r).await?;
        }
        let mut line = self.find_line(&**txn, store, &vp.store_purchase_id).await?;
        // An older token of this purchase line, now replaced.
        let superseded = line.as_ref().is_some_and(|(_, s)| *s);
        // A new token of a line we hold (upgrade, downgrade, resubscribe):
        // the line moves to it, with its owner, however long the chain.
        let mut switching = false;
        if line.is_none()
            && let Some(r) = replaces
            && let Some((p, _)) = self.find_line(&**txn, store, r).await?
        {
            line = Some((p, false));
            switching = true;
        }
        let existing = line.map(|(p, _)| p);
        let held = match &existing {
            None => self.find_held(&**txn, store, &vp.store_purchase_id).await?,
            Some(_) => None,
        };
        let key = vp
            .bound_customer
            .clone()
            .or_else(|| held.as_ref().and_then(|h| h.bound_key.clone()));
        let binding = match &key {
            Some(k) => Some(
                self.resolve_binding(&**txn, store, k, submitter.customer())
                    .await?,
            ),
            None => None,
        };
        let previous_owner = existing.as_ref().map(|e| e.customer_id.clone());
        let owner = match submitter {
            // The store's own binding wins over the transfer policy, which
            // only governs purchases the store binds to no one. Ids that
            // name a customer merged into an account mean the account.
            Submitter::Customer(c) => {
                let c = db::resolve_customer(&**txn, c).await?;
                match &binding {
                    Some(Binding::Customer(x)) => {
                        if db::resolve_customer(&**txn, x).await? != c {
                            return Err(AppError::ReceiptAlreadyInUse);
                        }
                        c
                    }
                    Some(Binding::Unknown) => return Err(AppError::ReceiptAlreadyInUse),
                    None => {
                        if previous_owner.as_deref().is_some_and(|o| o != c)
                            && self.transfer_policy == TransferPolicy::Keep
                        {
                            return Err(AppError::ReceiptAlreadyInUse);
                        }
                        c
                    }
                }
            }
            Submitter::Store => match (&previous_owner, &binding) {
                (Some(o), _) => o.clone(),
                (None, Some(Binding::Customer(x))) => db::resolve_customer(&**txn, x).await?,
                (None, _) if may_hold && store != Store::Stripe => {
                    return self.hold_in(txn, vp, held, key, now).await;
                }
                (None, _) => return Err(AppError::NotFound("customer for this purchase")),
            },
        };
        crate::domain::ExternalId::parse(&owner)
            .map_err(|e| AppError::bad_input(format!("invalid customer id: {e}")))?;
        let owner = db::lock_canonical(txn, &owner).await?;

        // A held purchase becomes the owner's as it stands now: a held
        // refund is not undone by submitting the transaction from before it.
        let claimed = match held {
            Some(h) => {
                held_purchases::Entity::delete_by_id(h.id)
                    .exec(&**txn)
                    .await?;
                let hv = from_held(h.state.clone()).map_err(|e| {
                    AppError::Internal(anyhow::anyhow!("held purchase {}: {e}", h.id))
                })?;
                is_stale_against_held(&h, vp)?.then_some(hv)
            }
            None => None,
        };
        let vp = claimed.as_ref().unwrap_or(vp);
        self.ensure_customer_in(txn, &owner, now).await?;
        let counted = self.count_renewals(&**txn, vp).await?;

        // A separate row of the replaced token (stored before lines were
        // collapsed): it stops granting now.
        let replaced = match replaces {
            Some(r) if !switching => purchases::Entity::find()
                .filter(purchases::Column::Store.eq(store.as_str()))
                .filter(purchases::Column::StorePurchaseId.eq(r))
                .one(&**txn)
                .await?
                .filter(|p| existing.as_ref().is_none_or(|e| e.id != p.id)),
            _ => None,
        };

        // Lock every customer this touches, in one order, and remember how
        // each stood before.
        let mut affected: BTreeSet<String> = BTreeSet::new();
        affected.insert(owner.clone());
        affected.extend(previous_owner.iter().cloned());
        affected.extend(replaced.iter().map(|r| r.customer_id.clone()));
        let mut before = Vec::with_capacity(affected.len());
        for c in &affected {
            db::hold_customer(txn, c).await?;
            before.push((c.clone(), self.state_before_write(&**txn, c, now).await?.0));
        }

        let stale = superseded
            || (!switching
                && existing
                    .as_ref()
                    .is_some_and(|e| is_stale(&e.status, e.source_updated_at, e.revoked_at, vp)));
        let old_token = existing
            .as_ref()
            .filter(|_| switching)
            .map(|e| e.store_purchase_id.clone());
        let purchase_id = match existing {
            Some(e) if stale => {
                let id = e.id;
                if e.customer_id != owner {
                    let mut am = e.into_active_model();
                    am.customer_id = Set(owner.clone());
                    am.update(&**txn).await?;
                }
                id
            }
            Some(e) => {
                let renewal_count = vp.renewal_count.or(counted).unwrap_or(e.renewal_count);
                let mut am = e.into_active_model();
                self.fill(&mut am, vp, &owner, renewal_count);
                am.update(&**txn).await?.id
            }
            None => {
                let mut am = <purchases::ActiveModel as Default>::default();
                self.fill(
                    &mut am,
                    vp,
                    &owner,
                    vp.renewal_count.or(counted).unwrap_or(0),
                );
                am.insert(&**txn).await?.id
            }
        };

        if let Some(r) = replaced
            .filter(|r| !is_final(&r.status) && r.status != PurchaseStatus::Expired.as_str())
        {
            let end = r.expires_at.map_or(now, |e| e.min(now));
            let mut am = r.into_active_model();
            am.status = Set(PurchaseStatus::Expired.as_str().into());
            am.expires_at = Set(Some(end));
            am.auto_renew = Set(false);
            am.source_updated_at = Set(vp.source_updated_at);
            am.update(&**txn).await?;
        } else {
            // Tokens this line replaced name it from now on, so a late
            // message about one of them changes nothing.
            for t in replaces.map(str::to_string).into_iter().chain(old_token) {
                if t == vp.store_purchase_id {
                    continue;
                }
                purchase_aliases::Entity::insert(purchase_aliases::ActiveModel {
                    store: Set(store.as_str().into()),
                    store_purchase_id: Set(t.clone()),
                    purchase_id: Set(purchase_id),
                    ..Default::default()
                })
                .on_conflict_do_nothing_on([
                    purchase_aliases::Column::Store,
                    purchase_aliases::Column::StorePurchaseId,
                ])
                .exec_without_returning(&**txn)
                .await?;
                held_purchases::Entity::delete_many()
                    .filter(held_purchases::Column::Store.eq(store.as_str()))
                    .filter(held_purchases::Column::StorePurchaseId.eq(t.as_str()))
                    .exec(&**txn)
                    .await?;
            }
        }

        let mut owner_snapshot = None;
        for (c, b) in before {
            let after = self.snapshot_in(&**txn, &c, now).await?;
            let mut changes = diff(&b, &after);
            if Some(&c) == previous_owner.as_ref() && c != owner {
                // What the previous owner lost, it lost to the transfer.
                for ch in changes
                    .iter_mut()
                    .filter(|ch| ch.new_status != crate::domain::STATUS_ACTIVE)
                {
                    ch.kind = EventKind::Transferred;
                    ch.reason = EventKind::Transferred.as_str();
                }
            }
            db::record_changes(&**txn, &c, &changes, now).await?;
            if c == owner {
                owner_snapshot = Some(after);
            }
        }
        let applied = Applied {
            customer_id: owner,
            purchase_id,
            snapshot: owner_snapshot
                .ok_or_else(|| AppError::Internal(anyhow::anyhow!("owner not in affected set")))?,
            stale,
        };
        // A later token of this line that arrived first, held for want of
        // an owner: it continues the line now.
        // Only Play tokens replace one another (`linkedPurchaseToken`).
        let successor = match stale || store != Store::PlayStore {
            true => None,
            false => {
                held_purchases::Entity::find()
                    .filter(held_purchases::Column::Store.eq(store.as_str()))
                    .filter(held_purchases::Column::Replaces.eq(vp.store_purchase_id.as_str()))
                    .one(&**txn)
                    .await?
            }
        };
        if let Some(h) = successor {
            let next = from_held(h.state.clone())
                .map_err(|e| AppError::Internal(anyhow::anyhow!("held purchase {}: {e}", h.id)))?;
            held_purchases::Entity::delete_by_id(h.id)
                .exec(&**txn)
                .await?;
            if let StoreApplied::Applied(a) =
                Box::pin(self.apply_inner(txn, &next, Submitter::Store, false, now)).await?
            {
                return Ok(StoreApplied::Applied(Applied {
                    stale: applied.stale,
                    ..a
                }));
            }
        }
        Ok(StoreApplied::Applied(applied))
    }

    fn fill(
        &self,
        am: &mut purchases::ActiveModel,
        vp: &VerifiedPurchase,
        owner: &str,
        renewal_count: i32,
    ) {
        am.customer_id = Set(owner.to_string());
        am.store = Set(vp.store.as_str().into());
        am.store_purchase_id = Set(vp.store_purchase_id.clone());
        am.product_id = Set(vp.product_id.clone());
        am.environment = Set(vp.environment.as_str().into());
        am.status = Set(vp.status.as_str().into());
        am.period_type = Set(vp.period_type.as_str().into());
        am.purchased_at = Set(vp.purchased_at);
        am.expires_at = Set(vp.expires_at);
        am.grace_expires_at = Set(vp.grace_expires_at);
        am.auto_renew = Set(vp.auto_renew);
        am.canceled_at = Set(vp.canceled_at);
        am.revoked_at = Set(vp.revoked_at);
        am.renewal_count = Set(renewal_count);
        am.source_updated_at = Set(vp.source_updated_at);
        am.raw = Set(Some(vp.raw.clone()));
        // Kept once known: a later payload without it does not erase it.
        if let Some(order) = crate::providers::order_id(vp) {
            am.order_id = Set(Some(order));
        }
    }

    /// Applies one verified purchase in its own transaction.
    pub async fn apply_purchase(
        &self,
        vp: &VerifiedPurchase,
        submitter: Submitter<'_>,
    ) -> AppResult<Applied> {
        let txn = self.db.write().await?;
        let applied = self
            .apply_purchase_in(&txn, vp, submitter, self.now())
            .await?;
        txn.commit().await?;
        Ok(applied)
    }

    /// Records a store notification in the caller's transaction. `false`
    /// means it was seen before: acknowledge it and change nothing. Because
    /// the row commits with the effect, a failed apply leaves no row (or
    /// its `failed` row) and the store's retry is processed.
    #[allow(clippy::too_many_arguments)] // the row's columns, each its own
    pub async fn claim_webhook(
        &self,
        txn: &WriteTxn,
        source: Store,
        event_id: &str,
        payload: &serde_json::Value,
        outcome: &str,
        customer: Option<&str>,
        now: DateTime<Utc>,
    ) -> AppResult<bool> {
        let res = webhook_events::Entity::insert(webhook_events::ActiveModel {
            source: Set(source.as_str().into()),
            event_id: Set(event_id.to_string()),
            received_at: Set(now),
            payload: Set(payload.clone()),
            outcome: Set(outcome.to_string()),
            processed_at: Set(Some(now)),
            customer_id: Set(customer.map(str::to_string)),
            ..Default::default()
        })
        .on_conflict_do_nothing_on([
            webhook_events::Column::Source,
            webhook_events::Column::EventId,
        ])
        .exec_without_returning(&**txn)
        .await?;
        if matches!(res, TryInsertResult::Inserted(n) if n > 0) {
            return Ok(true);
        }
        // An earlier delivery failed (the store's API was down): this one
        // takes its row over. Conditional, so only one delivery does.
        let mut q = webhook_events::Entity::update_many();
        if let Some(c) = customer {
            q = q.col_expr(webhook_events::Column::CustomerId, Expr::value(c));
        }
        let res = q
            .col_expr(webhook_events::Column::Outcome, Expr::value(outcome))
            .col_expr(
                webhook_events::Column::Payload,
                Expr::value(payload.clone()),
            )
            .col_expr(webhook_events::Column::ProcessedAt, Expr::value(now))
            .col_expr(
                webhook_events::Column::Error,
                Expr::value(Option::<String>::None),
            )
            .filter(webhook_events::Column::Source.eq(source.as_str()))
            .filter(webhook_events::Column::EventId.eq(event_id))
            .filter(webhook_events::Column::Outcome.eq(crate::domain::webhook_log::FAILED))
            .exec(&**txn)
            .await?;
        Ok(res.rows_affected > 0)
    }

    /// Stores a purchase submission before it is verified (the audit trail),
    /// committed on its own so a failed verification is still on record.
    /// What one customer id can leave behind is bounded: a payload over
    /// `receipts.max_payload_bytes` is kept as its size and digest, and past
    /// `max_unverified_per_customer` pending or invalid rows the oldest
    /// invalid ones make room (all pending: the submission is refused).
    pub async fn record_receipt(
        &self,
        customer_id: &str,
        store: Store,
        payload: serde_json::Value,
    ) -> AppResult<i64> {
        let payload = bounded_payload(payload, self.receipts.max_payload_bytes);
        let cap = self.receipts.max_unverified_per_customer.max(1);
        let customer_id = db::resolve_customer(&self.db.conn, customer_id).await?;
        let txn = self.db.write().await?;
        let unverified: Vec<(i64, String)> = receipts::Entity::find()
            .select_only()
            .column(receipts::Column::Id)
            .column(receipts::Column::Outcome)
            .filter(receipts::Column::CustomerId.eq(customer_id.as_str()))
            .filter(receipts::Column::Outcome.is_in(["pending", "invalid"]))
            .order_by_desc(receipts::Column::Id)
            .into_tuple()
            .all(&*txn)
            .await?;
        if unverified.len() as u64 >= cap {
            // Keep the newest cap - 1 so the new one fits.
            let drop: Vec<i64> = unverified
                .iter()
                .skip(cap as usize - 1)
                .filter(|(_, o)| o == "invalid")
                .map(|(id, _)| *id)
                .collect();
            let pending_kept = unverified.len() - drop.len();
            if pending_kept as u64 >= cap {
                return Err(AppError::RateLimited {
                    retry_after_secs: 10,
                });
            }
            receipts::Entity::delete_many()
                .filter(receipts::Column::Id.is_in(drop))
                .exec(&*txn)
                .await?;
        }
        let row = receipts::ActiveModel {
            customer_id: Set(customer_id),
            store: Set(store.as_str().into()),
            payload: Set(payload),
            received_at: Set(self.now()),
            outcome: Set("pending".into()),
            error: Set(None),
            purchase_id: Set(None),
            ..Default::default()
        }
        .insert(&*txn)
        .await?;
        txn.commit().await?;
        Ok(row.id)
    }

    /// A failed submission: marked invalid with its reason. When its
    /// customer does not exist (a failed verification creates none, so any
    /// id can be named) only the payload's size and digest stay on record,
    /// so made-up ids cannot be used to store data; retention deletes the
    /// row later like any invalid one.
    pub async fn fail_receipt(
        &self,
        receipt_id: i64,
        customer_id: &str,
        reason: &str,
    ) -> AppResult<()> {
        if self.find_customer(customer_id).await?.is_none()
            && let Some(row) = receipts::Entity::find_by_id(receipt_id)
                .one(&self.db.conn)
                .await?
        {
            receipts::ActiveModel {
                id: Set(receipt_id),
                payload: Set(bounded_payload(row.payload, 0)),
                ..Default::default()
            }
            .update(&self.db.conn)
            .await?;
        }
        self.finish_receipt(&self.db.conn, receipt_id, Err(reason))
            .await
    }

    /// Marks a submission valid (with its purchase) or invalid (with a reason
    /// safe to show the operator).
    pub async fn finish_receipt(
        &self,
        c: &impl ConnectionTrait,
        receipt_id: i64,
        outcome: Result<i64, &str>,
    ) -> AppResult<()> {
        let (outcome, error, purchase_id) = match outcome {
            Ok(pid) => ("valid", None, Some(pid)),
            Err(e) => ("invalid", Some(e.to_string()), None),
        };
        receipts::ActiveModel {
            id: Set(receipt_id),
            outcome: Set(outcome.into()),
            error: Set(error),
            purchase_id: Set(purchase_id),
            ..Default::default()
        }
        .update(c)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Duration;
    use sea_orm::{EntityTrait, PaginatorTrait};

    use super::*;
    use crate::{
        clock::OffsetClock,
        config::{Config, Secret},
        db::Db,
        domain::{EntitlementDef, Environment, PeriodType, ProductDef, ProductKind},
        providers::{PurchaseState, verified_for_test},
    };

    async fn core(policy: TransferPolicy) -> (Core, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.database_url = Secret::new(format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("t.db").display()
        ));
        cfg.transfer_policy = policy;
        cfg.catalog.entitlements = vec![EntitlementDef {
            key: "pro".into(),
            description: None,
        }];
        cfg.catalog.products = vec![ProductDef {
            id: "m".into(),
            entitlements: vec!["pro".into()],
            kind: ProductKind::Subscription,
            display_name: None,
            stripe_price_id: None,
            stripe_payment_link: None,
            app_store_product_id: Some("pro.m".into()),
            play_store_product_id: Some("pro_sub".into()),
        }];
        let db = Db::connect(&cfg).await.unwrap();
        (
            Core::new(&cfg, db, Arc::new(OffsetClock::default())).unwrap(),
            dir,
        )
    }

    fn state(
        core: &Core,
        id: &str,
        status: PurchaseStatus,
        updated_offset_secs: i64,
    ) -> PurchaseState {
        let now = core.now();
        PurchaseState {
            store: Store::AppStore,
            store_purchase_id: id.into(),
            product_id: "pro.m".into(),
            environment: Environment::Production,
            status,
            period_type: PeriodType::Normal,
            purchased_at: now - Duration::days(1),
            expires_at: Some(now + Duration::days(29)),
            grace_expires_at: None,
            auto_renew: true,
            canceled_at: None,
            revoked_at: (status == PurchaseStatus::Refunded).then_some(now),
            renewal_count: None,
            transaction_id: None,
            source_updated_at: now + Duration::seconds(updated_offset_secs),
            bound_customer: None,
            replaces: None,
            raw: serde_json::json!({}),
        }
    }

    async fn kinds(core: &Core, customer: &str) -> Vec<String> {
        db::events_of(&core.db.conn, customer, 100)
            .await
            .unwrap()
            .into_iter()
            .rev()
            .map(|e| e.kind)
            .collect()
    }

    #[tokio::test]
    async fn older_state_never_overwrites_newer_and_refund_sticks() {
        let (core, _d) = core(TransferPolicy::Transfer).await;
        let a = core
            .apply_purchase(
                &verified_for_test(state(&core, "otx1", PurchaseStatus::Active, 0)),
                Submitter::Customer("alice"),
            )
            .await
            .unwrap();
        assert!(a.snapshot.entitlement("pro").unwrap().is_active);
        let r = core
            .apply_purchase(
                &verified_for_test(state(&core, "otx1", PurchaseStatus::Refunded, 10)),
                Submitter::Store,
            )
            .await
            .unwrap();
        assert!(!r.snapshot.entitlement("pro").unwrap().is_active);
        // A renewal signed before the refund arrives late: ignored.
        let late = core
            .apply_purchase(
                &verified_for_test(state(&core, "otx1", PurchaseStatus::Active, 5)),
                Submitter::Store,
            )
            .await
            .unwrap();
        assert!(late.stale);
        assert!(!late.snapshot.entitlement("pro").unwrap().is_active);
        // Applying the same state twice changes nothing.
        core.apply_purchase(
            &verified_for_test(state(&core, "otx1", PurchaseStatus::Refunded, 10)),
            Submitter::Store,
        )
        .await
        .unwrap();
        assert_eq!(kinds(&core, "alice").await, vec!["granted", "refunded"]);
        assert_eq!(
            purchases::Entity::find()
                .count(&core.db.conn)
                .await
                .unwrap(),
            1
        );
    }

    #[tokio::test]
    async fn transfer_policy_moves_the_purchase_with_two_events() {
        let (core, _d) = core(TransferPolicy::Transfer).await;
        let vp = verified_for_test(state(&core, "otx2", PurchaseStatus::Active, 0));
        core.apply_purchase(&vp, Submitter::Customer("alice"))
            .await
            .unwrap();
        let b = core
            .apply_purchase(&vp, Submitter::Customer("bob"))
            .await
            .unwrap();
        assert_eq!(b.customer_id, "bob");
        assert!(b.snapshot.entitlement("pro").unwrap().is_active);
        assert!(
            !core
                .snapshot("alice")
                .await
                .unwrap()
                .entitlement("pro")
                .unwrap()
                .is_active
        );
        assert_eq!(kinds(&core, "alice").await, vec!["granted", "transferred"]);
        assert_eq!(kinds(&core, "bob").await, vec!["granted"]);
        // A later store message keeps it with its current owner.
        let s = core
            .apply_purchase(
                &verified_for_test(state(&core, "otx2", PurchaseStatus::Active, 60)),
                Submitter::Store,
            )
            .await
            .unwrap();
        assert_eq!(s.customer_id, "bob");
    }

    #[tokio::test]
    async fn keep_policy_rejects_a_second_customer() {
        let (core, _d) = core(TransferPolicy::Keep).await;
        let vp = verified_for_test(state(&core, "otx3", PurchaseStatus::Active, 0));
        core.apply_purchase(&vp, Submitter::Customer("alice"))
            .await
            .unwrap();
        let err = core
            .apply_purchase(&vp, Submitter::Customer("bob"))
            .await
            .unwrap_err();
        assert!(matches!(err, AppError::ReceiptAlreadyInUse));
        assert!(
            core.find_customer("bob").await.unwrap().is_none(),
            "nothing written for bob"
        );
        // Bound to alice by the store, submitted by bob: also rejected.
        let mut bound = state(&core, "otx4", PurchaseStatus::Active, 0);
        bound.bound_customer = Some("alice".into());
        let err = core
            .apply_purchase(&verified_for_test(bound), Submitter::Customer("bob"))
            .await
            .unwrap_err();
        assert!(matches!(err, AppError::ReceiptAlreadyInUse));
    }

    #[tokio::test]
    async fn replacement_leaves_one_live_purchase() {
        let (core, _d) = core(TransferPolicy::Transfer).await;
        core.apply_purchase(
            &verified_for_test(state(&core, "tok-old", PurchaseStatus::Active, 0)),
            Submitter::Customer("c"),
        )
        .await
        .unwrap();
        let mut up = state(&core, "tok-new", PurchaseStatus::Active, 10);
        up.replaces = Some("tok-old".into());
        core.apply_purchase(&verified_for_test(up), Submitter::Customer("c"))
            .await
            .unwrap();
        let rows = db::purchases_of(&core.db.conn, "c").await.unwrap();
        let now = core.now();
        let live: Vec<_> = rows
            .iter()
            .filter(|r| db::purchase_facts(r).unwrap().access(now) != crate::domain::Access::None)
            .map(|r| r.store_purchase_id.as_str())
            .collect();
        assert_eq!(live, vec!["tok-new"]);
    }

    #[tokio::test]
    async fn store_message_without_owner_is_not_found() {
        let (core, _d) = core(TransferPolicy::Transfer).await;
        let err = core
            .apply_purchase(
                &verified_for_test(state(&core, "otx9", PurchaseStatus::Active, 0)),
                Submitter::Store,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, AppError::NotFound(_)));
    }

    #[tokio::test]
    async fn webhook_claim_is_once() {
        let (core, _d) = core(TransferPolicy::Transfer).await;
        let now = core.now();
        let txn = core.db.write().await.unwrap();
        assert!(
            core.claim_webhook(
                &txn,
                Store::Stripe,
                "evt_1",
                &serde_json::json!({}),
                "processed",
                None,
                now
            )
            .await
            .unwrap()
        );
        assert!(
            !core
                .claim_webhook(
                    &txn,
                    Store::Stripe,
                    "evt_1",
                    &serde_json::json!({}),
                    "processed",
                    None,
                    now
                )
                .await
                .unwrap()
        );
        // Same id from another store is another event.
        assert!(
            core.claim_webhook(
                &txn,
                Store::AppStore,
                "evt_1",
                &serde_json::json!({}),
                "processed",
                None,
                now
            )
            .await
            .unwrap()
        );
        txn.commit().await.unwrap();
    }
}
