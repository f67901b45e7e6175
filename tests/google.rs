//! Google Play against a local fake of Google (token endpoint, Play
//! Developer API, JWKS) answering in the shapes of the androidpublisher v3
//! discovery document: verifyPurchase, acknowledgement, Pub/Sub pushes,
//! legacy receipts, and every bad input.

mod common;
mod google_support;

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use chrono::{DateTime, Duration, Utc};
use common::{Auth, Backend, TestApp, error_code};
use entitle::domain::{ApiKeyRole, TransferPolicy};
use google_support::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use rsa::{
    RsaPrivateKey,
    pkcs1v15::SigningKey,
    signature::{SignatureEncoding, Signer},
};
use sea_orm::{EntityTrait, QueryOrder};
use serde_json::{Value, json};

// ----------------------------------------------------------------- tests

/// Moves the clock an hour on; returns the new now.
fn at(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap()
        .to_utc()
}

fn step(app: &TestApp) -> DateTime<Utc> {
    app.clock.advance(Duration::hours(1));
    app.state.core.now()
}

/// The issue's "done when": verify, acknowledge, then a lifecycle of pushes
/// in order, then all of them again shuffled, twice.
async fn lifecycle_in_order_then_shuffled(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let now = app.state.core.now();

    g.fake.set("sub-1", Sub::active(now).json());
    let body = verify(&app, &key, "user-1", "pro_sub", "sub-1").await;
    let v = &body["data"]["verifyPurchase"];
    assert!(body["errors"].is_null(), "{body}");
    let pro = v["customer"]["entitlements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "pro")
        .unwrap();
    assert_eq!(pro["isActive"], true, "{body}");
    assert_eq!(pro["store"], "PLAY_STORE");
    assert_eq!(pro["willRenew"], true);
    assert_eq!(v["purchase"]["productId"], "pro_sub:monthly");
    assert_eq!(v["purchase"]["environment"], "SANDBOX");
    assert_eq!(
        g.fake.ack_state("sub-1"),
        "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED"
    );
    assert_eq!(g.fake.with(|s| s.acks.clone()), vec!["sub-1".to_string()]);

    // A second token: a one-time product.
    g.fake.set("life-1", product_purchase(0, false, None, now));
    let body = verify(&app, &key, "user-1", "maps_forever", "life-1").await;
    assert!(body["errors"].is_null(), "{body}");
    assert_eq!(g.fake.ack_state("life-1"), 1);
    assert!(is_active(&entitlement(&app, &key, "user-1", "maps").await));

    // In order: each step changes Google's state, then notifies.
    let mut sent: Vec<Value> = Vec::new();
    let t = step(&app);
    let mut s = Sub::active(now);
    s.acknowledged = true;
    s.expiry = now + Duration::days(60);
    g.fake.set("sub-1", s.json());
    let n = sub_note(2, "sub-1", t); // SUBSCRIPTION_RENEWED
    assert_eq!(push(&app, "m-renewed", &n).await.0, StatusCode::OK);
    sent.push(n);
    let c = entitlement(&app, &key, "user-1", "pro").await;
    assert!(is_active(&c));
    let shown =
        DateTime::parse_from_rfc3339(c["entitlement"]["expiresAt"].as_str().unwrap()).unwrap();
    assert_eq!(shown.timestamp_millis(), s.expiry.timestamp_millis(), "{c}");

    let t = step(&app);
    s.state = "SUBSCRIPTION_STATE_IN_GRACE_PERIOD";
    s.expiry = t + Duration::days(3);
    g.fake.set("sub-1", s.json());
    let n = sub_note(6, "sub-1", t); // IN_GRACE_PERIOD
    assert_eq!(push(&app, "m-grace", &n).await.0, StatusCode::OK);
    sent.push(n);
    let c = entitlement(&app, &key, "user-1", "pro").await;
    assert!(is_active(&c), "{c}");
    assert_eq!(c["entitlement"]["status"], "IN_GRACE_PERIOD");

    let t = step(&app);
    s.state = "SUBSCRIPTION_STATE_ON_HOLD";
    s.expiry = t - Duration::minutes(5);
    g.fake.set("sub-1", s.json());
    let n = sub_note(5, "sub-1", t); // ON_HOLD
    assert_eq!(push(&app, "m-hold", &n).await.0, StatusCode::OK);
    sent.push(n);
    let c = entitlement(&app, &key, "user-1", "pro").await;
    assert!(!is_active(&c), "{c}");
    assert_eq!(purchase_status(&c, "sub-1"), "ON_HOLD");

    let t = step(&app);
    s.state = "SUBSCRIPTION_STATE_ACTIVE";
    s.expiry = t + Duration::days(30);
    g.fake.set("sub-1", s.json());
    let n = sub_note(1, "sub-1", t); // RECOVERED
    assert_eq!(push(&app, "m-recovered", &n).await.0, StatusCode::OK);
    sent.push(n);
    assert!(is_active(&entitlement(&app, &key, "user-1", "pro").await));

    let t = step(&app);
    s.state = "SUBSCRIPTION_STATE_CANCELED";
    s.auto_renew = false;
    g.fake.set("sub-1", s.json());
    let n = sub_note(3, "sub-1", t); // CANCELED
    assert_eq!(push(&app, "m-canceled", &n).await.0, StatusCode::OK);
    sent.push(n);
    let c = entitlement(&app, &key, "user-1", "pro").await;
    assert!(is_active(&c), "canceled keeps the paid period: {c}");
    assert_eq!(c["entitlement"]["willRenew"], false);

    let t = step(&app);
    s.state = "SUBSCRIPTION_STATE_EXPIRED";
    s.expiry = t - Duration::minutes(1);
    g.fake.set("sub-1", s.json());
    let n = sub_note(13, "sub-1", t); // EXPIRED
    assert_eq!(push(&app, "m-expired", &n).await.0, StatusCode::OK);
    sent.push(n);
    let c = entitlement(&app, &key, "user-1", "pro").await;
    assert!(!is_active(&c));
    assert_eq!(purchase_status(&c, "sub-1"), "EXPIRED");

    let t = step(&app);
    g.fake.set("life-1", product_purchase(1, true, None, now));
    let n = voided_note("life-1", 2, t);
    assert_eq!(push(&app, "m-voided", &n).await.0, StatusCode::OK);
    sent.push(n);
    let c = entitlement(&app, &key, "user-1", "maps").await;
    assert!(!is_active(&c), "refund revokes: {c}");
    assert_eq!(purchase_status(&c, "life-1"), "REFUNDED");

    let final_check = |pro: Value, maps: Value| {
        assert!(!is_active(&pro), "{pro}");
        assert!(!is_active(&maps), "{maps}");
        assert_eq!(purchase_status(&pro, "sub-1"), "EXPIRED");
        assert_eq!(purchase_status(&pro, "life-1"), "REFUNDED");
    };
    let events = app.count("entitlement_events").await;

    // Everything again, shuffled, twice: once with the original message ids
    // (duplicates), once as new deliveries of the same notifications.
    use rand::seq::SliceRandom;
    let ids = [
        "m-renewed",
        "m-grace",
        "m-hold",
        "m-recovered",
        "m-canceled",
        "m-expired",
        "m-voided",
    ];
    for round in 0..2 {
        let mut order: Vec<usize> = (0..sent.len()).collect();
        order.shuffle(&mut rand::rng());
        for i in order {
            let id = if round == 0 {
                ids[i].to_string()
            } else {
                format!("{}-again", ids[i])
            };
            let (st, body) = push(&app, &id, &sent[i]).await;
            assert_eq!(st, StatusCode::OK, "{body}");
            if round == 0 {
                assert_eq!(body["outcome"], "duplicate");
            }
            final_check(
                entitlement(&app, &key, "user-1", "pro").await,
                entitlement(&app, &key, "user-1", "maps").await,
            );
        }
    }
    assert_eq!(
        app.count("entitlement_events").await,
        events,
        "redelivery changed nothing"
    );
}

/// The customer's Play purchase lines, as (storePurchaseId, status, productId).
async fn lines(app: &TestApp, customer: &str) -> Vec<(String, String, String)> {
    let admin = app.key(ApiKeyRole::Admin).await;
    let (_, body) = app
        .gql(
            &admin,
            "query($id: ID!) { customer(id: $id) { purchases { storePurchaseId status productId store } } }",
            json!({ "id": customer }),
        )
        .await;
    body["data"]["customer"]["purchases"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .filter(|p| p["store"] == "PLAY_STORE")
        .map(|p| {
            (
                p["storePurchaseId"].as_str().unwrap().to_string(),
                p["status"].as_str().unwrap().to_string(),
                p["productId"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn on_plan(mut v: Value, plan: &str) -> Value {
    v["lineItems"][0]["offerDetails"]["basePlanId"] = json!(plan);
    v
}

/// An upgrade: the new token names the old one in `linkedPurchaseToken`.
/// The purchase line moves to the new token at once (the old one stops
/// granting), with its owner; a late message about the old token changes
/// nothing.
async fn upgrade_leaves_one_live_purchase(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let now = app.state.core.now();
    g.fake.set("old-tok", Sub::active(now).json());
    verify(&app, &key, "user-1", "pro_sub", "old-tok").await;

    app.clock.advance(Duration::minutes(10));
    let t = app.state.core.now();
    let mut s = Sub::active(t);
    s.linked = Some("old-tok");
    s.expiry = t + Duration::days(365);
    // No account id on the new token: the owner comes from the old one.
    g.fake.set("new-tok", on_plan(s.json(), "yearly"));
    let (st, body) = push(&app, "m-upgrade", &sub_note(4, "new-tok", t)).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "applied");
    assert_eq!(
        g.fake.ack_state("new-tok"),
        "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED"
    );
    assert_eq!(
        lines(&app, "user-1").await,
        vec![(
            "new-tok".to_string(),
            "ACTIVE".to_string(),
            "pro_sub:yearly".to_string()
        )]
    );
    let c = entitlement(&app, &key, "user-1", "pro").await;
    assert!(is_active(&c));
    assert_eq!(
        at(&c["entitlement"]["expiresAt"]).timestamp(),
        s.expiry.timestamp()
    );

    // Google still reports the old token active for a moment, and says so
    // late: the line keeps the new token.
    let (_, body) = push(
        &app,
        "m-old-late",
        &sub_note(2, "old-tok", t + Duration::seconds(1)),
    )
    .await;
    assert_eq!(body["outcome"], "stale", "{body}");
    assert_eq!(lines(&app, "user-1").await.len(), 1);
    let c = entitlement(&app, &key, "user-1", "pro").await;
    assert_eq!(
        at(&c["entitlement"]["expiresAt"]).timestamp(),
        s.expiry.timestamp()
    );

    // The app submits the new token as well: still one line.
    verify(&app, &key, "user-1", "pro_sub", "new-tok").await;
    assert_eq!(lines(&app, "user-1").await.len(), 1);
    assert_eq!(app.count("purchases").await, 1);
}

/// Downgrade, then resubscribe after a lapse, then a third hop: every token
/// of the chain lands on one line with the first token's owner, and only
/// the newest grants.
async fn linked_chain_of_three_hops(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let t0 = app.state.core.now();
    let mut a = Sub::active(t0);
    a.account = Some("user-9");
    g.fake.set("tok-a", on_plan(a.json(), "yearly"));
    verify(&app, &key, "user-9", "pro_sub", "tok-a").await;

    // Downgrade to monthly: a new token linked to the first.
    app.clock.advance(Duration::minutes(5));
    let t1 = app.state.core.now();
    let mut bsub = Sub::active(t1);
    bsub.linked = Some("tok-a");
    g.fake.set("tok-b", bsub.json());
    let (_, body) = push(&app, "m-b", &sub_note(4, "tok-b", t1)).await;
    assert_eq!(body["outcome"], "applied", "{body}");
    assert_eq!(
        lines(&app, "user-9").await,
        vec![("tok-b".into(), "ACTIVE".into(), "pro_sub:monthly".into())]
    );

    // It lapses; weeks later the user resubscribes (Google links the new
    // token to the lapsed one).
    let mut lapsed = Sub::active(t1);
    lapsed.state = "SUBSCRIPTION_STATE_EXPIRED";
    lapsed.expiry = t1 + Duration::days(30);
    lapsed.auto_renew = false;
    lapsed.linked = Some("tok-a");
    g.fake.set("tok-b", lapsed.json());
    app.clock.advance(Duration::days(31));
    let t2 = app.state.core.now();
    let (_, body) = push(&app, "m-b-exp", &sub_note(13, "tok-b", t2)).await;
    assert_eq!(body["outcome"], "applied", "{body}");
    assert!(!is_active(&entitlement(&app, &key, "user-9", "pro").await));
    app.clock.advance(Duration::days(10));
    let t3 = app.state.core.now();
    let mut csub = Sub::active(t3);
    csub.linked = Some("tok-b");
    g.fake.set("tok-c", csub.json());
    let (_, body) = push(&app, "m-c", &sub_note(4, "tok-c", t3)).await;
    assert_eq!(body["outcome"], "applied", "{body}");
    let c = entitlement(&app, &key, "user-9", "pro").await;
    assert!(is_active(&c), "{c}");
    assert_eq!(
        lines(&app, "user-9").await,
        vec![("tok-c".into(), "ACTIVE".into(), "pro_sub:monthly".into())]
    );

    // Old tokens of the chain, however old, change nothing now.
    for (i, old) in ["tok-a", "tok-b"].iter().enumerate() {
        let (_, body) = push(
            &app,
            &format!("m-late-{i}"),
            &sub_note(3, old, t3 + Duration::seconds(1 + i as i64)),
        )
        .await;
        assert_eq!(body["outcome"], "stale", "{old}: {body}");
    }
    assert!(is_active(&entitlement(&app, &key, "user-9", "pro").await));
    assert_eq!(app.count("purchases").await, 1);
    // Submitting an old token of the chain by someone else: the line's
    // binding (user-9) wins.
    let before = app.counts().await;
    let body = verify(&app, &key, "user-x", "pro_sub", "tok-a").await;
    assert_eq!(error_code(&body), Some("RECEIPT_ALREADY_IN_USE"), "{body}");
    assert_nothing_granted(&app, &before, 1).await;
}

/// Out of order: the newest token of a chain arrives before the one it
/// replaces, whose owner is the only binding. It is held, then continues the
/// line as soon as the middle token is known; the oldest token, arriving
/// last, changes nothing.
async fn linked_tokens_out_of_order(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let t0 = app.state.core.now();
    g.fake.set("ooo-a", Sub::active(t0).json());
    verify(&app, &key, "user-o", "pro_sub", "ooo-a").await;

    let t1 = t0 + Duration::minutes(1);
    let mut bsub = Sub::active(t1);
    bsub.linked = Some("ooo-a");
    g.fake.set("ooo-b", bsub.json());
    let t2 = t0 + Duration::minutes(2);
    let mut csub = Sub::active(t2);
    csub.linked = Some("ooo-b");
    csub.expiry = t2 + Duration::days(365);
    g.fake.set("ooo-c", on_plan(csub.json(), "yearly"));

    // C first: nothing here knows ooo-b yet, and C names no account.
    let (_, body) = push(&app, "m-c", &sub_note(4, "ooo-c", t2)).await;
    assert_eq!(body["outcome"], "held", "{body}");
    assert_eq!(app.count("held_purchases").await, 1);
    // B: it continues ooo-a's line, and C at once continues B.
    let (_, body) = push(&app, "m-b", &sub_note(4, "ooo-b", t1)).await;
    assert_eq!(body["outcome"], "applied", "{body}");
    assert_eq!(app.count("held_purchases").await, 0);
    assert_eq!(
        lines(&app, "user-o").await,
        vec![("ooo-c".into(), "ACTIVE".into(), "pro_sub:yearly".into())]
    );
    // A's own late message, and B's again: stale.
    let (_, body) = push(&app, "m-a", &sub_note(2, "ooo-a", t2)).await;
    assert_eq!(body["outcome"], "stale", "{body}");
    let (_, body) = push(&app, "m-b2", &sub_note(2, "ooo-b", t2)).await;
    assert_eq!(body["outcome"], "stale", "{body}");
    let c = entitlement(&app, &key, "user-o", "pro").await;
    assert_eq!(
        at(&c["entitlement"]["expiresAt"]).timestamp(),
        csub.expiry.timestamp()
    );
    assert_eq!(app.count("purchases").await, 1);
}

/// A push before the app submits, with an obfuscated account id naming no
/// customer here: held (no customer made), a refund still applies to it,
/// and the customer it names receives it as it stands (refunded: never
/// PAID). Each receipt holds the submission, its outcome and its purchase.
async fn play_held_until_its_owner_appears(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let t0 = app.state.core.now();
    let mut s = Sub::active(t0);
    s.account = Some("player-1");
    g.fake.set("held-tok", s.json());
    let (_, body) = push(&app, "m-held-1", &sub_note(4, "held-tok", t0)).await;
    assert_eq!(body["outcome"], "held", "{body}");
    assert_eq!(app.count("customers").await, 0, "no phantom customer");
    assert_eq!(app.count("purchases").await, 0);
    assert_eq!(app.count("entitlement_events").await, 0);

    // Refunded before anyone submitted it.
    app.clock.advance(Duration::minutes(5));
    let t1 = app.state.core.now();
    let (_, body) = push(&app, "m-held-2", &voided_note("held-tok", 1, t1)).await;
    assert_eq!(body["outcome"], "held", "{body}");
    // Someone else submitting it: Google binds it to player-1.
    let before = app.counts().await;
    let body = verify(&app, &key, "player-2", "pro_sub", "held-tok").await;
    assert_eq!(error_code(&body), Some("RECEIPT_ALREADY_IN_USE"), "{body}");
    assert_nothing_granted(&app, &before, 1).await;

    // Google still reports the token active; the refund sticks.
    let body = verify(&app, &key, "player-1", "pro_sub", "held-tok").await;
    assert!(body["errors"].is_null(), "{body}");
    assert_eq!(
        body["data"]["verifyPurchase"]["purchase"]["status"], "REFUNDED",
        "{body}"
    );
    let c = entitlement(&app, &key, "player-1", "pro").await;
    assert!(!is_active(&c), "{c}");
    assert_eq!(app.count("held_purchases").await, 0);

    let rows = entities::receipts::Entity::find()
        .order_by_asc(entities::receipts::Column::Id)
        .all(&app.state.core.db().conn)
        .await
        .unwrap();
    let payload =
        json!({ "packageName": PACKAGE, "productId": "pro_sub", "purchaseToken": "held-tok" });
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (
            rows[0].customer_id.as_str(),
            &rows[0].payload,
            rows[0].outcome.as_str(),
            rows[0].error.as_deref(),
            rows[0].purchase_id
        ),
        (
            "player-2",
            // player-2 does not exist: a failed submission for a made-up id
            // keeps only the payload's size and digest.
            &common::digest_of(&payload),
            "invalid",
            Some("this purchase belongs to another customer"),
            None
        )
    );
    let pid = entities::purchases::Entity::find()
        .one(&app.state.core.db().conn)
        .await
        .unwrap()
        .unwrap()
        .id;
    assert_eq!(
        (
            rows[1].customer_id.as_str(),
            &rows[1].payload,
            rows[1].outcome.as_str(),
            rows[1].error.as_deref(),
            rows[1].purchase_id
        ),
        ("player-1", &payload, "valid", None, Some(pid))
    );
}

/// A held Play purchase goes to the customer its account id names as soon
/// as that customer is created.
async fn play_held_claimed_by_new_customer(b: Backend) {
    let (app, g) = setup_with(b, |c| c.trial = None).await;
    let key = app.key(ApiKeyRole::Client).await;
    let t0 = app.state.core.now();
    let mut s = Sub::active(t0);
    s.account = Some("watcher");
    g.fake.set("claim-tok", s.json());
    let (_, body) = push(&app, "m-claim", &sub_note(4, "claim-tok", t0)).await;
    assert_eq!(body["outcome"], "held", "{body}");
    let (st, body) = app.post_user(&key, "watcher").await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["paid_status"], "paid", "{body}");
    assert_eq!(app.count("held_purchases").await, 0);
}

/// Play numbers renewal orders `..0`, `..1`: the renewal count follows.
async fn play_renewal_count_from_order_id(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let t0 = app.state.core.now();
    let renewal_count =
        |body: &Value| body["data"]["verifyPurchase"]["purchase"]["renewalCount"].clone();
    let q = "mutation($input: VerifyPurchaseInput!, $c: ID) { verifyPurchase(input: $input, customerId: $c) { purchase { renewalCount } } }";
    for (order, expect) in [
        ("GPA.1234-5678-9012-34567", 0),
        ("GPA.1234-5678-9012-34567..0", 1),
        ("GPA.1234-5678-9012-34567..4", 5),
    ] {
        let mut v = Sub::active(t0).json();
        v["lineItems"][0]["latestSuccessfulOrderId"] = json!(order);
        g.fake.set("renew-tok", v);
        let (_, body) = app
            .gql(
                &key,
                q,
                json!({ "c": "renewer", "input": { "playStore": {
                    "packageName": PACKAGE, "productId": "pro_sub", "purchaseToken": "renew-tok" } } }),
            )
            .await;
        assert_eq!(renewal_count(&body), json!(expect), "{order}: {body}");
    }
}

/// Bad push tokens: 401 and nothing written.
async fn push_token_rejections(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let now = app.state.core.now();
    g.fake.set("sub-1", Sub::active(now).json());
    verify(&app, &key, "user-1", "pro_sub", "sub-1").await;
    let before = app.counts().await;
    let mut s = Sub::active(now);
    s.state = "SUBSCRIPTION_STATE_EXPIRED";
    s.expiry = now - Duration::minutes(1);
    g.fake.set("sub-1", s.json());
    let body = envelope("m-1", &sub_note(13, "sub-1", step(&app))).to_string();

    let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(
        json!({"aud": AUDIENCE, "email": PUSHER, "email_verified": true,
               "iss": "https://accounts.google.com", "exp": Utc::now().timestamp() + 600})
        .to_string(),
    );
    let hs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"aud": AUDIENCE, "email": PUSHER, "email_verified": true,
                "iss": "https://accounts.google.com", "exp": Utc::now().timestamp() + 600}),
        &EncodingKey::from_secret(b"a-shared-secret-nobody-should-use"),
    )
    .unwrap();
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        (
            "wrong audience",
            Some(
                Oidc {
                    aud: "https://elsewhere.example/push".into(),
                    ..Default::default()
                }
                .token(),
            ),
        ),
        (
            "wrong email",
            Some(
                Oidc {
                    email: "someone@evil.example".into(),
                    ..Default::default()
                }
                .token(),
            ),
        ),
        (
            "email not verified",
            Some(
                Oidc {
                    email_verified: json!(false),
                    ..Default::default()
                }
                .token(),
            ),
        ),
        (
            "expired",
            Some(
                Oidc {
                    exp_offset: -600,
                    ..Default::default()
                }
                .token(),
            ),
        ),
        (
            "unknown key",
            Some(
                Oidc {
                    kid: "stranger-key".into(),
                    signer_pem: KEYS.stranger_pem.clone(),
                    ..Default::default()
                }
                .token(),
            ),
        ),
        (
            "known kid, wrong signer",
            Some(
                Oidc {
                    signer_pem: KEYS.stranger_pem.clone(),
                    ..Default::default()
                }
                .token(),
            ),
        ),
        (
            "wrong issuer",
            Some(
                Oidc {
                    iss: "https://accounts.example.com".into(),
                    ..Default::default()
                }
                .token(),
            ),
        ),
        ("alg none", Some(format!("{none_header}.{claims}."))),
        ("HS256", Some(hs256)),
        ("garbage", Some("not-a-jwt".into())),
    ];
    for (name, token) in cases {
        let (st, resp) = push_raw(&app, token.as_deref(), body.clone()).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{name}: {resp}");
        assert_eq!(resp["error"]["code"], "UNAUTHENTICATED", "{name}");
        assert_eq!(app.counts().await, before, "{name}");
    }
    assert!(is_active(&entitlement(&app, &key, "user-1", "pro").await));
    // The unknown key made one refetch at most; the good token still works.
    let (st, _) = push_raw(&app, Some(&Oidc::default().token()), body).await;
    assert_eq!(st, StatusCode::OK);
    assert!(!is_active(&entitlement(&app, &key, "user-1", "pro").await));
}

