//! GraphQL API: queries, mutations, authorization, transport rules, limits,
//! and the checked-in schema.

mod common;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::Duration;
use common::{Auth, Backend, error_code, hs_config, sign_hs, spawn, spawn_with};
use entitle::{
    config::{JwtAlgorithm, JwtConfig},
    domain::ApiKeyRole,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn claims(sub: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({ "sub": sub, "iss": "https://auth.test/", "aud": "entitle", "iat": now, "exp": now + 600 })
}

const ME: &str = "{ me { id paidStatus entitlements { key isActive } } }";

async fn register(app: &common::TestApp, auth: &Auth, device: &str) -> Value {
    let (s, r) = app
        .gql(
            auth,
            "mutation($d: String!) { registerDevice(input: {platform: GARMIN, deviceId: $d}) { created customer { id paidStatus trialEndsAt } device { platform deviceId } } }",
            json!({ "d": device }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(r["errors"].is_null(), "{r}");
    r
}

async fn customer_queries_and_grants(b: Backend) {
    let app = spawn(b).await;
    let client = app.key(ApiKeyRole::Client).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let r = register(&app, &client, "dev-a").await;
    assert_eq!(r["data"]["registerDevice"]["created"], true);
    assert_eq!(
        r["data"]["registerDevice"]["customer"]["paidStatus"],
        "TRIAL"
    );
    assert_eq!(r["data"]["registerDevice"]["device"]["platform"], "GARMIN");

    let q = "query($id: ID!) { customer(id: $id) { id paidStatus entitlement(key: \"pro\") { key isActive store periodType status expiresAt willRenew } entitlements { key isActive status } purchases { store status periodType productId } devices { platform deviceId } events { kind oldStatus newStatus entitlement } } }";
    // Purchases, devices and the change log are beyond a client key's summary.
    let service = app.key(ApiKeyRole::Service).await;
    let (_, r) = app.gql(&service, q, json!({ "id": "dev-a" })).await;
    let c = &r["data"]["customer"];
    assert_eq!(c["entitlement"]["isActive"], true, "{r}");
    assert_eq!(c["entitlement"]["store"], "TRIAL");
    assert_eq!(c["entitlement"]["periodType"], "TRIAL");
    assert_eq!(c["entitlement"]["status"], "ACTIVE");
    assert_eq!(c["entitlement"]["willRenew"], false);
    assert_eq!(
        c["entitlements"].as_array().unwrap().len(),
        2,
        "every catalog entitlement"
    );
    assert_eq!(c["entitlements"][1]["key"], "maps");
    assert_eq!(c["entitlements"][1]["isActive"], false);
    assert_eq!(c["entitlements"][1]["status"], Value::Null);
    assert_eq!(c["purchases"][0]["store"], "TRIAL");
    assert_eq!(c["devices"][0]["deviceId"], "dev-a");
    assert_eq!(
        c["events"],
        json!([{ "kind": "GRANTED", "oldStatus": null, "newStatus": "ACTIVE", "entitlement": "pro" }])
    );

    let (_, r) = app.gql(&client, q, json!({ "id": "dev-a" })).await;
    assert_eq!(error_code(&r), Some("FORBIDDEN"), "{r}");
    assert_eq!(r["errors"].as_array().unwrap().len(), 3, "{r}");
    for refused in ["purchases", "devices", "events"] {
        assert!(r["data"]["customer"][refused].is_null(), "{r}");
    }

    // Unknown customer: null, not an error.
    let (_, r) = app.gql(&client, q, json!({ "id": "nobody" })).await;
    assert_eq!(r["data"]["customer"], Value::Null, "{r}");

    // Grant `maps` until a date, then revoke it.
    let until = (app.state.core.now() + Duration::days(30)).to_rfc3339();
    let (_, r) = app
        .gql(
            &admin,
            "mutation($u: DateTime) { grantEntitlement(customerId: \"dev-a\", entitlement: \"maps\", expiresAt: $u) { entitlement(key: \"maps\") { isActive store expiresAt } } }",
            json!({ "u": until }),
        )
        .await;
    assert_eq!(
        r["data"]["grantEntitlement"]["entitlement"]["isActive"], true,
        "{r}"
    );
    assert_eq!(
        r["data"]["grantEntitlement"]["entitlement"]["store"],
        "PROMOTIONAL"
    );
    let (_, r) = app
        .gql(&admin, "mutation { revokeGrant(customerId: \"dev-a\", entitlement: \"maps\") { entitlement(key: \"maps\") { isActive status } events(limit: 1) { kind newStatus reason } } }", json!({}))
        .await;
    assert_eq!(
        r["data"]["revokeGrant"]["entitlement"]["isActive"], false,
        "{r}"
    );
    assert_eq!(r["data"]["revokeGrant"]["entitlement"]["status"], "REVOKED");
    assert_eq!(
        r["data"]["revokeGrant"]["events"][0],
        json!({ "kind": "REVOKED", "newStatus": "EXPIRED", "reason": "revoked" })
    );
    // The trial is untouched by the revoke.
    let (_, r) = app
        .gql(
            &client,
            "{ customer(id: \"dev-a\") { paidStatus } }",
            json!({}),
        )
        .await;
    assert_eq!(r["data"]["customer"]["paidStatus"], "TRIAL");

    // Bad grants change nothing.
    let before = app.counts().await;
    for (q, code) in [
        (
            "mutation { grantEntitlement(customerId: \"dev-a\", entitlement: \"nope\") { id } }",
            "BAD_USER_INPUT",
        ),
        (
            "mutation { grantEntitlement(customerId: \"ghost\", entitlement: \"pro\") { id } }",
            "NOT_FOUND",
        ),
        (
            "mutation { grantEntitlement(customerId: \"dev-a\", entitlement: \"pro\", expiresAt: \"2001-01-01T00:00:00Z\") { id } }",
            "BAD_USER_INPUT",
        ),
        (
            "mutation { revokeGrant(customerId: \"dev-a\", entitlement: \"maps\") { id } }",
            "NOT_FOUND",
        ),
        (
            "mutation { revokeGrant(customerId: \"ghost\", entitlement: \"pro\") { id } }",
            "NOT_FOUND",
        ),
    ] {
        let (_, r) = app.gql(&admin, q, json!({})).await;
        assert_eq!(error_code(&r), Some(code), "{q}: {r}");
    }
    let (_, r) = app
        .gql(
            &client,
            "mutation { grantEntitlement(customerId: \"dev-a\", entitlement: \"pro\") { id } }",
            json!({}),
        )
        .await;
    assert_eq!(
        error_code(&r),
        Some("FORBIDDEN"),
        "client keys cannot grant"
    );
    assert_eq!(app.counts().await, before);
}

async fn customers_pagination_and_search(b: Backend) {
    let app = spawn(b).await;
    let client = app.key(ApiKeyRole::Client).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    for id in ["acme-1", "acme-2", "acme-3", "beta-1", "a_b", "axb"] {
        register(&app, &client, id).await;
    }
    let q = "query($after: String, $s: String) { customers(first: 2, after: $after, search: $s) { edges { cursor node { id } } pageInfo { hasNextPage endCursor } } }";
    let mut seen = Vec::new();
    let mut after = Value::Null;
    loop {
        let (_, r) = app
            .gql(&admin, q, json!({ "after": after, "s": "acme" }))
            .await;
        let conn = &r["data"]["customers"];
        for e in conn["edges"].as_array().unwrap() {
            seen.push(e["node"]["id"].as_str().unwrap().to_string());
        }
        if conn["pageInfo"]["hasNextPage"] != true {
            break;
        }
        after = conn["pageInfo"]["endCursor"].clone();
    }
    assert_eq!(seen, vec!["acme-1", "acme-2", "acme-3"]);
    // LIKE wildcards are literal.
    let (_, r) = app
        .gql(
            &admin,
            "{ customers(search: \"a_\") { nodes { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        r["data"]["customers"]["nodes"],
        json!([{ "id": "a_b" }]),
        "{r}"
    );
    let (_, r) = app
        .gql(
            &admin,
            "{ customers(first: 1000) { nodes { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&r), Some("BAD_USER_INPUT"), "{r}");
    let (_, r) = app
        .gql(
            &admin,
            "{ customers(after: \"!!!\") { nodes { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&r), Some("BAD_USER_INPUT"), "{r}");
    let service = app.key(ApiKeyRole::Service).await;
    let (_, r) = app
        .gql(&service, "{ customers { nodes { id } } }", json!({}))
        .await;
    assert_eq!(error_code(&r), Some("FORBIDDEN"), "listing is admin-only");
    let (_, r) = app
        .gql(&Auth::None, "{ customers { nodes { id } } }", json!({}))
        .await;
    assert_eq!(error_code(&r), Some("UNAUTHENTICATED"));
}

async fn products_for_paywalls(b: Backend) {
    let app = spawn(b).await;
    let client = app.key(ApiKeyRole::Client).await;
    let (_, r) = app.gql(&client, "{ products { id kind entitlements stripePriceId appStoreProductId playStoreProductId } }", json!({})).await;
    assert_eq!(r["data"]["products"][0]["id"], "pro_monthly", "{r}");
    assert_eq!(r["data"]["products"][0]["kind"], "SUBSCRIPTION");
    assert_eq!(r["data"]["products"][1]["kind"], "LIFETIME");
    assert_eq!(
        r["data"]["products"][1]["entitlements"],
        json!(["pro", "maps"])
    );
}

async fn jwt_customers_read_only_themselves(b: Backend) {
    let app = spawn_with(b, |c| c.auth.jwt = Some(hs_config())).await;
    let client = app.key(ApiKeyRole::Client).await;
    register(&app, &client, "alice").await;
    register(&app, &client, "bob").await;
    let alice = Auth::Bearer(sign_hs(&claims("alice")));
    let (s, r) = app.gql(&alice, ME, json!({})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["data"]["me"]["id"], "alice", "{r}");
    assert_eq!(r["data"]["me"]["paidStatus"], "TRIAL");
    let (_, r) = app
        .gql(&alice, "{ customer(id: \"alice\") { id } }", json!({}))
        .await;
    assert_eq!(r["data"]["customer"]["id"], "alice");
    let (_, r) = app
        .gql(
            &alice,
            "{ customer(id: \"bob\") { id paidStatus } }",
            json!({}),
        )
        .await;
    assert_eq!(error_code(&r), Some("FORBIDDEN"), "{r}");
    assert_eq!(r["data"]["customer"], Value::Null);
    // A customer registers devices only for itself.
    let (_, r) = app
        .gql(&alice, "mutation { registerDevice(input: {platform: IOS, deviceId: \"ph\", customerId: \"bob\"}) { created } }", json!({}))
        .await;
    assert_eq!(error_code(&r), Some("FORBIDDEN"));
    let (_, r) = app
        .gql(&alice, "mutation { registerDevice(input: {platform: IOS, deviceId: \"ph\"}) { customer { id } } }", json!({}))
        .await;
    assert_eq!(
        r["data"]["registerDevice"]["customer"]["id"], "alice",
        "{r}"
    );
    // `me` needs a customer.
    let (_, r) = app.gql(&client, ME, json!({})).await;
    assert_eq!(error_code(&r), Some("FORBIDDEN"));
    let (_, r) = app.gql(&Auth::None, ME, json!({})).await;
    assert_eq!(error_code(&r), Some("UNAUTHENTICATED"));
    // The admin claim makes an admin.
    let mut c = claims("ops");
    c["role"] = json!("admin");
    let (_, r) = app
        .gql(
            &Auth::Bearer(sign_hs(&c)),
            "{ customers { nodes { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        r["data"]["customers"]["nodes"].as_array().unwrap().len(),
        2,
        "{r}"
    );
}

async fn bad_tokens_get_401(b: Backend) {
    let rs_public = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/jwt_rs256_public.pem"
    ))
    .unwrap();
    let app = spawn_with(b.clone(), |c| c.auth.jwt = Some(hs_config())).await;
    let now = chrono::Utc::now().timestamp();
    let mut cases: Vec<(&str, String)> = Vec::new();
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims("alice").to_string())
    );
    cases.push(("alg none", unsigned));
    let mut c = claims("alice");
    c["aud"] = json!("someone-else");
    cases.push(("wrong audience", sign_hs(&c)));
    let mut c = claims("alice");
    c["iss"] = json!("https://evil.test/");
    cases.push(("wrong issuer", sign_hs(&c)));
    let mut c = claims("alice");
    c["exp"] = json!(now - 60);
    cases.push(("expired", sign_hs(&c)));
    let mut c = claims("alice");
    c["nbf"] = json!(now + 600);
    cases.push(("not yet valid", sign_hs(&c)));
    for missing in ["iss", "aud", "sub", "exp"] {
        let mut c = claims("alice");
        c.as_object_mut().unwrap().remove(missing);
        cases.push((missing, sign_hs(&c)));
    }
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims("alice"),
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret-another-secret-another"),
    )
    .unwrap();
    cases.push(("wrong key", forged));
    cases.push(("garbage", "not.a.jwt".into()));
    for (name, token) in &cases {
        let (s, r) = app.gql(&Auth::Bearer(token.clone()), ME, json!({})).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{name}: {r}");
        assert_eq!(r["error"]["code"], "UNAUTHENTICATED", "{name}");
    }
    // A scheme other than Bearer.
    let resp = app
        .client
        .post(app.url("/graphql"))
        .header("authorization", "Basic YTpi")
        .json(&json!({"query": ME}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // RS256 server: an HS256 token keyed with the public key (alg confusion) fails,
    // a real RS256 token passes.
    let rs_private = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/jwt_rs256_private.pem"
    ))
    .unwrap();
    let pem = rs_public.clone();
    let app = spawn_with(b, move |c| {
        c.auth.jwt = Some(JwtConfig {
            jwks_url: None,
            algorithm: JwtAlgorithm::RS256,
            secret: None,
            public_key_pem: Some(pem),
            ..hs_config()
        })
    })
    .await;
    let client = app.key(ApiKeyRole::Client).await;
    register(&app, &client, "alice").await;
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims("alice"),
        &jsonwebtoken::EncodingKey::from_secret(rs_public.as_bytes()),
    )
    .unwrap();
    let (s, _) = app.gql(&Auth::Bearer(confused), ME, json!({})).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "HS256 signed with the RSA public key"
    );
    let good = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims("alice"),
        &jsonwebtoken::EncodingKey::from_rsa_pem(rs_private.as_bytes()).unwrap(),
    )
    .unwrap();
    let (s, r) = app.gql(&Auth::Bearer(good), ME, json!({})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["data"]["me"]["id"], "alice", "{r}");
}

