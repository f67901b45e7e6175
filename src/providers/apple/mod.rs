//! Apple App Store: signed data from StoreKit 2 and App Store Server
//! Notifications v2, and the App Store Server API.
//!
//! Signature and chain checks are Apple's own rules as implemented by the
//! `app-store-server-library` crate: ES256 only, an `x5c` chain of exactly
//! three certificates verified up to one of *our* roots (the root inside
//! `x5c` is never trusted), Apple's leaf and intermediate OIDs, validity at
//! the payload's `signedDate`; then bundle id, environment and (production)
//! app Apple ID.

use std::sync::Arc;

use app_store_server_library::{
    models::{
        app_store_environment::Environment as AppleEnv, auto_renew_status::AutoRenewStatus,
        in_app_ownership_type::InAppOwnershipType,
        jws_renewal_info_decoded_payload::JWSRenewalInfoDecodedPayload,
        jws_transaction_decoded_payload::JWSTransactionDecodedPayload,
        offer_discount_type::OfferDiscountType, offer_type::OfferType,
        response_body_v2_decoded_payload::ResponseBodyV2DecodedPayload, status::Status,
    },
    signed_data_verifier::{SignedDataVerifier, SignedDataVerifierError},
};
use chrono::{DateTime, Utc};
use serde_json::json;

use super::{PurchaseState, VerifiedPurchase};
use crate::{
    clock::Clock,
    config::{AppleConfig, AppleEnvironment},
    domain::{Environment, PeriodType, PurchaseStatus, Store},
    error::{AppError, AppResult},
};

pub mod api;

/// Notification types that change a purchase; others are recorded and acknowledged.
pub const HANDLED: &[&str] = &[
    "SUBSCRIBED",
    "DID_RENEW",
    "DID_CHANGE_RENEWAL_STATUS",
    "DID_CHANGE_RENEWAL_PREF",
    "OFFER_REDEEMED",
    "DID_FAIL_TO_RENEW",
    "GRACE_PERIOD_EXPIRED",
    "EXPIRED",
    "REFUND",
    "REFUND_REVERSED",
    "REVOKE",
    "RENEWAL_EXTENDED",
    "ONE_TIME_CHARGE",
];

pub use api::ApiClient;

/// Apple Root CA - G3 (SHA-256 63343abf…3e9179), the root of every App Store
/// signature. Used when `apple.root_certificates` is empty.
const APPLE_ROOT_CA_G3: &[u8] = include_bytes!("AppleRootCA-G3.cer");

/// The App Store provider: verifiers for the configured environment (and
/// Sandbox beside production) and, when configured, the API client.
pub struct Apple {
    environment: AppleEnvironment,
    primary: SignedDataVerifier,
    /// Beside a production verifier when sandbox purchases are accepted.
    sandbox: Option<SignedDataVerifier>,
    api: Option<ApiClient>,
}

/// A verified notification, with its transaction and renewal info verified too.
// A private field, not `#[non_exhaustive]`: that would still let the rest
// of this crate (`service/` included) build one by hand.
#[allow(clippy::manual_non_exhaustive)]
pub struct Notification {
    pub uuid: String,
    pub kind: String,
    pub subtype: Option<String>,
    pub signed_date: DateTime<Utc>,
    pub transaction: Option<JWSTransactionDecodedPayload>,
    pub renewal: Option<JWSRenewalInfoDecodedPayload>,
    pub status: Option<Status>,
    /// The decoded payload, for the webhook record.
    pub raw: serde_json::Value,
    /// Only this provider makes one, after verifying it.
    _verified: (),
}

/// A verified transaction with what we know of its renewal.
pub struct Verified {
    pub transaction: JWSTransactionDecodedPayload,
    pub renewal: Option<JWSRenewalInfoDecodedPayload>,
    pub status: Option<Status>,
    /// The notification that carried it, if any.
    pub notification: Option<(String, Option<String>)>,
    /// The store's timestamp of this state.
    pub signed_date: DateTime<Utc>,
}