/// A key Google rotates in is fetched on first sight of its `kid`.
async fn push_key_rotation_refetches_once(b: Backend) {
    let (app, g) = setup(b).await;
    let n = json!({"version": "1.0", "packageName": PACKAGE,
                   "eventTimeMillis": Utc::now().timestamp_millis().to_string(),
                   "testNotification": {"version": "1.0"}});
    assert_eq!(push(&app, "m-1", &n).await.0, StatusCode::OK);
    assert_eq!(push(&app, "m-2", &n).await.0, StatusCode::OK);
    assert_eq!(g.fake.with(|s| s.jwks_fetches), 1, "keys are cached");
    let stranger =
        <RsaPrivateKey as rsa::pkcs8::DecodePrivateKey>::from_pkcs8_pem(&KEYS.stranger_pem)
            .unwrap();
    g.fake
        .with(|s| s.jwks.push(jwk(&stranger.to_public_key(), "google-key-2")));
    let tok = Oidc {
        kid: "google-key-2".into(),
        signer_pem: KEYS.stranger_pem.clone(),
        ..Default::default()
    }
    .token();
    let (st, body) = push_raw(&app, Some(&tok), envelope("m-3", &n).to_string()).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(g.fake.with(|s| s.jwks_fetches), 2);
    assert_eq!(app.count("webhook_events").await, 3);
}

