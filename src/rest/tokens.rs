//! `GET /.well-known/jwks.json` and the signature of live answers
//! (`X-Entitle-Nonce` in, `X-Entitle-Signature` out).

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use crate::{error::AppError, service::tokens::check_nonce, state::AppState};

pub const NONCE_HEADER: &str = "x-entitle-nonce";
pub const SIGNATURE_HEADER: &str = "x-entitle-signature";

/// Public keys need no credential. Caches may keep them a few minutes: a
/// rotated-in key is published one refresh period before it signs, and
/// verifiers fetch again when they meet an unknown `kid`.
pub async fn jwks(State(state): State<AppState>) -> Response {
    match state.core.tokens().jwks().await {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/jwk-set+json"),
                (header::CACHE_CONTROL, "public, max-age=300"),
            ],
            body.to_string(),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// With `X-Entitle-Nonce`, the answer carries a detached JWS over the
/// nonce, the request path (with its query) and the body. A bad nonce is
/// refused before the handler runs, so it changes nothing.
pub async fn sign_answers(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(raw) = req.headers().get(NONCE_HEADER) else {
        return next.run(req).await;
    };
    let nonce = match raw
        .to_str()
        .map_err(|_| check_nonce("").unwrap_err())
        .and_then(|n| {
            check_nonce(n)?;
            Ok(n.to_string())
        }) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    let (mut parts, body) = resp.into_parts();
    // Our own answers, already bounded by the request's cost limits.
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            return AppError::Internal(anyhow::anyhow!("reading the answer: {e}")).into_response();
        }
    };
    match state.core.tokens().sign_answer(&nonce, &path, &bytes).await {
        Ok(sig) => match HeaderValue::from_str(&sig) {
            Ok(v) => {
                parts.headers.insert(SIGNATURE_HEADER, v);
            }
            Err(_) => {
                return AppError::Internal(anyhow::anyhow!("signature is not a header value"))
                    .into_response();
            }
        },
        Err(e) => return e.into_response(),
    }
    Response::from_parts(parts, Body::from(bytes))
}