impl Verified {
    /// A transaction with no subscription status to go with it (a one-time
    /// purchase, or one the status call does not list).
    fn transaction_only(tx: JWSTransactionDecodedPayload, now: DateTime<Utc>) -> Self {
        let signed_date = tx.signed_date.unwrap_or(now);
        Verified {
            transaction: tx,
            renewal: None,
            status: None,
            notification: None,
            signed_date,
        }
    }
}

/// The one mapping of verification failures to API errors.
fn verify_error(e: SignedDataVerifierError) -> AppError {
    use SignedDataVerifierError as E;
    let msg = match e {
        E::InvalidAppIdentifier => "signed data is for another app",
        E::InvalidEnvironment => "signed data is for another App Store environment",
        E::InvalidAppAppleId => "signed data is for another app",
        E::VerificationFailure | E::InternalChainVerifierError(_) => {
            "signature or certificate chain is not valid"
        }
        E::InternalDecodeError(_) | E::InternalDeserializationError(_) | E::InternalJWSError(_) => {
            "not a valid App Store signed payload"
        }
    };
    AppError::InvalidReceipt(msg.into())
}

fn lib_env(e: AppleEnvironment) -> AppleEnv {
    match e {
        AppleEnvironment::Production => AppleEnv::Production,
        AppleEnvironment::Sandbox => AppleEnv::Sandbox,
    }
}

fn load_root(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| {
        anyhow::anyhow!(
            "apple.root_certificates: cannot read {}: {e}",
            path.display()
        )
    })?;
    if let Ok(text) = std::str::from_utf8(&bytes)
        && text.contains("-----BEGIN CERTIFICATE-----")
    {
        // PEM, possibly after a human-readable dump of the certificate.
        let b64: String = text
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        use base64::Engine;
        return base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| {
                anyhow::anyhow!("apple.root_certificates: {}: bad PEM: {e}", path.display())
            });
    }
    Ok(bytes)
}

impl Apple {
    pub fn new(
        cfg: &AppleConfig,
        accept_sandbox: bool,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Apple> {
        let roots = if cfg.root_certificates.is_empty() {
            vec![APPLE_ROOT_CA_G3.to_vec()]
        } else {
            cfg.root_certificates
                .iter()
                .map(|p| load_root(p))
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        let make = |env: AppleEnvironment| {
            // Offline checks: certificate validity is judged at the payload's
            // signedDate, as Apple's libraries do for stored data.
            SignedDataVerifier::new(
                roots.clone(),
                lib_env(env),
                cfg.bundle_id.clone(),
                cfg.app_apple_id,
                false,
            )
            .map_err(|e| anyhow::anyhow!("invalid configuration: apple: {e}"))
        };
        let primary = make(cfg.environment)?;
        let sandbox = (cfg.environment == AppleEnvironment::Production && accept_sandbox)
            .then(|| make(AppleEnvironment::Sandbox))
            .transpose()?;
        let api = if cfg.api_configured() {
            Some(ApiClient::new(cfg, clock)?)
        } else {
            None
        };
        Ok(Apple {
            environment: cfg.environment,
            primary,
            sandbox,
            api,
        })
    }

    pub fn api(&self) -> Option<&ApiClient> {
        self.api.as_ref()
    }

    /// Runs `f` with the primary verifier, then with the sandbox one when the
    /// primary objects only to the environment or app id (Apple may leave
    /// `appAppleId` out of sandbox data). The primary's objection is the one reported.
    fn with_verifiers<T>(
        &self,
        f: impl Fn(&SignedDataVerifier) -> Result<T, SignedDataVerifierError>,
    ) -> AppResult<T> {
        use SignedDataVerifierError as E;
        match (f(&self.primary), &self.sandbox) {
            (Ok(v), _) => Ok(v),
            (Err(e @ (E::InvalidEnvironment | E::InvalidAppIdentifier)), Some(sandbox)) => {
                f(sandbox).map_err(|_| verify_error(e))
            }
            (Err(e), _) => Err(verify_error(e)),
        }
    }

    pub fn verify_transaction(&self, jws: &str) -> AppResult<JWSTransactionDecodedPayload> {
        self.with_verifiers(|v| v.verify_and_decode_signed_transaction(jws))
    }

    pub fn verify_renewal(&self, jws: &str) -> AppResult<JWSRenewalInfoDecodedPayload> {
        self.with_verifiers(|v| v.verify_and_decode_renewal_info(jws))
    }

    /// Verifies a notification and the transaction and renewal info inside it.
    pub fn verify_notification(&self, signed_payload: &str) -> AppResult<Notification> {
        let n: ResponseBodyV2DecodedPayload =
            self.with_verifiers(|v| v.verify_and_decode_notification(signed_payload))?;
        let uuid = n
            .notification_uuid
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                AppError::InvalidReceipt("notification has no notificationUUID".into())
            })?;
        let signed_date = n
            .signed_date
            .ok_or_else(|| AppError::InvalidReceipt("notification has no signedDate".into()))?;
        let data = n.data.as_ref();
        let transaction = data
            .and_then(|d| d.signed_transaction_info.as_deref())
            .map(|t| self.verify_transaction(t))
            .transpose()?;
        let renewal = data
            .and_then(|d| d.signed_renewal_info.as_deref())
            .map(|r| self.verify_renewal(r))
            .transpose()?;
        Ok(notification_of(n, uuid, signed_date, transaction, renewal))
    }

