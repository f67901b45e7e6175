//! Legacy in-app receipts (`INAPP_PURCHASE_DATA` + `INAPP_DATA_SIGNATURE`),
//! as older Play Billing clients and the Cordova purchase plugin send them:
//! RSA-SHA1 PKCS#1 v1.5 over the exact JSON bytes, with the app's licensing key.

use base64::{Engine, engine::general_purpose::STANDARD};
use rsa::{
    RsaPublicKey,
    pkcs1v15::{Signature, VerifyingKey},
    pkcs8::DecodePublicKey,
    signature::Verifier,
};
use serde::Deserialize;
use sha1::Sha1;

use super::GoogleError;

/// The fields of a verified receipt we use: which purchase to read from the API.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LegacyPurchase {
    pub package_name: String,
    pub product_id: String,
    pub purchase_token: String,
}

/// The Play Console shows the key as base64 of its X.509 SubjectPublicKeyInfo.
pub(super) fn parse_public_key(b64: &str) -> anyhow::Result<RsaPublicKey> {
    let der = STANDARD
        .decode(b64.split_whitespace().collect::<String>())
        .map_err(|_| {
            anyhow::anyhow!("invalid configuration: google.license_public_key is not base64")
        })?;
    RsaPublicKey::from_public_key_der(&der).map_err(|_| {
        anyhow::anyhow!("invalid configuration: google.license_public_key is not an RSA public key")
    })
}

pub(super) fn verify(
    key: &RsaPublicKey,
    signed_data: &str,
    signature_b64: &str,
) -> Result<LegacyPurchase, GoogleError> {
    let sig = STANDARD
        .decode(signature_b64.trim())
        .map_err(|_| GoogleError::BadSignature("signature is not base64"))?;
    let sig = Signature::try_from(sig.as_slice())
        .map_err(|_| GoogleError::BadSignature("malformed signature"))?;
    VerifyingKey::<Sha1>::new(key.clone())
        .verify(signed_data.as_bytes(), &sig)
        .map_err(|_| GoogleError::BadSignature("signature does not verify"))?;
    serde_json::from_str(signed_data).map_err(|_| {
        GoogleError::Mismatch(
            "the signed purchase data lacks packageName, productId or purchaseToken",
        )
    })
}