/// Pushes that authenticate but cannot be used: 400, nothing written.
async fn malformed_pushes(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let now = app.state.core.now();
    g.fake.set("sub-1", Sub::active(now).json());
    verify(&app, &key, "user-1", "pro_sub", "sub-1").await;
    let before = app.counts().await;
    let good = Oidc::default().token();

    let mut other = sub_note(13, "sub-1", now);
    other["packageName"] = json!("com.other.app");
    let not_b64 = json!({"message": {"data": "%%% not base64 %%%", "messageId": "m-2"}});
    let not_json = json!({"message": {"data": STANDARD.encode("{ not json"), "messageId": "m-3"}});
    let placeholder = std::fs::read_to_string(
        "../shared/vectors/google/rtdn-pubsub-push-envelope.doc-example.json",
    )
    .unwrap();
    let cases = vec![
        ("other package", envelope("m-1", &other).to_string()),
        ("data not base64", not_b64.to_string()),
        ("data not JSON", not_json.to_string()),
        ("documentation placeholder", placeholder),
        ("no envelope", "{\"hello\": 1}".to_string()),
        ("not JSON at all", "hello".to_string()),
    ];
    let (st, resp) = push_raw(&app, Some(&good), "x".repeat(200 * 1024)).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{resp}");
    assert_eq!(app.counts().await, before);
    for (name, body) in cases {
        let (st, resp) = push_raw(&app, Some(&good), body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{name}: {resp}");
        assert_eq!(resp["error"]["code"], "BAD_USER_INPUT", "{name}");
        assert_eq!(app.counts().await, before, "{name}");
    }
    assert!(is_active(&entitlement(&app, &key, "user-1", "pro").await));
}

/// Tokens Google does not know: INVALID_RECEIPT, nothing granted (the
/// submission stays on record as invalid).
async fn unknown_tokens_are_invalid(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    g.fake.fail("gone-404", 404);
    g.fake.fail("gone-410", 410);
    for (product, token) in [
        ("pro_sub", "gone-404"),
        ("pro_sub", "gone-410"),
        ("maps_forever", "gone-404"),
        ("pro_sub", "never-seen"),
    ] {
        let before = app.counts().await;
        let body = verify(&app, &key, "user-1", product, token).await;
        assert_eq!(
            error_code(&body),
            Some("INVALID_RECEIPT"),
            "{token}: {body}"
        );
        assert_nothing_granted(&app, &before, 1).await;
    }
    let (_, body) = app
        .gql(&key, "query { customer(id: \"user-1\") { id } }", json!({}))
        .await;
    assert!(
        body["data"]["customer"].is_null(),
        "no customer made: {body}"
    );
    assert_eq!(g.fake.with(|s| s.acks.len()), 0);
}

/// Every count is unchanged but the receipts audit trail, which grew by `receipts`.
async fn assert_nothing_granted(app: &TestApp, before: &[(&str, i64)], receipts: i64) {
    let after = app.counts().await;
    for ((t, b), (_, a)) in before.iter().zip(after.iter()) {
        let expect = if *t == "receipts" { b + receipts } else { *b };
        assert_eq!(*a, expect, "{t}: {before:?} -> {after:?}");
    }
}

/// A submission for another package or product: INVALID_RECEIPT / BAD_USER_INPUT.
async fn wrong_package_or_product(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    g.fake
        .set("sub-1", Sub::active(app.state.core.now()).json());
    let before = app.counts().await;
    let (_, body) = app
        .gql(
            &key,
            VERIFY,
            json!({ "c": "user-1", "input": { "playStore": {
                "packageName": "com.other.app", "productId": "pro_sub", "purchaseToken": "sub-1" } } }),
        )
        .await;
    assert_eq!(error_code(&body), Some("INVALID_RECEIPT"), "{body}");
    assert_nothing_granted(&app, &before, 1).await;

    let before = app.counts().await;
    let body = verify(&app, &key, "user-1", "not_in_catalog", "sub-1").await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
    assert_nothing_granted(&app, &before, 1).await;

    // A token of one catalog subscription submitted as another product.
    let mut s = Sub::active(app.state.core.now()).json();
    s["lineItems"][0]["productId"] = json!("other_sub");
    g.fake.set("sub-2", s);
    let before = app.counts().await;
    let body = verify(&app, &key, "user-1", "pro_sub", "sub-2").await;
    assert_eq!(error_code(&body), Some("INVALID_RECEIPT"), "{body}");
    assert_nothing_granted(&app, &before, 1).await;
    assert_eq!(g.fake.with(|s| s.acks.len()), 0);
}

/// A token bound to another customer's obfuscatedExternalAccountId follows
/// the transfer policy: `keep` refuses it.
async fn bound_to_another_customer_keep(b: Backend) {
    let (app, g) = setup_with(b, |c| c.transfer_policy = TransferPolicy::Keep).await;
    let key = app.key(ApiKeyRole::Client).await;
    let mut s = Sub::active(app.state.core.now());
    s.account = Some("user-a");
    g.fake.set("sub-a", s.json());
    let before = app.counts().await;
    let body = verify(&app, &key, "user-b", "pro_sub", "sub-a").await;
    assert_eq!(error_code(&body), Some("RECEIPT_ALREADY_IN_USE"), "{body}");
    assert_nothing_granted(&app, &before, 1).await;
    assert_eq!(
        g.fake.with(|s| s.acks.len()),
        0,
        "not acknowledged for the wrong customer"
    );
    // Its owner may submit it.
    let body = verify(&app, &key, "user-a", "pro_sub", "sub-a").await;
    assert!(body["errors"].is_null(), "{body}");
}

/// The store's own binding wins whatever the transfer policy: under
/// `transfer` (the default) too, a purchase Google binds to user-a is not
/// moved by user-b's submission, and nothing changes.
async fn bound_to_another_customer_transfer(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let mut s = Sub::active(app.state.core.now());
    s.account = Some("user-a");
    g.fake.set("sub-a", s.json());
    verify(&app, &key, "user-a", "pro_sub", "sub-a").await;
    let before = app.counts().await;
    let body = verify(&app, &key, "user-b", "pro_sub", "sub-a").await;
    assert_eq!(error_code(&body), Some("RECEIPT_ALREADY_IN_USE"), "{body}");
    assert_nothing_granted(&app, &before, 1).await;
    assert!(is_active(&entitlement(&app, &key, "user-a", "pro").await));
    assert!(!is_active(&entitlement(&app, &key, "user-b", "pro").await));
    assert_eq!(app.count("customers").await, 1, "no user-b made");
    // A purchase Google binds to no one still moves under `transfer`.
    let mut free = Sub::active(app.state.core.now());
    free.acknowledged = true;
    g.fake.set("sub-free", free.json());
    verify(&app, &key, "user-a", "pro_sub", "sub-free").await;
    let body = verify(&app, &key, "user-b", "pro_sub", "sub-free").await;
    assert!(body["errors"].is_null(), "{body}");
    let c = entitlement(&app, &key, "user-b", "pro").await;
    assert_eq!(purchase_status(&c, "sub-free"), "ACTIVE", "{c}");
}

/// Google down: STORE_UNAVAILABLE, nothing granted; later the same submission works.
async fn google_down_then_retry(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let now = app.state.core.now();
    g.fake.set("sub-1", Sub::active(now).json());
    // Google's keys out of reach: the push is not refused, but retried.
    g.fake.with(|s| s.jwks_down = true);
    let before = app.counts().await;
    let (st, _) = push(&app, "m-0", &sub_note(4, "sub-1", now)).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.counts().await, before);
    g.fake.with(|s| {
        s.jwks_down = false;
        s.down = true;
    });
    let (_, body) = app
        .gql(
            &key,
            VERIFY,
            json!({ "c": "user-1", "input": { "playStore": {
                "packageName": PACKAGE, "productId": "pro_sub", "purchaseToken": "sub-1" } } }),
        )
        .await;
    assert_eq!(error_code(&body), Some("STORE_UNAVAILABLE"), "{body}");
    assert_eq!(body["errors"][0]["extensions"]["retryable"], true);
    assert_nothing_granted(&app, &before, 1).await;

    // A push while Google is down: 503, so Pub/Sub delivers it again;
    // nothing applied, the verified notification kept as `failed`.
    let before = app.counts().await;
    let (st, _) = push(&app, "m-1", &sub_note(4, "sub-1", now)).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    let after = app.counts().await;
    for ((t, n0), (_, n1)) in before.iter().zip(&after) {
        let grew = i64::from(*t == "webhook_events");
        assert_eq!(*n1, n0 + grew, "{t}");
    }

    g.fake.with(|s| s.down = false);
    let body = verify(&app, &key, "user-1", "pro_sub", "sub-1").await;
    assert!(body["errors"].is_null(), "{body}");
    assert!(is_active(&entitlement(&app, &key, "user-1", "pro").await));
    let (st, body) = push(&app, "m-1", &sub_note(4, "sub-1", app.state.core.now())).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "applied");
    // The redelivery took the failed row over.
    assert_eq!(
        app.count("webhook_events").await,
        after
            .iter()
            .find(|(t, _)| *t == "webhook_events")
            .unwrap()
            .1
    );
}