async fn transport_rules(b: Backend) {
    let app = spawn(b).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let Auth::Key(key) = &admin else {
        unreachable!()
    };
    let before = app.counts().await;
    let grant =
        "mutation { registerDevice(input: {platform: WEB, deviceId: \"via-get\"}) { created } }";

    // Mutation over GET.
    let resp = app
        .client
        .get(app.url("/graphql"))
        .query(&[("query", grant)])
        .header("api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "METHOD_NOT_ALLOWED"
    );
    // A query over GET is fine.
    let resp = app
        .client
        .get(app.url("/graphql"))
        .query(&[("query", "{ products { id } }")])
        .header("api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.json::<Value>().await.unwrap()["data"]["products"].is_array());
    // text/plain and missing content types.
    for ct in [
        Some("text/plain"),
        None,
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut rb = app
            .client
            .post(app.url("/graphql"))
            .header("api-key", key)
            .body(json!({ "query": grant }).to_string());
        if let Some(ct) = ct {
            rb = rb.header("content-type", ct);
        }
        let resp = rb.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
    }
    // Batches.
    let resp = app
        .client
        .post(app.url("/graphql"))
        .header("api-key", key)
        .json(&json!([{ "query": grant }, { "query": grant }]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "BAD_USER_INPUT"
    );
    // Malformed JSON.
    let resp = app
        .client
        .post(app.url("/graphql"))
        .header("api-key", key)
        .header("content-type", "application/json")
        .body("{\"query\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Oversize body.
    let big = json!({ "query": format!("{{ products {{ id }} }} #{}", "x".repeat(70_000)) });
    let resp = app
        .client
        .post(app.url("/graphql"))
        .header("api-key", key)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The body is left unread, so the answer says the connection closes and
    // the client's next request (below) goes down a fresh one.
    assert_eq!(
        resp.headers()
            .get("connection")
            .map(|v| v.to_str().unwrap()),
        Some("close")
    );
    // Too deep.
    let mut deep = String::from("name");
    for _ in 0..20 {
        deep = format!("ofType {{ {deep} }}");
    }
    let (_, r) = app
        .gql(
            &admin,
            &format!("{{ __schema {{ types {{ fields {{ type {{ {deep} }} }} }} }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(error_code(&r), Some("BAD_USER_INPUT"), "{r}");
    assert!(
        r["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("nested too deep"),
        "{r}"
    );
    // Alias flooding hits the complexity limit.
    let flood: String = (0..300)
        .map(|i| format!("a{i}: products {{ id displayName }} "))
        .collect();
    let (_, r) = app.gql(&admin, &format!("{{ {flood} }}"), json!({})).await;
    assert_eq!(error_code(&r), Some("BAD_USER_INPUT"), "{r}");
    assert!(r["data"].is_null());
    // Syntax errors carry a code too.
    let (_, r) = app.gql(&admin, "{ products { ", json!({})).await;
    assert_eq!(error_code(&r), Some("BAD_USER_INPUT"), "{r}");
    assert_eq!(app.counts().await, before, "nothing written");
}

const INTROSPECTION: &str = "query IntrospectionQuery { __schema { queryType { name } mutationType { name } types { ...FullType } directives { name locations args { ...InputValue } } } } fragment FullType on __Type { kind name description fields(includeDeprecated: true) { name args { ...InputValue } type { ...TypeRef } isDeprecated } inputFields { ...InputValue } interfaces { ...TypeRef } enumValues(includeDeprecated: true) { name } possibleTypes { ...TypeRef } } fragment InputValue on __InputValue { name type { ...TypeRef } defaultValue } fragment TypeRef on __Type { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } }";

async fn introspection_switch(b: Backend) {
    let app = spawn(b.clone()).await;
    let (_, r) = app.gql(&Auth::None, INTROSPECTION, json!({})).await;
    assert!(
        r["errors"].is_null(),
        "the explorer's introspection query fits the limits: {r}"
    );
    assert_eq!(r["data"]["__schema"]["queryType"]["name"], "QueryRoot");
    let page = app.client.get(app.url("/graphql")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("graphiql"));

    let app = spawn_with(b, |c| {
        c.graphql.introspection = false;
        c.graphql.graphiql = false;
    })
    .await;
    let (_, r) = app.gql(&Auth::None, INTROSPECTION, json!({})).await;
    assert!(
        r["data"].is_null() || r["data"]["__schema"].is_null(),
        "{r}"
    );
    let page = app.client.get(app.url("/graphql")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::NOT_FOUND);
}

on_all_backends!(
    customer_queries_and_grants,
    customers_pagination_and_search,
    products_for_paywalls,
    jwt_customers_read_only_themselves,
    bad_tokens_get_401,
    transport_rules,
    introspection_switch,
);

#[test]
fn checked_in_schema_matches_the_code() {
    let checked_in =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql")).unwrap();
    assert!(
        checked_in == entitle::graphql::sdl(),
        "schema.graphql is stale: run `cargo run -- export-schema --out schema.graphql`"
    );
}
