//! GraphQL over HTTP. Resolvers translate and call `service/`. The HTTP
//! handlers enforce what async-graphql's extractor does not: JSON only,
//! no batches, no mutations over GET.

use std::sync::Arc;

use async_graphql::{
    EmptySubscription, Schema, http::GraphiQLSource, parser::types::OperationType,
};
use axum::{
    Json,
    extract::{RawQuery, State},
    http::HeaderMap,
    response::{Html, IntoResponse, Response},
};

use crate::{
    app::AppState,
    config::Config,
    error::AppError,
    rest::{LimitedBody, is_json},
    service::Core,
};

mod mutation;
mod query;
mod stripe;
mod types;
mod verify;

pub use mutation::MutationRoot;
pub use query::QueryRoot;

pub type EntitleSchema = Schema<QueryRoot, MutationRoot, EmptySubscription>;

pub fn build_schema(config: &Config, core: Arc<Core>) -> EntitleSchema {
    let mut b = Schema::build(QueryRoot, MutationRoot, EmptySubscription)
        .data(core)
        .limit_depth(config.graphql.max_depth)
        .limit_complexity(config.graphql.max_complexity)
        .limit_recursive_depth(32);
    if !config.graphql.introspection {
        b = b.disable_introspection().disable_suggestions();
    }
    b.finish()
}

/// The SDL that `entitle export-schema` writes and `schema.graphql` holds.
pub fn sdl() -> String {
    Schema::build(QueryRoot, MutationRoot, EmptySubscription)
        .finish()
        .sdl()
}

async fn execute(
    state: &AppState,
    headers: &HeaderMap,
    request: async_graphql::Request,
) -> Response {
    let principal = match state.auth.principal(&state.core, headers).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let mut resp = state.schema.execute(request.data(principal)).await;
    // Parse and validation errors (depth, complexity, unknown fields) carry
    // no code of their own; every error a client sees has one.
    for err in &mut resp.errors {
        let ext = err.extensions.get_or_insert_with(Default::default);
        if ext.get("code").is_none() {
            ext.set("code", "BAD_USER_INPUT");
        }
    }
    Json(resp).into_response()
}

pub async fn post(
    State(state): State<AppState>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Response {
    if !is_json(&headers) {
        return AppError::UnsupportedMediaType("GraphQL requests must be sent as application/json")
            .into_response();
    }
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => return AppError::bad_input("request body is not valid JSON").into_response(),
    };
    if value.is_array() {
        return AppError::bad_input("batched requests are not supported").into_response();
    }
    let request: async_graphql::Request = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            return AppError::bad_input(format!("not a GraphQL request: {e}")).into_response();
        }
    };
    execute(&state, &headers, request).await
}

/// GraphiQL without a query string; read-only queries with one.
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let Some(raw) = raw.filter(|q| !q.is_empty()) else {
        if !state.config.graphql.graphiql {
            return AppError::NotFound("route").into_response();
        }
        return Html(
            GraphiQLSource::build()
                .endpoint("/graphql")
                .title("Entitle GraphQL")
                .finish(),
        )
        .into_response();
    };
    let request = match async_graphql::http::parse_query_string(&raw) {
        Ok(r) => r,
        Err(_) => return AppError::bad_input("malformed GraphQL query string").into_response(),
    };
    // A syntax error is left for execution to report in GraphQL's own shape.
    if let Ok(doc) = async_graphql::parser::parse_query(&request.query)
        && doc
            .operations
            .iter()
            .any(|(_, op)| op.node.ty != OperationType::Query)
    {
        return AppError::MethodNotAllowed("mutations and subscriptions must be sent with POST")
            .into_response();
    }
    execute(&state, &headers, request).await
}
