//! Plain REST routes. Handlers translate HTTP and call `service/`.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{header, request::Parts},
};

use crate::{app::AppState, auth::Principal, error::AppError};

pub mod garmin;
pub mod health;
pub mod playground;
pub mod subscriptions;
pub mod tokens;
pub mod webhooks;

/// The caller, from `Authorization: Bearer` or an `api-key` header.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        state
            .auth
            .principal(&state.core, &parts.headers)
            .await
            .map(Caller)
    }
}

/// The raw request body, refused with 413 past the configured limit whether
/// or not the client declared a length.
pub struct LimitedBody(pub Bytes);

impl FromRequest<AppState> for LimitedBody {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, AppError> {
        let limit = state.config.http.body_limit_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(AppError::PayloadTooLarge);
        }
        axum::body::to_bytes(req.into_body(), limit)
            .await
            .map(LimitedBody)
            .map_err(|_| AppError::PayloadTooLarge)
    }
}

pub fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim();
            m.eq_ignore_ascii_case("application/json")
                || m.eq_ignore_ascii_case("application/graphql-response+json")
        })
}

pub async fn not_found() -> AppError {
    AppError::NotFound("route")
}
