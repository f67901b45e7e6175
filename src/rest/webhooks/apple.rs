//! `POST /webhooks/apple`: App Store Server Notifications v2.

use axum::{Json, extract::State};
use serde_json::{Value, json};

use crate::{error::AppError, rest::LimitedBody, state::AppState};

/// 200 once the notification and its effect are committed (or it was a
/// duplicate); 400 for a bad signature, chain, bundle or environment; 5xx
/// for a transient fault, so Apple retries.
pub async fn notify(
    State(state): State<AppState>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Value>, AppError> {
    let apple = state
        .core
        .apple
        .as_deref()
        .ok_or(AppError::NotConfigured("App Store"))?;
    let outcome = state.core.apple_notification(apple, &body).await?;
    state
        .metrics
        .webhook(crate::domain::Store::AppStore, outcome.as_str());
    Ok(Json(
        json!({ "received": true, "outcome": outcome.as_str() }),
    ))
}
