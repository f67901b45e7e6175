//! Plain REST routes. Handlers translate HTTP and call `service/`.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{header, request::Parts},
};

use crate::{auth::Principal, error::AppError, state::AppState};

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

/// A handler state that knows the configured body limit, so `LimitedBody`
/// serves handlers of any state (GraphQL's as well as the shared one).
pub trait BodyLimit {
    fn body_limit(&self) -> usize;
}

impl BodyLimit for AppState {
    fn body_limit(&self) -> usize {
        self.config.http.body_limit_bytes
    }
}

impl<S: BodyLimit + Send + Sync> FromRequest<S> for LimitedBody {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        let limit = state.body_limit();
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
