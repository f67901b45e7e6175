//! App Store end to end: `verifyPurchase`, `POST /webhooks/apple`, the App
//! Store Server API re-read (faked in Apple's shapes), ordering, dedupe and
//! every bad input.

mod apple_support;
mod common;

use apple_support::*;
use chrono::{DateTime, Duration, Utc};
use common::{Auth, Backend, TestApp, error_code, spawn_with};
use entitle::{config::AppleEnvironment, domain::ApiKeyRole};
use reqwest::StatusCode;
use sea_orm::EntityTrait;
use serde_json::{Value, json};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{header_exists, method, path},
};

const CUSTOMER: &str = "6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11";
const OTHER: &str = "0b7f3e2a-9c1d-4e5f-8a6b-7c8d9e0f1a2b";

const VERIFY: &str = r#"mutation($input: VerifyPurchaseInput!, $customerId: ID) {
  verifyPurchase(input: $input, customerId: $customerId) {
    customer { id entitlements { key isActive expiresAt willRenew status periodType store productId gracePeriodExpiresAt } }
    purchase { productId status environment expiresAt autoRenew }
  }
}"#;

const CUSTOMER_Q: &str = r#"query($id: ID!) {
  customer(id: $id) {
    entitlements { key isActive expiresAt willRenew status periodType gracePeriodExpiresAt }
    purchases { storePurchaseId status environment expiresAt autoRenew revokedAt }
  }
}"#;

/// The app has signed up `CUSTOMER` (so their token is indexed) before any
/// purchase or notification.
async fn app(b: Backend, env: AppleEnvironment, api: Option<&str>) -> TestApp {
    let app = spawn_with(b, |c| configure(c, env, api)).await;
    app.sign_up(CUSTOMER).await;
    app
}

/// `app_store` may carry `customerId`; it is sent as the mutation's argument.
async fn verify(app: &TestApp, auth: &Auth, mut app_store: Value) -> (StatusCode, Value) {
    let customer = app_store
        .as_object_mut()
        .and_then(|o| o.remove("customerId"))
        .unwrap_or(Value::Null);
    app.gql(
        auth,
        VERIFY,
        json!({ "input": { "appStore": app_store }, "customerId": customer }),
    )
    .await
}

async fn customer(app: &TestApp, id: &str) -> Value {
    let admin = app.key(ApiKeyRole::Admin).await;
    let (s, body) = app.gql(&admin, CUSTOMER_Q, json!({ "id": id })).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body["errors"].is_null(), "{body}");
    body["data"]["customer"].clone()
}

fn ent<'a>(c: &'a Value, key: &str) -> &'a Value {
    c["entitlements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == key)
        .unwrap_or_else(|| panic!("no {key} in {c}"))
}

fn purchase<'a>(c: &'a Value, id: &str) -> &'a Value {
    c["purchases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["storePurchaseId"] == id)
        .unwrap_or_else(|| panic!("no purchase {id} in {c}"))
}

fn at(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap()
        .to_utc()
}

async fn post_webhook(app: &TestApp, jws: &str) -> (StatusCode, Value) {
    app.apple_notification(jws).await
}

