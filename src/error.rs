//! One error type for the whole API. It maps once to HTTP and once to
//! GraphQL; internal causes are logged, never shown.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

// Deliberately not `Display`: async-graphql converts any `Display` type
// into an error without a code, and every error we return must carry one.
#[derive(Debug)]
pub enum AppError {
    Unauthenticated,
    Forbidden(&'static str),
    NotFound(&'static str),
    BadInput(String),
    PayloadTooLarge,
    UnsupportedMediaType(&'static str),
    MethodNotAllowed(&'static str),
    InvalidReceipt(String),
    ReceiptAlreadyInUse,
    /// The device is bound to another customer; only an admin moves it.
    DeviceAlreadyBound,
    StoreUnavailable(&'static str),
    NotConfigured(&'static str),
    /// The cause is logged; clients see only "internal error".
    Internal(anyhow::Error),
}

impl AppError {
    /// The client-facing message: never a secret, never an internal cause.
    pub fn message(&self) -> String {
        match self {
            AppError::Unauthenticated => "authentication required".into(),
            AppError::Forbidden(m)
            | AppError::UnsupportedMediaType(m)
            | AppError::MethodNotAllowed(m) => (*m).into(),
            AppError::NotFound(what) => format!("{what} not found"),
            AppError::BadInput(m) | AppError::InvalidReceipt(m) => m.clone(),
            AppError::PayloadTooLarge => "request body too large".into(),
            AppError::ReceiptAlreadyInUse => "this purchase belongs to another customer".into(),
            AppError::DeviceAlreadyBound => "this device belongs to another customer".into(),
            AppError::StoreUnavailable(s) => format!("{s} is unavailable, try again later"),
            AppError::NotConfigured(s) => format!("{s} is not configured"),
            AppError::Internal(_) => "internal error".into(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AppError::Unauthenticated => "UNAUTHENTICATED",
            AppError::Forbidden(_) => "FORBIDDEN",
            AppError::NotFound(_) => "NOT_FOUND",
            AppError::BadInput(_) => "BAD_USER_INPUT",
            AppError::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            AppError::UnsupportedMediaType(_) => "UNSUPPORTED_MEDIA_TYPE",
            AppError::MethodNotAllowed(_) => "METHOD_NOT_ALLOWED",
            AppError::InvalidReceipt(_) => "INVALID_RECEIPT",
            AppError::ReceiptAlreadyInUse => "RECEIPT_ALREADY_IN_USE",
            AppError::DeviceAlreadyBound => "DEVICE_ALREADY_BOUND",
            AppError::StoreUnavailable(_) => "STORE_UNAVAILABLE",
            AppError::NotConfigured(_) => "NOT_CONFIGURED",
            AppError::Internal(_) => "INTERNAL",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::Unauthenticated => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::BadInput(_) | AppError::InvalidReceipt(_) => StatusCode::BAD_REQUEST,
            AppError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            AppError::ReceiptAlreadyInUse | AppError::DeviceAlreadyBound => StatusCode::CONFLICT,
            AppError::StoreUnavailable(_) | AppError::NotConfigured(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// One line for the operator's log: the code and message, or for an
    /// internal error its cause chain (database and store errors, which never
    /// carry our secrets).
    pub fn for_log(&self) -> String {
        match self {
            AppError::Internal(e) => format!("{e:#}"),
            other => format!("{}: {}", other.code(), other.message()),
        }
    }

    fn log(&self) {
        if let AppError::Internal(e) = self {
            tracing::error!(error = format!("{e:#}"), "internal error");
        }
    }

    pub fn bad_input(msg: impl Into<String>) -> Self {
        AppError::BadInput(msg.into())
    }
}

impl From<sea_orm::DbErr> for AppError {
    fn from(e: sea_orm::DbErr) -> Self {
        AppError::Internal(e.into())
    }
}

impl From<sea_orm::TransactionError<AppError>> for AppError {
    fn from(e: sea_orm::TransactionError<AppError>) -> Self {
        match e {
            sea_orm::TransactionError::Connection(e) => e.into(),
            sea_orm::TransactionError::Transaction(e) => e,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        self.log();
        let body = json!({ "error": { "code": self.code(), "message": self.message() } });
        (self.status(), Json(body)).into_response()
    }
}

impl From<AppError> for async_graphql::Error {
    fn from(e: AppError) -> Self {
        e.log();
        let code = e.code();
        let retryable = matches!(e, AppError::StoreUnavailable(_));
        let mut err = async_graphql::Error::new(e.message());
        let mut ext = async_graphql::ErrorExtensionValues::default();
        ext.set("code", code);
        if retryable {
            ext.set("retryable", true);
        }
        err.extensions = Some(ext);
        err
    }
}

pub type AppResult<T> = Result<T, AppError>;

impl From<AppError> for anyhow::Error {
    fn from(e: AppError) -> Self {
        match e {
            AppError::Internal(inner) => inner,
            other => anyhow::anyhow!("{}", other.message()),
        }
    }
}
