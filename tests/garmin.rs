//! The Garmin watch flow over `POST /user`: trial on first sight, expiry,
//! promotional grant, and every bad input.

mod common;

use chrono::Duration;
use common::{Auth, Backend, spawn};
use entitle::domain::ApiKeyRole;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::json;

async fn trial_then_expired_then_granted(b: Backend) {
    let app = spawn(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let admin = app.key(ApiKeyRole::Admin).await;

    let (s, body) = app.post_user(&key, "watch-1").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["paid_status"], "trial");
    assert_eq!(body["status"], "trial");
    assert_eq!(body["payment_link"], "https://buy.stripe.com/test_123");
    assert_eq!(
        body["checkout_url"],
        "https://buy.stripe.com/test_123?client_reference_id=watch-1"
    );
    let ends =
        chrono::DateTime::parse_from_rfc3339(body["trial_ends_at"].as_str().unwrap()).unwrap();
    let expected = app.state.core.now() + Duration::days(7);
    assert!(
        (ends.to_utc() - expected).num_seconds().abs() < 5,
        "{ends} vs {expected}"
    );

    // Still trial a moment before the end; expired from the end on.
    app.clock.advance(Duration::days(7) - Duration::seconds(10));
    assert_eq!(
        app.post_user(&key, "watch-1").await.1["paid_status"],
        "trial"
    );
    app.clock.advance(Duration::seconds(11));
    let (_, body) = app.post_user(&key, "watch-1").await;
    assert_eq!(body["paid_status"], "expired");
    assert_eq!(body["status"], "trial_ended", "legacy field");
    assert_eq!(
        body["trial_ends_at"].as_str().unwrap(),
        ends.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );

    let (s, g) = app
        .gql(
            &admin,
            "mutation($id: ID!) { grantEntitlement(customerId: $id, entitlement: \"pro\") { paidStatus } }",
            json!({ "id": "watch-1" }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(g["data"]["grantEntitlement"]["paidStatus"], "PAID", "{g}");
    let (_, body) = app.post_user(&key, "watch-1").await;
    assert_eq!(body["paid_status"], "paid");
    assert_eq!(body["status"], "paid");
}

async fn reregistration_never_restarts_the_trial(b: Backend) {
    let app = spawn(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    assert_eq!(
        app.post_user(&key, "watch-2").await.1["paid_status"],
        "trial"
    );
    app.clock.advance(Duration::days(8));
    // The same device again, by query string, and from the GraphQL client.
    let resp = key
        .apply(app.client.post(app.url("/user?id=watch-2")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["paid_status"],
        "expired"
    );
    let (_, r) = app
        .gql(
            &key,
            "mutation { registerDevice(input: {platform: GARMIN, deviceId: \"watch-2\"}) { created customer { paidStatus } } }",
            json!({}),
        )
        .await;
    assert_eq!(r["data"]["registerDevice"]["created"], false, "{r}");
    assert_eq!(
        r["data"]["registerDevice"]["customer"]["paidStatus"],
        "EXPIRED"
    );
    // A phone of the same customer does not get a fresh trial either.
    let (_, r) = app
        .gql(
            &key,
            "mutation { registerDevice(input: {platform: IOS, deviceId: \"phone-9\", customerId: \"watch-2\"}) { created customer { paidStatus } } }",
            json!({}),
        )
        .await;
    assert_eq!(r["data"]["registerDevice"]["created"], true, "{r}");
    assert_eq!(
        r["data"]["registerDevice"]["customer"]["paidStatus"],
        "EXPIRED"
    );
    assert_eq!(app.count("purchases").await, 1);
    assert_eq!(
        app.count("entitlement_events").await,
        2,
        "the trial's start and its end (logged when the phone's write noticed it), no second trial"
    );
}

async fn concurrent_first_sight_creates_one_trial(b: Backend) {
    let app = spawn(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (client, url, key) = (app.client.clone(), app.url("/user"), key.clone());
        tasks.push(tokio::spawn(async move {
            let resp = key
                .apply(client.post(url).json(&json!({"id": "racer"})))
                .send()
                .await
                .unwrap();
            (
                resp.status(),
                resp.json::<serde_json::Value>().await.unwrap(),
            )
        }));
    }
    for t in tasks {
        let (s, body) = t.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["paid_status"], "trial");
    }
    assert_eq!(app.count("customers").await, 1);
    assert_eq!(app.count("devices").await, 1);
    assert_eq!(app.count("purchases").await, 1);
    assert_eq!(app.count("entitlement_events").await, 1);
}

async fn concurrent_distinct_devices_all_succeed(b: Backend) {
    let app = spawn(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let mut tasks = Vec::new();
    for i in 0..48 {
        let (client, url, key) = (app.client.clone(), app.url("/user"), key.clone());
        tasks.push(tokio::spawn(async move {
            key.apply(client.post(url).json(&json!({"id": format!("dev-{i}")})))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            StatusCode::OK,
            "no write may fail with a locked database"
        );
    }
    assert_eq!(app.count("purchases").await, 48);
}

async fn bad_input_is_rejected_and_writes_nothing(b: Backend) {
    let app = spawn(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let revoked = app.key(ApiKeyRole::Client).await;
    let Auth::Key(revoked_key) = &revoked else {
        unreachable!()
    };
    app.state
        .core
        .api_keys()
        .revoke_api_key(&revoked_key[..12])
        .await
        .map_err(anyhow::Error::from)
        .unwrap();
    let service = app.key(ApiKeyRole::Service).await;
    let before = app.counts().await;

    let cases: Vec<(&str, Auth, reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            "missing key",
            Auth::None,
            app.client.post(app.url("/user")).json(&json!({"id": "x"})),
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
        ),
        (
            "unknown key",
            Auth::Key(
                "ent_0000000000000000000000000000000000000000000000000000000000000000".into(),
            ),
            app.client.post(app.url("/user")).json(&json!({"id": "x"})),
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
        ),
        (
            "garbage key",
            Auth::Key("nope".into()),
            app.client.post(app.url("/user")).json(&json!({"id": "x"})),
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
        ),
        (
            "revoked key",
            revoked.clone(),
            app.client.post(app.url("/user")).json(&json!({"id": "x"})),
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
        ),
        (
            "service key cannot register",
            service.clone(),
            app.client.post(app.url("/user")).json(&json!({"id": "x"})),
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
        ),
        (
            "malformed JSON",
            key.clone(),
            app.client
                .post(app.url("/user"))
                .header("content-type", "application/json")
                .body("{\"id\": "),
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
        ),
        (
            "wrong JSON shape",
            key.clone(),
            app.client
                .post(app.url("/user"))
                .json(&json!({"device": "x"})),
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
        ),
        (
            "missing id",
            key.clone(),
            app.client.post(app.url("/user")),
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
        ),
        (
            "empty id",
            key.clone(),
            app.client.post(app.url("/user")).json(&json!({"id": ""})),
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
        ),
        (
            "id over 256 bytes",
            key.clone(),
            app.client
                .post(app.url("/user"))
                .json(&json!({"id": "é".repeat(129)})),
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
        ),
        (
            "control character",
            key.clone(),
            app.client
                .post(app.url("/user"))
                .json(&json!({"id": "a\u{0}b"})),
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
        ),
        (
            "newline in query id",
            key.clone(),
            app.client.post(app.url("/user?id=a%0Ab")),
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
        ),
        (
            "oversize body",
            key.clone(),
            app.client
                .post(app.url("/user"))
                .header("content-type", "application/json")
                .body(format!("{{\"id\": \"{}\"}}", "a".repeat(70_000))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
        ),
    ];
    for (name, auth, rb, status, code) in cases {
        let resp = auth.apply(rb).send().await.unwrap();
        assert_eq!(resp.status(), status, "{name}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{name}: {body}");
    }
    assert_eq!(
        app.counts().await,
        before,
        "a rejected request wrote something"
    );
}

async fn oversize_chunked_body_is_rejected(b: Backend) {
    let app = spawn(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let before = app.counts().await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..100).map(|_| Ok(vec![b' '; 1024])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let resp = key
        .apply(app.client.post(app.url("/user")).body(body))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.counts().await, before);
}

on_all_backends!(
    trial_then_expired_then_granted,
    reregistration_never_restarts_the_trial,
    concurrent_first_sight_creates_one_trial,
    concurrent_distinct_devices_all_succeed,
    bad_input_is_rejected_and_writes_nothing,
    oversize_chunked_body_is_rejected,
);

/// A client that never finishes its body is cut off by the request timeout.
async fn slow_clients_time_out(b: Backend) {
    let app = common::spawn_with(b, |c| c.http.request_timeout_secs = 1).await;
    let key = app.key(ApiKeyRole::Client).await;
    let before = app.counts().await;
    let stream =
        futures_util::stream::once(async { Ok::<_, std::io::Error>(b"{\"id\": ".to_vec()) })
            .chain(futures_util::stream::pending());
    let resp = key
        .apply(
            app.client
                .post(app.url("/user"))
                .header("content-type", "application/json"),
        )
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(app.counts().await, before);
}

on_all_backends!(slow_clients_time_out);

/// The known-device path reads from memory; an admin's rebind and a grant made
/// through the server show on the very next `POST /user`.
async fn cached_device_reads_follow_rebind_and_grant(b: Backend) {
    let app = spawn(b).await;
    let key = app.key(ApiKeyRole::Client).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    assert_eq!(app.post_user(&key, "w-r").await.1["paid_status"], "trial");
    assert_eq!(app.post_user(&key, "w-r").await.1["paid_status"], "trial");
    // Only an admin moves a bound device.
    let (_, r) = app
        .gql(
            &admin,
            "mutation { registerDevice(input: {platform: GARMIN, deviceId: \"w-r\", customerId: \"acct-1\"}) { created customer { id paidStatus } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        r["data"]["registerDevice"]["customer"]["id"], "acct-1",
        "{r}"
    );
    let (_, body) = app.post_user(&key, "w-r").await;
    assert_eq!(
        body["paid_status"], "expired",
        "now bound to acct-1, which never had a trial: {body}"
    );
    assert_eq!(
        body["checkout_url"],
        "https://buy.stripe.com/test_123?client_reference_id=acct-1"
    );
    app.gql(
        &admin,
        "mutation { grantEntitlement(customerId: \"acct-1\", entitlement: \"pro\") { id } }",
        json!({}),
    )
    .await;
    assert_eq!(app.post_user(&key, "w-r").await.1["paid_status"], "paid");
}

on_all_backends!(cached_device_reads_follow_rebind_and_grant);
