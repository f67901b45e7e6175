//! GraphQL over HTTP. Resolvers translate and call `service/`. The HTTP
//! handlers enforce what async-graphql's extractor does not: JSON only,
//! no batches, no mutations over GET.
//!
//! Answers follow the GraphQL-over-HTTP specification: a client that
//! accepts `application/graphql-response+json` gets that media type, and a
//! request that fails before execution (parse, validation, variable
//! coercion) answers 400 without a `data` entry; every other client gets
//! `application/json` as before, with 200 for such failures.

use std::{net::SocketAddr, sync::Arc};

use async_graphql::{
    Schema,
    http::GraphiQLSource,
    parser::types::{ExecutableDocument, OperationType},
};
use axum::{
    Extension, Json,
    extract::{ConnectInfo, RawQuery, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{Html, IntoResponse, Response},
};

use crate::{
    config::Config,
    error::AppError,
    rest::{BodyLimit, LimitedBody, is_json},
    service::Core,
    state::AppState,
};

mod mutation;
mod query;
mod stripe;
mod subscription;
mod types;
mod verify;
mod webhooks;
mod ws;

pub use mutation::MutationRoot;
pub use query::QueryRoot;
pub use subscription::SubscriptionRoot;

pub type EntitleSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

pub fn build_schema(config: &Config, core: Arc<Core>) -> EntitleSchema {
    let mut b = Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .data(core)
        .limit_depth(config.graphql.max_depth)
        .limit_complexity(config.graphql.max_complexity)
        .limit_recursive_depth(32);
    if !config.graphql.introspection {
        b = b.disable_introspection().disable_suggestions();
    }
    b.finish()
}

/// The GraphQL handlers' state: the shared state, the schema and its parse
/// cache. The router builds it, so the shared state need not know GraphQL.
#[derive(Clone)]
pub struct GraphqlState {
    pub app: AppState,
    pub schema: EntitleSchema,
    pub parse_cache: Arc<ParseCache>,
}

impl GraphqlState {
    pub fn new(app: AppState) -> GraphqlState {
        let schema = build_schema(&app.config, app.core.clone());
        GraphqlState {
            app,
            schema,
            parse_cache: Arc::new(ParseCache::new()),
        }
    }
}

impl BodyLimit for GraphqlState {
    fn body_limit(&self) -> usize {
        self.app.body_limit()
    }
}

/// The SDL that `entitle export-schema` writes and `schema.graphql` holds.
pub fn sdl() -> String {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .finish()
        .sdl()
}

/// Parsed documents by query text. Clients send the same few operations
/// over and over; cloning a parsed document is far cheaper than parsing it
/// again. Validation (which depends on variables) still runs every time.
/// The least recently used text is evicted when full, so texts sent once
/// (by anyone) do not keep the regular ones out.
pub struct ParseCache {
    docs: std::sync::Mutex<lru::LruCache<String, ExecutableDocument>>,
}

impl ParseCache {
    /// Entries kept.
    const CAPACITY: usize = 256;
    /// Longer query texts are not kept.
    const MAX_QUERY_LEN: usize = 4096;

    pub fn new() -> ParseCache {
        ParseCache {
            docs: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(Self::CAPACITY).expect("non-zero capacity"),
            )),
        }
    }

    /// The parsed document, or `None` when the text does not parse (the
    /// schema then reports the syntax error in GraphQL's own shape).
    fn get(&self, query: &str) -> Option<ExecutableDocument> {
        if let Some(doc) = self.docs.lock().expect("parse cache").get(query) {
            return Some(doc.clone());
        }
        let doc = async_graphql::parser::parse_query(query).ok()?;
        if query.len() <= Self::MAX_QUERY_LEN {
            self.docs
                .lock()
                .expect("parse cache")
                .put(query.to_string(), doc.clone());
        }
        Some(doc)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.docs.lock().unwrap().len()
    }

    #[cfg(test)]
    fn contains(&self, query: &str) -> bool {
        self.docs.lock().unwrap().contains(query)
    }
}

impl Default for ParseCache {
    fn default() -> Self {
        ParseCache::new()
    }
}

/// The media type of a GraphQL answer, chosen from the request's `Accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaType {
    /// `application/json`: for clients that do not ask for the newer type,
    /// `*/*` and no `Accept` at all.
    Json,
    /// `application/graphql-response+json`, when the client accepts it at
    /// least as much as `application/json`.
    GraphqlResponse,
}

impl MediaType {
    pub const GRAPHQL_RESPONSE: &str = "application/graphql-response+json";