/// The token endpoint down is Google down too.
async fn token_endpoint_down(b: Backend) {
    let (app, g) = setup_with(b, |c| {
        c.google.as_mut().unwrap().token_uri = Some("http://127.0.0.1:9/token".into());
    })
    .await;
    let key = app.key(ApiKeyRole::Client).await;
    g.fake
        .set("sub-1", Sub::active(app.state.core.now()).json());
    let before = app.counts().await;
    let body = verify(&app, &key, "user-1", "pro_sub", "sub-1").await;
    assert_eq!(error_code(&body), Some("STORE_UNAVAILABLE"), "{body}");
    assert_nothing_granted(&app, &before, 1).await;
}

/// Acknowledgement fails: the purchase is kept; the next read acknowledges.
async fn acknowledgement_retried_on_next_read(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    g.fake
        .set("sub-1", Sub::active(app.state.core.now()).json());
    g.fake.with(|s| s.ack_down = true);
    let body = verify(&app, &key, "user-1", "pro_sub", "sub-1").await;
    assert!(body["errors"].is_null(), "{body}");
    assert!(is_active(&entitlement(&app, &key, "user-1", "pro").await));
    assert_eq!(g.fake.ack_state("sub-1"), "ACKNOWLEDGEMENT_STATE_PENDING");

    g.fake.with(|s| s.ack_down = false);
    app.clock.advance(Duration::minutes(1));
    let (st, _) = push(&app, "m-1", &sub_note(4, "sub-1", app.state.core.now())).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        g.fake.ack_state("sub-1"),
        "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED"
    );
}

