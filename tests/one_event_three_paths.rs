//! One store event reaches us by up to three paths: the store's webhook,
//! reconciliation (the store's list of what it failed to deliver, or of
//! voided purchases), and an operator's replay of the stored webhook row.
//! Whatever the order, and when a replay and a reconciliation race, the
//! event is applied once: one purchase row, one change-log row per change,
//! and the state left by the first path that applied it is the state after
//! the others. Stripe, the App Store and Google Play, each through its own
//! ingest code.

mod apple_support;
mod common;
mod google_support;
mod stripe_support;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use chrono::{DateTime, Duration, Utc};
use common::{Auth, Backend, TestApp, spawn_with};
use entitle::{
    config::AppleEnvironment,
    domain::ApiKeyRole,
    jobs::reconcile::{self, Counts, Source},
};
use reqwest::StatusCode;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::{Value, json};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers::any};

/// A path into the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Webhook,
    Reconcile,
    Replay,
    /// A replay and a reconciliation at the same time.
    ReplayWhileReconciling,
}

/// An order of the paths. With `api_down_first`, the store's API is down
/// for the first webhook, so it is recorded `failed` (replayable) and both
/// reconciliation and a replay may take it over.
struct Order {
    name: &'static str,
    api_down_first: bool,
    steps: &'static [Step],
}

const ORDERS: &[Order] = &[
    Order {
        name: "webhook, reconciliation, replay",
        api_down_first: false,
        steps: &[Step::Webhook, Step::Reconcile, Step::Replay],
    },
    Order {
        name: "reconciliation, webhook, replay",
        api_down_first: false,
        steps: &[Step::Reconcile, Step::Webhook, Step::Replay],
    },
    Order {
        name: "failed webhook, reconciliation, replay, redelivery",
        api_down_first: true,
        steps: &[Step::Webhook, Step::Reconcile, Step::Replay, Step::Webhook],
    },
    Order {
        name: "failed webhook, replay, reconciliation, redelivery",
        api_down_first: true,
        steps: &[Step::Webhook, Step::Replay, Step::Reconcile, Step::Webhook],
    },
    Order {
        name: "failed webhook, replay racing reconciliation, redelivery",
        api_down_first: true,
        steps: &[Step::Webhook, Step::ReplayWhileReconciling, Step::Webhook],
    },
];

/// What a store's test drives: one event per order (`case` numbers them),
/// each for a customer of its own.
trait StoreCase {
    const SOURCE: Source;
    /// `source` of its rows in `webhook_events`.
    const STORE: &'static str;
    /// Whether every path records the event under one dedupe key, so the
    /// paths after the first change nothing at all. Otherwise (Play: the
    /// notification carries no void time, so it cannot share the list's
    /// key) a later path re-reads the purchase, which may refresh when the
    /// state was read (`source_updated_at`, `raw`), but not the state.
    const ONE_DEDUPE_KEY: bool;
    fn customer(&self, case: usize) -> String;
    /// The webhook row of the case's event.
    fn event_id(&self, case: usize) -> String;
    /// The purchase the event is about (`store_purchase_id`).
    fn purchase(&self, case: usize) -> String;
    /// The change-log kinds once the event applied.
    fn kinds(&self) -> Vec<&'static str>;
    /// Everything up to the event: the customer, the store's state, and the
    /// event in the store's reconciliation list.
    async fn prepare(&self, app: &TestApp, case: usize);
    async fn deliver(&self, app: &TestApp, case: usize) -> (StatusCode, Value);
    fn set_api_down(&self, down: bool);
}

/// Purchases and change log of one customer, as the database holds them.
#[derive(Debug, PartialEq)]
struct Snapshot {
    purchases: Vec<String>,
    changes: Vec<String>,
}

/// With `whole_rows` off, a purchase is its state without the marks of
/// when it was last read.
async fn snapshot(app: &TestApp, customer: &str, whole_rows: bool) -> Snapshot {
    let db = &app.state.core.db().conn;
    let purchases = entitle::db::purchases_of(db, customer)
        .await
        .map_err(anyhow::Error::from)
        .unwrap()
        .into_iter()
        .map(|p| {
            if whole_rows {
                format!("{p:?}")
            } else {
                format!(
                    "{:?}",
                    entities::purchases::Model {
                        source_updated_at: chrono::DateTime::UNIX_EPOCH,
                        raw: None,
                        ..p
                    }
                )
            }
        })
        .collect();
    use entities::entitlement_events as ev;
    let changes = ev::Entity::find()
        .filter(ev::Column::CustomerId.eq(customer))
        .order_by_asc(ev::Column::Id)
        .all(db)
        .await
        .unwrap()
        .iter()
        // The publishing marks are the relay's, not the event's effect.
        .map(|e| {
            format!(
                "{} {} {} {:?} {:?} -> {} {:?} {}",
                e.id,
                e.entitlement,
                e.kind,
                e.reason,
                e.old_status,
                e.new_status,
                e.purchase_id,
                e.occurred_at
            )
        })
        .collect();
    Snapshot { purchases, changes }
}

