//! Verification of Apple signed data against Apple's own test material, and
//! every forged or foreign input: chain, OIDs, chain length, algorithm,
//! bundle, environment, malformed strings.

mod apple_support;

use std::sync::Arc;

use apple_support::*;
use chrono::{Duration, Utc};
use entitle::{
    clock::SystemClock,
    config::{AppleConfig, AppleEnvironment},
    error::AppError,
    providers::apple::{Apple, transaction_id_from_receipt},
};
use serde_json::json;

fn apple_with(env: AppleEnvironment, bundle: &str, accept_sandbox: bool) -> Apple {
    let cfg = AppleConfig {
        bundle_id: bundle.into(),
        app_apple_id: Some(APP_APPLE_ID),
        environment: env,
        root_certificates: vec![vector("certs/testCA.der")],
        issuer_id: None,
        key_id: None,
        private_key: None,
        api_base: None,
    };
    Apple::new(&cfg, accept_sandbox, Arc::new(SystemClock)).unwrap()
}

fn sandbox() -> Apple {
    apple_with(AppleEnvironment::Sandbox, BUNDLE, true)
}

fn mock(name: &str) -> String {
    read(vector(&format!("mock_signed_data/{name}")))
        .trim()
        .to_string()
}

fn invalid(r: Result<impl Sized, AppError>) -> String {
    match r {
        Err(e) => {
            assert_eq!(e.code(), "INVALID_RECEIPT", "{}", e.message());
            e.message()
        }
        Ok(_) => panic!("accepted"),
    }
}

#[test]
fn apple_mock_notification_decodes() {
    let n = sandbox()
        .verify_notification(&mock("testNotification"))
        .unwrap();
    assert_eq!(n.kind, "TEST");
    assert_eq!(n.uuid, "9ad56bd2-0bc6-42e0-af24-fd996d87a1e6");
    assert_eq!(n.signed_date.timestamp_millis(), 1681314324000);
    assert!(n.transaction.is_none());
    assert!(!n.is_handled());
}

#[test]
fn apple_mock_notification_at_production_is_invalid_environment() {
    let prod = apple_with(AppleEnvironment::Production, BUNDLE, false);
    let msg = invalid(prod.verify_notification(&mock("testNotification")));
    assert!(msg.contains("environment"), "{msg}");
}

#[test]
fn apple_mock_notification_wrong_app_apple_id() {
    let cfg = AppleConfig {
        bundle_id: BUNDLE.into(),
        app_apple_id: Some(1235),
        environment: AppleEnvironment::Production,
        root_certificates: vec![vector("certs/testCA.der")],
        issuer_id: None,
        key_id: None,
        private_key: None,
        api_base: None,
    };
    let prod = Apple::new(&cfg, false, Arc::new(SystemClock)).unwrap();
    let msg = invalid(prod.verify_notification(&mock("testNotification")));
    assert!(msg.contains("another app"), "{msg}");
}

#[test]
fn apple_mock_transaction_and_renewal_decode() {
    let a = sandbox();
    let tx = a.verify_transaction(&mock("transactionInfo")).unwrap();
    assert_eq!(tx.bundle_id.as_deref(), Some(BUNDLE));
    assert_eq!(tx.signed_date.unwrap().timestamp_millis(), 1672956154000);
    let r = a.verify_renewal(&mock("renewalInfo")).unwrap();
    assert_eq!(r.signed_date.unwrap().timestamp_millis(), 1672956154000);
}

#[test]
fn apple_mock_transaction_for_another_bundle() {
    let a = apple_with(AppleEnvironment::Sandbox, "com.example.x", true);
    let msg = invalid(a.verify_transaction(&mock("transactionInfo")));
    assert!(msg.contains("another app"), "{msg}");
}

#[test]
fn apple_mock_wrong_bundle_id() {
    let msg = invalid(sandbox().verify_notification(&mock("wrongBundleId")));
    assert!(msg.contains("another app"), "{msg}");
}

