//! Customer tokens from an identity provider: keys from its JWKS URL,
//! chosen by `kid`, a rotated-in key picked up on first sight, and made-up
//! `kid`s refused without a fetch per token.

mod common;

use common::{Auth, Backend, spawn_with};
use entitle::config::{JwtAlgorithm, JwtConfig};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use wiremock::{Mock, MockServer, ResponseTemplate, matchers::path};

const ISSUER: &str = "https://tenant.idp.test/";
const AUDIENCE: &str = "entitle-api";

/// Public halves of tests/fixtures/jwks_es256_{a,b}.pem.
fn jwk(kid: &str) -> Value {
    let (x, y) = match kid {
        "key-a" => (
            "vfvTHKK0d11_JYLbSa3V-H8Dm5-_3PTvMH6sq2MFxhw",
            "S7_nmnXCUB6L9aHuuNxKSKK7U72PKjXwIvdQBphJ6vQ",
        ),
        _ => (
            "8MjbXo8g42UYbaqIJkAZY5FxHXBEoC1WJRd5gVynE8A",
            "iOiL0sKxvq1mw8EtM3Dyeun2LXSxRmdYTEwhnpfSzTA",
        ),
    };
    json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid, "x": x, "y": y})
}

fn token(kid: &str, pem_file: &str, sub: &str) -> String {
    let pem = std::fs::read(format!(
        "{}/tests/fixtures/{pem_file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let now = chrono::Utc::now().timestamp();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(
        &h,
        &json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600}),
        &EncodingKey::from_ec_pem(&pem).unwrap(),
    )
    .unwrap()
}

async fn jwks_fetches(idp: &MockServer) -> usize {
    idp.received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == "/.well-known/jwks.json")
        .count()
}

async fn idp_keys(idp: &MockServer, kids: &[&str]) {
    idp.reset().await;
    let keys: Vec<Value> = kids.iter().map(|k| jwk(k)).collect();
    Mock::given(path("/.well-known/jwks.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "keys": keys })))
        .mount(idp)
        .await;
}

const ME: &str = "{ me { id paidStatus } }";

async fn jwks_customer_tokens(b: Backend) {
    let idp = MockServer::start().await;
    idp_keys(&idp, &["key-a"]).await;
    let url = format!("{}/.well-known/jwks.json", idp.uri());
    let app = spawn_with(b, |c| {
        c.auth.jwt = Some(JwtConfig {
            algorithm: JwtAlgorithm::ES256,
            secret: None,
            public_key_pem: None,
            jwks_url: Some(url),
            private_key_pem: None,
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            admin_claim: "role".into(),
            admin_value: "admin".into(),
            leeway_secs: 0,
        });
    })
    .await;
    // A signed-in customer needs a row; an admin key registers it.
    let admin = app.key(entitle::domain::ApiKeyRole::Admin).await;
    let (_, body) = app
        .gql(
            &admin,
            "mutation { registerDevice(input: {platform: WEB, deviceId: \"web-1\", customerId: \"alice\"}) { created } }",
            json!({}),
        )
        .await;
    assert!(body["errors"].is_null(), "{body}");

    let alice = Auth::Bearer(token("key-a", "jwks_es256_a.pem", "alice"));
    let (_, body) = app.gql(&alice, ME, json!({})).await;
    assert_eq!(body["data"]["me"]["id"], "alice", "{body}");
    let (_, body) = app.gql(&alice, ME, json!({})).await;
    assert_eq!(body["data"]["me"]["id"], "alice", "{body}");
    assert_eq!(jwks_fetches(&idp).await, 1, "keys are cached");

    // Signed by key B but naming key A: refused.
    let forged = Auth::Bearer(token("key-a", "jwks_es256_b.pem", "alice"));
    let (_, body) = app.gql(&forged, ME, json!({})).await;
    assert_eq!(body["error"]["code"], "UNAUTHENTICATED", "{body}");

    // The provider rotates key B in: a token naming it makes one refetch.
    idp_keys(&idp, &["key-a", "key-b"]).await;
    let rotated = Auth::Bearer(token("key-b", "jwks_es256_b.pem", "alice"));
    let (_, body) = app.gql(&rotated, ME, json!({})).await;
    assert_eq!(body["data"]["me"]["id"], "alice", "{body}");
    assert_eq!(jwks_fetches(&idp).await, 1, "one refetch after the reset");

    // A flood of made-up kids: all refused, without a fetch per token.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let app_base = app.base.clone();
        let tok = token(&format!("made-up-{i}"), "jwks_es256_a.pem", "alice");
        tasks.push(tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{app_base}/graphql"))
                .bearer_auth(tok)
                .json(&json!({ "query": ME }))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        let body = t.await.unwrap();
        assert_eq!(body["error"]["code"], "UNAUTHENTICATED", "{body}");
    }
    assert!(
        jwks_fetches(&idp).await <= 2,
        "made-up kids fetched {} times",
        jwks_fetches(&idp).await
    );
    // The known keys still work.
    let (_, body) = app.gql(&alice, ME, json!({})).await;
    assert_eq!(body["data"]["me"]["id"], "alice", "{body}");
}

on_all_backends!(jwks_customer_tokens);
