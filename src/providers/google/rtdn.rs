//! Real-time developer notifications as Pub/Sub pushes them: an envelope
//! whose `message.data` is a base64 `DeveloperNotification`.

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE},
};
use chrono::{DateTime, Utc};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct PushEnvelope {
    pub message: PushMessage,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushMessage {
    pub data: String,
    #[serde(alias = "message_id")]
    pub message_id: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeveloperNotification {
    pub package_name: String,
    /// Milliseconds since the epoch, as a JSON string (a number is accepted too).
    pub event_time_millis: serde_json::Value,
    #[serde(default)]
    pub subscription_notification: Option<SubscriptionNotification>,
    #[serde(default)]
    pub one_time_product_notification: Option<OneTimeProductNotification>,
    #[serde(default)]
    pub voided_purchase_notification: Option<VoidedPurchaseNotification>,
    #[serde(default)]
    pub test_notification: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionNotification {
    pub notification_type: i32,
    pub purchase_token: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OneTimeProductNotification {
    pub notification_type: i32,
    pub purchase_token: String,
    pub sku: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VoidedPurchaseNotification {
    pub purchase_token: String,
    /// 1 subscription, 2 one-time product.
    #[serde(default)]
    pub product_type: Option<i32>,
    /// 1 full refund, 2 partial (quantity-based) refund.
    #[serde(default)]
    pub refund_type: Option<i32>,
}

/// `SUBSCRIPTION_REVOKED`: the developer or Google ended it before expiry.
pub const SUBSCRIPTION_REVOKED: i32 = 12;

/// Why a push cannot be read.
#[derive(Debug)]
pub enum DecodeError {
    Envelope,
    NotBase64,
    NotJson,
}

impl DecodeError {
    pub fn message(&self) -> &'static str {
        match self {
            DecodeError::Envelope => "not a Pub/Sub push envelope",
            DecodeError::NotBase64 => "message.data is not base64",
            DecodeError::NotJson => "message.data is not a developer notification",
        }
    }
}

/// The envelope, its decoded notification, and the notification as JSON
/// (kept with the dedupe row).
pub fn decode(
    body: &[u8],
) -> Result<(PushEnvelope, DeveloperNotification, serde_json::Value), DecodeError> {
    let env: PushEnvelope = serde_json::from_slice(body).map_err(|_| DecodeError::Envelope)?;
    if env.message.message_id.is_empty() {
        return Err(DecodeError::Envelope);
    }
    let data = env.message.data.trim();
    let bytes = STANDARD
        .decode(data)
        .or_else(|_| URL_SAFE.decode(data))
        .map_err(|_| DecodeError::NotBase64)?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| DecodeError::NotJson)?;
    let n = DeveloperNotification::deserialize(&json).map_err(|_| DecodeError::NotJson)?;
    Ok((env, n, json))
}

/// A developer notification from the webhook log, where it was recorded
/// decoded after its push was verified.
pub fn from_stored(json: &serde_json::Value) -> Result<DeveloperNotification, DecodeError> {
    DeveloperNotification::deserialize(json).map_err(|_| DecodeError::NotJson)
}

impl DeveloperNotification {
    pub fn event_time(&self) -> Option<DateTime<Utc>> {
        match &self.event_time_millis {
            serde_json::Value::String(s) => super::map::millis(s),
            serde_json::Value::Number(n) => {
                n.as_i64().and_then(DateTime::<Utc>::from_timestamp_millis)
            }
            _ => None,
        }
    }
}
