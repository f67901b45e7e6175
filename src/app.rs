//! Builds the router and its state; binds; shuts down gracefully.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    middleware,
    response::IntoResponse,
    routing::{get, post},
};
use tokio::{net::TcpListener, sync::Semaphore};
use tower_http::timeout::TimeoutLayer;

use crate::{
    clock::{Clock, SystemClock},
    config::Config,
    graphql::{self, GraphqlState},
    providers::{apple::Apple, google::GooglePlay, stripe::StripeProvider},
    rest,
    service::Core,
};

// Still named here, where it was first defined, for code that starts the app.
pub use crate::state::AppState;

pub fn router(state: AppState) -> Router {
    let limit = state.config.http.body_limit_bytes;
    let timeout = Duration::from_secs(state.config.http.request_timeout_secs);
    let gql = GraphqlState::new(state.clone());
    // The answers a client may ask to have signed (`X-Entitle-Nonce`).
    let signed = Router::new()
        .route(
            "/graphql",
            post(graphql::post)
                .get(graphql::get)
                .with_state(gql.clone()),
        )
        .route("/user", post(rest::garmin::user))
        .route(
            "/api/subscriptions/check/{customer_id}",
            get(rest::subscriptions::check),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            rest::tokens::sign_answers,
        ));
    let in_flight = Arc::new(Semaphore::new(state.config.http.webhooks_in_flight.max(1)));
    let webhooks = Router::new()
        .route(
            "/webhooks/stripe",
            post(rest::webhooks::receive::<StripeProvider>),
        )
        .route(
            "/webhooks/google",
            post(rest::webhooks::receive::<GooglePlay>),
        )
        .route("/webhooks/apple", post(rest::webhooks::receive::<Apple>))
        .route_layer(middleware::from_fn_with_state(
            Turns {
                in_flight,
                waiting: state.metrics.webhooks_waiting.clone(),
            },
            take_turn,
        ));
    // The routes that write: each request runs to its end on its own.
    let writes = Router::new()
        .merge(signed)
        .merge(webhooks)
        .route_layer(middleware::from_fn(run_to_end));
    Router::new()
        .merge(writes)
        .route("/graphql/ws", get(graphql::ws).with_state(gql))
        .route("/.well-known/jwks.json", get(rest::tokens::jwks))
        .route("/health", get(rest::health::health))
        .route("/ready", get(rest::health::ready))
        .route("/metrics", get(rest::health::metrics))
        .route("/playground", get(rest::playground::index))
        .route("/playground/", get(rest::playground::index))
        .route("/playground/{file}", get(rest::playground::file))
        .fallback(rest::not_found)
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(middleware::map_response(close_unread))
        .with_state(state)
}