#[test]
fn apple_mock_missing_x5c() {
    let msg = invalid(sandbox().verify_notification(&mock("missingX5CHeaderClaim")));
    assert!(msg.contains("signature"), "{msg}");
}

#[test]
fn apple_embedded_root_rejects_test_chain() {
    // With no configured roots only Apple Root CA - G3 is trusted.
    let cfg = AppleConfig {
        bundle_id: BUNDLE.into(),
        app_apple_id: Some(APP_APPLE_ID),
        environment: AppleEnvironment::Sandbox,
        root_certificates: vec![],
        issuer_id: None,
        key_id: None,
        private_key: None,
        api_base: None,
    };
    let a = Apple::new(&cfg, true, Arc::new(SystemClock)).unwrap();
    let msg = invalid(a.verify_notification(&mock("testNotification")));
    assert!(msg.contains("chain"), "{msg}");
}

fn our_tx(env: &str) -> serde_json::Value {
    let now = Utc::now();
    let mut s = Sub::new(
        "7000000001",
        MONTHLY,
        "11111111-2222-3333-4444-555555555555",
        now,
    );
    s.env = if env == "Sandbox" {
        "Sandbox"
    } else {
        "Production"
    };
    s.tx("7000000001", now, Some(now + Duration::days(30)), now)
}

#[test]
fn apple_own_signature_verifies() {
    let a = apple_with(AppleEnvironment::Production, BUNDLE, false);
    let tx = a.verify_transaction(&sign(&our_tx("Production"))).unwrap();
    assert_eq!(tx.original_transaction_id.as_deref(), Some("7000000001"));
}

#[test]
fn apple_forged_chain_with_right_oids_is_rejected() {
    let chain = vec![
        x5c_entry(fixture("forgedLeaf.pem")),
        x5c_entry(fixture("forgedIntermediate.pem")),
        x5c_entry(fixture("forgedCA.pem")),
    ];
    let key =
        jsonwebtoken::EncodingKey::from_ec_pem(read(fixture("forgedLeaf.pk8.pem")).as_bytes())
            .unwrap();
    let jws = jws_with(
        json!({ "alg": "ES256", "x5c": chain }),
        &our_tx("Production"),
        &key,
    );
    let a = apple_with(AppleEnvironment::Production, BUNDLE, false);
    let msg = invalid(a.verify_transaction(&jws));
    assert!(msg.contains("chain"), "{msg}");

    // Control: the same chain passes when its own root is trusted, so the
    // rejection above is the root's doing, not a malformed certificate.
    let cfg = AppleConfig {
        bundle_id: BUNDLE.into(),
        app_apple_id: Some(APP_APPLE_ID),
        environment: AppleEnvironment::Production,
        root_certificates: vec![fixture("forgedCA.pem")],
        issuer_id: None,
        key_id: None,
        private_key: None,
        api_base: None,
    };
    let trusting = Apple::new(&cfg, false, Arc::new(SystemClock)).unwrap();
    trusting.verify_transaction(&jws).unwrap();
}

fn with_chain(chain: Vec<String>) -> String {
    jws_with(
        json!({ "alg": "ES256", "x5c": chain }),
        &our_tx("Production"),
        &test_key(),
    )
}

#[test]
fn apple_leaf_without_oid_is_rejected() {
    let jws = with_chain(vec![
        x5c_entry(vector("certs/testInvalidOIDLeaf.pem")),
        x5c_entry(vector("certs/testIntermediate.pem")),
        der_entry(vector("certs/testCA.der")),
    ]);
    let a = apple_with(AppleEnvironment::Production, BUNDLE, false);
    let msg = invalid(a.verify_transaction(&jws));
    assert!(msg.contains("chain"), "{msg}");
}

