//! Prometheus metrics: request counts and latencies per route.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: String,
    status: u16,
}

/// Both values come from closed sets (stores, outcome names in code).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    store: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteOnly {
    route: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RouteLabels, Counter>,
    latency: Family<RouteOnly, Histogram>,
    webhooks: Family<WebhookLabels, Counter>,
    /// Change-log rows the relay published (Redis and/or outbound queue).
    pub events_published: Counter,
    /// Relay batches that failed (Redis or database unavailable); the rows wait.
    pub relay_failures: Counter,
    /// Store notifications waiting for a turn (`http.webhooks_in_flight`).
    pub webhooks_waiting: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("entitle");
        let requests = Family::<RouteLabels, Counter>::default();
        let latency = Family::<RouteOnly, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
        });
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            latency.clone(),
        );
        let webhooks = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "webhook_events",
            "Store notifications acknowledged, by store and recorded outcome",
            webhooks.clone(),
        );
        let events_published = Counter::default();
        let relay_failures = Counter::default();
        registry.register(
            "events_published",
            "Change-log rows published by the event relay",
            events_published.clone(),
        );
        registry.register(
            "event_relay_failures",
            "Event relay batches that failed and will be retried",
            relay_failures.clone(),
        );
        let webhooks_waiting = Gauge::default();
        registry.register(
            "webhooks_waiting",
            "Store notifications waiting for a turn to be processed (http.webhooks_in_flight are processed at once); steadily above zero means deliveries arrive faster than they are applied",
            webhooks_waiting.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            webhooks,
            events_published,
            relay_failures,
            webhooks_waiting,
        }
    }
}

impl Metrics {
    /// One store notification acknowledged with `outcome`.
    pub fn webhook(
        &self,
        store: crate::domain::Store,
        outcome: crate::domain::webhook_log::WebhookOutcome,
    ) {
        self.webhooks
            .get_or_create(&WebhookLabels {
                store: store.as_str(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Counts the database's statements and committed write transactions.
    pub fn track_db(&mut self, stats: &crate::db::DbStats) {
        self.registry.register(
            "db_statements",
            "SQL statements run (BEGIN and COMMIT not included)",
            stats.statements.clone(),
        );
        self.registry.register(
            "db_write_transactions",
            "Write transactions committed (on SQLite one commit may hold a batch of writers)",
            stats.write_commits.clone(),
        );
        self.registry.register(
            "read_cache_listening",
            "PostgreSQL: 1 while this replica hears other replicas' writes (its read cache is on), 0 while not; always 1 on SQLite",
            stats.cache_listening.clone(),
        );
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Clients choose the method: anything but the standard ones shares one
/// label, so they cannot grow the label set.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

pub async fn track(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    // Unmatched paths share one label so scanners cannot blow up cardinality.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method());
    let resp = next.run(req).await;
    m.requests
        .get_or_create(&RouteLabels {
            method,
            route: route.clone(),
            status: resp.status().as_u16(),
        })
        .inc();
    m.latency
        .get_or_create(&RouteOnly { route })
        .observe(started.elapsed().as_secs_f64());
    resp
}