    /// A notification from the webhook log. Only verified notifications
    /// are recorded there, decoded (their transaction and renewal info
    /// verified too), so the stored row is Apple's word as it arrived.
    fn notification_from_stored(
        &self,
        row: &entities::webhook_events::Model,
    ) -> AppResult<Notification> {
        let bad = || AppError::bad_input("stored App Store notification is malformed");
        if row.source != Store::AppStore.as_str() {
            return Err(bad());
        }
        let raw = &row.payload;
        let n: ResponseBodyV2DecodedPayload =
            serde_json::from_value(raw.get("notification").cloned().ok_or_else(bad)?)
                .map_err(|_| bad())?;
        let opt = |key: &str| raw.get(key).filter(|v| !v.is_null()).cloned();
        let transaction: Option<JWSTransactionDecodedPayload> = opt("transaction")
            .map(serde_json::from_value)
            .transpose()
            .map_err(|_| bad())?;
        let renewal: Option<JWSRenewalInfoDecodedPayload> = opt("renewalInfo")
            .map(serde_json::from_value)
            .transpose()
            .map_err(|_| bad())?;
        let uuid = n
            .notification_uuid
            .clone()
            .filter(|u| *u == row.event_id)
            .ok_or_else(bad)?;
        let signed_date = n.signed_date.ok_or_else(bad)?;
        Ok(notification_of(n, uuid, signed_date, transaction, renewal))
    }
}

fn notification_of(
    n: ResponseBodyV2DecodedPayload,
    uuid: String,
    signed_date: DateTime<Utc>,
    transaction: Option<JWSTransactionDecodedPayload>,
    renewal: Option<JWSRenewalInfoDecodedPayload>,
) -> Notification {
    let data = n.data.as_ref();
    {
        let kind = n
            .notification_type
            .as_ref()
            .map(|t| t.raw_value().to_string())
            .unwrap_or_default();
        let subtype = n
            .subtype
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok())
            .and_then(|v| v.as_str().map(str::to_string));
        Notification {
            raw: json!({
                "notification": serde_json::to_value(&n).unwrap_or_default(),
                "transaction": transaction.as_ref().and_then(|t| serde_json::to_value(t).ok()),
                "renewalInfo": renewal.as_ref().and_then(|r| serde_json::to_value(r).ok()),
            }),
            uuid,
            kind,
            subtype,
            signed_date,
            status: data.and_then(|d| d.status.clone()),
            transaction,
            renewal,
            _verified: (),
        }
    }
}

