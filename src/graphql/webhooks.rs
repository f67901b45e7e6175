//! The webhook log, its replay, and the overview, over GraphQL: thin
//! translations of `service::webhooks`.

use async_graphql::{Context, ID, Object, SimpleObject};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use entities::webhook_events;
use serde_json::Value;

use super::{query::principal, types::Store};
use crate::{
    db::webhook_log::{DayCounts, NowCounts, WebhookFilter},
    domain::{self, webhook_log},
    error::AppError,
    policy::{Action, authorize},
    service::webhooks::{Overview as OverviewData, Replayed},
};

/// A store notification as recorded: verified, with what became of it.
pub struct WebhookEvent(pub webhook_events::Model);

/// The notification's type as the store names it.
fn event_type(source: &str, payload: &Value) -> Option<String> {
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    match source {
        "stripe" => s(payload.get("type")),
        "app_store" => {
            let n = payload.get("notification")?;
            let kind = s(n.get("notificationType"))?;
            Some(match s(n.get("subtype")) {
                Some(sub) => format!("{kind}/{sub}"),
                None => kind,
            })
        }
        "play_store" => {
            let obj = payload.as_object()?;
            let which = [
                ("subscriptionNotification", "subscription"),
                ("oneTimeProductNotification", "one_time_product"),
                ("voidedPurchaseNotification", "voided_purchase"),
                ("voidedPurchase", "voided_purchase"),
                ("testNotification", "test"),
            ]
            .into_iter()
            .find(|(k, _)| obj.contains_key(*k))?;
            let code = obj
                .get(which.0)
                .and_then(|n| n.get("notificationType"))
                .and_then(Value::as_i64);
            Some(match code {
                Some(c) => format!("{}:{c}", which.1),
                None => which.1.to_string(),
            })
        }
        _ => None,
    }
}

#[Object]
impl WebhookEvent {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn store(&self) -> async_graphql::Result<Store> {
        let s: domain::Store = self
            .0
            .source
            .parse()
            .map_err(|e| AppError::Internal(anyhow::Error::new(e)))?;
        Ok(s.into())
    }
    /// The store's own id of the notification (Stripe event id, App Store
    /// notificationUUID, Pub/Sub message id).
    async fn event_id(&self) -> &str {
        &self.0.event_id
    }
    /// The notification's type as the store names it (`checkout.session.completed`,
    /// `DID_RENEW/AUTO_RENEW_ENABLED`, `subscription:4`).
    #[graphql(name = "type")]
    async fn kind(&self) -> Option<String> {
        event_type(&self.0.source, &self.0.payload)
    }
    /// What became of it: `applied`, `unmatched`, `unknown_product`,
    /// `no_customer`, `failed`, `held`, `ignored`, ...
    async fn outcome(&self) -> &str {
        &self.0.outcome
    }
    /// The customer it touched or named.
    async fn customer_id(&self) -> Option<ID> {
        self.0.customer_id.clone().map(ID)
    }
    /// Why processing failed (`failed`): the store could not be asked.
    async fn error(&self) -> Option<&str> {
        self.0.error.as_deref()
    }
    async fn received_at(&self) -> DateTime<Utc> {
        self.0.received_at
    }
    async fn replayed_at(&self) -> Option<DateTime<Utc>> {
        self.0.replayed_at
    }
    /// Whether `replayWebhookEvent` may change it: it matched nothing (or
    /// failed) and its payload is still kept.
    async fn replayable(&self) -> bool {
        webhook_log::is_replayable(&self.0.outcome) && webhook_log::payload_kept(&self.0.payload)
    }
    /// The verified notification as recorded (admin only); `{"cleared":
    /// true}` once retention has removed it.
    async fn payload(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<async_graphql::Json<Value>> {
        authorize(
            principal(ctx),
            Action::ReadWebhookPayload,
            self.0.customer_id.as_deref(),
        )?;
        Ok(async_graphql::Json(self.0.payload.clone()))
    }
}

/// What `replayWebhookEvent` did.
#[derive(SimpleObject)]
pub struct WebhookReplay {
    /// The outcome before the replay.
    pub previous_outcome: String,
    /// The outcome now.
    pub outcome: String,
    /// False when the event was not replayable (it had already applied) or
    /// a concurrent replay took it: nothing changed.
    pub ran: bool,
    pub event: WebhookEvent,
}

pub fn encode_cursor(id: i64) -> String {
    URL_SAFE_NO_PAD.encode(id.to_string())
}

pub fn decode_cursor(c: &str) -> Result<i64, AppError> {
    URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| AppError::bad_input("invalid cursor"))
}

