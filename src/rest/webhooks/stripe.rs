//! `POST /webhooks/stripe`: authenticated by `Stripe-Signature` alone.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
};
use serde_json::{Value, json};

use crate::{app::AppState, error::AppResult, rest::LimitedBody, service::stripe::WebhookOutcome};

pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> AppResult<(StatusCode, Json<Value>)> {
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let outcome = state.core.handle_stripe_webhook(signature, &body).await?;
    let body = match outcome {
        WebhookOutcome::Processed(o) => json!({ "received": true, "outcome": o }),
        WebhookOutcome::Duplicate => json!({ "received": true, "outcome": "duplicate" }),
    };
    Ok((StatusCode::OK, Json(body)))
}