/// Only the audit row of the submission may be new.
fn assert_nothing_granted(before: &[(&str, i64)], after: &[(&str, i64)]) {
    for ((t, b), (_, a)) in before.iter().zip(after) {
        if *t == "receipts" {
            assert!(*a <= b + 1, "receipts {b} -> {a}");
        } else {
            assert_eq!(a, b, "{t} changed: {before:?} -> {after:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// The issue's "done when": submit, then walk one subscription through its
// life by webhook, and refund a second purchase.

struct Story {
    sub: Sub,
    life: Sub,
    t0: DateTime<Utc>,
    submitted: String,
    /// (notification, clock offset in days from t0 at which to check).
    steps: Vec<(String, i64)>,
    refund: Vec<String>,
}

fn story(t0: DateTime<Utc>) -> Story {
    let d = |days: i64| t0 + Duration::days(days);
    let sub = Sub::new("1000000001", MONTHLY, CUSTOMER, t0);
    let life = Sub::new("2000000001", LIFETIME, CUSTOMER, t0);
    let submitted = sign(&sub.tx("1000000001", t0, Some(d(30)), t0 + Duration::minutes(1)));
    let tx2 = |signed| sub.tx("1000000002", d(30), Some(d(60)), signed);
    let tx3 = |signed| sub.tx("1000000003", d(80), Some(d(110)), signed);
    let n = |kind: &str,
             subtype: Option<&str>,
             uuid: &str,
             signed: DateTime<Utc>,
             tx: Value,
             renewal: Value,
             status: i64| {
        notification(
            kind,
            subtype,
            uuid,
            "Production",
            signed,
            Some(&tx),
            Some(&renewal),
            Some(status),
        )
    };
    let steps = vec![
        (
            n(
                "DID_RENEW",
                None,
                "a0000000-0000-4000-8000-000000000001",
                d(30),
                tx2(d(30)),
                sub.renewal(true, false, None, d(30)),
                1,
            ),
            31,
        ),
        (
            n(
                "DID_FAIL_TO_RENEW",
                Some("GRACE_PERIOD"),
                "a0000000-0000-4000-8000-000000000002",
                d(60),
                tx2(d(60)),
                sub.renewal(true, true, Some(d(76)), d(60)),
                4,
            ),
            61,
        ),
        (
            n(
                "GRACE_PERIOD_EXPIRED",
                None,
                "a0000000-0000-4000-8000-000000000003",
                d(76),
                tx2(d(76)),
                sub.renewal(true, true, Some(d(76)), d(76)),
                3,
            ),
            77,
        ),
        (
            n(
                "DID_RENEW",
                Some("BILLING_RECOVERY"),
                "a0000000-0000-4000-8000-000000000004",
                d(80),
                tx3(d(80)),
                sub.renewal(true, false, None, d(80)),
                1,
            ),
            81,
        ),
        (
            n(
                "DID_CHANGE_RENEWAL_STATUS",
                Some("AUTO_RENEW_DISABLED"),
                "a0000000-0000-4000-8000-000000000005",
                d(90),
                tx3(d(90)),
                sub.renewal(false, false, None, d(90)),
                1,
            ),
            91,
        ),
        (
            n(
                "EXPIRED",
                Some("VOLUNTARY"),
                "a0000000-0000-4000-8000-000000000006",
                d(110) + Duration::seconds(1),
                tx3(d(110) + Duration::seconds(1)),
                sub.renewal(false, false, None, d(110) + Duration::seconds(1)),
                2,
            ),
            111,
        ),
    ];
    let bought = t0 + Duration::minutes(2);
    let mut refunded = life.tx("2000000001", bought, None, d(5));
    refunded["revocationDate"] = json!(ms(d(5)));
    refunded["revocationReason"] = json!(0);
    let refund = vec![
        notification(
            "ONE_TIME_CHARGE",
            None,
            "b0000000-0000-4000-8000-000000000001",
            "Production",
            bought,
            Some(&life.tx("2000000001", bought, None, bought)),
            None,
            None,
        ),
        notification(
            "REFUND",
            None,
            "b0000000-0000-4000-8000-000000000002",
            "Production",
            d(5),
            Some(&refunded),
            None,
            None,
        ),
    ];
    Story {
        sub,
        life,
        t0,
        submitted,
        steps,
        refund,
    }
}

async fn submit(app: &TestApp, s: &Story) {
    let key = app.key(ApiKeyRole::Client).await;
    let (status, body) = verify(
        app,
        &key,
        json!({ "signedTransaction": s.submitted, "customerId": CUSTOMER }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["errors"].is_null(), "{body}");
    let v = &body["data"]["verifyPurchase"];
    assert_eq!(v["customer"]["id"], CUSTOMER);
    let pro = ent(&v["customer"], "pro");
    assert_eq!(pro["isActive"], true, "{v}");
    assert_eq!(pro["store"], "APP_STORE");
    assert_eq!(pro["productId"], MONTHLY);
    assert_eq!(
        at(&pro["expiresAt"]).timestamp(),
        (s.t0 + Duration::days(30)).timestamp()
    );
    assert_eq!(v["purchase"]["productId"], MONTHLY);
    assert_eq!(v["purchase"]["environment"], "PRODUCTION");
    // The store id is admin-only; the client key's answer has none.
    let c = customer(app, CUSTOMER).await;
    assert_eq!(purchase(&c, "1000000001")["status"], "ACTIVE", "{c}");
    assert_eq!(ent(&v["customer"], "maps")["isActive"], false);
}

async fn check_final(app: &TestApp, s: &Story) {
    let c = customer(app, CUSTOMER).await;
    let pro = ent(&c, "pro");
    assert_eq!(pro["isActive"], false, "{c}");
    assert_eq!(ent(&c, "maps")["isActive"], false, "{c}");
    let p1 = purchase(&c, &s.sub.original);
    assert_eq!(p1["status"], "EXPIRED", "{c}");
    assert_eq!(p1["autoRenew"], false);
    assert_eq!(
        at(&p1["expiresAt"]).timestamp(),
        (s.t0 + Duration::days(110)).timestamp()
    );
    let p2 = purchase(&c, &s.life.original);
    assert_eq!(p2["status"], "REFUNDED", "{c}");
    assert!(!p2["revokedAt"].is_null());
    assert_eq!(app.count("purchases").await, 2);
    assert_eq!(app.count("webhook_events").await, 8);
}

async fn done_when_in_order(b: Backend) {
    let app = app(b, AppleEnvironment::Production, None).await;
    let s = story(app.state.core.now());
    submit(&app, &s).await;
    let mut now_days = 0;
    for (i, (jws, day)) in s.steps.iter().enumerate() {
        app.clock.advance(Duration::days(day - now_days));
        now_days = *day;
        let (status, body) = post_webhook(&app, jws).await;
        assert_eq!(status, StatusCode::OK, "step {i}: {body}");
        assert_eq!(body["outcome"], "applied", "step {i}: {body}");
        let c = customer(&app, CUSTOMER).await;
        let pro = ent(&c, "pro").clone();
        let d = |n: i64| (s.t0 + Duration::days(n)).timestamp();
        match i {
            0 => {
                assert_eq!(pro["isActive"], true, "{c}");
                assert_eq!(pro["status"], "ACTIVE");
                assert_eq!(at(&pro["expiresAt"]).timestamp(), d(60));
                assert_eq!(pro["willRenew"], true);
            }
            1 => {
                assert_eq!(pro["isActive"], true, "grace period grants: {c}");
                assert_eq!(pro["status"], "IN_GRACE_PERIOD");
                assert_eq!(at(&pro["gracePeriodExpiresAt"]).timestamp(), d(76));
            }
            2 => {
                assert_eq!(pro["isActive"], false, "{c}");
                assert_eq!(purchase(&c, "1000000001")["status"], "IN_BILLING_RETRY");
            }
            3 => {
                assert_eq!(pro["isActive"], true, "recovered: {c}");
                assert_eq!(pro["status"], "ACTIVE");
                assert_eq!(at(&pro["expiresAt"]).timestamp(), d(110));
            }
            4 => {
                assert_eq!(pro["isActive"], true, "paid period runs out: {c}");
                assert_eq!(pro["willRenew"], false);
                assert_eq!(pro["status"], "CANCELED");
            }
            5 => {
                assert_eq!(pro["isActive"], false, "{c}");
                assert_eq!(purchase(&c, "1000000001")["status"], "EXPIRED");
            }
            _ => unreachable!(),
        }
        // The same notification again changes nothing.
        let events = app.count("entitlement_events").await;
        let (status, body) = post_webhook(&app, jws).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["outcome"], "duplicate");
        assert_eq!(app.count("entitlement_events").await, events);
    }
    for jws in &s.refund {
        let (status, body) = post_webhook(&app, jws).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    check_final(&app, &s).await;
}

/// A small deterministic shuffle, so a failing order can be replayed.
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let j = ((seed >> 33) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

async fn done_when_shuffled_twice(b: Backend) {
    for seed in [1u64, 7, 42, 1234] {
        let app = app(b.clone(), AppleEnvironment::Production, None).await;
        let s = story(app.state.core.now());
        submit(&app, &s).await;
        app.clock.advance(Duration::days(111));
        let mut all: Vec<&String> = s
            .steps
            .iter()
            .map(|(j, _)| j)
            .chain(s.refund.iter())
            .collect();
        let twice: Vec<&String> = all.clone();
        all.extend(twice);
        shuffle(&mut all, seed);
        for jws in all {
            let (status, body) = post_webhook(&app, jws).await;
            assert_eq!(status, StatusCode::OK, "seed {seed}: {body}");
        }
        check_final(&app, &s).await;
    }
}

async fn refund_is_not_undone_by_a_late_renewal(b: Backend) {
    let app = app(b, AppleEnvironment::Production, None).await;
    let t0 = app.state.core.now();
    let sub = Sub::new("3000000001", MONTHLY, CUSTOMER, t0);
    let mut refunded = sub.tx(
        "3000000001",
        t0,
        Some(t0 + Duration::days(30)),
        t0 + Duration::days(2),
    );
    refunded["revocationDate"] = json!(ms(t0 + Duration::days(2)));
    let refund = notification(
        "REFUND",
        None,
        "c0000000-0000-4000-8000-000000000001",
        "Production",
        t0 + Duration::days(2),
        Some(&refunded),
        None,
        None,
    );
    let late = notification(
        "DID_RENEW",
        None,
        "c0000000-0000-4000-8000-000000000002",
        "Production",
        t0 + Duration::days(1),
        Some(&sub.tx(
            "3000000002",
            t0,
            Some(t0 + Duration::days(30)),
            t0 + Duration::days(1),
        )),
        Some(&sub.renewal(true, false, None, t0 + Duration::days(1))),
        Some(1),
    );
    assert_eq!(post_webhook(&app, &refund).await.0, StatusCode::OK);
    let (s, body) = post_webhook(&app, &late).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["outcome"], "stale");
    app.clock.advance(Duration::days(3));
    let c = customer(&app, CUSTOMER).await;
    assert_eq!(ent(&c, "pro")["isActive"], false, "{c}");
    assert_eq!(purchase(&c, "3000000001")["status"], "REFUNDED");

    // Apple reversing its refund later does restore access.
    let reversed = notification(
        "REFUND_REVERSED",
        None,
        "c0000000-0000-4000-8000-000000000003",
        "Production",
        t0 + Duration::days(3),
        Some(&sub.tx(
            "3000000001",
            t0,
            Some(t0 + Duration::days(30)),
            t0 + Duration::days(3),
        )),
        Some(&sub.renewal(true, false, None, t0 + Duration::days(3))),
        Some(1),
    );
    let (s, body) = post_webhook(&app, &reversed).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["outcome"], "applied", "{body}");
    let c = customer(&app, CUSTOMER).await;
    assert_eq!(ent(&c, "pro")["isActive"], true, "{c}");
}

async fn unowned_notification_is_recorded(b: Backend) {
    let app = app(b, AppleEnvironment::Production, None).await;
    let t0 = app.state.core.now();
    let sub = Sub::new("3100000001", MONTHLY, CUSTOMER, t0);
    let mut tx = sub.tx("3100000001", t0, Some(t0 + Duration::days(30)), t0);
    tx.as_object_mut().unwrap().remove("appAccountToken");
    let jws = notification(
        "SUBSCRIBED",
        Some("INITIAL_BUY"),
        "c1000000-0000-4000-8000-000000000001",
        "Production",
        t0,
        Some(&tx),
        None,
        Some(1),
    );
    let (s, body) = post_webhook(&app, &jws).await;
    assert_eq!(s, StatusCode::OK);
    // Nobody to give it to yet: held, no customer made up for it.
    assert_eq!(body["outcome"], "held", "{body}");
    assert_eq!(app.count("purchases").await, 0);
    assert_eq!(app.count("held_purchases").await, 1);
    assert_eq!(app.count("webhook_events").await, 1);
    let row = entities::webhook_events::Entity::find()
        .one(&app.state.core.db().conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.source, "app_store");
    assert_eq!(row.event_id, "c1000000-0000-4000-8000-000000000001");
    assert_eq!(row.outcome, "held");
    // The app submits it afterwards: it is theirs.
    let key = app.key(ApiKeyRole::Client).await;
    let (_, body) = verify(
        &app,
        &key,
        json!({ "signedTransaction": sign(&tx), "customerId": "alice" }),
    )
    .await;
    assert!(body["errors"].is_null(), "{body}");
    assert_eq!(
        ent(&body["data"]["verifyPurchase"]["customer"], "pro")["isActive"],
        true
    );
    assert_eq!(app.count("held_purchases").await, 0);
    assert_eq!(app.count("purchases").await, 1);
    // A service key may read but not submit.
    let service = app.key(ApiKeyRole::Service).await;
    let (_, body) = verify(
        &app,
        &service,
        json!({ "signedTransaction": sign(&tx), "customerId": "alice" }),
    )
    .await;
    assert_eq!(error_code(&body), Some("FORBIDDEN"), "{body}");
}

// ---------------------------------------------------------------------------
// Every notification type, in the shapes of Apple's models.

async fn every_notification_type_is_acknowledged(b: Backend) {
    let app = app(b, AppleEnvironment::Sandbox, None).await;
    let t0 = app.state.core.now();
    let mut sub = Sub::new("4000000001", MONTHLY, CUSTOMER, t0);
    sub.env = "Sandbox";
    let tx = sub.tx("4000000001", t0, Some(t0 + Duration::days(30)), t0);
    let renewal = sub.renewal(true, false, None, t0);
    let kinds: &[(&str, Option<&str>, bool)] = &[
        ("SUBSCRIBED", Some("INITIAL_BUY"), true),
        ("DID_RENEW", None, true),
        (
            "DID_CHANGE_RENEWAL_STATUS",
            Some("AUTO_RENEW_ENABLED"),
            true,
        ),
        ("DID_CHANGE_RENEWAL_PREF", Some("UPGRADE"), true),
        ("OFFER_REDEEMED", Some("INITIAL_BUY"), true),
        ("DID_FAIL_TO_RENEW", None, true),
        ("DID_FAIL_TO_RENEW", Some("GRACE_PERIOD"), true),
        ("GRACE_PERIOD_EXPIRED", None, true),
        ("EXPIRED", Some("VOLUNTARY"), true),
        ("REFUND", None, true),
        ("REFUND_REVERSED", None, true),
        ("REVOKE", None, true),
        ("RENEWAL_EXTENDED", None, true),
        ("ONE_TIME_CHARGE", None, true),
        ("PRICE_INCREASE", Some("PENDING"), false),
        ("REFUND_DECLINED", None, false),
        ("CONSUMPTION_REQUEST", None, false),
        ("RENEWAL_EXTENSION", Some("SUMMARY"), false),
        ("METADATA_UPDATE", None, false),
        ("SOME_FUTURE_TYPE", None, false),
    ];
    for (i, (kind, subtype, handled)) in kinds.iter().enumerate() {
        let signed = t0 + Duration::seconds(i as i64 + 1);
        let mut t = tx.clone();
        t["signedDate"] = json!(ms(signed));
        let jws = notification(
            kind,
            *subtype,
            &format!("d0000000-0000-4000-8000-{i:012}"),
            "Sandbox",
            signed,
            Some(&t),
            Some(&renewal),
            Some(1),
        );
        let (s, body) = post_webhook(&app, &jws).await;
        assert_eq!(s, StatusCode::OK, "{kind}: {body}");
        let expected = if *handled { "applied" } else { "ignored" };
        assert_eq!(body["outcome"], expected, "{kind}: {body}");
    }
    // Apple's model payloads without transaction data: recorded, acknowledged.
    let signed = t0 + Duration::minutes(5);
    for (file, kind) in [
        ("signedSummaryNotification.json", "summary"),
        ("signedConsumptionRequestNotification.json", "data"),
        ("signedRescindConsentNotification.json", "appData"),
        (
            "signedExternalPurchaseTokenNotification.json",
            "externalPurchaseToken",
        ),
        ("signedNotification.json", "data"),
    ] {
        let mut n: Value = serde_json::from_str(&read(vector(&format!("models/{file}")))).unwrap();
        n["signedDate"] = json!(ms(signed));
        n["notificationUUID"] = json!(format!("e0000000-0000-4000-8000-{:012}", file.len()));
        let part = &mut n[kind];
        part["bundleId"] = json!(BUNDLE);
        part["appAppleId"] = json!(APP_APPLE_ID);
        if kind == "externalPurchaseToken" {
            part["externalPurchaseId"] = json!("SANDBOX_b2158121-7af9-49d4-9561-1f588205523e");
        } else {
            part["environment"] = json!("Sandbox");
        }
        if kind == "data" {
            // Placeholders in the model; drop them (a real notification carries JWS here).
            part.as_object_mut()
                .unwrap()
                .remove("signedTransactionInfo");
            part.as_object_mut().unwrap().remove("signedRenewalInfo");
        }
        let (s, body) = post_webhook(&app, &sign(&n)).await;
        assert_eq!(s, StatusCode::OK, "{file}: {body}");
        assert_eq!(body["outcome"], "ignored", "{file}: {body}");
    }
    let (s, body) = post_webhook(&app, &read(vector("mock_signed_data/testNotification"))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "ignored");
}

// ---------------------------------------------------------------------------
// The App Store Server API, faked in Apple's shapes.

fn statuses(sub: &Sub, status: i64, tx: &Value, renewal: &Value) -> Value {
    json!({
        "environment": sub.env,
        "bundleId": BUNDLE,
        "appAppleId": APP_APPLE_ID,
        "data": [{
            "subscriptionGroupIdentifier": "21000000",
            "lastTransactions": [{
                "status": status,
                "originalTransactionId": sub.original,
                "signedTransactionInfo": sign(tx),
                "signedRenewalInfo": sign(renewal),
            }]
        }]
    })
}

async fn mount_api(
    server: &MockServer,
    tid: &str,
    sub: &Sub,
    status: i64,
    tx: &Value,
    renewal: &Value,
) {
    Mock::given(method("GET"))
        .and(path(format!("/inApps/v1/transactions/{tid}")))
        .and(header_exists("authorization"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({ "signedTransactionInfo": sign(tx) })),
        )
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/inApps/v1/subscriptions/{tid}")))
        .and(header_exists("authorization"))
        .respond_with(ResponseTemplate::new(200).set_body_json(statuses(sub, status, tx, renewal)))
        .mount(server)
        .await;
}

async fn transaction_id_is_resolved_through_the_api(b: Backend) {
    let server = MockServer::start().await;
    let app = app(b, AppleEnvironment::Production, Some(&server.uri())).await;
    let t0 = app.state.core.now();
    let sub = Sub::new("5000000001", MONTHLY, CUSTOMER, t0);
    let tx = sub.tx("5000000007", t0, Some(t0 + Duration::days(30)), t0);
    mount_api(
        &server,
        "5000000007",
        &sub,
        1,
        &tx,
        &sub.renewal(true, false, None, t0),
    )
    .await;
    let key = app.key(ApiKeyRole::Client).await;
    let (s, body) = verify(
        &app,
        &key,
        json!({ "transactionId": "5000000007", "customerId": CUSTOMER }),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(body["errors"].is_null(), "{body}");
    let c = &body["data"]["verifyPurchase"]["customer"];
    assert_eq!(ent(c, "pro")["isActive"], true, "{body}");

    // The bearer token Apple expects.
    let reqs = server.received_requests().await.unwrap();
    let n_before = reqs.len();
    let auth = reqs[0]
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap();
    let token = auth.strip_prefix("Bearer ").unwrap();
    let key =
        jsonwebtoken::DecodingKey::from_ec_pem(read(fixture("testSigningKey.pub.pem")).as_bytes())
            .unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["appstoreconnect-v1"]);
    v.set_issuer(&["57246542-96fe-1a63-e053-0824d011072a"]);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    let data = jsonwebtoken::decode::<Value>(token, &key, &v).unwrap();
    assert_eq!(data.header.kid.as_deref(), Some("ABCDEFGHIJ"));
    assert_eq!(data.claims["bid"], BUNDLE);
    assert_eq!(
        data.claims["exp"].as_i64().unwrap() - data.claims["iat"].as_i64().unwrap(),
        300
    );

    // An id Apple does not know (404 in production, then in sandbox).
    let client = app.key(ApiKeyRole::Client).await;
    let before = app.counts().await;
    let (_, body) = verify(
        &app,
        &client,
        json!({ "transactionId": "5999999999", "customerId": OTHER }),
    )
    .await;
    assert_eq!(error_code(&body), Some("INVALID_RECEIPT"), "{body}");
    assert_nothing_granted(&before, &app.counts().await);
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        n_before + 2
    );
    // An id that is not one never reaches Apple.
    let before = app.counts().await;
    let (_, body) = verify(
        &app,
        &client,
        json!({ "transactionId": "../../v1/x", "customerId": OTHER }),
    )
    .await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
    assert_nothing_granted(&before, &app.counts().await);
}

async fn legacy_receipt_is_resolved_through_the_api(b: Backend) {
    let server = MockServer::start().await;
    let app = app(b, AppleEnvironment::Production, Some(&server.uri())).await;
    let t0 = app.state.core.now();
    let life = Sub::new("0", LIFETIME, CUSTOMER, t0);
    let tx = life.tx("0", t0, None, t0);
    Mock::given(method("GET"))
        .and(path("/inApps/v1/transactions/0"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({ "signedTransactionInfo": sign(&tx) })),
        )
        .mount(&server)
        .await;
    let key = app.key(ApiKeyRole::Client).await;
    let receipt = read(vector("xcode/xcode-app-receipt-with-transaction"));
    let (s, body) = verify(
        &app,
        &key,
        json!({ "appReceipt": receipt, "customerId": CUSTOMER }),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(body["errors"].is_null(), "{body}");
    let c = &body["data"]["verifyPurchase"]["customer"];
    assert_eq!(ent(c, "maps")["isActive"], true, "{body}");
    assert!(ent(c, "maps")["expiresAt"].is_null(), "lifetime: {body}");

    // A receipt without in-app purchases grants nothing.
    let before = app.counts().await;
    let empty = read(vector("xcode/xcode-app-receipt-empty"));
    let (s, body) = verify(
        &app,
        &key,
        json!({ "appReceipt": empty, "customerId": OTHER }),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(error_code(&body), Some("INVALID_RECEIPT"), "{body}");
    assert_nothing_granted(&before, &app.counts().await);
}

async fn webhook_rereads_the_truth(b: Backend) {
    let server = MockServer::start().await;
    let app = app(b, AppleEnvironment::Production, Some(&server.uri())).await;
    let t0 = app.state.core.now();
    let sub = Sub::new("6000000001", MONTHLY, CUSTOMER, t0);
    // The notification claims a renewal; Apple's API says the customer has
    // since turned auto-renew off.
    let tx = sub.tx(
        "6000000002",
        t0,
        Some(t0 + Duration::days(30)),
        t0 + Duration::minutes(5),
    );
    mount_api(
        &server,
        "6000000002",
        &sub,
        1,
        &tx,
        &sub.renewal(false, false, None, t0 + Duration::minutes(5)),
    )
    .await;
    let jws = notification(
        "DID_RENEW",
        None,
        "f0000000-0000-4000-8000-000000000001",
        "Production",
        t0,
        Some(&sub.tx("6000000002", t0, Some(t0 + Duration::days(30)), t0)),
        Some(&sub.renewal(true, false, None, t0)),
        Some(1),
    );
    let (s, body) = post_webhook(&app, &jws).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let c = customer(&app, CUSTOMER).await;
    assert_eq!(ent(&c, "pro")["isActive"], true);
    assert_eq!(ent(&c, "pro")["willRenew"], false, "{c}");
    assert_eq!(ent(&c, "pro")["status"], "CANCELED");
}

async fn apple_down_is_store_unavailable(b: Backend) {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let app = app(b, AppleEnvironment::Production, Some(&server.uri())).await;
    let key = app.key(ApiKeyRole::Client).await;
    let before = app.counts().await;
    let (s, body) = verify(
        &app,
        &key,
        json!({ "transactionId": "5000000007", "customerId": CUSTOMER }),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(error_code(&body), Some("STORE_UNAVAILABLE"), "{body}");
    assert_eq!(body["errors"][0]["extensions"]["retryable"], true);
    assert_nothing_granted(&before, &app.counts().await);
    // Retried before giving up.
    assert_eq!(server.received_requests().await.unwrap().len(), 3);

    // A webhook that cannot re-read answers 5xx so Apple retries, and
    // applies nothing: the verified notification is kept as `failed`.
    let t0 = app.state.core.now();
    let sub = Sub::new("5000000001", MONTHLY, CUSTOMER, t0);
    let jws = notification(
        "DID_RENEW",
        None,
        "f0000000-0000-4000-8000-000000000002",
        "Production",
        t0,
        Some(&sub.tx("5000000007", t0, Some(t0 + Duration::days(30)), t0)),
        Some(&sub.renewal(true, false, None, t0)),
        Some(1),
    );
    let before = app.counts().await;
    let (s, body) = post_webhook(&app, &jws).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "STORE_UNAVAILABLE");
    let after = app.counts().await;
    for ((t, n0), (_, n1)) in before.iter().zip(&after) {
        let grew = i64::from(*t == "webhook_events");
        assert_eq!(*n1, n0 + grew, "{t}");
    }
    let row = entities::webhook_events::Entity::find()
        .one(&app.state.core.db().conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.event_id, "f0000000-0000-4000-8000-000000000002");
    assert_eq!(row.outcome, "failed");
    assert!(
        row.error.as_deref().unwrap().contains("unavailable"),
        "{row:?}"
    );
    // Apple's redelivery is processed, not taken for a duplicate.
    let (s, _) = post_webhook(&app, &jws).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.counts().await, after);
}

async fn a_5xx_is_retried(b: Backend) {
    let server = MockServer::start().await;
    // One failure first, then the real answer.
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    let app = app(b, AppleEnvironment::Production, Some(&server.uri())).await;
    let t0 = app.state.core.now();
    let sub = Sub::new("5100000001", MONTHLY, CUSTOMER, t0);
    let tx = sub.tx("5100000001", t0, Some(t0 + Duration::days(30)), t0);
    mount_api(
        &server,
        "5100000001",
        &sub,
        1,
        &tx,
        &sub.renewal(true, false, None, t0),
    )
    .await;
    let key = app.key(ApiKeyRole::Client).await;
    let (_, body) = verify(
        &app,
        &key,
        json!({ "transactionId": "5100000001", "customerId": CUSTOMER }),
    )
    .await;
    assert!(body["errors"].is_null(), "{body}");
    assert_eq!(
        ent(&body["data"]["verifyPurchase"]["customer"], "pro")["isActive"],
        true
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
}

async fn concurrent_duplicates_apply_once(b: Backend) {
    let app = app(b, AppleEnvironment::Production, None).await;
    let t0 = app.state.core.now();
    let sub = Sub::new("5200000001", MONTHLY, CUSTOMER, t0);
    let jws = notification(
        "SUBSCRIBED",
        Some("INITIAL_BUY"),
        "c2000000-0000-4000-8000-000000000001",
        "Production",
        t0,
        Some(&sub.tx("5200000001", t0, Some(t0 + Duration::days(30)), t0)),
        Some(&sub.renewal(true, false, None, t0)),
        Some(1),
    );
    let posts = (0..6).map(|_| post_webhook(&app, &jws));
    let results = futures_util::future::join_all(posts).await;
    let mut applied = 0;
    for (s, body) in results {
        assert_eq!(s, StatusCode::OK, "{body}");
        if body["outcome"] == "applied" {
            applied += 1;
        } else {
            assert_eq!(body["outcome"], "duplicate", "{body}");
        }
    }
    assert_eq!(applied, 1);
    assert_eq!(app.count("webhook_events").await, 1);
    assert_eq!(app.count("purchases").await, 1);
    let c = customer(&app, CUSTOMER).await;
    assert_eq!(ent(&c, "pro")["isActive"], true);
}

// ---------------------------------------------------------------------------
// Bad input: each answered with its code, and nothing granted.

async fn bad_submissions_grant_nothing(b: Backend) {
    let app = spawn_with(b, |c| {
        configure(c, AppleEnvironment::Production, None);
        c.accept_sandbox = false;
        c.transfer_policy = entitle::domain::TransferPolicy::Keep;
    })
    .await;
    let key = app.key(ApiKeyRole::Client).await;
    let t0 = app.state.core.now();
    let sub = Sub::new("8000000001", MONTHLY, CUSTOMER, t0);
    let good = sub.tx("8000000001", t0, Some(t0 + Duration::days(30)), t0);
    let forged_key =
        jsonwebtoken::EncodingKey::from_ec_pem(read(fixture("forgedLeaf.pk8.pem")).as_bytes())
            .unwrap();
    let forged = jws_with(
        json!({ "alg": "ES256", "x5c": [
            x5c_entry(fixture("forgedLeaf.pem")),
            x5c_entry(fixture("forgedIntermediate.pem")),
            x5c_entry(fixture("forgedCA.pem")),
        ]}),
        &good,
        &forged_key,
    );
    let chain_of =
        |c: Vec<String>| jws_with(json!({ "alg": "ES256", "x5c": c }), &good, &test_key());
    let full = test_chain();
    let mut four = full.clone();
    four.push(full[2].clone());
    let mut foreign = good.clone();
    foreign["bundleId"] = json!("com.other.app");
    let mut sandbox = good.clone();
    sandbox["environment"] = json!("Sandbox");
    let signed = sign(&good);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "self-signed chain with Apple's OIDs",
            forged,
            "INVALID_RECEIPT",
        ),
        (
            "leaf without OID",
            chain_of(vec![
                x5c_entry(vector("certs/testInvalidOIDLeaf.pem")),
                full[1].clone(),
                full[2].clone(),
            ]),
            "INVALID_RECEIPT",
        ),
        (
            "intermediate without OID",
            chain_of(vec![
                x5c_entry(vector("certs/testInvalidIntermediateLeaf.pem")),
                x5c_entry(vector("certs/testInvalidOIDIntermediate.pem")),
                full[2].clone(),
            ]),
            "INVALID_RECEIPT",
        ),
        (
            "chain of two",
            chain_of(full[..2].to_vec()),
            "INVALID_RECEIPT",
        ),
        ("chain of four", chain_of(four), "INVALID_RECEIPT"),
        ("foreign bundle", sign(&foreign), "INVALID_RECEIPT"),
        ("sandbox at production", sign(&sandbox), "INVALID_RECEIPT"),
        (
            "alg ES384",
            jws_with(json!({ "alg": "ES384", "x5c": full }), &good, &test_key()),
            "INVALID_RECEIPT",
        ),
        (
            "alg HS256",
            jws_with(json!({ "alg": "HS256", "x5c": full }), &good, &test_key()),
            "INVALID_RECEIPT",
        ),
        (
            "truncated",
            signed[..signed.len() - 20].to_string(),
            "INVALID_RECEIPT",
        ),
        ("not a JWS", "hello".to_string(), "INVALID_RECEIPT"),
    ];
    for (what, jws, code) in cases {
        let before = app.counts().await;
        let (s, body) = verify(
            &app,
            &key,
            json!({ "signedTransaction": jws, "customerId": CUSTOMER }),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{what}");
        assert_eq!(error_code(&body), Some(code), "{what}: {body}");
        assert_nothing_granted(&before, &app.counts().await);
    }

    // The token names another customer; under `keep` that is refused.
    let before = app.counts().await;
    let (s, body) = verify(
        &app,
        &key,
        json!({ "signedTransaction": signed, "customerId": OTHER }),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(error_code(&body), Some("RECEIPT_ALREADY_IN_USE"), "{body}");
    assert_nothing_granted(&before, &app.counts().await);

    // More than one, or none, of the three ways.
    let before = app.counts().await;
    let (_, body) = verify(
        &app,
        &key,
        json!({ "signedTransaction": signed, "transactionId": "1", "customerId": CUSTOMER }),
    )
    .await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
    let (_, body) = verify(&app, &key, json!({ "customerId": CUSTOMER })).await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
    // transactionId without the API configured.
    let (_, body) = verify(
        &app,
        &key,
        json!({ "transactionId": "1", "customerId": CUSTOMER }),
    )
    .await;
    assert_eq!(error_code(&body), Some("NOT_CONFIGURED"), "{body}");
    // No credentials at all.
    let (_, body) = verify(
        &app,
        &Auth::None,
        json!({ "signedTransaction": signed, "customerId": CUSTOMER }),
    )
    .await;
    assert_eq!(error_code(&body), Some("UNAUTHENTICATED"), "{body}");
    let after = app.counts().await;
    for ((t, b), (_, a)) in before.iter().zip(&after) {
        if *t != "receipts" {
            assert_eq!(a, b, "{t}");
        }
    }

    // The rightful customer still can.
    let (_, body) = verify(
        &app,
        &key,
        json!({ "signedTransaction": signed, "customerId": CUSTOMER }),
    )
    .await;
    assert!(body["errors"].is_null(), "{body}");
}

/// A purchase the store binds to no one (no appAccountToken: a restore on
/// a new install) moves under `transfer`.
async fn transfer_policy_moves_a_purchase(b: Backend) {
    let app = app(b, AppleEnvironment::Production, None).await;
    let key = app.key(ApiKeyRole::Client).await;
    let t0 = app.state.core.now();
    let sub = Sub::new("8100000001", MONTHLY, CUSTOMER, t0);
    let mut tx = sub.tx("8100000001", t0, Some(t0 + Duration::days(30)), t0);
    tx.as_object_mut().unwrap().remove("appAccountToken");
    let signed = sign(&tx);
    let (_, body) = verify(
        &app,
        &key,
        json!({ "signedTransaction": signed, "customerId": CUSTOMER }),
    )
    .await;
    assert!(body["errors"].is_null(), "{body}");
    let (_, body) = verify(
        &app,
        &key,
        json!({ "signedTransaction": signed, "customerId": OTHER }),
    )
    .await;
    assert!(body["errors"].is_null(), "{body}");
    assert_eq!(
        ent(&body["data"]["verifyPurchase"]["customer"], "pro")["isActive"],
        true
    );
    assert_eq!(
        ent(&customer(&app, CUSTOMER).await, "pro")["isActive"],
        false
    );
}

async fn sandbox_beside_production_keeps_its_environment(b: Backend) {
    let app = spawn_with(b, |c| {
        configure(c, AppleEnvironment::Production, None);
        c.accept_sandbox = true;
    })
    .await;
    let key = app.key(ApiKeyRole::Client).await;
    let t0 = app.state.core.now();
    let mut sub = Sub::new("8200000001", MONTHLY, CUSTOMER, t0);
    sub.env = "Sandbox";
    let signed = sign(&sub.tx("8200000001", t0, Some(t0 + Duration::days(30)), t0));
    let (_, body) = verify(
        &app,
        &key,
        json!({ "signedTransaction": signed, "customerId": CUSTOMER }),
    )
    .await;
    assert!(body["errors"].is_null(), "{body}");
    assert_eq!(
        body["data"]["verifyPurchase"]["purchase"]["environment"],
        "SANDBOX"
    );
    assert_eq!(
        ent(&body["data"]["verifyPurchase"]["customer"], "pro")["isActive"],
        true
    );
}

async fn bad_webhooks_change_nothing(b: Backend) {
    let app = spawn_with(b, |c| {
        configure(c, AppleEnvironment::Production, None);
        c.accept_sandbox = false;
    })
    .await;
    app.sign_up(CUSTOMER).await;
    let t0 = app.state.core.now();
    let sub = Sub::new("9000000001", MONTHLY, CUSTOMER, t0);
    let tx = sub.tx("9000000001", t0, Some(t0 + Duration::days(30)), t0);
    let n = json!({
        "notificationType": "SUBSCRIBED",
        "notificationUUID": "90000000-0000-4000-8000-000000000001",
        "data": { "appAppleId": APP_APPLE_ID, "bundleId": BUNDLE, "environment": "Production",
                  "signedTransactionInfo": sign(&tx) },
        "version": "2.0",
        "signedDate": ms(t0),
    });
    let forged_key =
        jsonwebtoken::EncodingKey::from_ec_pem(read(fixture("forgedLeaf.pk8.pem")).as_bytes())
            .unwrap();
    let forged = jws_with(
        json!({ "alg": "ES256", "x5c": [
            x5c_entry(fixture("forgedLeaf.pem")),
            x5c_entry(fixture("forgedIntermediate.pem")),
            x5c_entry(fixture("forgedCA.pem")),
        ]}),
        &n,
        &forged_key,
    );
    let mut foreign = n.clone();
    foreign["data"]["bundleId"] = json!("com.other.app");
    let mut sandbox = n.clone();
    sandbox["data"]["environment"] = json!("Sandbox");
    let mut wrong_app = n.clone();
    wrong_app["data"]["appAppleId"] = json!(999);
    // A valid envelope around a forged transaction.
    let mut inner_forged = n.clone();
    inner_forged["data"]["signedTransactionInfo"] = json!(jws_with(
        json!({ "alg": "ES256", "x5c": [
            x5c_entry(fixture("forgedLeaf.pem")),
            x5c_entry(fixture("forgedIntermediate.pem")),
            x5c_entry(fixture("forgedCA.pem")),
        ]}),
        &tx,
        &forged_key,
    ));
    let cases = vec![
        ("forged chain", json!({ "signedPayload": forged })),
        ("foreign bundle", json!({ "signedPayload": sign(&foreign) })),
        (
            "sandbox at production",
            json!({ "signedPayload": sign(&sandbox) }),
        ),
        (
            "another app id",
            json!({ "signedPayload": sign(&wrong_app) }),
        ),
        (
            "forged inner transaction",
            json!({ "signedPayload": sign(&inner_forged) }),
        ),
        ("not a JWS", json!({ "signedPayload": "nope" })),
        ("missing field", json!({ "payload": sign(&n) })),
    ];
    for (what, body) in cases {
        let before = app.counts().await;
        let resp = app
            .client
            .post(app.url("/webhooks/apple"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{what}");
        assert_eq!(app.counts().await, before, "{what}");
    }
    let before = app.counts().await;
    let resp = app
        .client
        .post(app.url("/webhooks/apple"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = app
        .client
        .post(app.url("/webhooks/apple"))
        .body(vec![b'a'; 200 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.counts().await, before);

    // And the genuine one is applied.
    let (s, body) = post_webhook(&app, &sign(&n)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "applied");
}

async fn apple_not_configured_is_503(b: Backend) {
    let app = common::spawn(b).await;
    let resp = app
        .client
        .post(app.url("/webhooks/apple"))
        .json(&json!({ "signedPayload": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let key = app.key(ApiKeyRole::Client).await;
    let (_, body) = verify(
        &app,
        &key,
        json!({ "signedTransaction": "x", "customerId": CUSTOMER }),
    )
    .await;
    assert_eq!(error_code(&body), Some("NOT_CONFIGURED"), "{body}");
}

on_all_backends!(
    done_when_in_order,
    done_when_shuffled_twice,
    refund_is_not_undone_by_a_late_renewal,
    unowned_notification_is_recorded,
    every_notification_type_is_acknowledged,
    transaction_id_is_resolved_through_the_api,
    legacy_receipt_is_resolved_through_the_api,
    webhook_rereads_the_truth,
    apple_down_is_store_unavailable,
    a_5xx_is_retried,
    concurrent_duplicates_apply_once,
    bad_submissions_grant_nothing,
    transfer_policy_moves_a_purchase,
    sandbox_beside_production_keeps_its_environment,
    bad_webhooks_change_nothing,
    apple_not_configured_is_503,
);
