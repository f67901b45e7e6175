//! Operators' look-ups (issue 16, points 3 and 4): `customers(search:)` by
//! every key a store or Stripe hands out, and `Entitlement.explanation` and
//! `Purchase.explanation` from the server, sandbox purchases included.

mod common;
mod google_support;
mod stripe_support;

use chrono::{DateTime, Duration, Utc};
use common::{Auth, Backend, TestApp, spawn_with};
use entities::purchases;
use entitle::domain::ApiKeyRole;
use reqwest::StatusCode;
use sea_orm::{ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use stripe_support::{FakeStripe, checkout_session, configure, deliver, event};

async fn register(app: &TestApp, client: &Auth, customer: &str, device: &str) {
    let (s, r) = app
        .gql(
            client,
            "mutation($c: ID, $d: String!) { registerDevice(input: {platform: IOS, deviceId: $d, customerId: $c}) { created } }",
            json!({ "c": customer, "d": device }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(r["errors"].is_null(), "{r}");
}

/// A purchase row as a verified store message would leave it.
#[allow(clippy::too_many_arguments)]
async fn purchase(
    app: &TestApp,
    customer: &str,
    store: &str,
    store_purchase_id: &str,
    product: &str,
    environment: &str,
    raw: Value,
    order_id: Option<&str>,
    now: DateTime<Utc>,
) {
    purchases::ActiveModel {
        customer_id: Set(customer.into()),
        store: Set(store.into()),
        store_purchase_id: Set(store_purchase_id.into()),
        product_id: Set(product.into()),
        environment: Set(environment.into()),
        status: Set("active".into()),
        period_type: Set("normal".into()),
        purchased_at: Set(now - Duration::days(1)),
        expires_at: Set(Some(now + Duration::days(29))),
        grace_expires_at: Set(None),
        auto_renew: Set(true),
        canceled_at: Set(None),
        revoked_at: Set(None),
        renewal_count: Set(0),
        source_updated_at: Set(now),
        raw: Set(Some(raw)),
        order_id: Set(order_id.map(str::to_string)),
        ..Default::default()
    }
    .insert(&app.state.core.db().conn)
    .await
    .unwrap();
    // Written behind the server's back, like a hand edit, which its read
    // cache would only see once the entry expires.
    app.state
        .core
        .db()
        .cache
        .invalidate([&customer.to_string()]);
}

async fn search(app: &TestApp, auth: &Auth, q: &str) -> Vec<String> {
    let (s, r) = app
        .gql(
            auth,
            "query($q: String) { customers(search: $q, first: 10) { nodes { id } } }",
            json!({ "q": q }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(r["errors"].is_null(), "{q}: {r}");
    r["data"]["customers"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect()
}

async fn search_by_every_key(b: Backend) {
    let fake = FakeStripe::start().await;
    let app = spawn_with(b, |c| configure(c, Some(&fake))).await;
    let client = app.key(ApiKeyRole::Client).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let now = app.state.core.now();
    register(&app, &client, "alice", "ios-device-A1").await;
    register(&app, &client, "bob", "ios-device-B2").await;
    register(&app, &client, "carol", "ios-device-C3").await;
    // Alice pays on iOS, bob on Android.
    purchase(
        &app,
        "alice",
        "app_store",
        "2000000123456789",
        "com.example.pro.monthly",
        "production",
        json!({}),
        None,
        now,
    )
    .await;
    purchase(
        &app,
        "bob",
        "play_store",
        "play-token-bob.AO-J1Oz",
        "pro_sub",
        "production",
        json!({ "latestOrderId": "GPA.3391-2271-4417-55120..4" }),
        Some("GPA.3391-2271-4417-55120"),
        now,
    )
    .await;
    // Carol pays on the web: Stripe reports her e-mail and Stripe customer.
    fake.set_line_items("cs_carol", "price_pro_lifetime");
    let mut session = checkout_session(
        "cs_carol",
        "payment",
        Some("carol"),
        Some("cus_Carol9"),
        None,
    );
    session["customer_details"]["email"] = json!("Carol.Buyer@Example.COM");
    let (s, r) = deliver(
        &app,
        &event("evt_carol", "checkout.session.completed", session, now),
    )
    .await;
    assert_eq!(
        (s, r["outcome"].as_str()),
        (StatusCode::OK, Some("applied")),
        "{r}"
    );

    for (q, want) in [
        ("ali", "alice"),
        ("ios-device-B2", "bob"),
        ("2000000123456789", "alice"),
        ("play-token-bob.AO-J1Oz", "bob"),
        ("GPA.3391-2271-4417-55120", "bob"),
        // A renewal's order id finds the same purchase.
        ("GPA.3391-2271-4417-55120..7", "bob"),
        ("cus_Carol9", "carol"),
        ("cs_carol", "carol"),
        ("carol.buyer@example.com", "carol"),
        ("  CAROL.BUYER@example.com ", "carol"),
    ] {
        assert_eq!(search(&app, &admin, q).await, vec![want.to_string()], "{q}");
    }
    for q in ["nobody", "GPA.0000", "cus_", "%", "ios-device"] {
        assert!(search(&app, &admin, q).await.is_empty(), "{q}");
    }
    // Searching is the admin's: the public key and a service key are refused.
    for auth in [client, app.key(ApiKeyRole::Service).await] {
        let (_, r) = app
            .gql(
                &auth,
                "{ customers(search: \"cus_Carol9\") { nodes { id } } }",
                json!({}),
            )
            .await;
        assert_eq!(common::error_code(&r), Some("FORBIDDEN"), "{r}");
    }
}

async fn explanations(app: &TestApp, auth: &Auth, customer: &str) -> Value {
    let (s, r) = app
        .gql(
            auth,
            "query($c: ID!) { customer(id: $c) { entitlements { key isActive explanation } } }",
            json!({ "c": customer }),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    r
}

fn explanation_of(r: &Value, key: &str) -> (bool, String) {
    let e = r["data"]["customer"]["entitlements"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .find(|e| e["key"] == key)
        .unwrap();
    (
        e["isActive"].as_bool().unwrap(),
        e["explanation"].as_str().unwrap().to_string(),
    )
}

async fn explanation_follows_accept_sandbox(b: Backend) {
    for accept_sandbox in [true, false] {
        let app = spawn_with(b.clone(), |c| c.accept_sandbox = accept_sandbox).await;
        let client = app.key(ApiKeyRole::Client).await;
        let service = app.key(ApiKeyRole::Service).await;
        let now = app.state.core.now();
        register(&app, &client, "tester", "ios-device-T").await;
        purchase(
            &app,
            "tester",
            "app_store",
            "2000000999",
            "com.example.pro.monthly",
            "sandbox",
            json!({}),
            None,
            now,
        )
        .await;
        let r = explanations(&app, &service, "tester").await;
        assert!(r["errors"].is_null(), "{r}");
        let (active, text) = explanation_of(&r, "pro");
        let (maps_active, maps) = explanation_of(&r, "maps");
        assert!(!maps_active);
        assert_eq!(
            maps,
            "Not active: no purchase, trial or grant has ever given this entitlement."
        );
        if accept_sandbox {
            // The server-side trial lasts 7 days, the sandbox month longer.
            assert!(active, "{text}");
            assert!(
                text.starts_with("Active: the App Store sandbox subscription com.example.pro.monthly is paid until "),
                "{text}"
            );
        } else {
            // Only the trial grants; the sandbox purchase is no source.
            assert!(active, "{text}");
            assert!(
                text.starts_with("Active: the free trial runs until "),
                "{text}"
            );
        }
        // The public key reads the summary but not the explanation.
        let r = explanations(&app, &client, "tester").await;
        assert_eq!(common::error_code(&r), Some("FORBIDDEN"), "{r}");
        assert!(
            r["data"].is_null() || r.to_string().find("Active:").is_none(),
            "{r}"
        );
    }
    // Without a trial, a refused sandbox purchase says why it does not count.
    let app = spawn_with(b, |c| {
        c.accept_sandbox = false;
        c.trial = None;
    })
    .await;
    let client = app.key(ApiKeyRole::Client).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let now = app.state.core.now();
    register(&app, &client, "tester", "ios-device-T").await;
    purchase(
        &app,
        "tester",
        "app_store",
        "2000000999",
        "com.example.pro.monthly",
        "sandbox",
        json!({}),
        None,
        now,
    )
    .await;
    let r = explanations(&app, &admin, "tester").await;
    let (active, text) = explanation_of(&r, "pro");
    assert!(!active);
    assert!(
        text.starts_with("Not active: the App Store sandbox subscription com.example.pro.monthly would give access until ")
            && text.ends_with("but sandbox purchases are ignored in production (accept_sandbox = false)."),
        "{text}"
    );
}

/// How the server writes an instant in a sentence.
fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// Each purchase row says what it grants now or why not, by the same rules
/// as the entitlements: a sandbox purchase grants only while the server
/// accepts sandbox; a refund, an expiry and an unmapped product are named.
async fn purchase_explanations_follow_accept_sandbox(b: Backend) {
    for accept_sandbox in [true, false] {
        let app = spawn_with(b.clone(), |c| c.accept_sandbox = accept_sandbox).await;
        let client = app.key(ApiKeyRole::Client).await;
        let admin = app.key(ApiKeyRole::Admin).await;
        let now = app.state.core.now();
        register(&app, &client, "tester", "ios-device-T").await;
        for (store, id, product, env) in [
            (
                "app_store",
                "2000000999",
                "com.example.pro.monthly",
                "sandbox",
            ),
            ("stripe", "sub_refunded", "price_pro_monthly", "production"),
            (
                "app_store",
                "2000000777",
                "com.example.retired",
                "production",
            ),
            ("stripe", "sub_lapsed", "price_pro_monthly", "production"),
        ] {
            purchase(
                &app,
                "tester",
                store,
                id,
                product,
                env,
                json!({}),
                None,
                now,
            )
            .await;
        }
        let set = |id: &str, m: purchases::ActiveModel| {
            purchases::Entity::update_many()
                .set(m)
                .filter(purchases::Column::StorePurchaseId.eq(id.to_string()))
                .exec(&app.state.core.db().conn)
        };
        set(
            "sub_refunded",
            purchases::ActiveModel {
                status: Set("refunded".into()),
                revoked_at: Set(Some(now - Duration::days(2))),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // Its period ran out; the store has not said so yet.
        set(
            "sub_lapsed",
            purchases::ActiveModel {
                purchased_at: Set(now - Duration::days(33)),
                expires_at: Set(Some(now - Duration::days(3))),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // Purchase rows written behind the server's back: drop the cached answer.
        app.state
            .core
            .db()
            .cache
            .invalidate([&"tester".to_string()]);

        let (s, r) = app
            .gql(
                &admin,
                "query($c: ID!) { customer(id: $c) { entitlements { key isActive explanation } purchases { store storePurchaseId status effectiveStatus explanation } } }",
                json!({ "c": "tester" }),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        assert!(r["errors"].is_null(), "{r}");
        let row = |id: &str| -> (String, String, String) {
            let p = r["data"]["customer"]["purchases"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["storePurchaseId"] == id || p["store"] == id)
                .unwrap_or_else(|| panic!("{id}: {r}"));
            (
                p["status"].as_str().unwrap().into(),
                p["effectiveStatus"].as_str().unwrap().into(),
                p["explanation"].as_str().unwrap().into(),
            )
        };
        let month_end = when(now + Duration::days(29));
        let sandbox = row("2000000999").2;
        if accept_sandbox {
            assert_eq!(
                sandbox,
                format!(
                    "Grants pro: the App Store sandbox subscription com.example.pro.monthly is paid until {month_end}; it will renew then."
                )
            );
        } else {
            assert_eq!(
                sandbox,
                format!(
                    "Grants nothing: the App Store sandbox subscription com.example.pro.monthly would grant pro until {month_end}, but sandbox purchases are ignored in production (accept_sandbox = false)."
                )
            );
        }
        assert_eq!(
            row("sub_refunded"),
            (
                "REFUNDED".into(),
                "REFUNDED".into(),
                format!(
                    "Grants nothing: the Stripe subscription price_pro_monthly was refunded on {}.",
                    when(now - Duration::days(2))
                )
            )
        );
        assert_eq!(
            row("2000000777").2,
            "Grants nothing: the App Store product com.example.retired is not in the catalog."
        );
        assert_eq!(
            row("sub_lapsed"),
            (
                "ACTIVE".into(),
                "EXPIRED".into(),
                format!(
                    "Grants nothing: the Stripe subscription price_pro_monthly expired on {}.",
                    when(now - Duration::days(3))
                )
            )
        );
        let (_, _, trial) = row("TRIAL");
        assert!(
            trial.starts_with("Grants pro: the free trial runs until "),
            "{trial}"
        );
        // The entitlement tells the same story from the same rules.
        let (active, pro) = explanation_of(&r, "pro");
        assert!(active, "{pro}");
        if accept_sandbox {
            assert!(
                pro.starts_with("Active: the App Store sandbox subscription"),
                "{pro}"
            );
        } else {
            assert!(pro.starts_with("Active: the free trial"), "{pro}");
        }
    }
}

/// A Play purchase verified through the real route is found by its order id
/// and its token.
async fn play_purchase_is_found_by_its_order_id(b: Backend) {
    let (app, g) = google_support::setup(b).await;
    let client = app.key(ApiKeyRole::Client).await;
    let admin = app.key(ApiKeyRole::Admin).await;
    let now = app.state.core.now();
    g.fake.set(
        "life-7",
        google_support::product_purchase(0, false, None, now),
    );
    let body = google_support::verify(&app, &client, "dora", "maps_forever", "life-7").await;
    assert!(body["errors"].is_null(), "{body}");
    // The fake's order id, and a later renewal's form of it.
    for q in [
        "GPA.3333-4444-5555-66666",
        "GPA.3333-4444-5555-66666..1",
        "life-7",
    ] {
        assert_eq!(
            search(&app, &admin, q).await,
            vec!["dora".to_string()],
            "{q}"
        );
    }
}

/// Rows written before the search keys existed get them from the migration:
/// the Stripe customer remembered in the attributes, the Play order id of
/// the stored payload.
async fn migration_backfills_the_search_keys(b: Backend) {
    use migration::{Migrator, MigratorTrait};
    use sea_orm::{ConnectionTrait, Database, Statement};
    let dir = tempfile::tempdir().unwrap();
    let url = common::fresh_database(&b, &dir).await;
    let db = Database::connect(url.as_str()).await.unwrap();
    let before = Migrator::migrations().len() as u32 - 1;
    Migrator::up(&db, Some(before)).await.unwrap();
    let backend = db.get_database_backend();
    let pg = matches!(b, Backend::Postgres(_));
    let now = if pg { "now()" } else { "CURRENT_TIMESTAMP" };
    for sql in [
        format!(
            "INSERT INTO customers (id, created_at, attributes) VALUES \
             ('old-web', {now}, '{{\"stripe_customer_id\": \"cus_Old1\"}}'), ('old-android', {now}, '{{}}')"
        ),
        format!(
            "INSERT INTO purchases (customer_id, store, store_purchase_id, product_id, environment, status, \
             period_type, purchased_at, auto_renew, renewal_count, source_updated_at, raw) VALUES \
             ('old-android', 'play_store', 'tok-old', 'pro_sub', 'production', 'active', 'normal', {now}, \
             true, 0, {now}, '{{\"latestOrderId\": \"GPA.1111-2222-3333-44444..5\"}}')"
        ),
    ] {
        db.execute_raw(Statement::from_string(backend, sql))
            .await
            .unwrap();
    }
    Migrator::up(&db, None).await.unwrap();
    let one = |sql: &str| {
        let db = db.clone();
        let sql = sql.to_string();
        async move {
            db.query_one_raw(Statement::from_string(backend, sql))
                .await
                .unwrap()
                .unwrap()
                .try_get_by_index::<Option<String>>(0)
                .unwrap()
        }
    };
    assert_eq!(
        one("SELECT stripe_customer_id FROM customers WHERE id = 'old-web'")
            .await
            .as_deref(),
        Some("cus_Old1")
    );
    assert_eq!(
        one("SELECT order_id FROM purchases WHERE store_purchase_id = 'tok-old'")
            .await
            .as_deref(),
        Some("GPA.1111-2222-3333-44444")
    );
    // And down again, for an operator who must roll back.
    Migrator::down(&db, Some(1)).await.unwrap();
}

on_all_backends!(
    search_by_every_key,
    explanation_follows_accept_sandbox,
    purchase_explanations_follow_accept_sandbox,
    play_purchase_is_found_by_its_order_id,
    migration_backfills_the_search_keys
);
