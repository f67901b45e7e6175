//! One customer across watch, phone and web. A watch's id is public (it
//! travels in every payment link), so joining it to an account needs proof
//! of possession: the device secret it was answered once, which buys a short
//! single-use pairing code that the signed-in owner types in. Pairing, like
//! an operator's merge, moves everything of the device's customer to the
//! account and leaves the old id as an alias of it.

use chrono::{DateTime, Duration, Utc};
use entities::{devices, pairing_codes, purchases};
use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Core, customers::own_purchase_key};
use crate::{
    db::{self, WriteTxn},
    domain::{EventKind, ExternalId, Platform, PurchaseStatus, Snapshot, Store, diff},
    error::{AppError, AppResult},
};

/// How long a pairing code can be used.
pub const PAIRING_CODE_TTL: Duration = Duration::minutes(10);
/// No 0/O, 1/I/L: read off a watch face and typed by hand.
const CODE_ALPHABET: &[u8] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
const CODE_LEN: usize = 8;

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// 256 random bits, URL-safe.
pub fn new_device_secret() -> String {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

fn new_pairing_code() -> String {
    let mut rng = rand::rng();
    (0..CODE_LEN)
        .map(|_| CODE_ALPHABET[rng.random_range(0..CODE_ALPHABET.len())] as char)
        .collect()
}

/// A code as typed: case, spaces and dashes do not matter. `None` when it
/// cannot be a code at all.
pub fn normalize_code(input: &str) -> Option<String> {
    let code: String = input
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (code.len() == CODE_LEN && code.bytes().all(|b| CODE_ALPHABET.contains(&b))).then_some(code)
}

/// Gives a device seen before secrets existed its secret, in the caller's
/// transaction. Only the request whose write lands answers it, so a secret
/// is answered once even to concurrent first calls.
pub(super) async fn issue_missing_secret(
    txn: &WriteTxn,
    device_row_id: i64,
) -> AppResult<Option<String>> {
    let secret = new_device_secret();
    let stored =
        db::device::set_secret_if_missing(&**txn, device_row_id, hash_secret(&secret)).await?;
    Ok(stored.then_some(secret))
}

pub struct IssuedCode {
    pub code: String,
    pub expires_at: DateTime<Utc>,
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

impl Core {
    /// A pairing code for the device, when `presented` is its secret;
    /// `None` (and nothing written) otherwise. A new code replaces the
    /// device's earlier ones.
    pub async fn pairing_code(
        &self,
        device: &devices::Model,
        presented: &str,
    ) -> AppResult<Option<IssuedCode>> {
        let Some(stored) = device.secret_hash.as_deref() else {
            return Ok(None);
        };
        let matches: bool = hash_secret(presented)
            .as_bytes()
            .ct_eq(stored.as_bytes())
            .into();
        if !matches {
            return Ok(None);
        }
        let now = self.now();
        let code = new_pairing_code();
        let expires_at = now + PAIRING_CODE_TTL;
        let txn = self.ctx.db.write().await?;
        db::device::drop_pairing_codes(&*txn, &device.platform, &device.device_id).await?;
        db::device::add_pairing_code(&*txn, hash_secret(&code), device, now, expires_at).await?;
        txn.commit().await?;
        Ok(Some(IssuedCode { code, expires_at }))
    }

    /// The signed-in customer `account` redeems a device's pairing code: the
    /// device's own customer is merged into the account. Returns the
    /// account's id and entitlements.
    pub async fn pair_device(&self, account: &str, code: &str) -> AppResult<(String, Snapshot)> {
        let code = normalize_code(code).ok_or(AppError::InvalidPairingCode)?;
        let account = ExternalId::parse(account)
            .map_err(|e| AppError::bad_input(format!("invalid customer id: {e}")))?;
        let now = self.now();
        let code_hash = hash_secret(&code);
        // Guesses are answered from a read, without queueing for the writer.
        let live = |r: &pairing_codes::Model| r.used_at.is_none() && r.expires_at > now;
        db::device::find_pairing_code(&self.ctx.db.conn, &code_hash)
            .await?
            .filter(live)
            .ok_or(AppError::InvalidPairingCode)?;
        let txn = self.ctx.db.write().await?;
        let row = db::device::find_pairing_code(&*txn, &code_hash)
            .await?
            .filter(live)
            .ok_or(AppError::InvalidPairingCode)?;
        let platform: Platform = row
            .platform
            .parse()
            .map_err(|e| AppError::Internal(anyhow::anyhow!("pairing code: {e}")))?;
        let device = db::find_device(&*txn, platform.as_str(), &row.device_id)
            .await?
            .ok_or(AppError::InvalidPairingCode)?;
        let into = db::lock_resolved_customer(&txn, account.as_str()).await?;
        db::ensure_customer(&txn, &into, now).await?;
        let from = db::lock_resolved_customer(&txn, &device.customer_id).await?;
        if from != into && device.customer_id != device.device_id {
            // It left its own customer already (paired, merged or registered
            // to an account): a code must not move someone's account.
            return Err(AppError::DeviceAlreadyPaired);
        }
        // Single use even against a concurrent redemption of the same code.
        if !db::device::use_pairing_code(&*txn, &code_hash, now).await? {
            return Err(AppError::InvalidPairingCode);
        }
        let snapshot = if from == into {
            self.ctx.snapshot_in(&*txn, &into, now).await?
        } else {
            self.merge_in(&txn, &from, &into, now).await?
        };
        txn.commit().await?;
        Ok((into, snapshot))
    }

    /// Merges customer `from` into `into` (the operator's tool). Returns the
    /// surviving customer's id and entitlements.
    pub async fn merge_customers(&self, from: &str, into: &str) -> AppResult<(String, Snapshot)> {
        let parse = |what: &str, s: &str| {
            ExternalId::parse(s).map_err(|e| AppError::bad_input(format!("invalid {what}: {e}")))
        };
        let (from, into) = (parse("from", from)?, parse("into", into)?);
        let now = self.now();
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
    async fn merge_in(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_eight_unambiguous_characters() {
        for _ in 0..200 {
            let c = new_pairing_code();
            assert_eq!(c.len(), CODE_LEN);
            assert!(!c.contains(['0', 'O', '1', 'I', 'L']), "{c}");
            assert_eq!(normalize_code(&c).as_deref(), Some(c.as_str()));
        }
    }

    #[test]
    fn typed_codes_normalise() {
        assert_eq!(normalize_code("abcd-efgh").as_deref(), Some("ABCDEFGH"));
        assert_eq!(normalize_code(" ab cd ef gh ").as_deref(), Some("ABCDEFGH"));
        assert_eq!(normalize_code("ABCDEFG"), None, "too short");
        assert_eq!(normalize_code("ABCDEFGHJ"), None, "too long");
        assert_eq!(normalize_code("ABCDEFG0"), None, "ambiguous character");
        assert_eq!(normalize_code("ABCDEFGÄ"), None);
    }

    #[test]
    fn secrets_are_long_and_distinct() {
        let (a, b) = (new_device_secret(), new_device_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(hash_secret(&a).len(), 64);
    }
}