/// hyper drops a handler's future when its client goes away (or the request
/// timeout fires), which may be between BEGIN and COMMIT: the transaction is
/// then rolled back behind the caller's back (PostgreSQL logs a COMMIT or
/// ROLLBACK with no transaction in progress), and work a store or a device
/// was told nothing about is lost and done again at the next delivery. A
/// request that may write therefore runs in a task of its own and finishes
/// whether or not anyone still waits for its answer.
async fn run_to_end(
    req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    match tokio::spawn(next.run(req)).await {
        Ok(resp) => resp,
        // Keeps a handler's panic what it was without the task.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// A store notification waits here, its body unread, while
/// `http.webhooks_in_flight` others are processed: a burst of deliveries then
/// costs memory for that many parsed payloads, not for every connection the
/// store opens. Waiting counts against the request timeout, and the store
/// delivers again what timed out.
async fn take_turn(
    State(turns): State<Turns>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let turn = match turns.in_flight.clone().try_acquire_owned() {
        Ok(turn) => Ok(turn),
        Err(_) => {
            let _counted = Waiting::new(&turns.waiting);
            turns.in_flight.acquire_owned().await
        }
    };
    match turn {
        Ok(_turn) => next.run(req).await,
        // Never closed; were it, no turn could be had.
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

#[derive(Clone)]
struct Turns {
    in_flight: Arc<Semaphore>,
    /// `entitle_webhooks_waiting`.
    waiting: prometheus_client::metrics::gauge::Gauge,
}

/// Counts one notification as waiting for as long as it lives, so a wait
/// that ends any way at all (a turn, or the request dropped) is uncounted.
struct Waiting<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> Waiting<'a> {
    fn new(g: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Waiting(g)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A refused body (too large, too slow) is left unread on the socket, so the
/// server will not reuse the connection. Saying so in the answer stops a
/// keep-alive client from sending its next request down a connection that is
/// about to close (it would see the connection drop mid-request).
async fn close_unread(mut resp: axum::response::Response) -> axum::response::Response {
    if matches!(
        resp.status(),
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
    ) {
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// A bound, running server. Dropping the handle does not stop it; send on
/// `shutdown` (or a signal, for `serve`) to drain and stop.
pub struct Running {
    pub addr: SocketAddr,
    pub state: AppState,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub async fn start(
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Running> {
    let bind = config.bind;
    let state = AppState::new(config, clock).await?;
    spawn_background(&state).await?;
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind {bind} (bind): {e}"))?;
    let addr = listener.local_addr()?;
    let app = router(state.clone());
    let http = state.config.http.clone();
    let task = tokio::spawn(serve_connections(listener, app, http, shutdown));
    Ok(Running { addr, state, task })
}

/// The accept loop. hyper serves each connection with a timer, so a client
/// must send its headers within `header_read_timeout_secs`, and a connection
/// silent for `idle_timeout_secs` is closed. On shutdown, new connections are
/// refused, open ones finish their request and close, and whatever is left
/// after `shutdown_grace_secs` is dropped.
async fn serve_connections(
    listener: TcpListener,
    app: Router,
    http: crate::config::HttpConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let header_timeout = Duration::from_secs(http.header_read_timeout_secs.max(1));
    let idle = Duration::from_secs(http.idle_timeout_secs.max(1));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let mut stop = stop_rx.clone();
                conns.spawn(async move {
                    let io = crate::http_io::IdleTimeout::new(TokioIo::new(stream), idle);
                    let svc = hyper::service::service_fn(
                        move |mut req: axum::http::Request<hyper::body::Incoming>| {
                            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                            app.clone().oneshot(req)
                        },
                    );
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(header_timeout)
                        .serve_connection(io, svc)
                        .with_upgrades();
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = stop.wait_for(|s| *s) => {}
                    }
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                });
            }
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let grace = Duration::from_secs(http.shutdown_grace_secs);
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            "shutdown grace over: closing the remaining connections"
        );
        conns.shutdown().await;
    }
    Ok(())
}

/// The event relay and feed, and this replica's share of the jobs.
async fn spawn_background(state: &AppState) -> anyhow::Result<()> {
    let core = &state.core;
    let config = &state.config;
    let wake = core.db().commits.subscribe();
    core.feed()
        .spawn(
            core.db().clone(),
            Duration::from_millis(config.events.feed_poll_ms.max(10)),
            wake.clone(),
        )
        .await?;
    for relay in crate::events::relay::Relay::new(
        config,
        core.db().clone(),
        core.clock().clone(),
        state.metrics.clone(),
    )? {
        relay.spawn(wake.clone());
    }
    crate::jobs::spawn_all(core.clone(), config);
    spawn_last_seen_writer(core.clone());
    let warm = config.cache_warm > 0 && !config.cache_ttl().is_zero();
    if config.is_postgres() {
        let mut live = core
            .db()
            .spawn_cache_listener(config.database_connect_url());
        // A replica's cache is off until its listener is in place, and
        // comes back empty after the listener's connection is lost: warming
        // it each time it comes on (not before, which would race the
        // notices) spares every first request a database read.
        if warm {
            let (core, limit) = (core.clone(), config.cache_warm);
            tokio::spawn(async move {
                while live.changed().await.is_ok() {
                    warm_caches(&core, limit).await;
                }
            });
        }
    } else if warm {
        let (core, limit) = (core.clone(), config.cache_warm);
        tokio::spawn(async move { warm_caches(&core, limit).await });
    }
    Ok(())
}

async fn warm_caches(core: &Core, limit: u64) {
    match core.reads().warm_caches(limit).await {
        Ok((customers, devices)) => tracing::debug!(customers, devices, "read cache warmed"),
        Err(e) => tracing::warn!(error = e.for_log(), "read cache not warmed"),
    }
}

/// How often buffered device check-ins are written.
const LAST_SEEN_FLUSH: Duration = Duration::from_secs(10);

/// Every replica writes the check-ins it saw itself (not a leased job).
fn spawn_last_seen_writer(core: Arc<Core>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LAST_SEEN_FLUSH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if core.customers().seen().is_empty() {
                continue;
            }
            if let Err(e) = core.customers().flush_last_seen().await {
                tracing::warn!(
                    error = e.for_log(),
                    "device check-ins not written (each is recorded again at its next check-in)"
                );
            }
        }
    });
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let running = start(config, Arc::new(SystemClock), shutdown_signal()).await?;
    tracing::info!(addr = %running.addr, "entitle listening");
    running.task.await??;
    if let Err(e) = running.state.core.customers().flush_last_seen().await {
        tracing::warn!(
            error = e.for_log(),
            "device check-ins not written at shutdown"
        );
    }
    tracing::info!("entitle stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
