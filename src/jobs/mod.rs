//! Background jobs. Each runs on every replica but does its work only while
//! it holds the job's lease, so two replicas never run one job at once.

use std::{future::Future, sync::Arc, time::Duration};

use chrono::Utc;

use crate::{
    db::{self, Db},
    error::AppResult,
};

pub mod expiry;
pub mod reconcile;
pub mod refresh;
pub mod retention;

// A job's saved position, where callers outside the jobs look for it.
pub use crate::db::jobs::{read_cursor, write_cursor};

/// Leases in the `job_leases` table. They are timed by the system clock, not
/// the business clock: they measure whether a process is alive.
#[derive(Clone)]
pub struct Leases {
    db: Db,
    /// Unique per process, so a restarted replica does not inherit its
    /// predecessor's lease before it expires.
    holder: String,
}

impl Leases {
    pub fn new(db: Db) -> Leases {
        use rand::RngCore;
        let mut b = [0u8; 8];
        rand::rng().fill_bytes(&mut b);
        Leases {
            db,
            holder: format!("{}-{}", std::process::id(), hex::encode(b)),
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Takes or renews the lease on `name` for `ttl`; false when another
    /// live holder has it.
    pub async fn try_acquire(&self, name: &str, ttl: Duration) -> AppResult<bool> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1));
        db::jobs::try_take_lease(&self.db.conn, name, &self.holder, now, until).await
    }

    /// Gives the lease up (on shutdown), so another replica can take it at once.
    pub async fn release(&self, name: &str) -> AppResult<()> {
        db::jobs::release_lease(&self.db.conn, name, &self.holder).await
    }
}

/// Runs `run` every `every` while this process holds the lease `name`.
/// A failed run is logged and retried at the next tick; the lease outlives
/// a tick so the holder keeps it from one run to the next.
pub fn spawn_leased<F, Fut>(leases: Leases, name: &'static str, every: Duration, run: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = AppResult<()>> + Send + 'static,
{
    let ttl = (every * 3).max(Duration::from_secs(30));
    spawn_leased_for(leases, name, every, ttl, run);
}

/// [`spawn_leased`] with the lease's time to live given.
pub fn spawn_leased_for<F, Fut>(
    leases: Leases,
    name: &'static str,
    every: Duration,
    ttl: Duration,
    run: F,
) where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = AppResult<()>> + Send + 'static,
{
    let run = Arc::new(run);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match leases.try_acquire(name, ttl).await {
                Ok(true) => {
                    // A run may outlast the lease (a first sweep over a large
                    // database): renew it meanwhile, and stop the run if it is
                    // lost, so two replicas never run the job at once.
                    let renew = async {
                        loop {
                            tokio::time::sleep(ttl / 3).await;
                            match leases.try_acquire(name, ttl).await {
                                Ok(true) => {}
                                Ok(false) => return "lost to another replica",
                                Err(_) => return "could not be renewed",
                            }
                        }
                    };
                    tokio::select! {
                        r = run() => if let Err(e) = r {
                            tracing::warn!(job = name, error = e.for_log(), "job run failed; retrying at the next tick");
                        },
                        why = renew => tracing::warn!(job = name, why, "job lease lost; run stopped"),
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(job = name, error = e.for_log(), "cannot take the job lease")
                }
            }
        }
    });
}

/// Starts this process's share of the background jobs (each runs on one
/// replica at a time).
pub fn spawn_all(core: Arc<crate::service::Core>, config: &crate::config::Config) {
    if !config.jobs.enabled {
        return;
    }
    let leases = Leases::new(core.db().clone());
    {
        let core = core.clone();
        spawn_leased(
            leases.clone(),
            expiry::JOB,
            Duration::from_millis(config.jobs.expiry_interval_ms.max(10)),
            move || {
                let core = core.clone();
                async move { expiry::sweep(&core).await.map(|_| ()) }
            },
        );
    }
    if config.retention.invalid_receipt_days > 0 || config.retention.webhook_payload_days > 0 {
        let core = core.clone();
        let cfg = config.retention.clone();
        spawn_leased(
            leases.clone(),
            retention::JOB,
            Duration::from_secs(config.retention.interval_secs.max(1)),
            move || {
                let core = core.clone();
                let cfg = cfg.clone();
                async move { retention::run(&core, &cfg).await.map(|_| ()) }
            },
        );
    }
    if !refresh::stores(&core).is_empty() {
        let core = core.clone();
        let cfg = config.jobs.clone();
        spawn_leased(
            leases.clone(),
            refresh::JOB,
            Duration::from_millis(config.jobs.refresh_interval_ms.max(10)),
            move || {
                let core = core.clone();
                let cfg = cfg.clone();
                async move { refresh::run(&core, &cfg).await.map(|_| ()) }
            },
        );
    }
    if config.jobs.reconcile_interval_secs > 0
        && !reconcile::enabled(&core, &config.reconcile).is_empty()
    {
        let core = core.clone();
        let cfg = config.reconcile.clone();
        spawn_leased(
            leases.clone(),
            reconcile::JOB,
            Duration::from_secs(config.jobs.reconcile_interval_secs),
            move || {
                let core = core.clone();
                let cfg = cfg.clone();
                async move { reconcile::run_job(&core, &cfg).await }
            },
        );
    }
    if core.stores().google().is_ok() {
        let core = core.clone();
        spawn_leased(
            leases.clone(),
            "play_acknowledgements",
            Duration::from_secs(config.jobs.acknowledge_interval_secs.max(1)),
            move || {
                let core = core.clone();
                async move {
                    let n = core.stores().retry_play_acknowledgements().await?;
                    if n > 0 {
                        tracing::info!(n, "Play purchases acknowledged on retry");
                    }
                    Ok(())
                }
            },
        );
    }
    if !config.outbound.endpoints.is_empty() {
        match crate::events::outbound::Dispatcher::new(
            core.db().clone(),
            core.clock().clone(),
            &config.outbound,
        ) {
            Ok(dispatcher) => {
                let dispatcher = Arc::new(dispatcher);
                spawn_leased(
                    leases.clone(),
                    crate::events::outbound::JOB,
                    Duration::from_millis(config.jobs.outbound_interval_ms.max(10)),
                    move || {
                        let dispatcher = dispatcher.clone();
                        async move { dispatcher.run_once().await.map(|_| ()) }
                    },
                );
            }
            Err(e) => tracing::error!(error = %e, "outbound webhooks are off"),
        }
    }
}