/// Acknowledgement fails and no notification follows: the periodic retry
/// acknowledges it, once.
async fn acknowledgement_retried_by_sweep(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let now = app.state.core.now();
    g.fake.set("sub-1", Sub::active(now).json());
    g.fake.set("life-1", product_purchase(0, false, None, now));
    g.fake.with(|s| s.ack_down = true);
    verify(&app, &key, "user-1", "pro_sub", "sub-1").await;
    verify(&app, &key, "user-1", "maps_forever", "life-1").await;
    assert!(is_active(&entitlement(&app, &key, "user-1", "maps").await));
    assert_eq!(
        app.state
            .core
            .stores()
            .retry_play_acknowledgements()
            .await
            .ok(),
        Some(0)
    );

    g.fake.with(|s| s.ack_down = false);
    let core = &app.state.core;
    assert_eq!(
        core.stores().retry_play_acknowledgements().await.ok(),
        Some(2)
    );
    assert_eq!(
        g.fake.ack_state("sub-1"),
        "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED"
    );
    assert_eq!(g.fake.ack_state("life-1"), 1);
    assert_eq!(
        core.stores().retry_play_acknowledgements().await.ok(),
        Some(0)
    );
    assert_eq!(g.fake.with(|s| s.acks.len()), 2);
}

