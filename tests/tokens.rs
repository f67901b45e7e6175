//! Issue 15: signed entitlement tokens, the JWKS, signed live answers, key
//! rotation, and the README's JavaScript and Python verifiers run against a
//! live server.

mod common;

use std::{path::Path, process::Command, sync::Arc, time::Duration as StdDuration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::Duration;
use common::{Auth, Backend, TestApp, error_code, hs_config, sign_hs, spawn, spawn_with};
use entitle::domain::ApiKeyRole;
use jsonwebtoken::{DecodingKey, Validation, jwk::JwkSet};
use reqwest::StatusCode;
use serde_json::{Value, json};

const NONCE: &str = "n0nce-0123456789abcdef";

async fn jwks(app: &TestApp) -> Value {
    let resp = app
        .client
        .get(app.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let cc = resp.headers()["cache-control"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(cc.contains("max-age"), "{cc}");
    resp.json().await.unwrap()
}

/// Verifies like a careful client: the kid must be published, the alg must
/// be the key's, iss/aud/exp checked.
fn verify(token: &str, jwks: &Value) -> Result<Value, String> {
    let set: JwkSet = serde_json::from_value(jwks.clone()).map_err(|e| e.to_string())?;
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("no kid")?;
    let jwk = set
        .find(&kid)
        .ok_or_else(|| format!("kid {kid} not published"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut v = Validation::new(header.alg);
    v.set_issuer(&["entitle"]);
    v.set_audience(&["entitle-clients"]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v.leeway = 0;
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

fn payload(token: &str) -> Value {
    let p = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

async fn user(app: &TestApp, key: &Auth, id: &str) -> Value {
    let (s, body) = app.post_user(key, id).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

async fn tokens_follow_the_state_and_are_signed_once_per_state(b: Backend) {
    let app = spawn(b).await;
    let client = app.key(ApiKeyRole::Client).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let service = app.key(ApiKeyRole::Service).await;

    let first = user(&app, &client, "watch-1").await;
    let token = first["entitlement_token"].as_str().unwrap().to_string();
    let keys = jwks(&app).await;
    let claims = verify(&token, &keys).unwrap();
    assert_eq!(claims["sub"], "watch-1");
    assert_eq!(claims["dev"], "watch-1");
    assert_eq!(claims["paid_status"], "trial");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3 * 86_400
    );
    // The trial ends after 7 days, beyond exp: still carried, with its end.
    let trial_end = chrono::DateTime::parse_from_rfc3339(first["trial_ends_at"].as_str().unwrap())
        .unwrap()
        .timestamp();
    assert_eq!(claims["ent"], json!({ "pro": trial_end }));
    let keys_in_claims: Vec<&String> = claims.as_object().unwrap().keys().collect();
    assert_eq!(
        keys_in_claims,
        [
            "aud",
            "dev",
            "ent",
            "exp",
            "iat",
            "iss",
            "paid_status",
            "sub"
        ],
        "nothing but the documented claims"
    );

    // Same state, same bucket: the same token, not signed again.
    let signed = app.state.core.tokens().signed_count();
    let again = user(&app, &client, "watch-1").await;
    assert_eq!(again["entitlement_token"], first["entitlement_token"]);
    assert_eq!(app.state.core.tokens().signed_count(), signed);

    // A grant shows in the very next token; a revoke takes it away again.
    let (s, r) = app
        .gql(
            &admin,
            r#"mutation { grantEntitlement(customerId: "watch-1", entitlement: "maps") { id } }"#,
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert!(r["errors"].is_null(), "{r}");
    let granted = user(&app, &client, "watch-1").await;
    let c = verify(granted["entitlement_token"].as_str().unwrap(), &keys).unwrap();
    assert_eq!(c["paid_status"], "paid");
    assert_eq!(c["ent"], json!({ "pro": trial_end, "maps": null }));
    let (_, r) = app
        .gql(
            &admin,
            r#"mutation { revokeGrant(customerId: "watch-1", entitlement: "maps") { id } }"#,
            json!({}),
        )
        .await;
    assert!(r["errors"].is_null(), "{r}");
    let revoked = user(&app, &client, "watch-1").await;
    let c = verify(revoked["entitlement_token"].as_str().unwrap(), &keys).unwrap();
    assert_eq!(
        c["ent"],
        json!({ "pro": trial_end }),
        "revoked: gone at once"
    );
    assert_eq!(c["paid_status"], "trial");

    // The subscription check hands out the customer's token, without `dev`.
    let resp = service
        .apply(app.client.get(app.url("/api/subscriptions/check/watch-1")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let check: Value = resp.json().await.unwrap();
    let c = verify(check["entitlement_token"].as_str().unwrap(), &keys).unwrap();
    assert_eq!(c["sub"], "watch-1");
    assert!(c.get("dev").is_none());

    // GraphQL: a client key for the customer it names, with or without a device.
    let (_, r) = app
        .gql(
            &client,
            r#"{ customer(id: "watch-1") { entitlementToken d: entitlementToken(deviceId: "watch-1") } }"#,
            json!({}),
        )
        .await;
    assert!(r["errors"].is_null(), "{r}");
    let c = verify(
        r["data"]["customer"]["entitlementToken"].as_str().unwrap(),
        &keys,
    )
    .unwrap();
    assert!(c.get("dev").is_none());
    let c = verify(r["data"]["customer"]["d"].as_str().unwrap(), &keys).unwrap();
    assert_eq!(c["dev"], "watch-1");

    // A lapsed trial leaves `ent` empty and the status expired.
    app.clock.advance(Duration::days(8));
    let lapsed = user(&app, &client, "watch-1").await;
    let keys = jwks(&app).await;
    let c = verify(lapsed["entitlement_token"].as_str().unwrap(), &keys).unwrap();
    assert_eq!(c["ent"], json!({}));
    assert_eq!(c["paid_status"], "expired");

    // No store ids, receipts or product ids anywhere in a token.
    for t in [&token, lapsed["entitlement_token"].as_str().unwrap()] {
        let p = payload(t).to_string();
        assert!(!p.contains("pro_") && !p.contains("trial:"), "{p}");
    }
}

async fn the_token_is_read_only_with_the_right_credential(b: Backend) {
    let app = spawn_with(b, |c| c.auth.jwt = Some(hs_config())).await;
    let client = app.key(ApiKeyRole::Client).await;
    user(&app, &client, "dev-a").await;
    user(&app, &client, "dev-b").await;
    let now = chrono::Utc::now().timestamp();
    let customer = |sub: &str| {
        Auth::Bearer(sign_hs(&json!({
            "sub": sub, "iss": "https://auth.test/", "aud": "entitle",
            "iat": now, "exp": now + 600,
        })))
    };
    let keys = jwks(&app).await;

    let (_, r) = app
        .gql(&customer("dev-a"), "{ me { entitlementToken } }", json!({}))
        .await;
    let c = verify(r["data"]["me"]["entitlementToken"].as_str().unwrap(), &keys).unwrap();
    assert_eq!(c["sub"], "dev-a");

    let q = r#"{ customer(id: "dev-b") { entitlementToken } }"#;
    let (_, r) = app.gql(&customer("dev-a"), q, json!({})).await;
    assert_eq!(error_code(&r), Some("FORBIDDEN"), "{r}");
    assert!(r["data"]["customer"].is_null(), "{r}");
    let (_, r) = app.gql(&Auth::None, q, json!({})).await;
    assert_eq!(error_code(&r), Some("UNAUTHENTICATED"), "{r}");

    // A device of another customer is not named in this customer's token.
    let (_, r) = app
        .gql(
            &client,
            r#"{ customer(id: "dev-a") { entitlementToken(deviceId: "dev-b") } }"#,
            json!({}),
        )
        .await;
    assert_eq!(error_code(&r), Some("NOT_FOUND"), "{r}");

    // The check stays a service-key route.
    let resp = client
        .apply(app.client.get(app.url("/api/subscriptions/check/dev-a")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // The JWKS needs no credential, and a wrong one does not matter to it.
    let resp = app
        .client
        .get(app.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    for k in body["keys"].as_array().unwrap() {
        assert!(k.get("d").is_none(), "no private member: {k}");
        assert_eq!(k["use"], "sig");
    }
}

/// Verifies an `X-Entitle-Signature` the way the README describes.
fn verify_answer(sig: &str, nonce: &str, path: &str, body: &[u8], jwks: &Value) -> bool {
    let (h, s) = sig.split_once("..").expect("detached JWS");
    let mut input = format!("{nonce}\n{path}\n").into_bytes();
    input.extend_from_slice(body);
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap();
    if header["typ"] != "entitle-answer+jws" {
        return false;
    }
    let set: JwkSet = serde_json::from_value(jwks.clone()).unwrap();
    let Some(jwk) = set.find(header["kid"].as_str().unwrap()) else {
        return false;
    };
    let key = DecodingKey::from_jwk(jwk).unwrap();
    let alg: jsonwebtoken::Algorithm = serde_json::from_value(header["alg"].clone()).unwrap();
    let signing_input = format!("{h}.{}", URL_SAFE_NO_PAD.encode(&input));
    jsonwebtoken::crypto::verify(s, signing_input.as_bytes(), &key, alg).unwrap_or(false)
}

async fn answers_are_signed_over_nonce_path_and_body(b: Backend) {
    let app = spawn(b).await;
    let client = app.key(ApiKeyRole::Client).await;
    let service = app.key(ApiKeyRole::Service).await;
    let keys = jwks(&app).await;

    // Out-of-bounds nonces: 400 before anything happens.
    let before = app.counts().await;
    for bad in ["short-nonce", &"x".repeat(65), "has space in it 0123"] {
        let resp = client
            .apply(
                app.client
                    .post(app.url("/user"))
                    .json(&json!({ "id": "w-bad" })),
            )
            .header("x-entitle-nonce", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert!(resp.headers().get("x-entitle-signature").is_none());
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "BAD_USER_INPUT");
    }
    assert_eq!(
        app.counts().await,
        before,
        "a refused nonce changes nothing"
    );

    // Without a nonce: no signature.
    let resp = client
        .apply(
            app.client
                .post(app.url("/user"))
                .json(&json!({ "id": "w1" })),
        )
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("x-entitle-signature").is_none());

    // POST /user with ?id=: the path includes the query.
    let resp = client
        .apply(app.client.post(app.url("/user?id=w1")))
        .header("x-entitle-nonce", NONCE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let sig = resp.headers()["x-entitle-signature"]
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.bytes().await.unwrap();
    assert!(verify_answer(&sig, NONCE, "/user?id=w1", &body, &keys));
    assert!(
        !verify_answer(&sig, "another-nonce-0123456", "/user?id=w1", &body, &keys),
        "replayed"
    );
    assert!(
        !verify_answer(&sig, NONCE, "/user?id=w2", &body, &keys),
        "other request"
    );
    let mut altered = body.to_vec();
    let at = altered.windows(5).position(|w| w == b"trial").unwrap();
    altered[at..at + 5].copy_from_slice(b"paid\"");
    assert!(
        !verify_answer(&sig, NONCE, "/user?id=w1", &altered, &keys),
        "altered"
    );

    // The subscription check and GraphQL sign too.
    let resp = service
        .apply(app.client.get(app.url("/api/subscriptions/check/w1")))
        .header("x-entitle-nonce", NONCE)
        .send()
        .await
        .unwrap();
    let sig = resp.headers()["x-entitle-signature"]
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.bytes().await.unwrap();
    assert!(verify_answer(
        &sig,
        NONCE,
        "/api/subscriptions/check/w1",
        &body,
        &keys
    ));
    let resp = client
        .apply(
            app.client
                .post(app.url("/graphql"))
                .json(&json!({ "query": r#"{ customer(id: "w1") { paidStatus } }"# })),
        )
        .header("x-entitle-nonce", NONCE)
        .send()
        .await
        .unwrap();
    let sig = resp.headers()["x-entitle-signature"]
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.bytes().await.unwrap();
    assert!(verify_answer(&sig, NONCE, "/graphql", &body, &keys));
    let resp = client
        .apply(
            app.client
                .post(app.url("/graphql"))
                .json(&json!({ "query": "{ products { id } }" })),
        )
        .header("x-entitle-nonce", "tiny")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

async fn rotation_under_load_keeps_every_token_verifiable(b: Backend) {
    let app = Arc::new(spawn_with(b, |c| c.tokens.key_refresh_secs = 1).await);
    let client = app.key(ApiKeyRole::Client).await;
    let (kids, old_kid) = app.state.core.tokens().published_kids().await.unwrap();
    assert_eq!(kids, std::slice::from_ref(&old_kid));
    let old_token = user(&app, &client, "rot-0").await["entitlement_token"]
        .as_str()
        .unwrap()
        .to_string();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (app, client, stop) = (app.clone(), client.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (s, body) = app.post_user(&client, &format!("rot-{w}-{}", i % 5)).await;
                assert_eq!(s, StatusCode::OK, "{body}");
                let token = body["entitlement_token"].as_str().unwrap().to_string();
                let keys = jwks(&app).await;
                verify(&token, &keys).unwrap_or_else(|e| panic!("{e}: {token}"));
                seen.push(kid_of(&token));
                i += 1;
            }
            seen
        }));
    }
    tokio::time::sleep(StdDuration::from_millis(400)).await;
    let new = app.state.core.tokens().rotate(None).await.unwrap();
    assert_ne!(new.kid, old_kid);
    // Published at once, signing one refresh period later.
    let (kids, current) = app.state.core.tokens().published_kids().await.unwrap();
    assert!(kids.contains(&new.kid) && kids.contains(&old_kid));
    assert_eq!(current, old_kid);
    tokio::time::sleep(StdDuration::from_millis(1800)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.expect("no request failed"));
    }
    assert!(seen.contains(&old_kid), "signed with the old key before");
    assert!(seen.contains(&new.kid), "and with the new one after");

    // The retired key stays published while its tokens live...
    let keys = jwks(&app).await;
    verify(&old_token, &keys).unwrap();
    // ...and drops out once the last of them has expired.
    app.clock.advance(Duration::days(3) + Duration::seconds(10));
    let keys = jwks(&app).await;
    let published: Vec<&str> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(published, [new.kid.as_str()]);
    let err = verify(&old_token, &keys).unwrap_err();
    assert!(err.contains("not published"), "{err}");
    // New tokens keep coming, signed by the new key.
    let t = user(&app, &client, "rot-0").await;
    assert_eq!(kid_of(t["entitlement_token"].as_str().unwrap()), new.kid);
}

async fn keys_are_encrypted_at_rest_and_need_the_same_key(b: Backend) {
    let app = spawn(b.clone()).await;
    let db = &app.state.core.db().conn;
    use sea_orm::EntityTrait;
    let rows = entities::signing_keys::Entity::find()
        .all(db)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "created on first start");
    let row = &rows[0];
    assert_eq!(row.algorithm, "ES256");
    assert!(
        !format!("{row:?}").contains(&row.private_key),
        "ciphertext kept out of Debug"
    );
    let jwk: Value = serde_json::from_str(&row.public_jwk).unwrap();
    assert!(jwk.get("d").is_none());

    // A different encryption key cannot open the stored key: refuse to start.
    let mut config = common::test_config();
    config.database_url = entitle::config::Secret::new(app.database_url.clone());
    config.tokens.encryption_key = Some(entitle::config::Secret::new(
        "b3RoZXItZW5jcnlwdGlvbi1rZXktb2YtMzItYnl0ZXM=",
    ));
    let err = entitle::app::AppState::new(config, Arc::new(entitle::clock::SystemClock))
        .await
        .err()
        .expect("wrong key refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("tokens.encryption_key"), "{msg}");
    assert!(!msg.contains("b3RoZXIt"), "the key is never echoed: {msg}");

    if matches!(b, Backend::Postgres(_)) {
        let mut config = common::test_config();
        config.database_url = entitle::config::Secret::new(app.database_url.clone());
        config.tokens.encryption_key = None;
        let err = entitle::app::AppState::new(config, Arc::new(entitle::clock::SystemClock))
            .await
            .err()
            .expect("PostgreSQL needs a configured key");
        assert!(format!("{err:#}").contains("tokens.encryption_key must be set"));
    } else {
        // SQLite without a key: a random one in a file beside the database,
        // readable by the owner only.
        let url = app.database_url.clone();
        let file = url
            .trim_start_matches("sqlite://")
            .split('?')
            .next()
            .unwrap()
            .to_string()
            + ".token-key";
        let meta = std::fs::metadata(&file).expect("key file beside the database");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
        let _ = meta;
    }
}

async fn ed25519_keys_sign_tokens_and_answers(b: Backend) {
    let app = spawn_with(b, |c| {
        c.tokens.algorithm = entitle::config::TokenAlgorithm::EdDSA;
    })
    .await;
    let client = app.key(ApiKeyRole::Client).await;
    let keys = jwks(&app).await;
    assert_eq!(keys["keys"][0]["kty"], "OKP");
    assert_eq!(keys["keys"][0]["crv"], "Ed25519");
    assert_eq!(keys["keys"][0]["alg"], "EdDSA");
    let resp = client
        .apply(
            app.client
                .post(app.url("/user"))
                .json(&json!({ "id": "ed-1" })),
        )
        .header("x-entitle-nonce", NONCE)
        .send()
        .await
        .unwrap();
    let sig = resp.headers()["x-entitle-signature"]
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.bytes().await.unwrap();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    let token = answer["entitlement_token"].as_str().unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(token).unwrap().alg,
        jsonwebtoken::Algorithm::EdDSA
    );
    let claims = verify(token, &keys).unwrap();
    assert_eq!(claims["dev"], "ed-1");
    assert!(verify_answer(&sig, NONCE, "/user", &body, &keys));
    assert!(!verify_answer(&sig, NONCE, "/user?id=x", &body, &keys));
}

on_all_backends!(
    ed25519_keys_sign_tokens_and_answers,
    tokens_follow_the_state_and_are_signed_once_per_state,
    the_token_is_read_only_with_the_right_credential,
    answers_are_signed_over_nonce_path_and_body,
    rotation_under_load_keeps_every_token_verifiable,
    keys_are_encrypted_at_rest_and_need_the_same_key,
);

#[test]
fn cli_rotates_and_lists_keys() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_entitle"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("DATABASE_URL")
            .env(
                "ENTITLE_DATABASE_URL",
                format!("sqlite://{}?mode=rwc", dir.path().join("k.db").display()),
            )
            .env("ENTITLE_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["migrate"]);
    let first = run(&["signing-key", "rotate"]);
    let second = run(&["signing-key", "rotate", "--algorithm", "ed25519"]);
    let list = run(&["signing-key", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    // The first rotation also created the first-start key.
    assert_eq!(lines.len(), 3, "{list}");
    assert!(list.contains(first.trim()) && list.contains(second.trim()));
    assert!(
        lines[2].contains("EdDSA") && lines[2].contains("retired -"),
        "{list}"
    );
    assert!(lines[0].contains("ES256"));
    assert!(!list.contains("private"), "{list}");
}

// ---- the README's snippets, run as a client runs them --------------------

fn clients_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients"))
}

fn run(cmd: &mut Command, input: Option<&str>) -> String {
    use std::io::Write;
    let mut child = cmd
        .current_dir(clients_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if let Some(i) = input {
        child.stdin.take().unwrap().write_all(i.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// npm in tests/clients (from its lock file) and PyJWT, when missing.
fn install_client_deps() {
    if !clients_dir()
        .join("node_modules/jose/package.json")
        .exists()
    {
        run(
            Command::new("npm").args(["ci", "--no-audit", "--no-fund"]),
            None,
        );
    }
    let has_pyjwt = Command::new("python3")
        .args(["-c", "import jwt, cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_pyjwt {
        run(
            Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "--user",
                "--quiet",
                "PyJWT",
                "cryptography",
            ]),
            None,
        );
    }
}

fn b64(s: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

fn forge(header: &Value, claims: &Value, sig: &str) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        sig
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_snippets_verify_offline_and_reject_forgeries() {
    install_client_deps();
    let app = spawn(Backend::Sqlite).await;
    let client = app.key(ApiKeyRole::Client).await;
    let service = app.key(ApiKeyRole::Service).await;
    // A second server whose tokens live one second, for the expired case.
    let short = spawn_with(Backend::Sqlite, |c| c.tokens.offline_secs = 1).await;
    let short_client = short.key(ApiKeyRole::Client).await;

    let resp = client
        .apply(
            app.client
                .post(app.url("/user"))
                .json(&json!({ "id": "watch-9" })),
        )
        .header("x-entitle-nonce", NONCE)
        .send()
        .await
        .unwrap();
    let sig = resp.headers()["x-entitle-signature"]
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.bytes().await.unwrap();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    let token = answer["entitlement_token"].as_str().unwrap().to_string();
    let check: Value = service
        .apply(app.client.get(app.url("/api/subscriptions/check/watch-9")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expired = user(&short, &short_client, "watch-x").await["entitlement_token"]
        .as_str()
        .unwrap()
        .to_string();

    let [h, p, s]: [&str; 3] = token.split('.').collect::<Vec<_>>().try_into().unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap();
    let mut claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
    claims["paid_status"] = json!("paid");
    claims["ent"]["maps"] = Value::Null;
    let tampered_payload = format!("{h}.{}.{s}", b64(claims.to_string().as_bytes()));
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
    let mut hdr = header.clone();
    hdr["jku"] = json!("https://attacker.invalid/jwks.json");
    let tampered_header = forge(&hdr, &claims, s);
    let mut hdr = header.clone();
    hdr["kid"] = json!("not-a-published-kid");
    let wrong_kid = forge(&hdr, &claims, s);
    let alg_none = forge(
        &json!({ "alg": "none", "typ": "JWT", "kid": header["kid"] }),
        &claims,
        "",
    );
    // HS256 "signed" with the published public key as the HMAC secret: the
    // classic algorithm-confusion forgery.
    let keys_json = run(
        Command::new("node").args(["run_verify.mjs", "fetch", &app.base]),
        None,
    );
    let keys: Value = serde_json::from_str(&keys_json).unwrap();
    let x = keys["keys"][0]["x"].as_str().unwrap();
    let mut hs_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs_header.kid = header["kid"].as_str().map(String::from);
    let hs256 = jsonwebtoken::encode(
        &hs_header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(x.as_bytes()),
    )
    .unwrap();
    let hs256_jwks = jsonwebtoken::encode(
        &hs_header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(keys_json.as_bytes()),
    )
    .unwrap();
    // Both servers' keys, as a client talking to both would keep them.
    let short_keys = jwks(&short).await;
    let mut all = keys.clone();
    all["keys"]
        .as_array_mut()
        .unwrap()
        .extend(short_keys["keys"].as_array().unwrap().iter().cloned());
    // Let the short-lived token expire.
    tokio::time::sleep(StdDuration::from_millis(2100)).await;

    let body_b64 = base64::engine::general_purpose::STANDARD.encode(&body);
    let mut altered = body.to_vec();
    let at = altered.windows(5).position(|w| w == b"trial").unwrap();
    altered[at..at + 5].copy_from_slice(b"paid\"");
    let case = json!({
        "jwks": all,
        "issuer": "entitle",
        "audience": "entitle-clients",
        "tokens": [
            { "name": "good", "token": token, "device": "watch-9" },
            { "name": "check", "token": check["entitlement_token"] },
            { "name": "other_device", "token": token, "device": "watch-8" },
            { "name": "tampered_payload", "token": tampered_payload },
            { "name": "tampered_header", "token": tampered_header },
            { "name": "wrong_kid", "token": wrong_kid },
            { "name": "alg_none", "token": alg_none },
            { "name": "hs256", "token": hs256 },
            { "name": "hs256_jwks", "token": hs256_jwks },
            { "name": "expired", "token": expired },
        ],
        "answers": [
            { "name": "good", "nonce": NONCE, "path": "/user", "body": body_b64, "signature": sig },
            { "name": "replayed", "nonce": "a-fresh-nonce-9876543210", "path": "/user", "body": body_b64, "signature": sig },
            { "name": "other_path", "nonce": NONCE, "path": "/graphql", "body": body_b64, "signature": sig },
            { "name": "altered", "nonce": NONCE, "path": "/user",
              "body": base64::engine::general_purpose::STANDARD.encode(&altered), "signature": sig },
            { "name": "token_as_signature", "nonce": NONCE, "path": "/user", "body": body_b64,
              "signature": format!("{h}..{s}") },
        ],
    })
    .to_string();

    // Offline: the drivers get the keys in the input and no server address.
    let js = run(
        Command::new("node").args(["run_verify.mjs", "check"]),
        Some(&case),
    );
    let py = run(
        Command::new("python3").args(["run_verify.py", "check"]),
        Some(&case),
    );
    for (who, out) in [("js", js), ("python", py)] {
        let out: Value = serde_json::from_str(&out).unwrap();
        let t = &out["tokens"];
        assert_eq!(t["good"]["ok"], true, "{who}: {out}");
        assert_eq!(t["good"]["claims"]["sub"], "watch-9", "{who}");
        assert_eq!(t["good"]["claims"]["dev"], "watch-9", "{who}");
        assert_eq!(t["good"]["claims"]["paid_status"], "trial", "{who}");
        assert_eq!(t["good"]["entitled"], json!({ "pro": true }), "{who}");
        assert_eq!(t["check"]["ok"], true, "{who}: {out}");
        for bad in [
            "other_device",
            "tampered_payload",
            "tampered_header",
            "wrong_kid",
            "alg_none",
            "hs256",
            "hs256_jwks",
            "expired",
        ] {
            assert_eq!(t[bad]["ok"], false, "{who} accepted {bad}: {out}");
        }
        let a = &out["answers"];
        assert_eq!(a["good"]["ok"], true, "{who}: {out}");
        for bad in ["replayed", "other_path", "altered", "token_as_signature"] {
            assert_eq!(a[bad]["ok"], false, "{who} accepted answer {bad}: {out}");
        }
    }
}

#[test]
fn readme_shows_the_snippets_verbatim() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for f in ["verify.mjs", "verify.py"] {
        let text = std::fs::read_to_string(clients_dir().join(f)).unwrap();
        assert!(
            readme.contains(text.trim_end()),
            "README.md must show tests/clients/{f} verbatim"
        );
    }
}
