//! `POST /webhooks/stripe`: authenticated by `Stripe-Signature` alone.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
};
use serde_json::{Value, json};

use crate::{
    domain::Store, error::AppResult, rest::LimitedBody, service::stripe::WebhookOutcome,
    state::AppState,
};

pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> AppResult<(StatusCode, Json<Value>)> {
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let outcome = state.core.handle_stripe_webhook(signature, &body).await?;
    let outcome = match outcome {
        WebhookOutcome::Processed(o) => o,
        WebhookOutcome::Duplicate => "duplicate",
    };
    state.metrics.webhook(Store::Stripe, outcome);
    let body = json!({ "received": true, "outcome": outcome });
    Ok((StatusCode::OK, Json(body)))
}
