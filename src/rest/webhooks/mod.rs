//! Store webhooks (`POST /webhooks/stripe`, `/webhooks/apple`,
//! `/webhooks/google`): one handler for every store. The store's connector
//! authenticates the delivery by the store's own proof (signature,
//! certificate chain, OIDC token); only then does the service see it, and it
//! records the event id in the same transaction as its effect. The answer is
//! 2xx only once that transaction has committed (or the event was a
//! duplicate); 400 for a forged, stale or foreign delivery; 5xx for a
//! transient fault, so the store delivers again.

use axum::{Json, extract::State, http::HeaderMap};
use serde_json::{Value, json};

use crate::{
    error::AppResult, providers::Delivery, rest::LimitedBody, service::stores::Ingest,
    state::AppState,
};

pub async fn receive<C: Ingest>(
    State(state): State<AppState>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> AppResult<Json<Value>> {
    let stores = state.core.stores();
    let connector = C::connector(stores)?;
    let auth = C::AUTH_HEADER
        .and_then(|h| headers.get(h))
        .and_then(|v| v.to_str().ok());
    let n = connector
        .verify(Delivery { body: &body, auth }, state.core.now())
        .await?;
    let outcome = stores.receive::<C>(&n).await?;
    state.metrics.webhook(C::STORE, outcome);
    Ok(Json(
        json!({ "received": true, "outcome": outcome.as_str() }),
    ))
}
