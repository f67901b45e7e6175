//! `GET /api/subscriptions/check/{id}`: "is this user subscribed?" for
//! other back-end services.

use axum::{
    Json,
    extract::{Path, State},
};
use serde::Serialize;

use super::Caller;
use crate::{
    domain::{EntitlementState, ExternalId},
    error::{AppError, AppResult},
    state::AppState,
};

#[derive(Serialize)]
pub struct CheckResponse {
    customer_id: String,
    /// True while any entitlement is active (a trial included);
    /// `paid_status` tells paid access from a trial.
    is_subscribed: bool,
    paid_status: &'static str,
    entitlements: Vec<EntitlementJson>,
    /// The same state, signed for offline verification.
    entitlement_token: String,
}

#[derive(Serialize)]
struct EntitlementJson {
    key: String,
    is_active: bool,
    expires_at: Option<String>,
    will_renew: bool,
    store: Option<&'static str>,
    product_id: Option<String>,
    status: Option<&'static str>,
}

impl From<&EntitlementState> for EntitlementJson {
    fn from(e: &EntitlementState) -> Self {
        EntitlementJson {
            key: e.key.clone(),
            is_active: e.is_active,
            expires_at: e
                .expires_at
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            will_renew: e.will_renew,
            store: e.store.map(|s| s.as_str()),
            product_id: e.product_id.clone(),
            status: e.status.map(|s| s.as_str()),
        }
    }
}

pub async fn check(
    State(state): State<AppState>,
    Caller(principal): Caller,
    Path(customer_id): Path<String>,
) -> AppResult<Json<CheckResponse>> {
    crate::policy::authorize_check(
        &principal,
        &customer_id,
        state.config.http.check_requires_key,
    )?;
    let id = ExternalId::parse(&customer_id)
        .map_err(|e| AppError::bad_input(format!("invalid customer id: {e}")))?;
    // An id merged into an account answers for the account, under its id.
    let (customer, snap) = state
        .core
        .reads()
        .read_customer(id.as_str())
        .await?
        .ok_or(AppError::NotFound("customer"))?;
    let entitlement_token = state
        .core
        .tokens()
        .entitlement_token(id.as_str(), None, &snap)
        .await?;
    Ok(Json(CheckResponse {
        customer_id: customer.id,
        is_subscribed: snap.entitlements.iter().any(|e| e.is_active),
        paid_status: snap.paid_status.as_str(),
        entitlements: snap
            .entitlements
            .iter()
            .map(EntitlementJson::from)
            .collect(),
        entitlement_token,
    }))
}
