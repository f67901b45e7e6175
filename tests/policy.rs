//! The credential policy from the outside: every credential against every
//! guarded GraphQL field, subscription and route, with the outcome the
//! design's matrix promises; the schema walk that fails when a field has no
//! policy entry or no probe here; and the attacks of the trust-boundary
//! issue (reading a purchase's secrets with the public key, moving a watch).

mod apple_support;
mod common;

use std::time::{Duration as StdDuration, Instant};

use apple_support::{MONTHLY, Sub, configure, sign};
use chrono::Duration;
use common::{Auth, Backend, TestApp, error_code, hs_config, sign_hs, spawn_with};
use entitle::{
    config::AppleEnvironment,
    domain::ApiKeyRole,
    policy::{self, Access},
};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

/// Alice pays on iOS; her id is the `appAccountToken` of her purchase.
const ALICE: &str = "6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11";
const ALICE_TX: &str = "7100000001";

fn jwt(sub: &str, admin: bool) -> Auth {
    let now = chrono::Utc::now().timestamp();
    let mut c = json!({ "sub": sub, "iss": "https://auth.test/", "aud": "entitle", "iat": now, "exp": now + 600 });
    if admin {
        c["role"] = json!("admin");
    }
    Auth::Bearer(sign_hs(&c))
}

/// The credentials of the matrix, in the order of every expectation string.
const CREDENTIALS: [&str; 7] = [
    "anonymous",
    "client key",
    "alice's JWT",
    "bob's JWT",
    "service key",
    "admin key",
    "admin JWT",
];

struct World {
    app: TestApp,
    creds: Vec<Auth>,
    /// Alice's App Store transaction as her app submitted it.
    alice_jws: String,
}

impl World {
    fn client(&self) -> &Auth {
        &self.creds[1]
    }
    fn admin(&self) -> &Auth {
        &self.creds[5]
    }
}

/// Alice with a device, a paid App Store subscription (so a purchase with a
/// store id and a receipt with its payload) and a change log; bob with a
/// watch of his own.
async fn world(b: Backend) -> World {
    let app = spawn_with(b, |c| {
        c.auth.jwt = Some(hs_config());
        configure(c, AppleEnvironment::Production, None);
    })
    .await;
    let client = app.key(ApiKeyRole::Client).await;
    let service = app.key(ApiKeyRole::Service).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let t0 = app.state.core.now();
    let sub = Sub::new(ALICE_TX, MONTHLY, ALICE, t0);
    let alice_jws = sign(&sub.tx(ALICE_TX, t0, Some(t0 + Duration::days(30)), t0));
    let (_, r) = app
        .gql(
            &client,
            "mutation($j: String!, $c: ID) { verifyPurchase(customerId: $c, input: {appStore: {signedTransaction: $j}}) { customer { paidStatus } } }",
            json!({ "j": alice_jws, "c": ALICE }),
        )
        .await;
    assert_eq!(
        r["data"]["verifyPurchase"]["customer"]["paidStatus"], "PAID",
        "{r}"
    );
    let (_, r) = app
        .gql(
            &client,
            "mutation($c: ID) { registerDevice(input: {platform: IOS, deviceId: \"alice-phone\", customerId: $c}) { created } }",
            json!({ "c": ALICE }),
        )
        .await;
    assert_eq!(r["data"]["registerDevice"]["created"], true, "{r}");
    assert_eq!(app.post_user(&client, "bob").await.0, StatusCode::OK);
    let creds = vec![
        Auth::None,
        client,
        jwt(ALICE, false),
        jwt("bob", false),
        service,
        admin,
        jwt("ops", true),
    ];
    World {
        app,
        creds,
        alice_jws,
    }
}