async fn change_kinds(app: &TestApp, customer: &str) -> Vec<String> {
    use entities::entitlement_events as ev;
    ev::Entity::find()
        .filter(ev::Column::CustomerId.eq(customer))
        .order_by_asc(ev::Column::Id)
        .all(&app.state.core.db().conn)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

async fn webhook_row(
    app: &TestApp,
    store: &str,
    event_id: &str,
) -> Option<entities::webhook_events::Model> {
    use entities::webhook_events as w;
    w::Entity::find()
        .filter(w::Column::Source.eq(store))
        .filter(w::Column::EventId.eq(event_id))
        .one(&app.state.core.db().conn)
        .await
        .unwrap()
}

const REPLAY: &str =
    "mutation($id: ID!) { replayWebhookEvent(id: $id) { previousOutcome outcome ran } }";

async fn replay(app: &TestApp, admin: &Auth, id: i64) -> Value {
    let (s, body) = app.gql(admin, REPLAY, json!({ "id": id })).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body["errors"].is_null(), "{body}");
    body["data"]["replayWebhookEvent"].clone()
}

async fn reconcile_since(app: &TestApp, source: Source, since: DateTime<Utc>) -> Counts {
    reconcile::run_one(&app.state.core, source, Some(since))
        .await
        .unwrap_or_else(|e| panic!("{} reconciliation failed: {e:?}", source.name()))
}

/// Runs every order against `store`, each on an event of its own.
async fn every_order_applies_once<S: StoreCase>(app: &TestApp, store: &S) {
    let admin = app.key(ApiKeyRole::Admin).await;
    let since = app.state.core.now() - Duration::days(1);
    for (case, order) in ORDERS.iter().enumerate() {
        let customer = store.customer(case);
        let event_id = store.event_id(case);
        store.prepare(app, case).await;
        let before = change_kinds(app, &customer).await;
        // The state once the event applied: every later path leaves it so.
        let mut settled: Option<Snapshot> = None;
        for (i, step) in order.steps.iter().enumerate() {
            let down = order.api_down_first && i == 0;
            store.set_api_down(down);
            let what = format!("{} / {}: step {} ({step:?})", S::STORE, order.name, i + 1);
            match step {
                Step::Webhook => {
                    let (s, body) = store.deliver(app, case).await;
                    if down {
                        assert!(s.is_server_error(), "{what}: {s} {body}");
                        let row = webhook_row(app, S::STORE, &event_id).await;
                        assert_eq!(row.map(|r| r.outcome).as_deref(), Some("failed"), "{what}");
                        assert_eq!(change_kinds(app, &customer).await, before, "{what}");
                        continue;
                    }
                    assert_eq!(s, StatusCode::OK, "{what}: {body}");
                    if settled.is_some() && S::ONE_DEDUPE_KEY {
                        assert_eq!(body["outcome"], "duplicate", "{what}: {body}");
                    }
                }
                Step::Reconcile => {
                    let c = reconcile_since(app, S::SOURCE, since).await;
                    if settled.is_some() && S::ONE_DEDUPE_KEY {
                        assert_eq!((c.seen, c.duplicates), (1, 1), "{what}: {c:?}");
                    }
                }
                Step::Replay => {
                    let row = webhook_row(app, S::STORE, &event_id)
                        .await
                        .unwrap_or_else(|| panic!("{what}: no webhook row to replay"));
                    let r = replay(app, &admin, row.id).await;
                    if settled.is_some() && row.outcome != "failed" {
                        assert_eq!(r["ran"], false, "{what}: {r}");
                    }
                }
                Step::ReplayWhileReconciling => {
                    let row = webhook_row(app, S::STORE, &event_id)
                        .await
                        .unwrap_or_else(|| panic!("{what}: no webhook row to replay"));
                    let (r, c) = tokio::join!(
                        replay(app, &admin, row.id),
                        reconcile_since(app, S::SOURCE, since)
                    );
                    assert_ne!(r["outcome"], "failed", "{what}: {r}");
                    if S::ONE_DEDUPE_KEY {
                        // Both claim the one row: exactly one of them ran it.
                        assert!(
                            (r["ran"] == true) != (c.applied == 1),
                            "{what}: replay {r}, reconciliation {c:?}"
                        );
                    }
                }
            }
            let now = snapshot(app, &customer, S::ONE_DEDUPE_KEY).await;
            let kinds = change_kinds(app, &customer).await;
            let mut want = before.clone();
            want.extend(store.kinds().iter().map(|k| k.to_string()));
            assert_eq!(kinds, want, "{what}: the change log");
            assert_eq!(
                now.purchases.len(),
                1,
                "{what}: one purchase row: {:#?}",
                now.purchases
            );
            assert!(
                now.purchases[0]
                    .contains(&format!("store_purchase_id: {:?}", store.purchase(case))),
                "{what}: {:?}",
                now.purchases
            );
            match &settled {
                None => settled = Some(now),
                Some(first) => assert_eq!(&now, first, "{what}: the state changed"),
            }
        }
        store.set_api_down(false);
        let row = webhook_row(app, S::STORE, &event_id).await.unwrap();
        let ends = if S::ONE_DEDUPE_KEY {
            &["applied"][..]
        } else {
            &["applied", "stale"][..]
        };
        assert!(
            ends.contains(&row.outcome.as_str()),
            "{} / {}: the webhook row ends {}",
            S::STORE,
            order.name,
            row.outcome
        );
    }
}

