//! `POST /webhooks/google`: Pub/Sub push of Google Play real-time developer
//! notifications, authenticated by the push's OIDC token.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, header},
};
use serde_json::{Value, json};

use crate::{error::AppError, rest::LimitedBody, state::AppState};

pub async fn google(
    State(state): State<AppState>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Value>, AppError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let outcome = state.core.handle_play_push(authorization, &body).await?;
    state
        .metrics
        .webhook(crate::domain::Store::PlayStore, outcome.as_str());
    Ok(Json(json!({ "outcome": outcome.as_str() })))
}
