//! One customer across watch, phone and web: the watch's device secret, its
//! pairing code, `pairDevice` for the signed-in owner, the operator's
//! `mergeCustomers`, and the old id staying an alias of the account.

mod common;
mod stripe_support;

use chrono::Duration;
use common::{Auth, Backend, TestApp, error_code, hs_config, sign_hs, spawn_with};
use entitle::domain::ApiKeyRole;
use reqwest::StatusCode;
use serde_json::{Value, json};
use stripe_support::*;

fn customer_token(sub: &str) -> Auth {
    let now = chrono::Utc::now().timestamp();
    Auth::Bearer(sign_hs(&json!({
        "sub": sub, "iss": "https://auth.test/", "aud": "entitle", "iat": now, "exp": now + 600
    })))
}

fn admin_token(sub: &str) -> Auth {
    let now = chrono::Utc::now().timestamp();
    Auth::Bearer(sign_hs(&json!({
        "sub": sub, "iss": "https://auth.test/", "aud": "entitle", "iat": now, "exp": now + 600,
        "role": "admin"
    })))
}

/// A server with customer tokens, and Stripe webhooks against a fake API.
async fn start(b: Backend) -> (TestApp, FakeStripe) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| {
        c.auth.jwt = Some(hs_config());
        configure(c, Some(&fake));
    })
    .await;
    (app, fake)
}

/// `POST /user`, optionally with the device's secret.
async fn post_user(app: &TestApp, auth: &Auth, id: &str, secret: Option<&str>) -> Value {
    let mut rb = app.client.post(app.url("/user")).json(&json!({ "id": id }));
    if let Some(s) = secret {
        rb = rb.header("X-Device-Secret", s);
    }
    let resp = auth.apply(rb).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

const PAIR: &str =
    "mutation($c: String!) { pairDevice(code: $c) { id paidStatus devices { deviceId } } }";
const MERGE: &str = "mutation($f: ID!, $i: ID!) { mergeCustomers(from: $f, into: $i) { id paidStatus trialEndsAt purchases { store status } devices { deviceId } } }";

/// Every table pairing or merging writes, for "nothing changed".
async fn state_counts(app: &TestApp) -> Vec<(&'static str, i64)> {
    let mut c = app.counts().await;
    for t in ["customer_aliases", "pairing_codes"] {
        c.push((t, app.count(t).await));
    }
    c.push((
        "used codes",
        app.count("pairing_codes WHERE used_at IS NOT NULL").await,
    ));
    c
}

async fn device_owner(app: &TestApp, device: &str) -> String {
    entitle::db::find_device(&app.state.core.db().conn, "garmin", device)
        .await
        .map_err(anyhow::Error::from)
        .unwrap()
        .unwrap()
        .customer_id
}

async fn kinds(app: &TestApp, customer: &str) -> Vec<String> {
    entitle::db::events_of(&app.state.core.db().conn, customer, 100)
        .await
        .map_err(anyhow::Error::from)
        .unwrap()
        .into_iter()
        .rev()
        .map(|e| e.kind)
        .collect()
}

/// A signed, paid one-time checkout for the lifetime product naming `reference`.
async fn pay_lifetime(app: &TestApp, fake: &FakeStripe, session_id: &str, reference: &str) {
    let session = checkout_session(session_id, "payment", Some(reference), None, None);
    fake.set_line_items(session_id, "price_pro_lifetime");
    let ev = event(
        &format!("evt_{session_id}"),
        "checkout.session.completed",
        session,
        app.state.core.now(),
    );
    let (s, r) = deliver(app, &ev).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["outcome"], "applied", "{r}");
}