// ------------------------------------------------------------------ Stripe

struct StripeStore {
    fake: stripe_support::FakeStripe,
    created: DateTime<Utc>,
}

impl StripeStore {
    fn event(&self, case: usize) -> String {
        let now = self.created;
        let sub = self.subscription(case, now);
        stripe_support::event(
            &self.event_id(case),
            "customer.subscription.created",
            sub,
            now,
        )
    }

    fn subscription(&self, case: usize, now: DateTime<Utc>) -> Value {
        stripe_support::subscription(
            &self.purchase(case),
            &format!("cus_once_{case}"),
            Some(&self.customer(case)),
            "price_pro_monthly",
            "active",
            now - Duration::days(1),
            now + Duration::days(29),
        )
    }
}

impl StoreCase for StripeStore {
    const SOURCE: Source = Source::Stripe;
    const STORE: &'static str = "stripe";
    const ONE_DEDUPE_KEY: bool = true;

    fn customer(&self, case: usize) -> String {
        format!("stripe-once-{case}")
    }
    fn event_id(&self, case: usize) -> String {
        format!("evt_once_{case}")
    }
    fn purchase(&self, case: usize) -> String {
        format!("sub_once_{case}")
    }
    fn kinds(&self) -> Vec<&'static str> {
        vec!["granted"]
    }

    async fn prepare(&self, _app: &TestApp, case: usize) {
        self.fake
            .set_subscription(&self.subscription(case, self.created));
        let listed: Value = serde_json::from_str(&self.event(case)).unwrap();
        self.fake.set(
            "GET",
            "/v1/events",
            json!({ "object": "list", "data": [listed], "has_more": false, "url": "/v1/events" }),
        );
    }

    async fn deliver(&self, app: &TestApp, case: usize) -> (StatusCode, Value) {
        stripe_support::deliver(app, &self.event(case)).await
    }

    fn set_api_down(&self, down: bool) {
        self.fake.set_down(down);
    }
}

async fn stripe_event_applies_once_by_any_path(b: Backend) {
    let fake = stripe_support::FakeStripe::start().await;
    let app = spawn_with(b, |c| {
        stripe_support::configure(c, Some(&fake));
        // The test runs reconciliation itself, when each order says.
        c.jobs.enabled = false;
    })
    .await;
    let created = app.state.core.now() - Duration::hours(1);
    every_order_applies_once(&app, &StripeStore { fake, created }).await;
}

// --------------------------------------------------------------- App Store

/// The App Store Server API: answers by path from a map, or 500 throughout
/// while down.
#[derive(Clone, Default)]
struct AppleApi {
    by_path: Arc<Mutex<HashMap<String, Value>>>,
    down: Arc<AtomicBool>,
}