impl super::Connector for Apple {
    const STORE: Store = Store::AppStore;
    const AUTH_HEADER: Option<&'static str> = None;
    type Notification = Notification;
    type Reread = VerifiedPurchase;

    async fn verify(
        &self,
        delivery: super::Delivery<'_>,
        _now: DateTime<Utc>,
    ) -> AppResult<Notification> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Body {
            signed_payload: String,
        }
        let body: Body = serde_json::from_slice(delivery.body)
            .map_err(|_| AppError::bad_input("expected a JSON body with signedPayload"))?;
        self.verify_notification(body.signed_payload.trim())
    }

    fn read_stored(&self, row: &entities::webhook_events::Model) -> AppResult<Notification> {
        self.notification_from_stored(row)
    }

    async fn reread_purchase(
        &self,
        purchase: super::PurchaseRef<'_>,
        _now: DateTime<Utc>,
    ) -> AppResult<Option<VerifiedPurchase>> {
        let v = self
            .reread(purchase.store_purchase_id, Some(purchase.environment))
            .await?;
        self.purchase(&v).map(Some)
    }
}

impl Apple {
    /// Re-reads the truth for `transaction_id` from the App Store Server API:
    /// the transaction and, for subscriptions, the latest renewal state.
    /// `env` is the transaction's environment when known; otherwise the
    /// configured one is asked first, then Sandbox (when accepted), as Apple
    /// advises for ids of unknown origin.
    pub async fn reread(
        &self,
        transaction_id: &str,
        env: Option<Environment>,
    ) -> AppResult<Verified> {
        let api = self
            .api
            .as_ref()
            .ok_or(AppError::NotConfigured("App Store Server API"))?;
        let candidates = match env {
            Some(Environment::Production) => vec![AppleEnvironment::Production],
            Some(Environment::Sandbox) => vec![AppleEnvironment::Sandbox],
            None if self.sandbox.is_some() => {
                vec![AppleEnvironment::Production, AppleEnvironment::Sandbox]
            }
            None => vec![self.environment],
        };
        let mut found = None;
        for (i, e) in candidates.iter().enumerate() {
            match api.transaction_info(*e, transaction_id).await {
                Ok(signed) => {
                    found = Some((*e, signed));
                    break;
                }
                Err(AppError::InvalidReceipt(_)) if i + 1 < candidates.len() => continue,
                Err(err) => return Err(err),
            }
        }
        let Some((api_env, signed)) = found else {
            return Err(AppError::InvalidReceipt(
                "the App Store does not know this transaction".into(),
            ));
        };
        let tx = self.verify_transaction(&signed)?;
        if tx.expires_date.is_none() {
            return Ok(Verified::transaction_only(tx, api.now()));
        }
        let statuses = api.subscription_statuses(api_env, transaction_id).await?;
        let original = tx.original_transaction_id.clone();
        let item = statuses
            .data
            .iter()
            .flatten()
            .flat_map(|g| g.last_transactions.iter().flatten())
            .find(|i| i.original_transaction_id.is_some() && i.original_transaction_id == original);
        let Some(item) = item else {
            return Ok(Verified::transaction_only(tx, api.now()));
        };
        let latest = match item.signed_transaction_info.as_deref() {
            Some(s) => self.verify_transaction(s)?,
            None => tx,
        };
        let renewal = item
            .signed_renewal_info
            .as_deref()
            .map(|r| self.verify_renewal(r))
            .transpose()?;
        let signed_date = [
            latest.signed_date,
            renewal.as_ref().and_then(|r| r.signed_date),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or_else(|| api.now());
        Ok(Verified {
            transaction: latest,
            renewal,
            status: item.status.clone(),
            notification: None,
            signed_date,
        })
    }

    /// One page of the notifications Apple failed to deliver between
    /// `start` and `end`, in the configured environment: their signed
    /// payloads (to be verified like any webhook) and the token of the next
    /// page, if any.
    pub async fn undelivered_notifications(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        pagination_token: Option<&str>,
    ) -> AppResult<(Vec<String>, Option<String>)> {
        let api = self
            .api
            .as_ref()
            .ok_or(AppError::NotConfigured("App Store Server API"))?;
        let page = api
            .notification_history(self.environment, start, end, true, pagination_token)
            .await?;
        let payloads = page
            .notification_history
            .into_iter()
            .flatten()
            .filter_map(|i| i.signed_payload)
            .collect();
        let next = match (page.has_more, page.pagination_token) {
            (Some(true), Some(t)) if !t.is_empty() => Some(t),
            _ => None,
        };
        Ok((payloads, next))
    }

    /// Turns verified data into purchase state; its `appAccountToken`, if
    /// any, is the binding.
    pub fn purchase(&self, v: &Verified) -> AppResult<VerifiedPurchase> {
        to_state(v).map(VerifiedPurchase::new)
    }
}

/// The transaction id in a legacy app receipt (PKCS#7), found as Apple's
/// `ReceiptUtility` finds it. Nothing in the receipt is trusted: the id is
/// only used to ask the App Store Server API.
pub fn transaction_id_from_receipt(app_receipt: &str) -> AppResult<String> {
    use app_store_server_library::receipt_utility::extract_transaction_id_from_app_receipt;
    match extract_transaction_id_from_app_receipt(app_receipt.trim()) {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(AppError::InvalidReceipt(
            "the receipt holds no in-app purchase".into(),
        )),
        Err(_) => Err(AppError::InvalidReceipt("not a valid app receipt".into())),
    }
}

pub use crate::domain::tokens::{ACCOUNT_TOKEN_NAMESPACE, account_token};

/// The environment a verified transaction belongs to.
pub fn environment(tx: &JWSTransactionDecodedPayload) -> Environment {
    match tx.environment {
        Some(AppleEnv::Production) => Environment::Production,
        _ => Environment::Sandbox,
    }
}

fn period_type(tx: &JWSTransactionDecodedPayload) -> PeriodType {
    if tx.offer_discount_type == Some(OfferDiscountType::FreeTrial) {
        PeriodType::Trial
    } else if tx.offer_type == Some(OfferType::IntroductoryOffer) {
        PeriodType::Intro
    } else {
        PeriodType::Normal
    }
}

/// DESIGN §4 status of a transaction and its renewal info as of `at` (the
/// store's timestamp of that state), so the answer does not depend on when
/// we happen to process it.
pub fn status_at(
    tx: &JWSTransactionDecodedPayload,
    renewal: Option<&JWSRenewalInfoDecodedPayload>,
    hint: Option<&Status>,
    at: DateTime<Utc>,
) -> PurchaseStatus {
    if tx.revocation_date.is_some() || hint == Some(&Status::Revoked) {
        // A family member losing access is a revoke; the purchaser's refund is a refund.
        return if tx.in_app_ownership_type == Some(InAppOwnershipType::FamilyShared) {
            PurchaseStatus::Revoked
        } else {
            PurchaseStatus::Refunded
        };
    }
    let Some(expires) = tx.expires_date else {
        return PurchaseStatus::Active;
    };
    let auto_renew = renewal.is_none_or(|r| r.auto_renew_status != Some(AutoRenewStatus::Off));
    let in_retry = renewal.is_some_and(|r| r.is_in_billing_retry_period == Some(true))
        || matches!(
            hint,
            Some(Status::BillingRetry | Status::BillingGracePeriod)
        );
    let grace = renewal.and_then(|r| r.grace_period_expires_date);
    if expires > at && hint != Some(&Status::Expired) {
        if !auto_renew {
            PurchaseStatus::Canceled
        } else if period_type(tx) == PeriodType::Trial {
            PurchaseStatus::Trialing
        } else {
            PurchaseStatus::Active
        }
    } else if in_retry && grace.is_some_and(|g| g > at) {
        PurchaseStatus::InGracePeriod
    } else if in_retry {
        PurchaseStatus::InBillingRetry
    } else {
        PurchaseStatus::Expired
    }
}

fn to_state(v: &Verified) -> AppResult<PurchaseState> {
    let tx = &v.transaction;
    let invalid = |what: &str| AppError::InvalidReceipt(format!("transaction has no {what}"));
    let original = tx
        .original_transaction_id
        .clone()
        .or_else(|| tx.transaction_id.clone())
        .ok_or_else(|| invalid("originalTransactionId"))?;
    let product_id = tx.product_id.clone().ok_or_else(|| invalid("productId"))?;
    let purchased_at = tx
        .original_purchase_date
        .or(tx.purchase_date)
        .ok_or_else(|| invalid("purchaseDate"))?;
    let renewal = v.renewal.as_ref().filter(|r| {
        r.original_transaction_id.is_none()
            || r.original_transaction_id == tx.original_transaction_id
    });
    let status = status_at(tx, renewal, v.status.as_ref(), v.signed_date);
    let auto_renew = tx.expires_date.is_some()
        && !matches!(
            status,
            PurchaseStatus::Expired | PurchaseStatus::Refunded | PurchaseStatus::Revoked
        )
        && renewal.is_none_or(|r| r.auto_renew_status != Some(AutoRenewStatus::Off));
    let canceled_at = (tx.expires_date.is_some()
        && renewal.is_some_and(|r| r.auto_renew_status == Some(AutoRenewStatus::Off)))
    .then(|| renewal.and_then(|r| r.signed_date).unwrap_or(v.signed_date));
    let grace_expires_at = renewal
        .filter(|r| r.is_in_billing_retry_period == Some(true))
        .and_then(|r| r.grace_period_expires_date);
    // The service resolves the token to a customer through its index.
    let bound_customer = tx.app_account_token.map(|t| t.hyphenated().to_string());
    let (kind, subtype) = v.notification.clone().unzip();
    Ok(PurchaseState {
        store: Store::AppStore,
        store_purchase_id: original,
        product_id,
        environment: environment(tx),
        status,
        period_type: period_type(tx),
        purchased_at,
        expires_at: tx.expires_date,
        grace_expires_at,
        auto_renew,
        canceled_at,
        revoked_at: tx.revocation_date,
        renewal_count: None,
        transaction_id: tx.transaction_id.clone(),
        source_updated_at: v.signed_date,
        bound_customer,
        replaces: None,
        raw: json!({
            "transaction": serde_json::to_value(tx).unwrap_or_default(),
            "renewalInfo": renewal.and_then(|r| serde_json::to_value(r).ok()),
            "notificationType": kind,
            "subtype": subtype.flatten(),
        }),
    })
}

impl Notification {
    /// Whether this notification type changes a purchase (others are recorded
    /// and acknowledged).
    pub fn is_handled(&self) -> bool {
        HANDLED.contains(&self.kind.as_str())
    }

