//! The store's own binding, end to end through `/webhooks/apple` and
//! `verifyPurchase`: account tokens resolve through their index (UUID ids,
//! UUID v5 of other ids, the `%08x-0000-…` form of integer ids); a purchase
//! whose token names no customer here is held, not given to a made-up one,
//! and its first rightful owner receives it as it then stands; a purchase the
//! store binds to someone is never moved by another's submission.

mod apple_support;
mod common;

use apple_support::*;
use chrono::{DateTime, Duration, Utc};
use common::{Auth, Backend, TestApp, error_code, spawn_with};
use entitle::{
    config::AppleEnvironment,
    domain::{ApiKeyRole, TransferPolicy, tokens::account_token},
};
use reqwest::StatusCode;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::{Value, json};

const VERIFY: &str = r#"mutation($input: VerifyPurchaseInput!, $customerId: ID) {
  verifyPurchase(input: $input, customerId: $customerId) {
    customer { id entitlements { key isActive } }
    purchase { status renewalCount }
  }
}"#;

const CUSTOMER_Q: &str = r#"query($id: ID!) {
  customer(id: $id) {
    entitlement(key: "pro") { isActive status }
    purchases { storePurchaseId status renewalCount }
    events { kind newStatus }
  }
}"#;

async fn app(b: Backend, policy: TransferPolicy) -> TestApp {
    spawn_with(b, |c| {
        configure(c, AppleEnvironment::Production, None);
        c.transfer_policy = policy;
        // Customers made by a device registration start without a trial, so
        // only purchases grant.
        c.trial = None;
    })
    .await
}