async fn watch_trial_web_pays_then_pairs(b: Backend) {
    let (app, fake) = start(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let service = app.key(ApiKeyRole::Service).await;
    let alice = customer_token("alice");

    // First sight: a trial and, once, the device's secret.
    let first = post_user(&app, &key, "watch-1", None).await;
    assert_eq!(first["paid_status"], "trial");
    let secret = first["device_secret"]
        .as_str()
        .expect("secret at first sight");
    assert!(secret.len() >= 40, "{secret}");
    assert!(first.get("pairing_code").is_none());
    let stored: String = entitle::db::find_device(&app.state.core.db().conn, "garmin", "watch-1")
        .await
        .map_err(anyhow::Error::from)
        .unwrap()
        .unwrap()
        .secret_hash
        .unwrap();
    assert_ne!(stored, secret, "only a hash is stored");
    assert_eq!(stored, entitle::service::pairing::hash_secret(secret));
    let again = post_user(&app, &key, "watch-1", None).await;
    assert!(
        again.get("device_secret").is_none(),
        "answered once: {again}"
    );

    // The web account pays; the watch is still on its own trial.
    pay_lifetime(&app, &fake, "cs_web_1", "alice").await;
    let (_, me) = app.gql(&alice, "{ me { id paidStatus } }", json!({})).await;
    assert_eq!(me["data"]["me"]["paidStatus"], "PAID", "{me}");

    // With its secret the watch gets a code; the rest of the answer is as before.
    let with_code = post_user(&app, &key, "watch-1", Some(secret)).await;
    let code = with_code["pairing_code"]
        .as_str()
        .expect("code")
        .to_string();
    assert_eq!(code.len(), 8);
    let expires = chrono::DateTime::parse_from_rfc3339(
        with_code["pairing_code_expires_at"].as_str().unwrap(),
    )
    .unwrap();
    let ttl = expires.to_utc() - app.state.core.now();
    assert!(
        ttl <= Duration::minutes(10) && ttl > Duration::minutes(9),
        "{ttl}"
    );
    for f in [
        "paid_status",
        "status",
        "payment_link",
        "checkout_url",
        "trial_ends_at",
    ] {
        assert_eq!(with_code[f], again[f], "{f}");
    }
    assert_eq!(with_code["paid_status"], "trial");

    // The owner types it in (lower case, with a dash, as people do).
    let typed = format!("{}-{}", &code[..4], &code[4..]).to_lowercase();
    let (s, r) = app.gql(&alice, PAIR, json!({ "c": typed })).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["data"]["pairDevice"]["id"], "alice", "{r}");
    assert_eq!(r["data"]["pairDevice"]["paidStatus"], "PAID");
    assert_eq!(
        r["data"]["pairDevice"]["devices"],
        json!([{ "deviceId": "watch-1" }])
    );

    // The watch's next call answers the account's status, paid on the web.
    let after = post_user(&app, &key, "watch-1", None).await;
    assert_eq!(after["paid_status"], "paid", "{after}");
    assert_eq!(after["status"], "paid");
    assert_eq!(
        after["checkout_url"],
        "https://buy.stripe.com/test_123?client_reference_id=alice"
    );
    assert!(after.get("device_secret").is_none());
    assert_eq!(device_owner(&app, "watch-1").await, "alice");

    // The watch's trial moved with a `transferred` row; the account holds both.
    assert_eq!(kinds(&app, "watch-1").await, vec!["granted", "transferred"]);
    assert_eq!(
        app.count("purchases WHERE customer_id = 'alice'").await,
        2,
        "the lifetime purchase and the watch's trial"
    );
    assert_eq!(
        app.count("purchases WHERE customer_id = 'watch-1'").await,
        0
    );

    // Reads naming the old id land on the account.
    let admin = app.key(ApiKeyRole::Admin).await;
    let (_, r) = app
        .gql(
            &admin,
            "{ customer(id: \"watch-1\") { id paidStatus } }",
            json!({}),
        )
        .await;
    assert_eq!(r["data"]["customer"]["id"], "alice", "{r}");
    assert_eq!(r["data"]["customer"]["paidStatus"], "PAID");
    let resp = service
        .apply(app.client.get(app.url("/api/subscriptions/check/watch-1")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let check: Value = resp.json().await.unwrap();
    assert_eq!(check["customer_id"], "alice", "{check}");
    assert_eq!(check["is_subscribed"], true);
    assert_eq!(check["paid_status"], "paid");

    // The code was single use.
    let before = state_counts(&app).await;
    let (_, r) = app
        .gql(&customer_token("bob"), PAIR, json!({ "c": code }))
        .await;
    assert_eq!(error_code(&r), Some("INVALID_PAIRING_CODE"), "{r}");
    assert_eq!(state_counts(&app).await, before);
}

async fn admin_merge_keeps_one_trial_and_the_alias(b: Backend) {
    let (app, fake) = start(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let admin = app.key(ApiKeyRole::Admin).await;

    // The watch's trial starts a day before the account's own (a phone).
    let watch = post_user(&app, &key, "watch-a", None).await;
    let watch_trial_end = watch["trial_ends_at"].as_str().unwrap().to_string();
    app.clock.advance(Duration::days(1));
    let (_, r) = app
        .gql(
            &key,
            "mutation { registerDevice(input: {platform: IOS, deviceId: \"phone-a\", customerId: \"acct\"}) { created customer { trialEndsAt } } }",
            json!({}),
        )
        .await;
    assert_eq!(r["data"]["registerDevice"]["created"], true, "{r}");
    let rfc = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    let watch_end = rfc(&json!(watch_trial_end));
    let acct_end = rfc(&r["data"]["registerDevice"]["customer"]["trialEndsAt"]);
    assert!(acct_end - watch_end >= Duration::hours(23), "{r}");

    let (s, r) = app
        .gql(&admin, MERGE, json!({ "f": "watch-a", "i": "acct" }))
        .await;
    assert_eq!(s, StatusCode::OK);
    let m = &r["data"]["mergeCustomers"];
    assert_eq!(m["id"], "acct", "{r}");
    assert_eq!(m["paidStatus"], "TRIAL");
    // The earliest-started trial is the one kept.
    let kept = rfc(&m["trialEndsAt"]);
    assert!((kept - watch_end).abs() < Duration::seconds(1), "{r}");
    let mut devices: Vec<&str> = m["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap())
        .collect();
    devices.sort();
    assert_eq!(devices, vec!["phone-a", "watch-a"]);
    let trials: Vec<&Value> = m["purchases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["store"] == "TRIAL")
        .collect();
    assert_eq!(trials.len(), 2, "{r}");
    assert_eq!(
        trials.iter().filter(|p| p["status"] == "ACTIVE").count(),
        1,
        "one trial survives: {r}"
    );
    assert_eq!(kinds(&app, "watch-a").await, vec!["granted", "transferred"]);

    // No fresh trial for either id afterwards, from any client.
    app.clock.advance(Duration::days(7));
    assert_eq!(
        post_user(&app, &key, "watch-a", None).await["paid_status"],
        "expired"
    );
    for (device, customer) in [("tab-1", "acct"), ("tab-2", "watch-a")] {
        let (_, r) = app
            .gql(
                &key,
                "mutation($d: String!, $c: ID!) { registerDevice(input: {platform: ANDROID, deviceId: $d, customerId: $c}) { created customer { id paidStatus } } }",
                json!({ "d": device, "c": customer }),
            )
            .await;
        assert_eq!(r["data"]["registerDevice"]["created"], true, "{r}");
        assert_eq!(r["data"]["registerDevice"]["customer"]["id"], "acct");
        assert_eq!(
            r["data"]["registerDevice"]["customer"]["paidStatus"],
            "EXPIRED"
        );
    }
    assert_eq!(app.count("purchases WHERE store = 'trial'").await, 2);

    // A payment link still naming the watch lands on the account.
    pay_lifetime(&app, &fake, "cs_old_link", "watch-a").await;
    assert_eq!(
        post_user(&app, &key, "watch-a", None).await["paid_status"],
        "paid"
    );
    assert_eq!(
        app.count("purchases WHERE customer_id = 'watch-a'").await,
        0
    );
    let c = entitlements(&app, "acct").await;
    assert_eq!(entitlement(&c, "maps")["isActive"], true, "{c}");
    assert_eq!(
        entitlements(&app, "watch-a").await,
        c,
        "alias reads the account"
    );

    // Grants naming the old id land on the account too.
    let (_, g) = app
        .gql(
            &admin,
            "mutation { grantEntitlement(customerId: \"watch-a\", entitlement: \"pro\") { id } }",
            json!({}),
        )
        .await;
    assert_eq!(g["data"]["grantEntitlement"]["id"], "acct", "{g}");
    assert_eq!(
        app.count("purchases WHERE customer_id = 'watch-a'").await,
        0
    );
}

async fn merge_bad_inputs_change_nothing(b: Backend) {
    let (app, _fake) = start(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let service = app.key(ApiKeyRole::Service).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    post_user(&app, &key, "w1", None).await;
    post_user(&app, &key, "w2", None).await;
    let before = state_counts(&app).await;

    for (auth, code) in [
        (Auth::None, "UNAUTHENTICATED"),
        (key.clone(), "FORBIDDEN"),
        (service.clone(), "FORBIDDEN"),
        (customer_token("w2"), "FORBIDDEN"),
    ] {
        let (_, r) = app.gql(&auth, MERGE, json!({ "f": "w1", "i": "w2" })).await;
        assert_eq!(error_code(&r), Some(code), "{auth:?}: {r}");
        assert_eq!(r["data"], Value::Null);
    }
    for (f, i, code) in [
        ("w1", "w1", "BAD_USER_INPUT"),
        ("nobody", "w1", "NOT_FOUND"),
        ("w1", "nobody", "NOT_FOUND"),
        ("w1", "bad\u{7}id", "BAD_USER_INPUT"),
    ] {
        let (_, r) = app.gql(&admin, MERGE, json!({ "f": f, "i": i })).await;
        assert_eq!(error_code(&r), Some(code), "{f} -> {i}: {r}");
    }
    assert_eq!(state_counts(&app).await, before);
    assert_eq!(device_owner(&app, "w1").await, "w1");

    // Once merged, merging again (the alias into its account) is "into itself".
    let (_, r) = app
        .gql(&admin_token("ops"), MERGE, json!({ "f": "w1", "i": "w2" }))
        .await;
    assert_eq!(r["data"]["mergeCustomers"]["id"], "w2", "{r}");
    let merged = state_counts(&app).await;
    for (f, i) in [("w1", "w2"), ("w2", "w1")] {
        let (_, r) = app.gql(&admin, MERGE, json!({ "f": f, "i": i })).await;
        assert_eq!(error_code(&r), Some("BAD_USER_INPUT"), "{f} -> {i}: {r}");
    }
    assert_eq!(state_counts(&app).await, merged);
}

async fn pairing_bad_inputs_change_nothing(b: Backend) {
    let (app, _fake) = start(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let alice = customer_token("alice");
    let bob = customer_token("bob");

    let first = post_user(&app, &key, "watch-p", None).await;
    let secret = first["device_secret"].as_str().unwrap().to_string();
    let other = post_user(&app, &key, "watch-q", None).await;
    let other_secret = other["device_secret"].as_str().unwrap().to_string();
    let plain = post_user(&app, &key, "watch-p", None).await;
    let before = state_counts(&app).await;

    // Without the secret, or with a wrong one (another device's, too): no
    // code, the same answer otherwise, and nothing written.
    for wrong in ["", "not-the-secret", other_secret.as_str(), &secret[..20]] {
        let r = post_user(&app, &key, "watch-p", Some(wrong)).await;
        assert_eq!(r, plain, "{wrong:?}");
    }
    assert_eq!(state_counts(&app).await, before);

    // Unknown and malformed codes.
    for code in ["ABCDEFGH", "abc", "ABCDEFG0", "", &"A".repeat(64)] {
        let (s, r) = app.gql(&alice, PAIR, json!({ "c": code })).await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            matches!(
                error_code(&r),
                Some("INVALID_PAIRING_CODE" | "BAD_USER_INPUT")
            ),
            "{code:?}: {r}"
        );
    }
    let (_, r) = app.gql(&alice, PAIR, json!({ "c": "ABCDEFGH" })).await;
    assert_eq!(error_code(&r), Some("INVALID_PAIRING_CODE"));
    assert_eq!(state_counts(&app).await, before);

    // Only a signed-in customer may pair.
    let code = post_user(&app, &key, "watch-p", Some(&secret)).await["pairing_code"]
        .as_str()
        .unwrap()
        .to_string();
    let with_code = state_counts(&app).await;
    for (auth, expected) in [
        (Auth::None, "UNAUTHENTICATED"),
        (key.clone(), "FORBIDDEN"),
        (admin.clone(), "FORBIDDEN"),
        (admin_token("ops"), "FORBIDDEN"),
    ] {
        let (_, r) = app.gql(&auth, PAIR, json!({ "c": code })).await;
        assert_eq!(error_code(&r), Some(expected), "{auth:?}: {r}");
    }
    assert_eq!(state_counts(&app).await, with_code);

    // A newer code replaces it; an expired one is refused.
    let newer = post_user(&app, &key, "watch-p", Some(&secret)).await["pairing_code"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, r) = app.gql(&alice, PAIR, json!({ "c": code })).await;
    assert_eq!(
        error_code(&r),
        Some("INVALID_PAIRING_CODE"),
        "replaced: {r}"
    );
    app.clock
        .advance(Duration::minutes(10) + Duration::seconds(1));
    let expired = state_counts(&app).await;
    let (_, r) = app.gql(&alice, PAIR, json!({ "c": newer })).await;
    assert_eq!(error_code(&r), Some("INVALID_PAIRING_CODE"), "expired: {r}");
    assert_eq!(state_counts(&app).await, expired);
    assert_eq!(device_owner(&app, "watch-p").await, "watch-p");

    // Paired with alice, the device cannot be paired with bob, even with a
    // fresh code from its own secret.
    let code = post_user(&app, &key, "watch-p", Some(&secret)).await["pairing_code"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, r) = app.gql(&alice, PAIR, json!({ "c": code })).await;
    assert_eq!(r["data"]["pairDevice"]["id"], "alice", "{r}");
    let code = post_user(&app, &key, "watch-p", Some(&secret)).await["pairing_code"]
        .as_str()
        .unwrap()
        .to_string();
    let paired = state_counts(&app).await;
    let (_, r) = app.gql(&bob, PAIR, json!({ "c": code })).await;
    assert_eq!(error_code(&r), Some("DEVICE_ALREADY_PAIRED"), "{r}");
    assert_eq!(state_counts(&app).await, paired);
    assert_eq!(device_owner(&app, "watch-p").await, "alice");
    assert_eq!(app.count("customers WHERE id = 'bob'").await, 0);
    // Its owner redeeming it again is harmless.
    let (_, r) = app.gql(&alice, PAIR, json!({ "c": code })).await;
    assert_eq!(r["data"]["pairDevice"]["id"], "alice", "{r}");
    assert_eq!(app.count("customer_aliases").await, 1);
}

/// A device first seen before secrets existed (here: registered over
/// GraphQL, which answers none) is answered one on its next `POST /user`.
async fn device_seen_before_gets_its_secret_once(b: Backend) {
    let (app, _fake) = start(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let (_, r) = app
        .gql(
            &key,
            "mutation { registerDevice(input: {platform: GARMIN, deviceId: \"old-watch\"}) { created } }",
            json!({}),
        )
        .await;
    assert_eq!(r["data"]["registerDevice"]["created"], true, "{r}");
    assert_eq!(app.count("devices WHERE secret_hash IS NULL").await, 1);

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, url, key) = (app.client.clone(), app.url("/user"), key.clone());
        tasks.push(tokio::spawn(async move {
            let resp = key
                .apply(client.post(url).json(&json!({ "id": "old-watch" })))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.json::<Value>().await.unwrap()
        }));
    }
    let mut secrets = Vec::new();
    for t in tasks {
        if let Some(s) = t.await.unwrap()["device_secret"].as_str() {
            secrets.push(s.to_string());
        }
    }
    assert_eq!(secrets.len(), 1, "answered once, even to concurrent calls");
    assert!(post_user(&app, &key, "old-watch", None).await["device_secret"].is_null());
    let r = post_user(&app, &key, "old-watch", Some(&secrets[0])).await;
    assert_eq!(r["pairing_code"].as_str().map(str::len), Some(8), "{r}");
}

on_all_backends!(
    watch_trial_web_pays_then_pairs,
    admin_merge_keeps_one_trial_and_the_alias,
    merge_bad_inputs_change_nothing,
    pairing_bad_inputs_change_nothing,
    device_seen_before_gets_its_secret_once,
);