/// The access token is cached, and refreshed when Google refuses it.
async fn access_token_cached_and_refreshed_on_401(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let mut s = Sub::active(app.state.core.now());
    s.acknowledged = true;
    g.fake.set("sub-1", s.json());
    verify(&app, &key, "user-1", "pro_sub", "sub-1").await;
    verify(&app, &key, "user-1", "pro_sub", "sub-1").await;
    assert_eq!(g.fake.with(|s| s.tokens_issued), 1);
    g.fake.with(|s| {
        s.revoked_tokens.insert("ya29.fake-1".into());
    });
    let body = verify(&app, &key, "user-1", "pro_sub", "sub-1").await;
    assert!(body["errors"].is_null(), "{body}");
    assert_eq!(g.fake.with(|s| s.tokens_issued), 2);
}

fn legacy_receipt(token: &str, product: &str, package: &str) -> (String, String) {
    let data = json!({
        "orderId": "GPA.1234-5678-9012-34567", "packageName": package, "productId": product,
        "purchaseTime": 1767225600000_i64, "purchaseState": 0, "purchaseToken": token,
        "acknowledged": false
    })
    .to_string();
    let signer = SigningKey::<sha1::Sha1>::new(KEYS.google.clone());
    let sig = STANDARD.encode(signer.sign(data.as_bytes()).to_bytes());
    (data, sig)
}