    pub fn negotiate(headers: &HeaderMap) -> MediaType {
        let mut graphql = 0.0_f32;
        let mut json = 0.0_f32;
        for accept in headers.get_all(axum::http::header::ACCEPT) {
            let Ok(accept) = accept.to_str() else {
                continue;
            };
            for range in accept.split(',') {
                let mut parts = range.split(';');
                let media = parts.next().unwrap_or("").trim();
                let q = parts
                    .filter_map(|p| p.trim().strip_prefix("q="))
                    .find_map(|q| q.trim().parse::<f32>().ok())
                    .unwrap_or(1.0);
                if media.eq_ignore_ascii_case(Self::GRAPHQL_RESPONSE) {
                    graphql = graphql.max(q);
                } else if media.eq_ignore_ascii_case("application/json") {
                    json = json.max(q);
                }
            }
        }
        if graphql > 0.0 && graphql >= json {
            MediaType::GraphqlResponse
        } else {
            MediaType::Json
        }
    }

    fn content_type(self) -> HeaderValue {
        match self {
            MediaType::Json => HeaderValue::from_static("application/json"),
            MediaType::GraphqlResponse => {
                HeaderValue::from_static("application/graphql-response+json; charset=utf-8")
            }
        }
    }

    /// A refusal made before execution. `application/json` clients keep
    /// the answers they always had; the newer media type answers in
    /// GraphQL's response shape, with the error's own status.
    fn refuse(self, e: AppError) -> Response {
        match self {
            MediaType::Json => e.into_response(),
            MediaType::GraphqlResponse => graphql_error(self, e),
        }
    }
}

/// Whether the answer is a request error: the document did not parse or
/// validate, or the variables did not coerce. Execution never started, so
/// there is no `data` and no error names a path.
fn is_request_error(resp: &async_graphql::Response) -> bool {
    resp.data == async_graphql::Value::Null
        && !resp.errors.is_empty()
        && resp.errors.iter().all(|e| e.path.is_empty())
}

async fn execute(
    state: &GraphqlState,
    headers: &HeaderMap,
    peer: Option<&ConnectInfo<SocketAddr>>,
    media: MediaType,
    mut request: async_graphql::Request,
) -> Response {
    let principal = match state.app.auth.principal(&state.app.core, headers).await {
        Ok(p) => p,
        Err(e) => return media.refuse(e),
    };
    if let Some(doc) = state.parse_cache.get(&request.query) {
        if let Some(limiter) = &state.app.limiter
            && is_mutation(&doc, request.operation_name.as_deref())
            && let Err(e) = limiter.check(&principal, limiter.client_ip(headers, peer))
        {
            return graphql_error(media, e);
        }
        request.set_parsed_query(doc);
    }
    let mut resp = state.schema.execute(request.data(principal)).await;
    // Parse and validation errors (depth, complexity, unknown fields) carry
    // no code of their own; every error a client sees has one.
    for err in &mut resp.errors {
        let ext = err.extensions.get_or_insert_with(Default::default);
        if ext.get("code").is_none() {
            ext.set("code", "BAD_USER_INPUT");
        }
    }
    let mut out = CappedWriter {
        buf: Vec::with_capacity(128),
        cap: state.app.config.graphql.max_response_bytes,
    };
    let (status, written) = if media == MediaType::GraphqlResponse && is_request_error(&resp) {
        (
            StatusCode::BAD_REQUEST,
            serde_json::to_writer(&mut out, &ErrorsOnly::of(&resp)),
        )
    } else {
        (StatusCode::OK, serde_json::to_writer(&mut out, &resp))
    };
    match written {
        Ok(()) => (
            status,
            [(axum::http::header::CONTENT_TYPE, media.content_type())],
            out.buf,
        )
            .into_response(),
        // The cap is the only way writing into memory fails.
        Err(_) => {
            drop(out);
            graphql_error(media, AppError::ResponseTooLarge)
        }
    }
}

/// A response with no `data` entry at all, as the specification asks of a
/// request error answered as `application/graphql-response+json`.
#[derive(serde::Serialize)]
struct ErrorsOnly<'a> {
    errors: &'a [async_graphql::ServerError],
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    extensions: &'a std::collections::BTreeMap<String, async_graphql::Value>,
}

impl<'a> ErrorsOnly<'a> {
    fn of(resp: &'a async_graphql::Response) -> Self {
        ErrorsOnly {
            errors: &resp.errors,
            extensions: &resp.extensions,
        }
    }
}