impl Respond for AppleApi {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        if self.down.load(Ordering::SeqCst) {
            return ResponseTemplate::new(500);
        }
        match self.by_path.lock().unwrap().get(req.url.path()) {
            Some(v) => ResponseTemplate::new(200).set_body_json(v),
            None => ResponseTemplate::new(404).set_body_json(json!({ "errorCode": 4040010 })),
        }
    }
}

struct AppleStore {
    api: AppleApi,
    t0: DateTime<Utc>,
}

impl AppleStore {
    fn sub(&self, case: usize) -> apple_support::Sub {
        apple_support::Sub::new(
            &format!("71000001{case:02}"),
            apple_support::MONTHLY,
            &self.customer(case),
            self.t0 - Duration::hours(1),
        )
    }

    fn tx(&self, case: usize) -> Value {
        let t0 = self.t0;
        self.sub(case).tx(
            &format!("71000002{case:02}"),
            t0 - Duration::hours(1),
            Some(t0 + Duration::days(30)),
            t0 - Duration::hours(1),
        )
    }

    fn renewal(&self, case: usize) -> Value {
        self.sub(case)
            .renewal(true, false, None, self.t0 - Duration::hours(1))
    }

    fn payload(&self, case: usize) -> String {
        apple_support::notification(
            "SUBSCRIBED",
            Some("INITIAL_BUY"),
            &self.event_id(case),
            "Production",
            self.t0 - Duration::hours(1),
            Some(&self.tx(case)),
            Some(&self.renewal(case)),
            Some(1),
        )
    }
}

impl StoreCase for AppleStore {
    const SOURCE: Source = Source::Apple;
    const STORE: &'static str = "app_store";
    const ONE_DEDUPE_KEY: bool = true;

    fn customer(&self, case: usize) -> String {
        format!("6c8f5c3a-0d6e-4b47-9a0f-1f0d5e9b2a{case:02}")
    }
    fn event_id(&self, case: usize) -> String {
        format!("a1000000-0000-4000-8000-0000000000{case:02}")
    }
    fn purchase(&self, case: usize) -> String {
        self.sub(case).original
    }
    fn kinds(&self) -> Vec<&'static str> {
        vec!["granted"]
    }

    async fn prepare(&self, app: &TestApp, case: usize) {
        // The customer exists before the store names it, as after sign-up.
        app.sign_up(&self.customer(case)).await;
        let sub = self.sub(case);
        let tx = self.tx(case);
        let id = tx["transactionId"].as_str().unwrap().to_string();
        let statuses = json!({
            "environment": sub.env, "bundleId": apple_support::BUNDLE,
            "appAppleId": apple_support::APP_APPLE_ID,
            "data": [{ "subscriptionGroupIdentifier": "21000000", "lastTransactions": [{
                "status": 1, "originalTransactionId": sub.original,
                "signedTransactionInfo": apple_support::sign(&tx),
                "signedRenewalInfo": apple_support::sign(&self.renewal(case)),
            }]}]
        });
        let mut paths = self.api.by_path.lock().unwrap();
        paths.insert(
            format!("/inApps/v1/transactions/{id}"),
            json!({ "signedTransactionInfo": apple_support::sign(&tx) }),
        );
        paths.insert(format!("/inApps/v1/subscriptions/{id}"), statuses);
        // Apple's history of failed sends holds this case's notification.
        paths.insert(
            "/inApps/v1/notifications/history".into(),
            json!({
                "notificationHistory": [{ "signedPayload": self.payload(case), "sendAttempts": [
                    { "attemptDate": 1_700_000_000_000i64, "sendAttemptResult": "TIMED_OUT" }
                ]}],
                "hasMore": false
            }),
        );
    }

    async fn deliver(&self, app: &TestApp, case: usize) -> (StatusCode, Value) {
        let resp = app
            .client
            .post(app.url("/webhooks/apple"))
            .json(&json!({ "signedPayload": self.payload(case) }))
            .send()
            .await
            .unwrap();
        let s = resp.status();
        (s, resp.json().await.unwrap_or(Value::Null))
    }

    fn set_api_down(&self, down: bool) {
        self.api.down.store(down, Ordering::SeqCst);
    }
}

async fn apple_notification_applies_once_by_any_path(b: Backend) {
    let server = MockServer::start().await;
    let api = AppleApi::default();
    Mock::given(any())
        .respond_with(api.clone())
        .mount(&server)
        .await;
    let uri = server.uri();
    let app = spawn_with(b, |c| {
        apple_support::configure(c, AppleEnvironment::Production, Some(&uri));
        c.jobs.enabled = false;
    })
    .await;
    let t0 = app.state.core.now();
    every_order_applies_once(&app, &AppleStore { api, t0 }).await;
}

