//! Applying verified store state: the one path by which Stripe, App Store
//! and Play purchases change what a customer may use.

use std::{collections::BTreeSet, sync::Arc};

use chrono::{DateTime, Utc};
use entities::{held_purchases, purchases};

use super::{Ctx, Reads};
use crate::{
    config::ReceiptsConfig,
    db::{self, Conn, WriteTxn, held_purchase::HeldState, purchase::PurchaseFields},
    domain::{
        EventKind, PurchaseStatus, Snapshot, Store, TransferPolicy, compute, diff, rules, tokens,
    },
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

/// The one path by which verified store state changes a purchase: every
/// store, every source (submission, webhook, re-read, replay) ends here,
/// and so does the audit trail of submissions.
pub struct Purchases {
    ctx: Arc<Ctx>,
    reads: Reads,
    transfer_policy: TransferPolicy,
    receipts: ReceiptsConfig,
}

impl Purchases {
    pub(super) fn new(
        ctx: Arc<Ctx>,
        reads: Reads,
        transfer_policy: TransferPolicy,
        receipts: ReceiptsConfig,
    ) -> Purchases {
        Purchases {
            ctx,
            reads,
            transfer_policy,
            receipts,
        }
    }

    /// Applies a verified purchase state in the caller's write transaction,
    /// with its change-log rows. Older state (by the store's own timestamp)
    /// never overwrites newer; a refund is never undone by an older message.
    /// A store message about a purchase nobody here owns is
    /// `NotFound` and writes nothing (see [`Self::apply_store_in`] to hold it).
    pub(super) async fn apply_purchase_in(
        &self,
        txn: &WriteTxn,
        vp: &VerifiedPurchase,
        submitter: Submitter<'_>,
        now: DateTime<Utc>,
    ) -> AppResult<Applied> {
        self.apply_prefetched_in(txn, vp, submitter, None, now)
            .await
    }

    /// [`Self::apply_purchase_in`] for a caller that already looked up, in
    /// this transaction and after [`db::lock_store_purchase`], the
    /// purchase's own store id.
    pub(super) async fn apply_prefetched_in(
        &self,
        txn: &WriteTxn,
        vp: &VerifiedPurchase,
        submitter: Submitter<'_>,
        prefetched: Option<db::purchase::StoreIdLookup>,
        now: DateTime<Utc>,
    ) -> AppResult<Applied> {
        match self
            .apply_inner(txn, vp, submitter, false, prefetched, now)
            .await?
        {
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
    pub(super) async fn apply_store_in(
        &self,
        txn: &WriteTxn,
        vp: &VerifiedPurchase,
        now: DateTime<Utc>,
    ) -> AppResult<StoreApplied> {
        self.apply_inner(txn, vp, Submitter::Store, true, None, now)
            .await
    }

    /// The customer the store binding `key` names. The submitter comes
    /// first (their own token needs no index); Apple tokens resolve through
    /// the account-token index; Play and Stripe ids may be the customer id.
    async fn resolve_binding(
        &self,
        c: &impl Conn,
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
            && let Some(owner) =
                db::customer::account_token_owner(c, &t.hyphenated().to_string()).await?
        {
            return Ok(Binding::Customer(owner));
        }
        if store != Store::AppStore && db::customer::find(c, key).await?.is_some() {
            return Ok(Binding::Customer(key.to_string()));
        }
        Ok(Binding::Unknown)
    }

    /// The purchase line `id` names: its own row, or (`true`) the line a
    /// later token of it superseded it with.
    async fn find_line(
        &self,
        c: &impl Conn,
        store: Store,
        id: &str,
    ) -> AppResult<Option<(purchases::Model, bool)>> {
        if let Some(p) = db::purchase::find_by_store_id(c, store.as_str(), id).await? {
            return Ok(Some((p, false)));
        }
        self.find_replaced_line(c, store, id).await
    }

    /// The line a later token of `id` superseded it with, when no row is
    /// stored under `id` itself.
    async fn find_replaced_line(
        &self,
        c: &impl Conn,
        store: Store,
        id: &str,
    ) -> AppResult<Option<(purchases::Model, bool)>> {
        let Some(line) = db::purchase::replaced_by(c, store.as_str(), id).await? else {
            return Ok(None);
        };
        Ok(db::purchase::find(c, line).await?.map(|p| (p, true)))
    }

    async fn find_held(
        &self,
        c: &impl Conn,
        store: Store,
        id: &str,
    ) -> AppResult<Option<held_purchases::Model>> {
        db::held_purchase::find(c, store.as_str(), id).await
    }

    /// Renewals of an App Store purchase: the distinct transactions seen
    /// for its original transaction, less the first. `None` for other
    /// stores or a state without a transaction id.
    async fn count_renewals(&self, c: &impl Conn, vp: &PurchaseState) -> AppResult<Option<i32>> {
        if vp.renewal_count.is_some() {
            return Ok(vp.renewal_count);
        }
        let (Store::AppStore, Some(tx)) = (vp.store, vp.transaction_id.as_deref()) else {
            return Ok(None);
        };
        db::purchase::record_transaction(c, vp.store.as_str(), &vp.store_purchase_id, tx).await?;
        let seen =
            db::purchase::transactions_seen(c, vp.store.as_str(), &vp.store_purchase_id).await?;
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
        let held = db::held_purchase::bound_to_any(&**txn, keys).await?;
        if held.is_empty() {
            return Ok(());
        }
        db::hold_customer(txn, customer_id).await?;
        let (before, _) = self
            .ctx
            .state_before_write(&**txn, customer_id, now)
            .await?;
        for h in held {
            let vp = from_held(h.state.clone())
                .map_err(|e| AppError::Internal(anyhow::anyhow!("held purchase {}: {e}", h.id)))?;
            db::lock_store_purchase(txn, vp.store.as_str(), &vp.store_purchase_id).await?;
            db::held_purchase::release(&**txn, h.id).await?;
            if self
                .find_line(&**txn, vp.store, &vp.store_purchase_id)
                .await?
                .is_some()
            {
                continue;
            }
            let row = self.fields(&vp, customer_id, vp.renewal_count.unwrap_or(0));
            db::purchase::insert(&**txn, row).await?;
        }
        self.ctx
            .record_transition(&**txn, customer_id, &before, now)
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
        let held_state = HeldState {
            bound_key: key,
            replaces: vp.replaces.clone(),
            state: json,
            source_updated_at: vp.source_updated_at,
        };
        match held {
            Some(h) => db::held_purchase::overwrite(&**txn, h, held_state).await?,
            None => {
                db::held_purchase::insert(
                    &**txn,
                    vp.store.as_str(),
                    &vp.store_purchase_id,
                    held_state,
                    now,
                )
                .await?
            }
        }
        // An unowned token this one replaced is this purchase now.
        if let Some(r) = vp.replaces.as_deref() {
            db::held_purchase::release_store_id(&**txn, vp.store.as_str(), r).await?;
        }
        Ok(StoreApplied::Held { stale: false })
    }

    async fn apply_inner(
        &self,
        txn: &WriteTxn,
        vp: &VerifiedPurchase,
        submitter: Submitter<'_>,
        may_hold: bool,
        prefetched: Option<db::purchase::StoreIdLookup>,
        now: DateTime<Utc>,
    ) -> AppResult<StoreApplied> {
        let store = vp.store;
        db::lock_store_purchase(txn, store.as_str(), &vp.store_purchase_id).await?;
        let replaces = vp
            .replaces
            .as_deref()
            .filter(|r| *r != vp.store_purchase_id);
        if let Some(r) = replaces {
            db::lock_store_purchase(txn, store.as_str(), r).await?;
        }
        let lookup = match prefetched {
            Some(l) => l,
            None => {
                db::lookup_store_id_in(
                    txn,
                    store.as_str(),
                    &vp.store_purchase_id,
                    vp.bound_customer.as_deref(),
                )
                .await?
            }
        };
        if cfg!(debug_assertions) {
            // Development and test builds check the one-statement lookup
            // (and a caller's) against the separate reads it stands for.
            let id = &vp.store_purchase_id;
            let read = db::purchase::StoreIdLookup {
                row: db::purchase::find_by_store_id(&**txn, store.as_str(), id).await?,
                replaced_by: db::purchase::replaced_by(&**txn, store.as_str(), id).await?,
                held: self.find_held(&**txn, store, id).await?.is_some(),
                bound: match &lookup.bound {
                    Some((b, _)) => Some((b.clone(), db::resolve_customer(&**txn, b).await?)),
                    None => None,
                },
                next_id: lookup.next_id,
            };
            assert_eq!(lookup, read, "store id lookup");
        }
        let mut line = match (&lookup.row, lookup.replaced_by) {
            (Some(p), _) => Some((p.clone(), false)),
            (None, Some(id)) => db::purchase::find(&**txn, id).await?.map(|p| (p, true)),
            (None, None) => None,
        };
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
            None if lookup.held => self.find_held(&**txn, store, &vp.store_purchase_id).await?,
            _ => None,
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
                (None, Some(Binding::Customer(x))) => match lookup.resolved(x) {
                    Some(r) => r.to_string(),
                    None => db::resolve_customer(&**txn, x).await?,
                },
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
                db::held_purchase::release(&**txn, h.id).await?;
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
            Some(r) if !switching => db::purchase::find_by_store_id(&**txn, store.as_str(), r)
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
        // When this write touches one customer's one purchase row, the state
        // after it follows from the facts before and that row, without
        // reading them again.
        let mut derive_after = affected.len() == 1 && replaced.is_none() && !switching;
        let mut owner_facts = Vec::new();
        for c in &affected {
            db::hold_customer(txn, c).await?;
            let prefetched = txn.take_prefetched_facts(c);
            let (snapshot, facts, _) = self
                .ctx
                .facts_before_write(&**txn, c, now, prefetched)
                .await?;
            if derive_after {
                owner_facts = facts;
            }
            before.push((c.clone(), snapshot));
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
        let (purchase_id, written) = match existing {
            Some(e) if stale => {
                let id = e.id;
                if e.customer_id != owner {
                    // Not reached when deriving (two customers), but a move
                    // changes the facts all the same.
                    derive_after = false;
                    db::purchase::move_to(&**txn, e, &owner).await?;
                }
                (id, None)
            }
            Some(e) => {
                let renewal_count = vp.renewal_count.or(counted).unwrap_or(e.renewal_count);
                let row = self.fields(vp, &owner, renewal_count);
                let row = db::purchase::overwrite_deferred(txn, e, row).await?;
                (row.id, Some(row))
            }
            None => {
                let row = self.fields(vp, &owner, vp.renewal_count.or(counted).unwrap_or(0));
                let row = match lookup.next_id {
                    Some(id) => db::purchase::insert_deferred(txn, id, row).await?,
                    None => db::purchase::insert(&**txn, row).await?,
                };
                (row.id, Some(row))
            }
        };
        if derive_after && let Some(row) = &written {
            let f = db::purchase_facts(row)?;
            match owner_facts.iter_mut().find(|x| x.id == f.id) {
                Some(x) => *x = f,
                None => {
                    owner_facts.push(f);
                    // In the order a read would give.
                    owner_facts.sort_by_key(|x| x.id);
                }
            }
        }

        if let Some(r) = replaced
            .filter(|r| !is_final(&r.status) && r.status != PurchaseStatus::Expired.as_str())
        {
            let end = r.expires_at.map_or(now, |e| e.min(now));
            db::purchase::expire_superseded(&**txn, r, end, vp.source_updated_at).await?;
        } else {
            // Tokens this line replaced name it from now on, so a late
            // message about one of them changes nothing.
            for t in replaces.map(str::to_string).into_iter().chain(old_token) {
                if t == vp.store_purchase_id {
                    continue;
                }
                db::purchase::add_replaced_id(&**txn, store.as_str(), &t, purchase_id).await?;
                db::held_purchase::release_store_id(&**txn, store.as_str(), &t).await?;
            }
        }

        let mut owner_snapshot = None;
        for (c, b) in before {
            let after = if derive_after {
                if cfg!(debug_assertions) {
                    // Development and test builds check the derivation
                    // against the database on every write.
                    let read = db::purchase_facts_of(&**txn, &c).await?;
                    assert_eq!(owner_facts, read, "facts derived after a write");
                }
                compute(
                    &self.ctx.catalog,
                    &owner_facts,
                    now,
                    self.ctx.accept_sandbox,
                )
            } else {
                self.ctx.snapshot_in(&**txn, &c, now).await?
            };
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
            db::record_changes_deferred(txn, &c, &changes, now).await?;
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
                db::held_purchase::successor_of(&**txn, store.as_str(), &vp.store_purchase_id)
                    .await?
            }
        };
        if let Some(h) = successor {
            let next = from_held(h.state.clone())
                .map_err(|e| AppError::Internal(anyhow::anyhow!("held purchase {}: {e}", h.id)))?;
            db::held_purchase::release(&**txn, h.id).await?;
            if let StoreApplied::Applied(a) =
                Box::pin(self.apply_inner(txn, &next, Submitter::Store, false, None, now)).await?
            {
                return Ok(StoreApplied::Applied(Applied {
                    stale: applied.stale,
                    ..a
                }));
            }
        }
        Ok(StoreApplied::Applied(applied))
    }

    /// The purchase row a verified state makes for `owner`.
    fn fields(&self, vp: &VerifiedPurchase, owner: &str, renewal_count: i32) -> PurchaseFields {
        PurchaseFields {
            customer_id: owner.to_string(),
            store: vp.store.as_str().into(),
            store_purchase_id: vp.store_purchase_id.clone(),
            product_id: vp.product_id.clone(),
            environment: vp.environment.as_str().into(),
            status: vp.status.as_str().into(),
            period_type: vp.period_type.as_str().into(),
            purchased_at: vp.purchased_at,
            expires_at: vp.expires_at,
            grace_expires_at: vp.grace_expires_at,
            auto_renew: vp.auto_renew,
            canceled_at: vp.canceled_at,
            revoked_at: vp.revoked_at,
            renewal_count,
            source_updated_at: vp.source_updated_at,
            raw: Some(vp.raw.clone()),
            // Kept once known: a later payload without it does not erase it.
            order_id: crate::providers::order_id(vp),
        }
    }

    /// Applies one verified purchase in its own transaction.
    pub async fn apply_purchase(
        &self,
        vp: &VerifiedPurchase,
        submitter: Submitter<'_>,
    ) -> AppResult<Applied> {
        let txn = self.ctx.db.write().await?;
        let applied = self
            .apply_purchase_in(&txn, vp, submitter, self.ctx.now())
            .await?;
        txn.commit().await?;
        Ok(applied)
    }

    /// Records a store notification in the caller's transaction. `false`
    /// means it was seen before: acknowledge it and change nothing. Because
    /// the row commits with the effect, a failed apply leaves no row (or
    /// its `failed` row) and the store's retry is processed.
    #[allow(clippy::too_many_arguments)] // the row's columns, each its own
    pub(super) async fn claim_webhook(
        &self,
        txn: &WriteTxn,
        source: Store,
        event_id: &str,
        payload: &serde_json::Value,
        outcome: &str,
        customer: Option<&str>,
        now: DateTime<Utc>,
    ) -> AppResult<bool> {
        let claim = db::webhook_claim::Claim {
            source: source.as_str(),
            event_id,
            payload,
            outcome,
            customer_id: customer,
            at: now,
        };
        if db::webhook_claim::insert_new(txn, claim).await? {
            return Ok(true);
        }
        // An earlier delivery failed (the store's API was down): this one
        // takes its row over.
        db::webhook_claim::take_over_failed(&**txn, claim).await
    }

    /// Stores a purchase submission before it is verified (the audit trail),
    /// committed on its own so a failed verification is still on record.
    /// What one customer id can leave behind is bounded: a payload over
    /// `receipts.max_payload_bytes` is kept as its size and digest, and past
    /// `max_unverified_per_customer` pending or invalid rows the oldest
    /// invalid ones make room (all pending: the submission is refused).
    pub(super) async fn record_receipt(
        &self,
        customer_id: &str,
        store: Store,
        payload: serde_json::Value,
    ) -> AppResult<i64> {
        let payload = bounded_payload(payload, self.receipts.max_payload_bytes);
        let cap = self.receipts.max_unverified_per_customer.max(1);
        let customer_id = db::resolve_customer(&self.ctx.db.conn, customer_id).await?;
        let txn = self.ctx.db.write().await?;
        let unverified = db::receipt::unverified_of(&*txn, &customer_id).await?;
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
            db::receipt::delete(&*txn, drop).await?;
        }
        let id = db::receipt::insert_pending(
            &*txn,
            customer_id,
            store.as_str(),
            payload,
            self.ctx.now(),
        )
        .await?;
        txn.commit().await?;
        Ok(id)
    }

    /// A failed submission: marked invalid with its reason. When its
    /// customer does not exist (a failed verification creates none, so any
    /// id can be named) only the payload's size and digest stay on record,
    /// so made-up ids cannot be used to store data; retention deletes the
    /// row later like any invalid one.
    pub(super) async fn fail_receipt(
        &self,
        receipt_id: i64,
        customer_id: &str,
        reason: &str,
    ) -> AppResult<()> {
        if self.reads.find_customer(customer_id).await?.is_none()
            && let Some(row) = db::receipt::find(&self.ctx.db.conn, receipt_id).await?
        {
            db::receipt::replace_payload(
                &self.ctx.db.conn,
                receipt_id,
                bounded_payload(row.payload, 0),
            )
            .await?;
        }
        self.finish_receipt(&self.ctx.db.conn, receipt_id, Err(reason))
            .await
    }

    /// Marks a submission valid (with its purchase) or invalid (with a reason
    /// safe to show the operator).
    pub(super) async fn finish_receipt(
        &self,
        c: &impl Conn,
        receipt_id: i64,
        outcome: Result<i64, &str>,
    ) -> AppResult<()> {
        let (outcome, error, purchase_id) = match outcome {
            Ok(pid) => ("valid", None, Some(pid)),
            Err(e) => ("invalid", Some(e.to_string()), None),
        };
        db::receipt::finish(c, receipt_id, outcome, error, purchase_id).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Duration;

    use super::*;
    use crate::{
        clock::OffsetClock,
        config::{Config, Secret},
        db::Db,
        domain::{EntitlementDef, Environment, PeriodType, ProductDef, ProductKind},
        providers::{PurchaseState, verified_for_test},
        service::Core,
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
        db::events_of(&core.db().conn, customer, 100)
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
            .purchases()
            .apply_purchase(
                &verified_for_test(state(&core, "otx1", PurchaseStatus::Active, 0)),
                Submitter::Customer("alice"),
            )
            .await
            .unwrap();
        assert!(a.snapshot.entitlement("pro").unwrap().is_active);
        let r = core
            .purchases()
            .apply_purchase(
                &verified_for_test(state(&core, "otx1", PurchaseStatus::Refunded, 10)),
                Submitter::Store,
            )
            .await
            .unwrap();
        assert!(!r.snapshot.entitlement("pro").unwrap().is_active);
        // A renewal signed before the refund arrives late: ignored.
        let late = core
            .purchases()
            .apply_purchase(
                &verified_for_test(state(&core, "otx1", PurchaseStatus::Active, 5)),
                Submitter::Store,
            )
            .await
            .unwrap();
        assert!(late.stale);
        assert!(!late.snapshot.entitlement("pro").unwrap().is_active);
        // Applying the same state twice changes nothing.
        core.purchases()
            .apply_purchase(
                &verified_for_test(state(&core, "otx1", PurchaseStatus::Refunded, 10)),
                Submitter::Store,
            )
            .await
            .unwrap();
        assert_eq!(kinds(&core, "alice").await, vec!["granted", "refunded"]);
        assert_eq!(db::purchase::count_all(&core.db().conn).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn transfer_policy_moves_the_purchase_with_two_events() {
        let (core, _d) = core(TransferPolicy::Transfer).await;
        let vp = verified_for_test(state(&core, "otx2", PurchaseStatus::Active, 0));
        core.purchases()
            .apply_purchase(&vp, Submitter::Customer("alice"))
            .await
            .unwrap();
        let b = core
            .purchases()
            .apply_purchase(&vp, Submitter::Customer("bob"))
            .await
            .unwrap();
        assert_eq!(b.customer_id, "bob");
        assert!(b.snapshot.entitlement("pro").unwrap().is_active);
        assert!(
            !core
                .reads()
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
            .purchases()
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
        core.purchases()
            .apply_purchase(&vp, Submitter::Customer("alice"))
            .await
            .unwrap();
        let err = core
            .purchases()
            .apply_purchase(&vp, Submitter::Customer("bob"))
            .await
            .unwrap_err();
        assert!(matches!(err, AppError::ReceiptAlreadyInUse));
        assert!(
            core.reads().find_customer("bob").await.unwrap().is_none(),
            "nothing written for bob"
        );
        // Bound to alice by the store, submitted by bob: also rejected.
        let mut bound = state(&core, "otx4", PurchaseStatus::Active, 0);
        bound.bound_customer = Some("alice".into());
        let err = core
            .purchases()
            .apply_purchase(&verified_for_test(bound), Submitter::Customer("bob"))
            .await
            .unwrap_err();
        assert!(matches!(err, AppError::ReceiptAlreadyInUse));
    }

    #[tokio::test]
    async fn replacement_leaves_one_live_purchase() {
        let (core, _d) = core(TransferPolicy::Transfer).await;
        core.purchases()
            .apply_purchase(
                &verified_for_test(state(&core, "tok-old", PurchaseStatus::Active, 0)),
                Submitter::Customer("c"),
            )
            .await
            .unwrap();
        let mut up = state(&core, "tok-new", PurchaseStatus::Active, 10);
        up.replaces = Some("tok-old".into());
        core.purchases()
            .apply_purchase(&verified_for_test(up), Submitter::Customer("c"))
            .await
            .unwrap();
        let rows = db::purchases_of(&core.db().conn, "c").await.unwrap();
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
            .purchases()
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
        let txn = core.db().write().await.unwrap();
        assert!(
            core.purchases()
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
        assert!(
            !core
                .purchases()
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
            core.purchases()
                .claim_webhook(
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