const VERIFY_LEGACY: &str = "mutation($d: String!, $s: String!) {
  verifyPurchase(customerId: \"user-1\", input: { playStoreReceipt: { signedData: $d, signature: $s } }) {
    customer { entitlements { key isActive } } purchase { productId status } } }";

/// A legacy signed receipt verifies offline, then goes through the API.
async fn legacy_receipt_verifies(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    g.fake.set(
        "life-1",
        product_purchase(0, false, Some("user-1"), app.state.core.now()),
    );
    let (data, sig) = legacy_receipt("life-1", "maps_forever", PACKAGE);
    let (_, body) = app
        .gql(&key, VERIFY_LEGACY, json!({ "d": data, "s": sig }))
        .await;
    assert!(body["errors"].is_null(), "{body}");
    assert_eq!(
        body["data"]["verifyPurchase"]["purchase"]["status"], "ACTIVE",
        "{body}"
    );
    // The purchase token is the store id: only an admin reads it back.
    let admin = app.key(ApiKeyRole::Admin).await;
    let (_, body) = app
        .gql(
            &admin,
            "{ customer(id: \"user-1\") { purchases { storePurchaseId } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        body["data"]["customer"]["purchases"][0]["storePurchaseId"], "life-1",
        "{body}"
    );
    assert!(is_active(&entitlement(&app, &key, "user-1", "maps").await));
    assert_eq!(g.fake.ack_state("life-1"), 1);
}

/// A legacy receipt with a bad signature: INVALID_RECEIPT, Google not asked.
async fn legacy_receipt_bad_signature(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    g.fake.set(
        "life-1",
        product_purchase(0, false, None, app.state.core.now()),
    );
    let (data, sig) = legacy_receipt("life-1", "maps_forever", PACKAGE);
    let tampered = data.replace("life-1", "life-2");
    let (_, other_sig) = legacy_receipt("life-9", "maps_forever", PACKAGE);
    for (name, d, s) in [
        ("tampered data", tampered.as_str(), sig.as_str()),
        (
            "another receipt's signature",
            data.as_str(),
            other_sig.as_str(),
        ),
        ("signature not base64", data.as_str(), "***"),
        ("empty signature", data.as_str(), ""),
    ] {
        let before = app.counts().await;
        let (_, body) = app
            .gql(&key, VERIFY_LEGACY, json!({ "d": d, "s": s }))
            .await;
        assert_eq!(error_code(&body), Some("INVALID_RECEIPT"), "{name}: {body}");
        assert_nothing_granted(&app, &before, 1).await;
    }
    // Signed, but for another package.
    let (d, s) = legacy_receipt("life-1", "maps_forever", "com.other.app");
    let before = app.counts().await;
    let (_, body) = app
        .gql(&key, VERIFY_LEGACY, json!({ "d": d, "s": s }))
        .await;
    assert_eq!(error_code(&body), Some("INVALID_RECEIPT"), "{body}");
    assert_nothing_granted(&app, &before, 1).await;
    assert_eq!(g.fake.with(|s| s.acks.len()), 0);
}