#[test]
fn apple_intermediate_without_oid_is_rejected() {
    let jws = with_chain(vec![
        x5c_entry(vector("certs/testInvalidIntermediateLeaf.pem")),
        x5c_entry(vector("certs/testInvalidOIDIntermediate.pem")),
        der_entry(vector("certs/testCA.der")),
    ]);
    let a = apple_with(AppleEnvironment::Production, BUNDLE, false);
    let msg = invalid(a.verify_transaction(&jws));
    assert!(msg.contains("chain"), "{msg}");
}

#[test]
fn apple_chain_of_two_or_four_is_rejected() {
    let a = apple_with(AppleEnvironment::Production, BUNDLE, false);
    let full = test_chain();
    let msg = invalid(a.verify_transaction(&with_chain(full[..2].to_vec())));
    assert!(msg.contains("chain"), "{msg}");
    let mut four = full.clone();
    four.push(full[2].clone());
    let msg = invalid(a.verify_transaction(&with_chain(four)));
    assert!(msg.contains("chain"), "{msg}");
    // The right three verify.
    a.verify_transaction(&with_chain(full)).unwrap();
}

#[test]
fn apple_alg_other_than_es256_is_rejected() {
    let a = apple_with(AppleEnvironment::Production, BUNDLE, false);
    for alg in ["ES384", "HS256", "none", "RS256"] {
        let jws = jws_with(
            json!({ "alg": alg, "x5c": test_chain() }),
            &our_tx("Production"),
            &test_key(),
        );
        invalid(a.verify_transaction(&jws));
    }
}

#[test]
fn apple_bad_signature_is_rejected() {
    let a = apple_with(AppleEnvironment::Production, BUNDLE, false);
    let good = sign(&our_tx("Production"));
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    // Same header and signature, other payload.
    let mut other = our_tx("Production");
    other["productId"] = json!(LIFETIME);
    parts[1] = sign(&other).split('.').nth(1).unwrap().to_string();
    invalid(a.verify_transaction(&parts.join(".")));
}

#[test]
fn apple_truncated_or_non_jws_is_rejected() {
    let a = apple_with(AppleEnvironment::Production, BUNDLE, false);
    let good = sign(&our_tx("Production"));
    for bad in [
        good[..good.len() / 2].to_string(),
        good.rsplit_once('.').unwrap().0.to_string(),
        "not a jws".to_string(),
        String::new(),
        "a.b.c".to_string(),
        format!("{good}.extra"),
    ] {
        invalid(a.verify_transaction(&bad));
    }
}

#[test]
fn apple_sandbox_at_production_verifier() {
    let strict = apple_with(AppleEnvironment::Production, BUNDLE, false);
    let msg = invalid(strict.verify_transaction(&sign(&our_tx("Sandbox"))));
    assert!(msg.contains("environment"), "{msg}");
    // With sandbox accepted it verifies, and stays sandbox.
    let lenient = apple_with(AppleEnvironment::Production, BUNDLE, true);
    let tx = lenient
        .verify_transaction(&sign(&our_tx("Sandbox")))
        .unwrap();
    assert_eq!(
        serde_json::to_value(tx.environment).unwrap(),
        json!("Sandbox")
    );
    // A sandbox deployment never takes production data.
    let sb = sandbox();
    invalid(sb.verify_transaction(&sign(&our_tx("Production"))));
}

#[test]
fn apple_foreign_bundle_is_rejected() {
    let mut tx = our_tx("Production");
    tx["bundleId"] = json!("com.other.app");
    let a = apple_with(AppleEnvironment::Production, BUNDLE, false);
    let msg = invalid(a.verify_transaction(&sign(&tx)));
    assert!(msg.contains("another app"), "{msg}");
}

#[test]
fn apple_receipt_transaction_id_extraction() {
    let with = read(vector("xcode/xcode-app-receipt-with-transaction"));
    assert_eq!(transaction_id_from_receipt(&with).unwrap(), "0");
    let empty = read(vector("xcode/xcode-app-receipt-empty"));
    invalid(transaction_id_from_receipt(&empty));
    invalid(transaction_id_from_receipt("bm90IGEgcmVjZWlwdA=="));
    invalid(transaction_id_from_receipt("%%%"));
}
