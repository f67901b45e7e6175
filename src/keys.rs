//! Key material as written in the configuration. Checking the configuration
//! and using a key must agree on what a well-formed key is, so both parse it
//! here; this module depends on no other module of the crate, so that
//! `config` can use it without depending on the code that uses the keys.

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use zeroize::Zeroizing;

/// The HMAC key of a Standard Webhooks `whsec_…` secret; `None` when it is
/// malformed.
pub fn webhook_signing_key(secret: &str) -> Option<Vec<u8>> {
    let b64 = secret.strip_prefix("whsec_")?;
    STANDARD.decode(b64).ok().filter(|k| !k.is_empty())
}

/// The key that encrypts signing keys at rest: 32 bytes as 64 hex digits or
/// base64. The error never repeats the input.
pub fn encryption_key_bytes(text: &str) -> Result<Zeroizing<[u8; 32]>, &'static str> {
    let t = text.trim();
    let bytes = Zeroizing::new(
        if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(t).map_err(|_| "is not valid hex")?
        } else {
            STANDARD
                .decode(t)
                .or_else(|_| URL_SAFE_NO_PAD.decode(t.trim_end_matches('=')))
                .map_err(|_| "must be 32 bytes as base64 or 64 hex digits")?
        },
    );
    let arr: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| "must be exactly 32 bytes (base64 or 64 hex digits)")?;
    Ok(Zeroizing::new(arr))
}
