//! `Stripe-Signature` verification: HMAC-SHA256 over `"{t}.{raw body}"`.
//!
//! Hand-written rather than the webhook crate's helper, because that one
//! keeps only the last `v1` value (so a rolled secret fails while Stripe
//! signs with both) and reads the system clock (so tests cannot move time).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far the signed timestamp may be from our clock, either way.
pub const TOLERANCE_SECS: i64 = 300;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignatureError {
    Missing,
    Malformed,
    /// Only schemes we do not accept (e.g. `v0`) were present.
    NoV1,
    Stale,
    Mismatch,
}

impl SignatureError {
    pub fn message(self) -> &'static str {
        match self {
            SignatureError::Missing => "missing Stripe-Signature header",
            SignatureError::Malformed => "malformed Stripe-Signature header",
            SignatureError::NoV1 => "no v1 signature in Stripe-Signature header",
            SignatureError::Stale => "Stripe-Signature timestamp outside the tolerance",
            SignatureError::Mismatch => "Stripe-Signature does not match the payload",
        }
    }
}

/// Checks `header` against `body` with any of `secrets`, at `now` (unix
/// seconds). Every `v1` value is tried, so rotation works; comparisons are
/// constant-time (`verify_slice`).
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secrets: &[&str],
    now: i64,
) -> Result<i64, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp: Option<&str> = None;
    let mut v1: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match k {
            "t" if timestamp.is_none() => timestamp = Some(v),
            "t" => return Err(SignatureError::Malformed),
            // An undecodable value cannot match; it must not hide the others.
            "v1" => v1.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let t_str = timestamp.ok_or(SignatureError::Malformed)?;
    if t_str.is_empty() || !t_str.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SignatureError::Malformed);
    }
    let t: i64 = t_str.parse().map_err(|_| SignatureError::Malformed)?;
    if v1.is_empty() {
        return Err(SignatureError::NoV1);
    }
    let matched = secrets.iter().any(|secret| {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
            return false;
        };
        mac.update(t_str.as_bytes());
        mac.update(b".");
        mac.update(body);
        v1.iter().any(|sig| mac.clone().verify_slice(sig).is_ok())
    });
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    if (now - t).abs() > TOLERANCE_SECS {
        return Err(SignatureError::Stale);
    }
    Ok(t)
}

/// The header Stripe would send for `body` at `t`; for tests and tools.
pub fn sign(body: &[u8], secret: &str, t: i64) -> String {
    format!("t={t},v1={}", signature(body, secret, t))
}

fn signature(body: &[u8], secret: &str, t: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "whsec_test_secret";
    const BODY: &[u8] = br#"{"id":"evt_1","type":"ping"}"#;
    const NOW: i64 = 1_700_000_000;

    #[test]
    fn accepts_a_valid_signature() {
        let h = sign(BODY, S, NOW);
        assert_eq!(verify(Some(&h), BODY, &[S], NOW), Ok(NOW));
    }

    #[test]
    fn accepts_any_of_several_v1_and_ignores_v0() {
        let good = signature(BODY, S, NOW);
        let other = signature(BODY, "whsec_old", NOW);
        let h = format!("t={NOW},v1={other},v0=deadbeef,v1={good}");
        assert!(verify(Some(&h), BODY, &[S], NOW).is_ok());
        let h = format!("t={NOW},v1={good},v1={other}");
        assert!(verify(Some(&h), BODY, &[S], NOW).is_ok());
        let h = format!("t={NOW},v1=zz,v1={good}");
        assert!(verify(Some(&h), BODY, &[S], NOW).is_ok());
        // Either configured secret verifies.
        let h = format!("t={NOW},v1={other}");
        assert!(verify(Some(&h), BODY, &[S, "whsec_old"], NOW).is_ok());
    }

    #[test]
    fn rejects_bad_input() {
        let good = signature(BODY, S, NOW);
        assert_eq!(verify(None, BODY, &[S], NOW), Err(SignatureError::Missing));
        assert_eq!(
            verify(Some(&format!("t={NOW},v0={good}")), BODY, &[S], NOW),
            Err(SignatureError::NoV1)
        );
        assert_eq!(
            verify(Some(&format!("v1={good}")), BODY, &[S], NOW),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(Some(&format!("t=-5,v1={good}")), BODY, &[S], NOW),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(Some("garbage"), BODY, &[S], NOW),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(Some(&sign(BODY, "whsec_wrong", NOW)), BODY, &[S], NOW),
            Err(SignatureError::Mismatch)
        );
        let mut flipped = BODY.to_vec();
        flipped[3] ^= 1;
        assert_eq!(
            verify(Some(&sign(BODY, S, NOW)), &flipped, &[S], NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn tolerance_is_300_seconds_both_ways() {
        for (t, ok) in [
            (NOW - 300, true),
            (NOW + 300, true),
            (NOW - 301, false),
            (NOW + 301, false),
        ] {
            let r = verify(Some(&sign(BODY, S, t)), BODY, &[S], NOW);
            assert_eq!(r.is_ok(), ok, "t offset {}", t - NOW);
            if !ok {
                assert_eq!(r, Err(SignatureError::Stale));
            }
        }
    }
}