// ------------------------------------------------------------- Google Play

const VOIDED_PATH: &str =
    "/androidpublisher/v3/applications/com.example.app/purchases/voidedpurchases";

/// Play's voided-purchases list, as the test sets it.
#[derive(Clone, Default)]
struct VoidedList(Arc<Mutex<Vec<Value>>>);

impl Respond for VoidedList {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        ResponseTemplate::new(200)
            .set_body_json(json!({ "voidedPurchases": *self.0.lock().unwrap() }))
    }
}

/// The webhook is the voided-purchase notification; reconciliation finds
/// the same refund in the voided-purchases list. The grant comes first,
/// from the app's own submission.
struct GoogleStore {
    google: google_support::Google,
    voided: VoidedList,
    client: Auth,
    /// Each case's purchase time.
    bought: Mutex<HashMap<usize, DateTime<Utc>>>,
}

impl GoogleStore {
    fn voided_at(&self, case: usize) -> DateTime<Utc> {
        self.bought.lock().unwrap()[&case] + Duration::minutes(5)
    }

    fn order_id(&self, case: usize) -> String {
        format!("GPA.3333-4444-5555-6{case:04}")
    }
}

impl StoreCase for GoogleStore {
    const SOURCE: Source = Source::Google;
    const STORE: &'static str = "play_store";
    const ONE_DEDUPE_KEY: bool = false;

    fn customer(&self, case: usize) -> String {
        format!("play-once-{case}")
    }
    fn event_id(&self, case: usize) -> String {
        format!("m-void-once-{case}")
    }
    fn purchase(&self, case: usize) -> String {
        format!("void-once-{case}")
    }
    fn kinds(&self) -> Vec<&'static str> {
        vec!["refunded"]
    }

    async fn prepare(&self, app: &TestApp, case: usize) {
        let token = self.purchase(case);
        // Bought now; refunded five minutes later, reported after that.
        let bought = app.state.core.now();
        self.bought.lock().unwrap().insert(case, bought);
        self.google
            .fake
            .set(&token, google_support::Sub::active(bought).json());
        google_support::verify(app, &self.client, &self.customer(case), "pro_sub", &token).await;
        assert_eq!(change_kinds(app, &self.customer(case)).await, ["granted"]);
        app.clock.advance(Duration::minutes(10));
        *self.voided.0.lock().unwrap() = vec![json!({
            "kind": "androidpublisher#voidedPurchase",
            "purchaseToken": token,
            "purchaseTimeMillis": bought.timestamp_millis().to_string(),
            "voidedTimeMillis": self.voided_at(case).timestamp_millis().to_string(),
            "orderId": self.order_id(case),
            "voidedSource": 0,
            "voidedReason": 1,
            "refundType": 1
        })];
    }

    async fn deliver(&self, app: &TestApp, case: usize) -> (StatusCode, Value) {
        // Google notifies after the void: the notification's time is later
        // than the void's in the list.
        let at = self.voided_at(case) + Duration::seconds(30);
        let mut note = google_support::voided_note(&self.purchase(case), 1, at);
        note["voidedPurchaseNotification"]["orderId"] = json!(self.order_id(case));
        google_support::push(app, &self.event_id(case), &note).await
    }

    fn set_api_down(&self, down: bool) {
        self.google.fake.with(|s| s.down = down);
    }
}

async fn play_refund_applies_once_by_any_path(b: Backend) {
    let voided = VoidedList::default();
    let (app, google) = google_support::setup_with(b, |c| {
        c.jobs.enabled = false;
    })
    .await;
    Mock::given(wiremock::matchers::method("GET"))
        .and(wiremock::matchers::path(VOIDED_PATH))
        .respond_with(voided.clone())
        .with_priority(1)
        .mount(&google.server)
        .await;
    let client = app.key(ApiKeyRole::Client).await;
    every_order_applies_once(
        &app,
        &GoogleStore {
            google,
            voided,
            client,
            bought: Mutex::default(),
        },
    )
    .await;
}

on_all_backends!(
    stripe_event_applies_once_by_any_path,
    apple_notification_applies_once_by_any_path,
    play_refund_applies_once_by_any_path,
);