/// The filter of `webhookEvents`, from its arguments.
pub fn filter(
    store: Option<Store>,
    outcome: Option<Vec<String>>,
    customer_id: Option<ID>,
    since: Option<DateTime<Utc>>,
    replayable: Option<bool>,
    after: Option<&str>,
) -> Result<WebhookFilter, AppError> {
    let mut outcomes = outcome.unwrap_or_default();
    if outcomes.len() > 20 {
        return Err(AppError::bad_input("at most 20 outcomes"));
    }
    match replayable {
        Some(true) if outcomes.is_empty() => {
            outcomes = webhook_log::replayable_names()
                .map(str::to_string)
                .collect();
        }
        Some(true) => outcomes.retain(|o| webhook_log::is_replayable(o)),
        Some(false) if outcomes.is_empty() => {
            return Err(AppError::bad_input(
                "replayable: false needs the outcomes to list",
            ));
        }
        Some(false) => outcomes.retain(|o| !webhook_log::is_replayable(o)),
        None => {}
    }
    if replayable.is_some() && outcomes.is_empty() {
        // Nothing can match; an impossible outcome keeps the query honest.
        outcomes.push("\u{0}".into());
    }
    Ok(WebhookFilter {
        source: store.map(|s| domain::Store::from(s).as_str().to_string()),
        outcomes,
        customer_id: customer_id.map(|c| c.0),
        since,
        before_id: after.map(decode_cursor).transpose()?,
    })
}

pub fn replay_payload(r: Replayed, row: webhook_events::Model) -> WebhookReplay {
    WebhookReplay {
        previous_outcome: r.previous,
        outcome: r.outcome,
        ran: r.ran,
        event: WebhookEvent(row),
    }
}

/// Customers with access now, per store.
#[derive(SimpleObject)]
pub struct StoreCount {
    pub store: Store,
    pub customers: i64,
}

/// What is true now.
#[derive(SimpleObject)]
pub struct OverviewNow {
    /// Distinct customers with access to something, whatever the source.
    pub customers_with_access: i64,
    pub by_store: Vec<StoreCount>,
    /// Customers whose only access is a trial (ours or a store's).
    pub in_trial: i64,
    /// Customers in a store's grace period (access kept while it retries).
    pub in_grace_period: i64,
    /// Customers whose store is retrying a failed payment (no access).
    pub in_billing_retry: i64,
}

/// One UTC day of the change log.
#[derive(SimpleObject)]
pub struct OverviewDay {
    /// `YYYY-MM-DD`.
    pub day: String,
    pub new_trials: i64,
    /// Paid purchases granted to customers who had a trial.
    pub trial_conversions: i64,
    pub renewals: i64,
    pub cancellations: i64,
    pub refunds: i64,
}

/// Now, and the change log per day.
#[derive(SimpleObject)]
pub struct Overview {
    pub now: OverviewNow,
    /// Oldest first, one entry per day, today last.
    pub days: Vec<OverviewDay>,
}

impl From<OverviewData> for Overview {
    fn from(o: OverviewData) -> Self {
        let NowCounts {
            with_access,
            by_store,
            in_trial,
            in_grace,
            in_billing_retry,
        } = o.now;
        Overview {
            now: OverviewNow {
                customers_with_access: with_access,
                by_store: by_store
                    .into_iter()
                    .filter_map(|(s, n)| {
                        s.parse::<domain::Store>().ok().map(|s| StoreCount {
                            store: s.into(),
                            customers: n,
                        })
                    })
                    .collect(),
                in_trial,
                in_grace_period: in_grace,
                in_billing_retry,
            },
            days: o
                .days
                .into_iter()
                .map(|d: DayCounts| OverviewDay {
                    day: d.day,
                    new_trials: d.new_trials,
                    trial_conversions: d.conversions,
                    renewals: d.renewals,
                    cancellations: d.cancellations,
                    refunds: d.refunds,
                })
                .collect(),
        }
    }
}
