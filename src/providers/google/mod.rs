//! Google Play: purchase tokens read from the Play Developer API with a
//! service account, Pub/Sub push notifications authenticated by Google's
//! OIDC token, and legacy receipts signed with the app's licensing key.
//!
//! Everything this module returns as a [`VerifiedPurchase`] was either read
//! from the Play Developer API or checked against a Google signature.

mod api;
mod auth;
mod legacy;
mod map;
mod oidc;
pub mod rtdn;

use std::time::Duration;

use chrono::{DateTime, Utc};

pub use legacy::LegacyPurchase;

use crate::{
    config::GoogleConfig, domain::PurchaseStatus, error::AppError, providers::VerifiedPurchase,
};

/// Errors of this provider; [`From<GoogleError> for AppError`] is the one
/// place they become API errors.
#[derive(Debug)]
pub enum GoogleError {
    /// Google does not know the token (404, 410) or refuses it as malformed (400).
    UnknownPurchase,
    /// The purchase is not what the caller said it is.
    Mismatch(&'static str),
    /// A receipt's signature did not verify.
    BadSignature(&'static str),
    /// A push's OIDC token did not verify.
    PushRejected(&'static str),
    /// Google could not be reached or failed; retry later.
    Unavailable(String),
    /// Google answered something we cannot read.
    Malformed(String),
    /// A required setting is missing.
    NotConfigured(&'static str),
}

impl From<GoogleError> for AppError {
    fn from(e: GoogleError) -> Self {
        match e {
            GoogleError::UnknownPurchase => {
                AppError::InvalidReceipt("Google Play does not know this purchase token".into())
            }
            GoogleError::Mismatch(m) => AppError::InvalidReceipt(m.into()),
            GoogleError::BadSignature(_) => {
                AppError::InvalidReceipt("the purchase receipt's signature does not verify".into())
            }
            GoogleError::PushRejected(why) => {
                tracing::info!(why, "Google push refused");
                AppError::Unauthenticated
            }
            GoogleError::Unavailable(cause) => {
                tracing::warn!(cause, "Google Play API unavailable");
                AppError::StoreUnavailable("Google Play")
            }
            GoogleError::Malformed(cause) => {
                AppError::Internal(anyhow::anyhow!("unexpected Google Play answer: {cause}"))
            }
            GoogleError::NotConfigured(what) => AppError::NotConfigured(what),
        }
    }
}

/// What the Play API says about a purchase, verified and normalised.
#[derive(Debug)]
pub struct Fetched {
    pub purchase: VerifiedPurchase,
    /// Google still waits for our acknowledgement; without it the purchase
    /// is refunded after three days.
    pub needs_ack: bool,
    pub kind: PlayKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlayKind {
    /// Acknowledged through `purchases.subscriptions.acknowledge`, which
    /// wants the bare product id.
    Subscription {
        product_id: String,
    },
    Product {
        product_id: String,
    },
}

/// The Google Play client: API access, push verification and legacy
/// receipt checks, as configured.
pub struct GooglePlay {
    pub package_name: String,
    api: Option<api::PlayApi>,
    push: Option<oidc::PushVerifier>,
    license_key: Option<rsa::RsaPublicKey>,
}

impl std::fmt::Debug for GooglePlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GooglePlay")
            .field("package_name", &self.package_name)
            .finish_non_exhaustive()
    }
}

impl GooglePlay {
    /// Checks the configuration (service-account key, licensing key) so a
    /// bad setting stops the server at start rather than at the first purchase.
    pub fn new(cfg: &GoogleConfig) -> anyhow::Result<GooglePlay> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let api = match &cfg.service_account {
            Some(sa) => {
                let tokens =
                    auth::TokenSource::from_config(sa.expose(), cfg.token_uri.as_deref(), &http)?;
                Some(api::PlayApi::new(http.clone(), &cfg.api_base, tokens)?)
            }
            None => None,
        };
        let push = match (&cfg.pubsub_audience, &cfg.pubsub_service_account) {
            (Some(aud), Some(email)) => Some(oidc::PushVerifier::new(
                http.clone(),
                cfg.jwks_uri.clone(),
                std::time::Duration::from_millis(cfg.jwks_failure_backoff_ms),
                aud.clone(),
                email.clone(),
            )),
            (None, None) => None,
            _ => anyhow::bail!(
                "invalid configuration: google.pubsub_audience and google.pubsub_service_account go together"
            ),
        };
        let license_key = cfg
            .license_public_key
            .as_deref()
            .map(legacy::parse_public_key)
            .transpose()?;
        Ok(GooglePlay {
            package_name: cfg.package_name.clone(),
            api,
            push,
            license_key,
        })
    }

    fn api(&self) -> Result<&api::PlayApi, GoogleError> {
        self.api.as_ref().ok_or(GoogleError::NotConfigured(
            "Google Play API (google.service_account)",
        ))
    }

    pub fn check_package(&self, package_name: &str) -> Result<(), GoogleError> {
        if package_name == self.package_name {
            Ok(())
        } else {
            Err(GoogleError::Mismatch(
                "the purchase is for another app (package name)",
            ))
        }
    }

    /// Reads a subscription (`purchases.subscriptionsv2.get`). `product_id`,
    /// when given, must be the purchase's product.
    pub async fn fetch_subscription(
        &self,
        token: &str,
        product_id: Option<&str>,
        read_at: DateTime<Utc>,
    ) -> Result<Fetched, GoogleError> {
        let raw = self
            .api()?
            .get_subscription(&self.package_name, token)
            .await?;
        let m = map::subscription(token, raw, read_at)?;
        if let Some(p) = product_id {
            let bare = m.state.product_id.split(':').next().unwrap_or_default();
            let p_bare = p.split(':').next().unwrap_or_default();
            if bare != p_bare {
                return Err(GoogleError::Mismatch(
                    "the purchase token is for another product",
                ));
            }
        }
        Ok(Fetched {
            purchase: VerifiedPurchase::new(m.state),
            needs_ack: m.needs_ack,
            kind: PlayKind::Subscription {
                product_id: m.bare_product_id,
            },
        })
    }

    /// Reads a one-time product purchase (`purchases.products.get`).
    pub async fn fetch_product(
        &self,
        product_id: &str,
        token: &str,
        read_at: DateTime<Utc>,
    ) -> Result<Fetched, GoogleError> {
        let raw = self
            .api()?
            .get_product(&self.package_name, product_id, token)
            .await?;
        let m = map::product(product_id, token, raw, read_at)?;
        Ok(Fetched {
            purchase: VerifiedPurchase::new(m.state),
            needs_ack: m.needs_ack,
            kind: PlayKind::Product {
                product_id: product_id.to_string(),
            },
        })
    }

    pub async fn acknowledge(&self, kind: &PlayKind, token: &str) -> Result<(), GoogleError> {
        let api = self.api()?;
        match kind {
            PlayKind::Subscription { product_id } => {
                api.acknowledge_subscription(&self.package_name, product_id, token)
                    .await
            }
            PlayKind::Product { product_id } => {
                api.acknowledge_product(&self.package_name, product_id, token)
                    .await
            }
        }
    }

    /// Checks a Pub/Sub push's `Authorization: Bearer` OIDC token.
    pub async fn verify_push(&self, authorization: Option<&str>) -> Result<(), GoogleError> {
        let push = self.push.as_ref().ok_or(GoogleError::NotConfigured(
            "Google Pub/Sub push (google.pubsub_audience)",
        ))?;
        let token = authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(GoogleError::PushRejected("missing bearer token"))?;
        push.verify(token).await
    }

    /// Checks a legacy `INAPP_PURCHASE_DATA` / `INAPP_DATA_SIGNATURE` pair
    /// offline. The token it names must still be read from the API.
    pub fn verify_legacy(
        &self,
        signed_data: &str,
        signature: &str,
    ) -> Result<LegacyPurchase, GoogleError> {
        let key = self.license_key.as_ref().ok_or(GoogleError::NotConfigured(
            "Google Play legacy receipts (google.license_public_key)",
        ))?;
        legacy::verify(key, signed_data, signature)
    }
}

/// One entry of the Play voided-purchases list.
#[derive(Clone, Debug)]
pub struct VoidedPurchase {
    pub purchase_token: String,
    pub order_id: Option<String>,
    pub voided_at: DateTime<Utc>,
    /// 0 other, 1 remorse, 2 not received, 3 defective, 4 accidental, 5
    /// fraud, 6 friendly fraud, 7 chargeback.
    pub voided_reason: Option<i64>,
    /// 1 full refund, 2 partial (quantity-based) refund.
    pub refund_type: Option<i32>,
}

pub struct VoidedPage {
    pub purchases: Vec<VoidedPurchase>,
    pub next_page_token: Option<String>,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct VoidedList {
    voided_purchases: Vec<VoidedEntry>,
    token_pagination: Option<TokenPagination>,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct TokenPagination {
    next_page_token: Option<String>,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct VoidedEntry {
    purchase_token: String,
    order_id: Option<String>,
    voided_time_millis: Option<String>,
    voided_reason: Option<i64>,
    refund_type: Option<i32>,
}

impl GooglePlay {
    /// Whether the Play Developer API (a service account) is configured.
    pub fn has_api(&self) -> bool {
        self.api.is_some()
    }

    /// One page of the purchases voided (refunded, charged back, revoked)
    /// since `since`, subscriptions included.
    pub async fn voided_purchases(
        &self,
        since: DateTime<Utc>,
        page_token: Option<&str>,
    ) -> Result<VoidedPage, GoogleError> {
        let raw = self
            .api()?
            .voided_purchases(&self.package_name, since.timestamp_millis(), page_token)
            .await?;
        let list: VoidedList = if raw.is_null() {
            VoidedList::default()
        } else {
            serde_json::from_value(raw)
                .map_err(|e| GoogleError::Malformed(format!("voided purchases: {e}")))?
        };
        let purchases = list
            .voided_purchases
            .into_iter()
            .map(|v| {
                let voided_at = v
                    .voided_time_millis
                    .as_deref()
                    .and_then(map::millis)
                    .ok_or_else(|| GoogleError::Malformed("voidedTimeMillis".into()))?;
                if v.purchase_token.is_empty() {
                    return Err(GoogleError::Malformed("purchaseToken".into()));
                }
                Ok(VoidedPurchase {
                    purchase_token: v.purchase_token,
                    order_id: v.order_id,
                    voided_at,
                    voided_reason: v.voided_reason,
                    refund_type: v.refund_type,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VoidedPage {
            purchases,
            next_page_token: list
                .token_pagination
                .and_then(|t| t.next_page_token)
                .filter(|t| !t.is_empty()),
        })
    }
}

/// A voided-purchase notification (authenticated by the push token) turns
/// the state read from the API into a refund effective at `voided_at`.
pub fn voided(f: Fetched, voided_at: DateTime<Utc>) -> Fetched {
    let mut s = f.purchase.0;
    s.status = PurchaseStatus::Refunded;
    s.revoked_at = Some(voided_at);
    s.auto_renew = false;
    s.source_updated_at = s.source_updated_at.max(voided_at);
    Fetched {
        purchase: VerifiedPurchase::new(s),
        needs_ack: false,
        kind: f.kind,
    }
}

/// A subscription the developer revoked (notification 12): access ends at
/// the notification's time.
pub fn revoked(f: Fetched, revoked_at: DateTime<Utc>) -> Fetched {
    let mut s = f.purchase.0;
    s.status = PurchaseStatus::Revoked;
    s.revoked_at = Some(revoked_at);
    s.auto_renew = false;
    Fetched {
        purchase: VerifiedPurchase::new(s),
        needs_ack: false,
        kind: f.kind,
    }
}

/// Keeps a refund or revocation we already hold: `state` is a later read
/// of the same token, whose other fields still apply.
pub fn keep_final(
    state: VerifiedPurchase,
    status: PurchaseStatus,
    revoked_at: Option<DateTime<Utc>>,
) -> VerifiedPurchase {
    let mut s = state.0;
    s.revoked_at = revoked_at.or(Some(s.source_updated_at));
    s.status = status;
    s.auto_renew = false;
    VerifiedPurchase::new(s)
}

/// The status and revocation time of a held purchase state.
pub fn held_final(state: &serde_json::Value) -> Option<(String, Option<DateTime<Utc>>)> {
    let held = crate::providers::from_held(state.clone()).ok()?;
    Some((held.status.as_str().to_string(), held.revoked_at))
}

/// Stamps the state with the notification's own time, so a late message
/// never overwrites what a newer one already applied.
pub fn stamped(f: Fetched, at: DateTime<Utc>) -> Fetched {
    let mut s = f.purchase.0;
    s.source_updated_at = at;
    Fetched {
        purchase: VerifiedPurchase::new(s),
        needs_ack: f.needs_ack,
        kind: f.kind,
    }
}

/// A Play payload's order id (`GPA.…`) without its renewal suffix: a
/// one-time product's `orderId`, a subscription's latest order.
pub fn order_id(raw: &serde_json::Value) -> Option<String> {
    let s = |v: &serde_json::Value| v.as_str().filter(|x| !x.is_empty()).map(str::to_string);
    s(&raw["orderId"])
        .or_else(|| s(&raw["latestOrderId"]))
        .or_else(|| s(&raw["lineItems"][0]["latestSuccessfulOrderId"]))
        .map(|o| base_order_id(&o).to_string())
}

/// `GPA.1234-5678-9012-34567..3` (the fourth renewal) is order `GPA.1234-5678-9012-34567`.
pub fn base_order_id(order: &str) -> &str {
    order.split("..").next().unwrap_or(order)
}

/// A Play developer notification whose Pub/Sub push was verified (or read
/// back from the webhook log), for this app's package, with its event time.
// A private field, not `#[non_exhaustive]`: that would still let the rest
// of this crate (`service/` included) build one by hand.
#[allow(clippy::manual_non_exhaustive)]
pub struct VerifiedPush {
    /// Pub/Sub's message id: the notification's dedupe key.
    pub message_id: String,
    pub notification: rtdn::DeveloperNotification,
    /// The decoded notification, as recorded in the webhook log.
    pub payload: serde_json::Value,
    pub event_time: DateTime<Utc>,
    /// Only this provider makes one, after verifying it.
    _verified: (),
}

impl GooglePlay {
    fn verified_push(
        &self,
        message_id: String,
        notification: rtdn::DeveloperNotification,
        payload: serde_json::Value,
    ) -> crate::error::AppResult<VerifiedPush> {
        use crate::error::AppError;
        if notification.package_name != self.package_name {
            return Err(AppError::bad_input("notification for another package"));
        }
        let event_time = notification
            .event_time()
            .ok_or_else(|| AppError::bad_input("eventTimeMillis is missing or malformed"))?;
        Ok(VerifiedPush {
            message_id,
            notification,
            payload,
            event_time,
            _verified: (),
        })
    }
}

impl super::Connector for GooglePlay {
    const STORE: crate::domain::Store = crate::domain::Store::PlayStore;
    const AUTH_HEADER: Option<&'static str> = Some("authorization");
    type Notification = VerifiedPush;
    type Reread = Fetched;

    async fn verify(
        &self,
        delivery: super::Delivery<'_>,
        _now: DateTime<Utc>,
    ) -> crate::error::AppResult<VerifiedPush> {
        self.verify_push(delivery.auth).await?;
        let (envelope, n, json) = rtdn::decode(delivery.body)
            .map_err(|e| crate::error::AppError::bad_input(e.message()))?;
        self.verified_push(envelope.message.message_id, n, json)
    }

    fn read_stored(
        &self,
        row: &entities::webhook_events::Model,
    ) -> crate::error::AppResult<VerifiedPush> {
        use crate::error::AppError;
        if row.source != crate::domain::Store::PlayStore.as_str() {
            return Err(AppError::bad_input("stored Play notification is malformed"));
        }
        if row.payload.get("voidedPurchase").is_some() {
            return Err(AppError::bad_input(
                "a voided-purchases entry is replayed by reconciliation, not here",
            ));
        }
        let n = rtdn::from_stored(&row.payload)
            .map_err(|_| AppError::bad_input("stored Play notification is malformed"))?;
        self.verified_push(row.event_id.clone(), n, row.payload.clone())
    }

    async fn reread_purchase(
        &self,
        purchase: super::PurchaseRef<'_>,
        now: DateTime<Utc>,
    ) -> crate::error::AppResult<Option<Fetched>> {
        // Only subscriptions come due: a one-time product has no period
        // that ends.
        Ok(Some(
            self.fetch_subscription(purchase.store_purchase_id, None, now)
                .await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    /// The service-account JSON passes through the environment intact, and
    /// never shows in `Debug`.
    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn service_account_from_env_is_kept_and_redacted() {
        let sa = serde_json::json!({
            "type": "service_account",
            "client_email": "sa@example-project.iam.gserviceaccount.com",
            "private_key": "-----BEGIN PRIVATE KEY-----\nMIIsecret\n-----END PRIVATE KEY-----\n"
        })
        .to_string();
        figment::Jail::expect_with(|jail| {
            // The test harness's own ENTITLE_TEST_* variables are not the server's.
            jail.clear_env();
            jail.set_env("ENTITLE_GOOGLE__PACKAGE_NAME", "com.example.app");
            jail.set_env("ENTITLE_GOOGLE__SERVICE_ACCOUNT", &sa);
            let cfg = Config::load(None).map_err(|e| e.to_string())?;
            let g = cfg.google.as_ref().unwrap();
            assert_eq!(g.service_account.as_ref().unwrap().expose(), sa);
            assert_eq!(g.api_base, "https://androidpublisher.googleapis.com/");
            assert!(!format!("{cfg:?}").contains("MIIsecret"));
            Ok(())
        });
    }
}