/// Duplicates, test notifications and a refund of a subscription.
async fn duplicates_test_and_subscription_refund(b: Backend) {
    let (app, g) = setup(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let now = app.state.core.now();
    let test = json!({"version": "1.0", "packageName": PACKAGE,
                      "eventTimeMillis": now.timestamp_millis().to_string(),
                      "testNotification": {"version": "1.0"}});
    let (st, body) = push(&app, "m-test", &test).await;
    assert_eq!(
        (st, body["outcome"].as_str()),
        (StatusCode::OK, Some("test"))
    );
    let before = app.counts().await;
    let (st, body) = push(&app, "m-test", &test).await;
    assert_eq!(
        (st, body["outcome"].as_str()),
        (StatusCode::OK, Some("duplicate"))
    );
    assert_eq!(app.counts().await, before);

    g.fake.set("sub-1", Sub::active(now).json());
    verify(&app, &key, "user-1", "pro_sub", "sub-1").await;
    app.clock.advance(Duration::minutes(5));
    let t = app.state.core.now();
    let mut s = Sub::active(now);
    s.state = "SUBSCRIPTION_STATE_EXPIRED";
    s.acknowledged = true;
    g.fake.set("sub-1", s.json());
    let (st, _) = push(&app, "m-void", &voided_note("sub-1", 1, t)).await;
    assert_eq!(st, StatusCode::OK);
    let c = entitlement(&app, &key, "user-1", "pro").await;
    assert!(!is_active(&c));
    assert_eq!(purchase_status(&c, "sub-1"), "REFUNDED");
    // A renewal notification from before the refund, delivered late, while
    // Google still (lagging) says active: the refund stands.
    g.fake.set("sub-1", Sub::active(now).json());
    let (st, body) = push(
        &app,
        "m-late",
        &sub_note(2, "sub-1", t - Duration::minutes(1)),
    )
    .await;
    assert_eq!(
        (st, body["outcome"].as_str()),
        (StatusCode::OK, Some("stale"))
    );
    let c = entitlement(&app, &key, "user-1", "pro").await;
    assert!(!is_active(&c));
    assert_eq!(purchase_status(&c, "sub-1"), "REFUNDED");

    // A newer notification reads the token as merely expired: still refunded.
    let mut s = Sub::active(now);
    s.state = "SUBSCRIPTION_STATE_EXPIRED";
    s.acknowledged = true;
    s.expiry = t;
    g.fake.set("sub-1", s.json());
    let events = app.count("entitlement_events").await;
    let (st, body) = push(
        &app,
        "m-after",
        &sub_note(13, "sub-1", t + Duration::minutes(1)),
    )
    .await;
    assert_eq!(
        (st, body["outcome"].as_str()),
        (StatusCode::OK, Some("applied"))
    );
    let c = entitlement(&app, &key, "user-1", "pro").await;
    assert_eq!(purchase_status(&c, "sub-1"), "REFUNDED");
    assert_eq!(app.count("entitlement_events").await, events);

    // A purchase nobody here has and no account binds: held for whoever
    // submits it, granting no one meanwhile.
    g.fake.set("stranger", Sub::active(now).json());
    let events = app.count("entitlement_events").await;
    let (st, body) = push(&app, "m-stranger", &sub_note(4, "stranger", t)).await;
    assert_eq!(
        (st, body["outcome"].as_str()),
        (StatusCode::OK, Some("held"))
    );
    assert_eq!(app.count("held_purchases").await, 1);
    assert_eq!(app.count("entitlement_events").await, events);
    assert_eq!(
        g.fake.ack_state("stranger"),
        "ACKNOWLEDGEMENT_STATE_PENDING"
    );
}

/// Without a [google] section the route answers 503 "not configured".
async fn not_configured(b: Backend) {
    let app = common::spawn(b).await;
    let before = app.counts().await;
    let (st, body) = push_raw(&app, Some("x"), "{}".into()).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "NOT_CONFIGURED");
    let key = app.key(ApiKeyRole::Client).await;
    let before_verify = app.counts().await;
    let body = verify(&app, &key, "user-1", "pro_sub", "t").await;
    assert_eq!(error_code(&body), Some("NOT_CONFIGURED"), "{body}");
    assert_eq!(app.counts().await, before_verify);
    assert_eq!(before.len(), before_verify.len());
}

/// Who may submit: a customer token for itself, app keys naming the customer.
async fn verify_requires_a_customer(b: Backend) {
    let (app, g) = setup(b).await;
    g.fake
        .set("sub-1", Sub::active(app.state.core.now()).json());
    let input = json!({ "playStore": {
        "packageName": PACKAGE, "productId": "pro_sub", "purchaseToken": "sub-1" } });
    let before = app.counts().await;
    let (_, body) = app
        .gql(&Auth::None, VERIFY, json!({ "input": input, "c": "u" }))
        .await;
    assert_eq!(error_code(&body), Some("UNAUTHENTICATED"), "{body}");
    let key = app.key(ApiKeyRole::Client).await;
    let (_, body) = app.gql(&key, VERIFY, json!({ "input": input })).await;
    assert_eq!(error_code(&body), Some("BAD_USER_INPUT"), "{body}");
    let service = app.key(ApiKeyRole::Service).await;
    let before2 = app.counts().await;
    let (_, body) = app
        .gql(&service, VERIFY, json!({ "input": input, "c": "u" }))
        .await;
    assert_eq!(error_code(&body), Some("FORBIDDEN"), "{body}");
    assert_eq!(app.counts().await, before2);
    assert_eq!(before[2], app.counts().await[2], "no purchase");
}

/// Google's keys endpoint hanging holds up only what needs it: a push whose
/// key is cached is answered at once while a push naming an unknown key
/// waits for the fetch, and a flood of made-up keys costs one fetch.
async fn hanging_jwks_does_not_delay_cached_keys(b: Backend) {
    let (app, g) = setup(b).await;
    let n = json!({"version": "1.0", "packageName": PACKAGE,
                   "eventTimeMillis": Utc::now().timestamp_millis().to_string(),
                   "testNotification": {"version": "1.0"}});
    assert_eq!(push(&app, "m-1", &n).await.0, StatusCode::OK);
    assert_eq!(g.fake.with(|s| s.jwks_fetches), 1);
    g.fake.with(|s| s.jwks_hang = true);

    // Made-up keys: they wait on one shared fetch of the hanging endpoint.
    let strangers: Vec<_> = (0..20)
        .map(|i| {
            let tok = Oidc {
                kid: format!("made-up-{i}"),
                ..Default::default()
            }
            .token();
            let app_base = app.base.clone();
            let client = app.client.clone();
            let body = envelope(&format!("x-{i}"), &n).to_string();
            tokio::spawn(async move {
                client
                    .post(format!("{app_base}/webhooks/google"))
                    .bearer_auth(tok)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    // The cached key answers while that fetch hangs.
    let started = std::time::Instant::now();
    let (st, body) = tokio::time::timeout(std::time::Duration::from_secs(3), push(&app, "m-2", &n))
        .await
        .expect("a push with a cached key waited for the keys endpoint");
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    assert!(
        g.fake.with(|s| s.jwks_fetches) <= 2,
        "made-up keys fetched more than once"
    );
    for s in strangers {
        s.abort();
    }
    assert_eq!(app.count("webhook_events").await, 2);
}

on_all_backends!(
    play_held_until_its_owner_appears,
    play_held_claimed_by_new_customer,
    play_renewal_count_from_order_id,
    linked_chain_of_three_hops,
    linked_tokens_out_of_order,
    hanging_jwks_does_not_delay_cached_keys,
    lifecycle_in_order_then_shuffled,
    upgrade_leaves_one_live_purchase,
    push_token_rejections,
    push_key_rotation_refetches_once,
    malformed_pushes,
    unknown_tokens_are_invalid,
    wrong_package_or_product,
    bound_to_another_customer_keep,
    bound_to_another_customer_transfer,
    google_down_then_retry,
    token_endpoint_down,
    acknowledgement_retried_on_next_read,
    acknowledgement_retried_by_sweep,
    access_token_cached_and_refreshed_on_401,
    legacy_receipt_verifies,
    legacy_receipt_bad_signature,
    duplicates_test_and_subscription_refund,
    not_configured,
    verify_requires_a_customer,
);
