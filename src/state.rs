//! What every HTTP surface shares: the use cases, authentication, the
//! configuration, metrics and the write limiter. The GraphQL and REST
//! handlers and the router depend on it; it depends on neither.

use std::{sync::Arc, time::Duration};

use crate::{
    auth::Authenticator, clock::Clock, config::Config, db::Db, metrics::Metrics, service::Core,
};

#[derive(Clone)]
pub struct AppState {
    pub core: Arc<Core>,
    pub auth: Arc<Authenticator>,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// `None` when `rate_limit.enabled` is off.
    pub limiter: Option<Arc<crate::rate_limit::WriteLimiter>>,
}

impl AppState {
    pub async fn new(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<AppState> {
        let db = Db::connect(&config).await?;
        let core = Arc::new(Core::new(&config, db, clock)?);
        core.tokens().start().await.map_err(anyhow::Error::from)?;
        if let crate::service::tokens::KeySource::File(path) = &core.tokens().key_source {
            tracing::warn!(
                file = %path.display(),
                "tokens.encryption_key is not set: signing keys are encrypted with a key kept in this file; keep it with the database, or set tokens.encryption_key"
            );
        }
        let auth = Arc::new(Authenticator::new(
            config.auth.jwt.as_ref(),
            Duration::from_secs(config.auth.api_key_cache_secs),
        )?);
        let mut metrics = Metrics::default();
        metrics.track_db(&core.db().stats);
        let limiter = crate::rate_limit::WriteLimiter::new(&config.rate_limit)?.map(Arc::new);
        Ok(AppState {
            limiter,
            core,
            auth,
            config: Arc::new(config),
            metrics: Arc::new(metrics),
        })
    }
}