async fn verify(app: &TestApp, customer: &str, jws: &str) -> Value {
    let key = client(app).await;
    let (s, body) = app
        .gql(
            &key,
            VERIFY,
            json!({ "input": { "appStore": { "signedTransaction": jws } }, "customerId": customer }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

/// The app's client key, made once per app so key rows stay out of the
/// "nothing changed" counts.
async fn client(app: &TestApp) -> Auth {
    use std::sync::Mutex;
    static KEYS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
    // By database, not address: a later app in the same test may be given
    // the port an earlier, dropped one had.
    let base = app.database_url.clone();
    if let Some((_, k)) = KEYS.lock().unwrap().iter().find(|(u, _)| *u == base) {
        return Auth::Key(k.clone());
    }
    let Auth::Key(k) = app.key(ApiKeyRole::Client).await else {
        unreachable!("client keys are keys")
    };
    KEYS.lock().unwrap().push((base, k.clone()));
    Auth::Key(k)
}

async fn customer(app: &TestApp, id: &str) -> Value {
    let admin = app.key(ApiKeyRole::Admin).await;
    let (_, body) = app.gql(&admin, CUSTOMER_Q, json!({ "id": id })).await;
    assert!(body["errors"].is_null(), "{body}");
    body["data"]["customer"].clone()
}

fn active(c: &Value) -> bool {
    c["entitlement"]["isActive"] == true
}

fn kinds(c: &Value) -> Vec<String> {
    let mut k: Vec<String> = c["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    k.reverse();
    k
}

async fn webhook(app: &TestApp, jws: &str) -> (StatusCode, Value) {
    app.apple_notification(jws).await
}

/// A subscription of `token`'s owner: its first transaction, signed at `t0`.
fn first_tx(sub: &Sub, t0: DateTime<Utc>) -> Value {
    sub.tx(&sub.original, t0, Some(t0 + Duration::days(30)), t0)
}

fn subscribed(sub: &Sub, uuid: &str, t0: DateTime<Utc>) -> String {
    let tx = first_tx(sub, t0);
    notification(
        "SUBSCRIBED",
        Some("INITIAL_BUY"),
        uuid,
        "Production",
        t0,
        Some(&tx),
        Some(&sub.renewal(true, false, None, t0)),
        Some(1),
    )
}

async fn receipts(app: &TestApp, customer: &str) -> Vec<entities::receipts::Model> {
    entities::receipts::Entity::find()
        .filter(entities::receipts::Column::CustomerId.eq(customer))
        .order_by_asc(entities::receipts::Column::Id)
        .all(&app.state.core.db().conn)
        .await
        .unwrap()
}

async fn purchase_id(app: &TestApp, store_purchase_id: &str) -> i64 {
    entities::purchases::Entity::find()
        .filter(entities::purchases::Column::StorePurchaseId.eq(store_purchase_id))
        .one(&app.state.core.db().conn)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no purchase {store_purchase_id}"))
        .id
}

/// Alice's transaction names her (appAccountToken); mallory submitting it
/// under `transfer` gets RECEIPT_ALREADY_IN_USE and nothing changes: alice
/// stays paid, no transferred event, no mallory. Each receipt holds what was
/// submitted, its outcome, its error and its purchase.
async fn binding_wins_over_transfer(b: Backend) {
    let app = app(b, TransferPolicy::Transfer).await;
    let t0 = app.state.core.now();
    let sub = Sub::new(
        "5100000001",
        MONTHLY,
        &account_token("alice").to_string(),
        t0,
    );
    let jws = sign(&first_tx(&sub, t0));
    let body = verify(&app, "alice", &jws).await;
    assert!(body["errors"].is_null(), "{body}");
    let alice = customer(&app, "alice").await;
    let before = app.counts().await;

    let body = verify(&app, "mallory", &jws).await;
    assert_eq!(error_code(&body), Some("RECEIPT_ALREADY_IN_USE"), "{body}");
    let after = app.counts().await;
    for ((t, b), (_, a)) in before.iter().zip(&after) {
        let expect = if *t == "receipts" { b + 1 } else { *b };
        assert_eq!(*a, expect, "{t}: {before:?} -> {after:?}");
    }
    assert!(active(&alice), "{alice}");
    let alice = customer(&app, "alice").await;
    assert!(active(&alice), "{alice}");
    assert_eq!(kinds(&alice), vec!["GRANTED"], "no transferred event");
    assert!(customer(&app, "mallory").await.is_null());

    // The audit trail: what each submission held and what became of it.
    let pid = purchase_id(&app, "5100000001").await;
    let a = receipts(&app, "alice").await;
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].store, "app_store");
    assert_eq!(a[0].payload, json!({ "signedTransaction": jws }));
    assert_eq!(
        (
            a[0].outcome.as_str(),
            a[0].error.as_deref(),
            a[0].purchase_id
        ),
        ("valid", None, Some(pid))
    );
    let m = receipts(&app, "mallory").await;
    assert_eq!(m.len(), 1);
    // mallory does not exist: a failed submission for a made-up id keeps
    // only the payload's size and digest.
    assert_eq!(
        m[0].payload,
        common::digest_of(&json!({ "signedTransaction": jws }))
    );
    assert_eq!(m[0].outcome, "invalid");
    assert_eq!(
        m[0].error.as_deref(),
        Some("this purchase belongs to another customer")
    );
    assert_eq!(m[0].purchase_id, None);
}

/// The notification comes before the app submits (the usual order), for a
/// non-UUID id: held, no customer made up; the submission then claims it
/// without RECEIPT_ALREADY_IN_USE (under `keep`) and without spurious
/// events (under `transfer`).
async fn notification_before_submission(b: Backend) {
    for policy in [TransferPolicy::Keep, TransferPolicy::Transfer] {
        let app = app(b.clone(), policy).await;
        let t0 = app.state.core.now();
        let sub = Sub::new("5200000001", MONTHLY, &account_token("bob").to_string(), t0);
        let (s, body) = webhook(
            &app,
            &subscribed(&sub, "e2000000-0000-4000-8000-000000000001", t0),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["outcome"], "held", "{policy:?}: {body}");
        assert_eq!(app.count("customers").await, 0, "no phantom customer");
        assert_eq!(app.count("purchases").await, 0);
        assert_eq!(app.count("entitlement_events").await, 0);
        assert_eq!(app.count("held_purchases").await, 1);

        let body = verify(&app, "bob", &sign(&first_tx(&sub, t0))).await;
        assert!(body["errors"].is_null(), "{policy:?}: {body}");
        let bob = customer(&app, "bob").await;
        assert!(active(&bob), "{bob}");
        assert_eq!(kinds(&bob), vec!["GRANTED"], "{policy:?}");
        assert_eq!(app.count("customers").await, 1);
        assert_eq!(app.count("held_purchases").await, 0);
        assert_eq!(
            receipts(&app, "bob").await[0].purchase_id,
            Some(purchase_id(&app, "5200000001").await)
        );

        // Later notifications find bob through his purchase.
        let t1 = t0 + Duration::days(30);
        let renewed = sub.tx("5200000002", t1, Some(t1 + Duration::days(30)), t1);
        let n = notification(
            "DID_RENEW",
            None,
            "e2000000-0000-4000-8000-000000000002",
            "Production",
            t1,
            Some(&renewed),
            Some(&sub.renewal(true, false, None, t1)),
            Some(1),
        );
        let (_, body) = webhook(&app, &n).await;
        assert_eq!(body["outcome"], "applied", "{body}");
        assert_eq!(app.count("customers").await, 1);
    }
}

/// An integer user id's token (`%08x-0000-0000-0000-000000000000`): a
/// customer known before resolves at once; one signed up after the
/// notification receives the held purchase when their device registers.
async fn integer_id_tokens(b: Backend) {
    let app = app(b, TransferPolicy::Keep).await;
    let t0 = app.state.core.now();
    let client = app.key(ApiKeyRole::Client).await;
    let register = |id: &'static str| {
        let app = &app;
        let client = &client;
        async move {
            let (_, body) = app
                .gql(
                    client,
                    "mutation($c: ID!, $d: String!) { registerDevice(input: {platform: IOS, deviceId: $d, customerId: $c}) { customer { paidStatus } } }",
                    json!({ "c": id, "d": format!("phone-{id}") }),
                )
                .await;
            assert!(body["errors"].is_null(), "{body}");
            body
        }
    };
    register("7").await;
    let known = Sub::new(
        "5300000007",
        MONTHLY,
        "00000007-0000-0000-0000-000000000000",
        t0,
    );
    let (_, body) = webhook(
        &app,
        &subscribed(&known, "e3000000-0000-4000-8000-000000000007", t0),
    )
    .await;
    assert_eq!(body["outcome"], "applied", "{body}");
    assert!(active(&customer(&app, "7").await));

    let later = Sub::new(
        "5300000042",
        MONTHLY,
        "0000002a-0000-0000-0000-000000000000",
        t0,
    );
    let (_, body) = webhook(
        &app,
        &subscribed(&later, "e3000000-0000-4000-8000-000000000042", t0),
    )
    .await;
    assert_eq!(body["outcome"], "held", "{body}");
    assert!(customer(&app, "42").await.is_null());
    let events = app.count("entitlement_events").await;
    // The user signs in on a new phone: customer 42 is created and claims it.
    let body = register("42").await;
    assert_eq!(
        body["data"]["registerDevice"]["customer"]["paidStatus"], "PAID",
        "{body}"
    );
    let c = customer(&app, "42").await;
    assert_eq!(c["purchases"][0]["storePurchaseId"], "5300000042", "{c}");
    assert_eq!(kinds(&c), vec!["GRANTED"]);
    assert_eq!(app.count("entitlement_events").await, events + 1);
    assert_eq!(app.count("held_purchases").await, 0);
}

/// A REFUND for a purchase nobody submitted yet still applies to it:
/// submitting the pre-refund transaction later does not give PAID.
async fn refund_before_submission(b: Backend) {
    let app = app(b, TransferPolicy::Transfer).await;
    let t0 = app.state.core.now();
    let sub = Sub::new(
        "5400000001",
        MONTHLY,
        &account_token("carol").to_string(),
        t0,
    );
    let (_, body) = webhook(
        &app,
        &subscribed(&sub, "e4000000-0000-4000-8000-000000000001", t0),
    )
    .await;
    assert_eq!(body["outcome"], "held", "{body}");
    app.clock.advance(Duration::days(2));
    let t1 = app.state.core.now();
    let mut refunded = first_tx(&sub, t0);
    refunded["revocationDate"] = json!(ms(t1));
    refunded["revocationReason"] = json!(0);
    refunded["signedDate"] = json!(ms(t1));
    let n = notification(
        "REFUND",
        None,
        "e4000000-0000-4000-8000-000000000002",
        "Production",
        t1,
        Some(&refunded),
        None,
        Some(5),
    );
    let (_, body) = webhook(&app, &n).await;
    assert_eq!(body["outcome"], "held", "{body}");
    assert_eq!(app.count("customers").await, 0);

    let body = verify(&app, "carol", &sign(&first_tx(&sub, t0))).await;
    assert!(body["errors"].is_null(), "{body}");
    assert_eq!(
        body["data"]["verifyPurchase"]["purchase"]["status"], "REFUNDED",
        "{body}"
    );
    let carol = customer(&app, "carol").await;
    assert!(!active(&carol), "{carol}");
    assert!(
        carol["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["newStatus"] != "ACTIVE"),
        "access never on: {carol}"
    );
    // And an old renewal of it arriving late changes nothing.
    let (_, body) = webhook(
        &app,
        &subscribed(&sub, "e4000000-0000-4000-8000-000000000003", t0),
    )
    .await;
    assert_eq!(body["outcome"], "stale", "{body}");
    assert!(!active(&customer(&app, "carol").await));
}

/// A malformed account token: the transaction is not a valid App Store
/// transaction; refused, nothing changed (but the audit row).
async fn malformed_account_token(b: Backend) {
    let app = app(b, TransferPolicy::Transfer).await;
    let t0 = app.state.core.now();
    let sub = Sub::new("5500000001", MONTHLY, "not-a-uuid", t0);
    client(&app).await;
    let before = app.counts().await;
    let body = verify(&app, "dave", &sign(&first_tx(&sub, t0))).await;
    assert_eq!(error_code(&body), Some("INVALID_RECEIPT"), "{body}");
    let after = app.counts().await;
    for ((t, b), (_, a)) in before.iter().zip(&after) {
        let expect = if *t == "receipts" { b + 1 } else { *b };
        assert_eq!(*a, expect, "{t}");
    }
    let r = receipts(&app, "dave").await;
    assert_eq!((r[0].outcome.as_str(), r[0].purchase_id), ("invalid", None));
    assert!(r[0].error.is_some());
    let before = app.counts().await;
    let (s, _) = webhook(
        &app,
        &subscribed(&sub, "e5000000-0000-4000-8000-000000000001", t0),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(app.counts().await, before);
}

/// Renewals: one per distinct transaction of the original transaction;
/// a notification repeating a transaction counts nothing.
async fn apple_renewal_count(b: Backend) {
    let app = app(b, TransferPolicy::Transfer).await;
    let t0 = app.state.core.now();
    let sub = Sub::new(
        "5600000001",
        MONTHLY,
        &account_token("erin").to_string(),
        t0,
    );
    let body = verify(&app, "erin", &sign(&first_tx(&sub, t0))).await;
    assert_eq!(
        body["data"]["verifyPurchase"]["purchase"]["renewalCount"],
        0
    );
    for (i, tid) in ["5600000002", "5600000003", "5600000003"]
        .iter()
        .enumerate()
    {
        let t = t0 + Duration::days(30 * (i as i64 + 1)) + Duration::seconds(i as i64);
        let tx = sub.tx(tid, t, Some(t + Duration::days(30)), t);
        let n = notification(
            "DID_RENEW",
            None,
            &format!("e6000000-0000-4000-8000-00000000000{i}"),
            "Production",
            t,
            Some(&tx),
            Some(&sub.renewal(true, false, None, t)),
            Some(1),
        );
        let (_, body) = webhook(&app, &n).await;
        assert_eq!(body["outcome"], "applied", "{body}");
    }
    let c = customer(&app, "erin").await;
    assert_eq!(c["purchases"][0]["renewalCount"], 2, "{c}");
}

on_all_backends!(
    binding_wins_over_transfer,
    notification_before_submission,
    integer_id_tokens,
    refund_before_submission,
    malformed_account_token,
    apple_renewal_count,
);