    /// The verified transaction state this notification carries.
    pub fn verified(&self) -> Option<Verified> {
        let transaction = self.transaction.clone()?;
        Some(Verified {
            transaction,
            renewal: self.renewal.clone(),
            status: self.status.clone(),
            notification: Some((self.kind.clone(), self.subtype.clone())),
            signed_date: self.signed_date,
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn tx(extra: serde_json::Value) -> JWSTransactionDecodedPayload {
        let mut v = json!({
            "transactionId": "2", "originalTransactionId": "1", "productId": "p",
            "purchaseDate": 1_700_000_000_000i64, "originalPurchaseDate": 1_700_000_000_000i64,
            "expiresDate": 1_702_592_000_000i64, "environment": "Production",
            "inAppOwnershipType": "PURCHASED", "signedDate": 1_700_000_000_000i64,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    fn renewal(v: serde_json::Value) -> JWSRenewalInfoDecodedPayload {
        serde_json::from_value(v).unwrap()
    }

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    const SIGNED: i64 = 1_700_000_000_000;
    const EXPIRES: i64 = 1_702_592_000_000;

    #[test]
    fn statuses_follow_design_table() {
        let t = tx(json!({}));
        assert_eq!(
            status_at(&t, None, None, at(SIGNED)),
            PurchaseStatus::Active
        );
        let off = renewal(json!({ "autoRenewStatus": 0 }));
        assert_eq!(
            status_at(&t, Some(&off), None, at(SIGNED)),
            PurchaseStatus::Canceled
        );
        assert_eq!(
            status_at(&t, Some(&off), None, at(EXPIRES)),
            PurchaseStatus::Expired
        );
        let grace = renewal(json!({
            "autoRenewStatus": 1, "isInBillingRetryPeriod": true,
            "gracePeriodExpiresDate": EXPIRES + 86_400_000,
        }));
        assert_eq!(
            status_at(&t, Some(&grace), None, at(EXPIRES)),
            PurchaseStatus::InGracePeriod
        );
        assert_eq!(
            status_at(&t, Some(&grace), None, at(EXPIRES + 86_400_000)),
            PurchaseStatus::InBillingRetry
        );
        let refunded = tx(json!({ "revocationDate": SIGNED + 1000, "revocationReason": 0 }));
        assert_eq!(
            status_at(&refunded, None, None, at(SIGNED)),
            PurchaseStatus::Refunded
        );
        let family = tx(json!({ "revocationDate": SIGNED, "inAppOwnershipType": "FAMILY_SHARED" }));
        assert_eq!(
            status_at(&family, None, None, at(SIGNED)),
            PurchaseStatus::Revoked
        );
        let lifetime = tx(json!({ "expiresDate": null, "type": "Non-Consumable" }));
        assert_eq!(
            status_at(&lifetime, None, None, at(SIGNED)),
            PurchaseStatus::Active
        );
        assert_eq!(
            status_at(&t, None, Some(&Status::Expired), at(SIGNED)),
            PurchaseStatus::Expired
        );
    }

    #[test]
    fn offers_give_period_types() {
        let trial = tx(json!({ "offerType": 1, "offerDiscountType": "FREE_TRIAL" }));
        assert_eq!(period_type(&trial), PeriodType::Trial);
        assert_eq!(
            status_at(&trial, None, None, at(SIGNED)),
            PurchaseStatus::Trialing
        );
        let intro = tx(json!({ "offerType": 1, "offerDiscountType": "PAY_AS_YOU_GO" }));
        assert_eq!(period_type(&intro), PeriodType::Intro);
        let promo = tx(json!({ "offerType": 2, "offerDiscountType": "PAY_UP_FRONT" }));
        assert_eq!(period_type(&promo), PeriodType::Normal);
    }

    #[test]
    fn state_maps_every_field() {
        let token = "7e3fb20b-4cdb-47cc-936d-99d65f608138";
        let v = Verified {
            transaction: tx(json!({ "appAccountToken": token })),
            renewal: Some(renewal(
                json!({ "autoRenewStatus": 0, "signedDate": SIGNED + 5 }),
            )),
            status: None,
            notification: Some((
                "DID_CHANGE_RENEWAL_STATUS".into(),
                Some("AUTO_RENEW_DISABLED".into()),
            )),
            signed_date: at(SIGNED + 5),
        };
        let s = to_state(&v).unwrap();
        assert_eq!(s.store_purchase_id, "1");
        assert_eq!(s.product_id, "p");
        assert_eq!(s.environment, Environment::Production);
        assert_eq!(s.status, PurchaseStatus::Canceled);
        assert!(!s.auto_renew);
        assert_eq!(s.canceled_at, Some(at(SIGNED + 5)));
        assert_eq!(s.expires_at, Some(at(EXPIRES)));
        assert_eq!(s.source_updated_at, at(SIGNED + 5));
        assert_eq!(s.bound_customer.as_deref(), Some(token));
        assert_eq!(s.transaction_id.as_deref(), Some("2"));
        assert_eq!(s.raw["notificationType"], "DID_CHANGE_RENEWAL_STATUS");
        assert!(s.purchased_at < at(SIGNED) + Duration::seconds(1));
    }
}
