//! One customer across watch, phone and web. A watch's id is public (it
//! travels in every payment link), so joining it to an account needs proof
//! of possession: the device secret it was answered once, which buys a short
//! single-use pairing code that the signed-in owner types in. Pairing, like
//! an operator's merge, moves everything of the device's customer to the
//! account and leaves the old id as an alias of it.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use entities::{devices, pairing_codes};
use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Ctx, customers::Customers};
use crate::{
    db::{self, WriteTxn},
    domain::{ExternalId, Platform, Snapshot},
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

/// Pairing codes, and redeeming one: the merge itself is the customers'.
pub struct Pairing {
    ctx: Arc<Ctx>,
    customers: Arc<Customers>,
}

impl Pairing {
    pub(super) fn new(ctx: Arc<Ctx>, customers: Arc<Customers>) -> Pairing {
        Pairing { ctx, customers }
    }

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
        let now = self.ctx.now();
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
        let now = self.ctx.now();
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
            self.customers.merge_in(&txn, &from, &into, now).await?
        };
        txn.commit().await?;
        Ok((into, snapshot))
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
