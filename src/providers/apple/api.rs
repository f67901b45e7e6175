//! App Store Server API client: Get Transaction Info and Get All
//! Subscription Statuses, authenticated with an ES256 bearer token.

use std::{sync::Arc, time::Duration};

use app_store_server_library::models::{
    notification_history_request::NotificationHistoryRequest,
    notification_history_response::NotificationHistoryResponse, status_response::StatusResponse,
    transaction_info_response::TransactionInfoResponse,
};
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    clock::Clock,
    config::{AppleConfig, AppleEnvironment},
    error::{AppError, AppResult},
};

const PRODUCTION_BASE: &str = "https://api.storekit.itunes.apple.com";
const SANDBOX_BASE: &str = "https://api.storekit-sandbox.itunes.apple.com";
/// Attempts per call; 5xx answers and connection failures are retried.
const ATTEMPTS: u32 = 3;
const STORE: &str = "App Store";

pub struct ApiClient {
    http: reqwest::Client,
    production_base: String,
    sandbox_base: String,
    issuer_id: String,
    key_id: String,
    bundle_id: String,
    key: EncodingKey,
    clock: Arc<dyn Clock>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: i64,
    exp: i64,
    aud: &'static str,
    bid: &'a str,
}

impl ApiClient {
    pub fn new(cfg: &AppleConfig, clock: Arc<dyn Clock>) -> anyhow::Result<ApiClient> {
        let (Some(issuer_id), Some(key_id), Some(private_key)) =
            (&cfg.issuer_id, &cfg.key_id, &cfg.private_key)
        else {
            anyhow::bail!("invalid configuration: apple API credentials are incomplete");
        };
        let key = EncodingKey::from_ec_pem(private_key.expose().as_bytes()).map_err(|_| {
            anyhow::anyhow!("invalid configuration: apple.private_key is not a PKCS#8 EC PEM key")
        })?;
        // An explicit base (a local fake, a proxy) serves both environments.
        let base = |default: &str| {
            cfg.api_base
                .as_deref()
                .unwrap_or(default)
                .trim_end_matches('/')
                .to_string()
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(ApiClient {
            http,
            production_base: base(PRODUCTION_BASE),
            sandbox_base: base(SANDBOX_BASE),
            issuer_id: issuer_id.clone(),
            key_id: key_id.clone(),
            bundle_id: cfg.bundle_id.clone(),
            key,
            clock,
        })
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// A bearer token valid for five minutes.
    pub fn token(&self) -> AppResult<String> {
        let iat = self.clock.now().timestamp();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        header.typ = Some("JWT".into());
        let claims = Claims {
            iss: &self.issuer_id,
            iat,
            exp: iat + 300,
            aud: "appstoreconnect-v1",
            bid: &self.bundle_id,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| AppError::Internal(anyhow::anyhow!("signing App Store API token: {e}")))
    }

    /// GET Transaction Info: the signed transaction for any transaction id.
    pub async fn transaction_info(
        &self,
        env: AppleEnvironment,
        transaction_id: &str,
    ) -> AppResult<String> {
        let path = format!("/inApps/v1/transactions/{}", path_segment(transaction_id)?);
        let r: TransactionInfoResponse = self.get(env, &path).await?;
        r.signed_transaction_info.ok_or_else(|| {
            AppError::Internal(anyhow::anyhow!(
                "App Store answered without signedTransactionInfo"
            ))
        })
    }

    /// GET All Subscription Statuses of the subscription `transaction_id` belongs to.
    pub async fn subscription_statuses(
        &self,
        env: AppleEnvironment,
        transaction_id: &str,
    ) -> AppResult<StatusResponse> {
        let path = format!("/inApps/v1/subscriptions/{}", path_segment(transaction_id)?);
        self.get(env, &path).await
    }

    /// POST Get Notification History: one page of the notifications Apple
    /// sent (or failed to send) between `start` and `end`.
    pub async fn notification_history(
        &self,
        env: AppleEnvironment,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        only_failures: bool,
        pagination_token: Option<&str>,
    ) -> AppResult<NotificationHistoryResponse> {
        let mut path = "/inApps/v1/notifications/history".to_string();
        if let Some(t) = pagination_token {
            let q: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("paginationToken", t)
                .finish();
            path = format!("{path}?{q}");
        }
        let body = NotificationHistoryRequest {
            start_date: start,
            end_date: end,
            notification_type: None,
            notification_subtype: None,
            transaction_id: None,
            only_failures: only_failures.then_some(true),
        };
        self.send(env, &path, Some(&body)).await
    }

    async fn get<T: DeserializeOwned>(&self, env: AppleEnvironment, path: &str) -> AppResult<T> {
        self.send::<T, ()>(env, path, None).await
    }

    /// GET, or POST with a JSON body.
    async fn send<T: DeserializeOwned, B: Serialize>(
        &self,
        env: AppleEnvironment,
        path: &str,
        body: Option<&B>,
    ) -> AppResult<T> {
        let base = match env {
            AppleEnvironment::Production => &self.production_base,
            AppleEnvironment::Sandbox => &self.sandbox_base,
        };
        let url = format!("{base}{path}");
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=ATTEMPTS {
            let rb = match body {
                Some(b) => self.http.post(&url).json(b),
                None => self.http.get(&url),
            };
            let resp = rb.bearer_auth(self.token()?).send().await;
            let retry = match resp {
                Ok(r) if r.status().is_success() => {
                    return r.json::<T>().await.map_err(|e| {
                        AppError::Internal(anyhow::anyhow!(
                            "App Store API answer not understood: {e}"
                        ))
                    });
                }
                Ok(r) => {
                    let status = r.status();
                    match status.as_u16() {
                        400 | 404 => {
                            return Err(AppError::InvalidReceipt(
                                "the App Store does not know this transaction".into(),
                            ));
                        }
                        401 | 403 => {
                            return Err(AppError::Internal(anyhow::anyhow!(
                                "App Store API refused our credentials ({status})"
                            )));
                        }
                        429 => return Err(AppError::StoreUnavailable(STORE)),
                        s if s >= 500 => {
                            tracing::warn!(status = s, attempt, "App Store API error");
                            true
                        }
                        _ => {
                            return Err(AppError::Internal(anyhow::anyhow!(
                                "App Store API answered {status}"
                            )));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "App Store API unreachable");
                    true
                }
            };
            if retry && attempt < ATTEMPTS {
                tokio::time::sleep(delay).await;
                delay *= 3;
            }
        }
        Err(AppError::StoreUnavailable(STORE))
    }
}

/// Transaction ids are digits; anything else never reaches a URL.
fn path_segment(id: &str) -> AppResult<&str> {
    if !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(id)
    } else {
        Err(AppError::bad_input("transactionId must be alphanumeric"))
    }
}
