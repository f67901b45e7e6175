//! The operator dashboard and GraphQL explorer: a static bundle compiled into
//! the binary so a deployment is one file. The page holds no secret and talks
//! only to the public GraphQL API with the key the operator types in.

use axum::{
    extract::Path,
    http::header,
    response::{IntoResponse, Response},
};

use crate::error::AppError;

const INDEX: &str = include_str!("../../playground/index.html");
const APP_JS: &str = include_str!("../../playground/app.js");
const EXPLORER_JS: &str = include_str!("../../playground/explorer.js");
const APP_CSS: &str = include_str!("../../playground/app.css");

// Everything the page needs comes from this server; inline script stays off
// so an injected string in customer data cannot run.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CONTENT_SECURITY_POLICY, CSP),
        ],
        body,
    )
        .into_response()
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn file(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => asset("text/javascript; charset=utf-8", APP_JS),
        "explorer.js" => asset("text/javascript; charset=utf-8", EXPLORER_JS),
        "app.css" => asset("text/css; charset=utf-8", APP_CSS),
        _ => AppError::NotFound("route").into_response(),
    }
}
