//! Builds the router and its state; binds; shuts down gracefully.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::StatusCode,
    middleware,
    routing::{get, post},
};
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;

use crate::{
    auth::Authenticator,
    clock::{Clock, SystemClock},
    config::Config,
    db::Db,
    graphql::{self, EntitleSchema},
    metrics::Metrics,
    rest,
    service::Core,
};

#[derive(Clone)]
pub struct AppState {
    pub core: Arc<Core>,
    pub auth: Arc<Authenticator>,
    pub schema: EntitleSchema,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub parse_cache: Arc<graphql::ParseCache>,
}

impl AppState {
    pub async fn new(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<AppState> {
        let db = Db::connect(&config).await?;
        let core = Arc::new(Core::new(&config, db, clock)?);
        core.tokens.start().await.map_err(anyhow::Error::from)?;
        if let crate::service::tokens::KeySource::File(path) = &core.tokens.key_source {
            tracing::warn!(
                file = %path.display(),
                "tokens.encryption_key is not set: signing keys are encrypted with a key kept in this file; keep it with the database, or set tokens.encryption_key"
            );
        }
        let auth = Arc::new(Authenticator::new(
            config.auth.jwt.as_ref(),
            Duration::from_secs(config.auth.api_key_cache_secs),
        )?);
        let schema = graphql::build_schema(&config, core.clone());
        Ok(AppState {
            core,
            auth,
            schema,
            config: Arc::new(config),
            metrics: Arc::new(Metrics::default()),
            parse_cache: Arc::new(graphql::ParseCache::new()),
        })
    }
}

pub fn router(state: AppState) -> Router {
    let limit = state.config.http.body_limit_bytes;
    let timeout = Duration::from_secs(state.config.http.request_timeout_secs);
    // The answers a client may ask to have signed (`X-Entitle-Nonce`).
    let signed = Router::new()
        .route("/graphql", post(graphql::post).get(graphql::get))
        .route("/user", post(rest::garmin::user))
        .route(
            "/api/subscriptions/check/{customer_id}",
            get(rest::subscriptions::check),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            rest::tokens::sign_answers,
        ));
    Router::new()
        .merge(signed)
        .route("/graphql/ws", get(graphql::ws))
        .route("/webhooks/stripe", post(rest::webhooks::stripe::receive))
        .route("/webhooks/google", post(rest::webhooks::google::google))
        .route("/webhooks/apple", post(rest::webhooks::apple::notify))
        .route("/.well-known/jwks.json", get(rest::tokens::jwks))
        .route("/health", get(rest::health::health))
        .route("/ready", get(rest::health::ready))
        .route("/metrics", get(rest::health::metrics))
        .route("/playground", get(rest::playground::index))
        .route("/playground/", get(rest::playground::index))
        .route("/playground/{file}", get(rest::playground::file))
        .fallback(rest::not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(state)
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
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok(Running { addr, state, task })
}

/// The event relay and feed, and this replica's share of the jobs.
async fn spawn_background(state: &AppState) -> anyhow::Result<()> {
    let core = &state.core;
    let config = &state.config;
    let wake = core.db.commits.subscribe();
    core.feed
        .spawn(
            core.db.clone(),
            Duration::from_millis(config.events.feed_poll_ms.max(10)),
            wake.clone(),
        )
        .await?;
    for relay in crate::events::relay::Relay::new(config, core.clone(), state.metrics.clone())? {
        relay.spawn(wake.clone());
    }
    crate::jobs::spawn_all(core.clone(), config);
    Ok(())
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let running = start(config, Arc::new(SystemClock), shutdown_signal()).await?;
    tracing::info!(addr = %running.addr, "entitle listening");
    running.task.await??;
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