/// How one probe reaches the server.
enum Probe {
    /// A GraphQL operation; `$d` is a device id unique to the credential.
    Gql(&'static str),
    /// `entitlementChanged` over graphql-ws, for one customer or everyone.
    Watch(Option<&'static str>),
    /// `POST /user` for a watch unique to the credential.
    PostUser,
    /// `GET` of a path.
    Get(&'static str),
}

/// The contract, written out on its own rather than read from the code.
/// One letter per credential, in `CREDENTIALS` order: `O` answered with no
/// error; `P` let through by the policy (the answer may still be another
/// error: bad input, not configured, not found); `F` FORBIDDEN;
/// `U` UNAUTHENTICATED.
const MATRIX: &[(&str, Probe, &str)] = &[
    ("QueryRoot.me", Probe::Gql("{ me { id } }"), "UFOOFFP"),
    (
        "QueryRoot.customer",
        Probe::Gql(
            "{ customer(id: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { id paidStatus trialEndsAt entitlements { key isActive expiresAt willRenew store productId periodType status gracePeriodExpiresAt } entitlement(key: \"pro\") { isActive } } }",
        ),
        "UOOFOOO",
    ),
    (
        "QueryRoot.customers",
        Probe::Gql("{ customers { nodes { id } } }"),
        "UFFFFOO",
    ),
    (
        "QueryRoot.products",
        Probe::Gql("{ products { id } }"),
        "UOOOOOO",
    ),
    (
        "Customer.createdAt",
        Probe::Gql("{ customer(id: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { createdAt } }"),
        "UFOFOOO",
    ),
    (
        "Customer.purchases",
        Probe::Gql(
            "{ customer(id: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { purchases { id store productId status expiresAt } } }",
        ),
        "UFOFOOO",
    ),
    (
        "Customer.devices",
        Probe::Gql(
            "{ customer(id: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { devices { platform deviceId } } }",
        ),
        "UFOFOOO",
    ),
    (
        "Customer.entitlementToken",
        Probe::Gql(
            "{ customer(id: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { entitlementToken } }",
        ),
        "UOOFOOO",
    ),
    (
        "Customer.receipts",
        Probe::Gql(
            "{ customer(id: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { receipts { id outcome error } } }",
        ),
        "UFFFOOO",
    ),
    (
        "Customer.events",
        Probe::Gql(
            "{ customer(id: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { events { kind newStatus } } }",
        ),
        "UFOFOOO",
    ),
    (
        "Entitlement.purchaseId",
        Probe::Gql(
            "{ customer(id: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { entitlements { purchaseId } } }",
        ),
        "UFOFOOO",
    ),
    (
        "Entitlement.explanation",
        Probe::Gql(
            "{ customer(id: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { entitlements { key explanation } } }",
        ),
        "UFOFOOO",
    ),
    (
        "Purchase.explanation",
        Probe::Gql(
            "{ customer(id: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { purchases { id explanation } } }",
        ),
        "UFOFOOO",
    ),
    (
        "Purchase.storePurchaseId",
        Probe::Gql(
            "{ customer(id: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { purchases { storePurchaseId } } }",
        ),
        "UFFFFOO",
    ),
    (
        "Receipt.payload",
        Probe::Gql(
            "{ customer(id: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { receipts { payload } } }",
        ),
        "UFFFFOO",
    ),
    (
        "QueryRoot.webhookEvents",
        Probe::Gql("{ webhookEvents(first: 5) { nodes { id outcome customerId } } }"),
        "UFFFFOO",
    ),
    (
        "QueryRoot.overview",
        Probe::Gql(
            "{ overview(days: 7) { now { customersWithAccess inTrial } days { day newTrials } } }",
        ),
        "UFFFFOO",
    ),
    (
        "Customer.webhookEvents",
        Probe::Gql(
            "{ customer(id: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { webhookEvents { outcome } } }",
        ),
        "UFFFOOO",
    ),
    (
        "WebhookEvent.payload",
        Probe::Gql("{ webhookEvents(first: 5) { nodes { payload } } }"),
        "UFFFFOO",
    ),
    (
        "MutationRoot.replayWebhookEvent",
        Probe::Gql("mutation { replayWebhookEvent(id: \"999999\") { outcome ran } }"),
        "UFFFFPP",
    ),
    (
        "MutationRoot.registerDevice",
        Probe::Gql(
            "mutation($d: String!) { registerDevice(input: {platform: WEB, deviceId: $d, customerId: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\"}) { created customer { id } device { deviceId } } }",
        ),
        "UOOFFOO",
    ),
    (
        "MutationRoot.verifyPurchase",
        Probe::Gql(
            "mutation { verifyPurchase(customerId: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\", input: {appStore: {signedTransaction: \"x\", transactionId: \"y\"}}) { customer { id } } }",
        ),
        "UPPFFPP",
    ),
    (
        "MutationRoot.createCheckoutSession",
        Probe::Gql(
            "mutation { createCheckoutSession(input: {productId: \"pro_monthly\", successUrl: \"https://app.test/ok\", cancelUrl: \"https://app.test/no\"}) { url } }",
        ),
        "UFPPFFF",
    ),
    (
        "MutationRoot.createPortalSession",
        Probe::Gql("mutation { createPortalSession(returnUrl: \"https://app.test/\") { url } }"),
        "UFPPFFF",
    ),
    (
        "MutationRoot.grantEntitlement",
        Probe::Gql(
            "mutation { grantEntitlement(customerId: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\", entitlement: \"no-such\") { id } }",
        ),
        "UFFFFPP",
    ),
    (
        "MutationRoot.revokeGrant",
        Probe::Gql(
            "mutation { revokeGrant(customerId: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\", entitlement: \"maps\") { id } }",
        ),
        "UFFFFPP",
    ),
    (
        "MutationRoot.pairDevice",
        Probe::Gql("mutation { pairDevice(code: \"ABCD-EFGH\") { id } }"),
        "UFPPFFF",
    ),
    (
        "MutationRoot.mergeCustomers",
        Probe::Gql(
            "mutation { mergeCustomers(from: \"no-such-customer\", into: \"6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11\") { id } }",
        ),
        "UFFFFPP",
    ),
    (
        "SubscriptionRoot.entitlementChanged",
        Probe::Watch(Some(ALICE)),
        "UOOFOOO",
    ),
    // Without `customerId`: a customer token watches itself, nobody else
    // but service and admin watches everyone.
    (
        "SubscriptionRoot.entitlementChanged",
        Probe::Watch(None),
        "UFOOOOO",
    ),
    ("POST /user", Probe::PostUser, "UOOOFOO"),
    (
        "GET /api/subscriptions/check/{customer_id}",
        Probe::Get("/api/subscriptions/check/6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a11"),
        "UFFFOOO",
    ),
];

/// What a probe got: `O`, `P`, `F` or `U`, with the body for messages.
async fn run(w: &World, probe: &Probe, i: usize) -> (char, Value) {
    let app = &w.app;
    let auth = &w.creds[i];
    let unique = format!("probe-{i}-{}", next_id());
    match probe {
        Probe::Gql(q) => {
            let (s, r) = app.gql(auth, q, json!({ "d": unique })).await;
            assert_eq!(s, StatusCode::OK, "{r}");
            (gql_outcome(&r), r)
        }
        Probe::Watch(c) => watch(app, auth, *c).await,
        Probe::PostUser => {
            let (s, r) = app.post_user(auth, &unique).await;
            (rest_outcome(s, &r), r)
        }
        Probe::Get(path) => {
            let resp = auth
                .apply(app.client.get(app.url(path)))
                .send()
                .await
                .unwrap();
            let s = resp.status();
            let r = resp.json().await.unwrap_or(Value::Null);
            (rest_outcome(s, &r), r)
        }
    }
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn gql_outcome(r: &Value) -> char {
    match error_code(r) {
        None => {
            assert!(r["data"].is_object(), "{r}");
            'O'
        }
        Some("UNAUTHENTICATED") => 'U',
        Some("FORBIDDEN") => 'F',
        Some(_) => 'P',
    }
}

fn rest_outcome(s: StatusCode, r: &Value) -> char {
    match (s, r["error"]["code"].as_str()) {
        (StatusCode::OK, _) => 'O',
        (StatusCode::UNAUTHORIZED, Some("UNAUTHENTICATED")) => 'U',
        (StatusCode::FORBIDDEN, Some("FORBIDDEN")) => 'F',
        (s, _) => {
            assert!(s.is_client_error() || s.is_server_error(), "{s} {r}");
            'P'
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON message, skipping keepalives; `None` once closed.
async fn ws_next(ws: &mut Ws) -> Option<Value> {
    loop {
        match ws.next().await?.ok()? {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "ping" || v["type"] == "ka" {
                    continue;
                }
                return Some(v);
            }
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

/// Subscribes as `auth`; `O` once the subscription is attached to the feed,
/// the refusal's code otherwise. An anonymous socket may also be refused at
/// `connection_init`, before it can subscribe.
async fn watch(app: &TestApp, auth: &Auth, customer: Option<&str>) -> (char, Value) {
    let feed = &app.state.core.feed();
    let deadline = Instant::now() + StdDuration::from_secs(10);
    while feed.subscribers() > 0 {
        assert!(Instant::now() < deadline, "earlier probes detach");
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
    let init = match auth {
        Auth::None => json!({}),
        Auth::Key(k) => json!({ "api-key": k }),
        Auth::Bearer(t) => json!({ "Authorization": format!("Bearer {t}") }),
    };
    let mut req = app
        .url("/graphql/ws")
        .replacen("http://", "ws://", 1)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::text(
        json!({ "type": "connection_init", "payload": init }).to_string(),
    ))
    .await
    .unwrap();
    let ack = tokio::time::timeout(StdDuration::from_secs(10), ws_next(&mut ws))
        .await
        .expect("an answer to connection_init");
    match ack {
        Some(m) if m["type"] == "connection_ack" => {}
        other if matches!(auth, Auth::None) => return ('U', other.unwrap_or(Value::Null)),
        other => panic!("no ack: {other:?}"),
    }
    ws.send(Message::text(
        json!({
            "id": "w",
            "type": "subscribe",
            "payload": {
                "query": "subscription($c: ID) { entitlementChanged(customerId: $c) { eventId customerId entitlement kind oldStatus newStatus occurredAt } }",
                "variables": { "c": customer }
            }
        })
        .to_string(),
    ))
    .await
    .unwrap();
    let outcome = tokio::select! {
        m = ws_next(&mut ws) => {
            let m = m.unwrap_or(Value::Null);
            let errors = if m["type"] == "error" { &m["payload"] } else { &m["payload"]["errors"] };
            assert!(m["payload"]["data"].is_null(), "no data with a refusal: {m}");
            let c = match errors[0]["extensions"]["code"].as_str() {
                Some("UNAUTHENTICATED") => 'U',
                Some("FORBIDDEN") => 'F',
                _ => panic!("a refusal carries its code: {m}"),
            };
            (c, m)
        }
        _ = async {
            while feed.subscribers() == 0 {
                tokio::time::sleep(StdDuration::from_millis(10)).await;
            }
        } => ('O', Value::Null),
        _ = tokio::time::sleep(StdDuration::from_secs(10)) => panic!("neither attached nor refused"),
    };
    ws.close(None).await.ok();
    outcome
}

/// Whatever a refused field would have held is absent from the answer:
/// along each error's path, the data stops at a null.
fn assert_refused_fields_are_null(body: &Value) {
    for e in body["errors"].as_array().into_iter().flatten() {
        let mut at = &body["data"];
        for step in e["path"].as_array().into_iter().flatten() {
            if at.is_null() {
                break;
            }
            at = match step {
                Value::String(k) => &at[k.as_str()],
                Value::Number(n) => &at[n.as_u64().unwrap() as usize],
                _ => unreachable!(),
            };
        }
        assert!(at.is_null(), "a refused field answered data: {body}");
    }
}

async fn credential_matrix(b: Backend) {
    let w = world(b).await;
    let mut wrong = Vec::new();
    for (coordinate, probe, expected) in MATRIX {
        assert_eq!(expected.len(), CREDENTIALS.len(), "{coordinate}");
        for (i, want) in expected.chars().enumerate() {
            let before = w.app.counts().await;
            let (got, body) = run(&w, probe, i).await;
            if got != want {
                wrong.push(format!(
                    "{coordinate} with {}: expected {want}, got {got}: {body}",
                    CREDENTIALS[i]
                ));
            }
            if matches!(got, 'F' | 'U') {
                assert_eq!(
                    w.app.counts().await,
                    before,
                    "{coordinate} refused for {} changed nothing",
                    CREDENTIALS[i]
                );
                if let Probe::Gql(_) = probe {
                    assert_refused_fields_are_null(&body);
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Every field of every object type has a policy entry; every guarded field
/// and route has a probe in `MATRIX`. Adding a field without deciding (and
/// testing) who may use it fails here.
#[test]
fn every_field_and_route_is_in_the_policy_and_the_matrix() {
    use async_graphql::parser::types::{TypeKind, TypeSystemDefinition};
    let sdl = entitle::graphql::sdl();
    let doc = async_graphql::parser::parse_schema(&sdl).unwrap();
    let mut fields = Vec::new();
    for def in &doc.definitions {
        if let TypeSystemDefinition::Type(t) = def
            && let TypeKind::Object(o) = &t.node.kind
        {
            for f in &o.fields {
                fields.push(format!("{}.{}", t.node.name.node, f.node.name.node));
            }
        }
    }
    for root in ["QueryRoot", "MutationRoot", "SubscriptionRoot"] {
        assert!(
            fields.iter().any(|f| f.starts_with(&format!("{root}."))),
            "{root} has fields"
        );
    }
    for f in &fields {
        let access = policy::field(f).unwrap_or_else(|| panic!("{f} has no policy entry"));
        if ["QueryRoot.", "MutationRoot.", "SubscriptionRoot."]
            .iter()
            .any(|r| f.starts_with(r))
        {
            assert!(matches!(access, Access::Guard(_)), "{f} needs a guard");
        }
        if matches!(access, Access::Guard(_)) {
            assert!(
                MATRIX.iter().any(|(c, _, _)| c == f),
                "{f} is guarded but the credential matrix does not probe it"
            );
        }
    }
    for (route, access) in policy::ROUTES {
        if matches!(access, Access::Guard(_)) {
            assert!(
                MATRIX.iter().any(|(c, _, _)| c == route),
                "{route} is guarded but the credential matrix does not probe it"
            );
        }
    }
    for (c, _, _) in MATRIX {
        assert!(
            fields.iter().any(|f| f == c) || policy::ROUTES.iter().any(|(r, _)| r == c),
            "the matrix probes {c}, which is neither a field nor a route"
        );
    }
}

/// The purchase-theft read: with the public key (or another customer's
/// token, or a service key) a receipt's payload and a purchase's store id
/// come back as FORBIDDEN, on every path to them, and the answer carries
/// neither. The admin reads both, so the refusal is not for want of data.
async fn client_key_cannot_read_purchase_secrets(b: Backend) {
    let w = world(b).await;
    let app = &w.app;
    let secrets = [w.alice_jws.as_str(), ALICE_TX];
    let queries = [
        "query($c: ID!) { customer(id: $c) { receipts(limit: 50) { payload } } }",
        "query($c: ID!) { customer(id: $c) { purchases { storePurchaseId } } }",
        "query($c: ID!) { customer(id: $c) { paidStatus a: receipts { id } b: receipts { payload } p: purchases { productId storePurchaseId } } }",
        "mutation($c: ID) { registerDevice(input: {platform: IOS, deviceId: \"alice-phone\", customerId: $c}) { customer { receipts { payload } purchases { storePurchaseId } } } }",
    ];
    let before = app.counts().await;
    for who in [1, 2, 3, 4] {
        for q in queries {
            let (_, r) = app.gql(&w.creds[who], q, json!({ "c": ALICE })).await;
            assert!(
                matches!(error_code(&r), Some("FORBIDDEN")),
                "{} on {q}: {r}",
                CREDENTIALS[who]
            );
            let text = r.to_string();
            for s in secrets {
                assert!(
                    !text.contains(s),
                    "{} read a secret: {text}",
                    CREDENTIALS[who]
                );
            }
        }
    }
    assert_eq!(app.counts().await, before, "nothing changed");
    // Re-submitting her own transaction with the client key: accepted, and
    // still no store id in the answer.
    let (_, r) = app
        .gql(
            w.client(),
            "mutation($j: String!, $c: ID) { verifyPurchase(customerId: $c, input: {appStore: {signedTransaction: $j}}) { purchase { status storePurchaseId } } }",
            json!({ "j": w.alice_jws, "c": ALICE }),
        )
        .await;
    assert_eq!(error_code(&r), Some("FORBIDDEN"), "{r}");
    assert!(!r.to_string().contains(ALICE_TX), "{r}");
    // Nor the purchase's explanation (refunds, revocations, billing trouble):
    // the rest of the purchase comes back, that field as a refusal.
    let (_, r) = app
        .gql(
            w.client(),
            "mutation($j: String!, $c: ID) { verifyPurchase(customerId: $c, input: {appStore: {signedTransaction: $j}}) { purchase { status effectiveStatus explanation } } }",
            json!({ "j": w.alice_jws, "c": ALICE }),
        )
        .await;
    assert_eq!(error_code(&r), Some("FORBIDDEN"), "{r}");
    assert!(!r.to_string().contains("Grants"), "{r}");
    let (_, r) = app
        .gql(
            w.client(),
            "mutation($j: String!, $c: ID) { verifyPurchase(customerId: $c, input: {appStore: {signedTransaction: $j}}) { purchase { status effectiveStatus } } }",
            json!({ "j": w.alice_jws, "c": ALICE }),
        )
        .await;
    assert!(r["errors"].is_null(), "{r}");
    assert_eq!(
        r["data"]["verifyPurchase"]["purchase"]["effectiveStatus"], "ACTIVE",
        "{r}"
    );
    for who in [2, 4, 5] {
        let (_, r) = app
            .gql(
                &w.creds[who],
                "query($c: ID!) { customer(id: $c) { purchases { explanation } } }",
                json!({ "c": ALICE }),
            )
            .await;
        let said = r["data"]["customer"]["purchases"][0]["explanation"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: {r}", CREDENTIALS[who]));
        assert!(
            said.starts_with("Grants pro: the App Store subscription"),
            "{said}"
        );
    }

    let (_, r) = app
        .gql(
            w.admin(),
            "query($c: ID!) { customer(id: $c) { receipts { payload } purchases { storePurchaseId } } }",
            json!({ "c": ALICE }),
        )
        .await;
    assert!(r["errors"].is_null(), "{r}");
    assert!(r.to_string().contains(&w.alice_jws), "{r}");
    assert_eq!(
        r["data"]["customer"]["purchases"][0]["storePurchaseId"],
        ALICE_TX
    );
}

/// The watch hijack: a paying watch cannot be moved to another customer by
/// the client key, by another customer's token or through `POST /user`;
/// the victim stays `paid`, its checkout link names it, no device moved and
/// nothing was written. An admin can still move it.
async fn watch_hijack_is_refused(b: Backend) {
    let w = world(b).await;
    let app = &w.app;
    let client = w.client();
    assert_eq!(
        app.post_user(client, "watch-v").await.1["paid_status"],
        "trial"
    );
    let (_, r) = app
        .gql(
            w.admin(),
            "mutation { grantEntitlement(customerId: \"watch-v\", entitlement: \"pro\") { paidStatus } }",
            json!({}),
        )
        .await;
    assert_eq!(r["data"]["grantEntitlement"]["paidStatus"], "PAID", "{r}");
    let paid = app.post_user(client, "watch-v").await.1;
    assert_eq!(paid["paid_status"], "paid");

    let before = app.counts().await;
    let mallory = jwt("mallory", false);
    for (who, q) in [
        (
            client,
            "mutation { registerDevice(input: {platform: GARMIN, deviceId: \"watch-v\", customerId: \"mallory\"}) { created customer { id paidStatus } } }",
        ),
        (
            &mallory,
            "mutation { registerDevice(input: {platform: GARMIN, deviceId: \"watch-v\"}) { created customer { id paidStatus } } }",
        ),
        (
            client,
            "mutation { registerDevice(input: {platform: GARMIN, deviceId: \"watch-v\", customerId: \"bob\"}) { created } }",
        ),
    ] {
        let (s, r) = app.gql(who, q, json!({})).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(error_code(&r), Some("DEVICE_ALREADY_BOUND"), "{q}: {r}");
        assert!(r["data"].is_null(), "{r}");
        assert!(
            !r.to_string().contains("watch-v"),
            "the owner is not named: {r}"
        );
    }
    let (s, r) = app.post_user(&mallory, "watch-v").await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");
    assert_eq!(r["error"]["code"], "DEVICE_ALREADY_BOUND");

    assert_eq!(app.counts().await, before, "nothing written");
    let device = entitle::db::find_device(&app.state.core.db().conn, "garmin", "watch-v")
        .await
        .map_err(anyhow::Error::from)
        .unwrap()
        .unwrap();
    assert_eq!(device.customer_id, "watch-v", "the watch did not move");
    assert!(
        app.state
            .core
            .reads()
            .find_customer("mallory")
            .await
            .map_err(anyhow::Error::from)
            .unwrap()
            .is_none(),
        "no customer made for the attacker"
    );
    let after = app.post_user(client, "watch-v").await.1;
    assert_eq!(after["paid_status"], "paid", "{after}");
    assert_eq!(after["status"], "paid");
    assert_eq!(
        after["checkout_url"],
        "https://buy.stripe.com/test_123?client_reference_id=watch-v"
    );

    // Naming the customer it is already bound to is no move: allowed.
    let (_, r) = app
        .gql(
            client,
            "mutation { registerDevice(input: {platform: GARMIN, deviceId: \"watch-v\", customerId: \"watch-v\"}) { created customer { paidStatus } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        r["data"]["registerDevice"]["customer"]["paidStatus"], "PAID",
        "{r}"
    );

    // The admin moves it; the event log does not change (access moved with
    // the device's binding, not with a purchase).
    let (_, r) = app
        .gql(
            w.admin(),
            "mutation { registerDevice(input: {platform: GARMIN, deviceId: \"watch-v\", customerId: \"acct-9\"}) { customer { id } device { customerId } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        r["data"]["registerDevice"]["device"]["customerId"], "acct-9",
        "{r}"
    );
    assert_eq!(
        app.post_user(client, "watch-v").await.1["paid_status"],
        "expired"
    );
}

on_all_backends!(
    credential_matrix,
    client_key_cannot_read_purchase_secrets,
    watch_hijack_is_refused,
);