/// An error in GraphQL's response shape, for refusals made before execution:
/// `200` with `data: null` for `application/json` clients (as always), the
/// error's own status and no `data` for the newer media type.
fn graphql_error(media: MediaType, e: AppError) -> Response {
    let status = e.status();
    let retry_after = match &e {
        AppError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
        _ => None,
    };
    let err: async_graphql::Error = e.into();
    let resp =
        async_graphql::Response::from_errors(vec![err.into_server_error(Default::default())]);
    let mut answer = match media {
        MediaType::Json => Json(resp).into_response(),
        MediaType::GraphqlResponse => (
            status,
            [(axum::http::header::CONTENT_TYPE, media.content_type())],
            serde_json::to_vec(&ErrorsOnly::of(&resp)).unwrap_or_default(),
        )
            .into_response(),
    };
    if let Some(secs) = retry_after.filter(|_| media == MediaType::GraphqlResponse) {
        answer
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    answer
}

/// Whether the operation to run is a mutation (the one named, or any when
/// none is named: execution refuses an ambiguous document anyway).
fn is_mutation(doc: &ExecutableDocument, name: Option<&str>) -> bool {
    doc.operations.iter().any(|(n, op)| {
        op.node.ty == OperationType::Mutation && (name.is_none() || n.map(|n| n.as_str()) == name)
    })
}

/// Serialises into memory up to `cap` bytes, then fails, so an oversized
/// answer costs at most the cap.
struct CappedWriter {
    buf: Vec<u8>,
    cap: usize,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.cap {
            return Err(std::io::Error::other("response size cap"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub async fn post(
    State(state): State<GraphqlState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Response {
    let media = MediaType::negotiate(&headers);
    if !is_json(&headers) {
        return media.refuse(AppError::UnsupportedMediaType(
            "GraphQL requests must be sent as application/json",
        ));
    }
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => return media.refuse(AppError::bad_input("request body is not valid JSON")),
    };
    if value.is_array() {
        return media.refuse(AppError::bad_input("batched requests are not supported"));
    }
    let request: async_graphql::Request = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            return media.refuse(AppError::bad_input(format!("not a GraphQL request: {e}")));
        }
    };
    execute(
        &state,
        &headers,
        peer.as_ref().map(|p| &p.0),
        media,
        request,
    )
    .await
}

/// GraphiQL without a query string; read-only queries with one.
pub async fn get(
    State(state): State<GraphqlState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let Some(raw) = raw.filter(|q| !q.is_empty()) else {
        if !state.app.config.graphql.graphiql {
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
    let media = MediaType::negotiate(&headers);
    let request = match async_graphql::http::parse_query_string(&raw) {
        Ok(r) => r,
        Err(_) => return media.refuse(AppError::bad_input("malformed GraphQL query string")),
    };
    // A syntax error is left for execution to report in GraphQL's own shape.
    if let Ok(doc) = async_graphql::parser::parse_query(&request.query)
        && doc
            .operations
            .iter()
            .any(|(_, op)| op.node.ty != OperationType::Query)
    {
        return media.refuse(AppError::MethodNotAllowed(
            "mutations and subscriptions must be sent with POST",
        ));
    }
    execute(
        &state,
        &headers,
        peer.as_ref().map(|p| &p.0),
        media,
        request,
    )
    .await
}

/// graphql-ws (and the older subscriptions-transport-ws) at `/graphql/ws`.
/// The `connection_init` payload authenticates like HTTP headers do:
/// `{"Authorization": "Bearer …"}` or `{"api-key": "…"}`; a missing or bad
/// credential closes the connection.
pub use ws::ws;

/// Credentials from a `connection_init` payload, as the headers they stand for.
fn init_headers(payload: &serde_json::Value) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(obj) = payload.as_object() {
        // Some clients nest them under `headers`.
        let nested = obj.get("headers").and_then(|h| h.as_object());
        for (k, v) in obj.iter().chain(nested.into_iter().flatten()) {
            let name = match k.to_ascii_lowercase().as_str() {
                "authorization" => "authorization",
                "api-key" | "apikey" | "api_key" | "x-api-key" => "api-key",
                _ => continue,
            };
            if let Some(v) = v.as_str().and_then(|v| HeaderValue::from_str(v).ok()) {
                headers.insert(HeaderName::from_static(name), v);
            }
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_cache_keeps_parsed_documents_within_bounds() {
        let cache = ParseCache::new();
        let q = "{ products { id } }";
        let first = cache.get(q).expect("parses");
        assert_eq!(cache.len(), 1);
        // The kept document is the same as a fresh parse.
        assert_eq!(format!("{:?}", cache.get(q).unwrap()), format!("{first:?}"));
        assert_eq!(cache.len(), 1);
        // Syntax errors are not kept; execution reports them.
        assert!(cache.get("{ products { id }").is_none());
        // Long texts are parsed but not kept.
        let long = format!(
            "{{ products {{ id }} }}{}",
            " ".repeat(ParseCache::MAX_QUERY_LEN)
        );
        assert!(cache.get(&long).is_some());
        assert_eq!(cache.len(), 1);
        // A flood of one-off texts evicts the oldest, not the one in use.
        for i in 0..ParseCache::CAPACITY + 10 {
            assert!(
                cache
                    .get(&format!("query Q{i} {{ products {{ id }} }}"))
                    .is_some()
            );
            cache.get(q);
        }
        assert_eq!(cache.len(), ParseCache::CAPACITY);
        assert!(cache.contains(q), "the text in use stays");
        assert!(!cache.contains("query Q0 { products { id } }"));
        let last = format!(
            "query Q{} {{ products {{ id }} }}",
            ParseCache::CAPACITY + 9
        );
        assert!(cache.contains(&last), "new texts are still kept");
    }
}
