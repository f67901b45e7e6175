//! Feeds the change log to its sinks, each on its own: the Redis stream
//! (rows published in id order, then marked `published_at`) and the
//! outbound webhook queue (a delivery per endpoint queued, then marked
//! `outbound_queued_at`). Redis being down holds back only the stream. At
//! least once: a crash between a publish and its mark publishes the rows
//! again, with the same `eventId`.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use tokio::sync::watch;

use super::EntitlementEvent;
use crate::{
    clock::Clock,
    config::Config,
    db::{
        self, Conn, Db,
        change_log::{Outlet, Turn},
    },
    error::{AppError, AppResult},
    metrics::Metrics,
};

pub struct Relay {
    db: Db,
    clock: Arc<dyn Clock>,
    sink: Sink,
    batch: u64,
    poll: Duration,
    metrics: Arc<Metrics>,
}

enum Sink {
    Redis(Box<RedisSink>),
    /// The URLs of the configured endpoints.
    Outbound(Vec<String>),
}

impl Sink {
    fn outlet(&self) -> Outlet {
        match self {
            Sink::Redis(_) => Outlet::Stream,
            Sink::Outbound(_) => Outlet::OutboundQueue,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Sink::Redis(_) => "redis stream",
            Sink::Outbound(_) => "outbound queue",
        }
    }
}

struct RedisSink {
    client: redis::Client,
    conn: Option<redis::aio::MultiplexedConnection>,
    key: String,
    max_len: u64,
}

impl RedisSink {
    async fn connection(&mut self) -> AppResult<&mut redis::aio::MultiplexedConnection> {
        if self.conn.is_none() {
            let cfg = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(5)));
            let conn = self
                .client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await
                .map_err(redis_err)?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    async fn publish(&mut self, events: &[EntitlementEvent]) -> AppResult<()> {
        let mut pipe = redis::pipe();
        for ev in events {
            let cmd = pipe.cmd("XADD").arg(&self.key);
            if self.max_len > 0 {
                cmd.arg("MAXLEN").arg("~").arg(self.max_len);
            }
            cmd.arg("*").arg("event").arg(ev.to_json()).ignore();
        }
        let conn = self.connection().await?;
        let res: Result<(), _> = pipe.query_async(conn).await;
        if let Err(e) = res {
            // Reconnect next time: the connection may be the broken part.
            self.conn = None;
            return Err(redis_err(e));
        }
        Ok(())
    }
}

// The Redis URL may carry a password; the client error text does not.
fn redis_err(e: redis::RedisError) -> AppError {
    AppError::Internal(anyhow::anyhow!("redis: {e}"))
}

impl Relay {
    /// One relay per configured sink: the Redis stream with `redis_url`,
    /// the outbound queue with outbound endpoints. With neither, rows stay
    /// unpublished in the change log.
    pub fn new(
        config: &Config,
        db: Db,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Vec<Relay>> {
        let mut sinks = Vec::new();
        if let Some(url) = &config.redis_url {
            sinks.push(Sink::Redis(Box::new(RedisSink {
                client: redis::Client::open(url.expose())
                    .map_err(|_| anyhow::anyhow!("invalid configuration: redis_url"))?,
                conn: None,
                key: config.events.stream_key.clone(),
                max_len: config.events.stream_max_len,
            })));
        }
        let outbound_urls: Vec<String> = config
            .outbound
            .endpoints
            .iter()
            .map(|e| e.url.clone())
            .collect();
        if !outbound_urls.is_empty() {
            sinks.push(Sink::Outbound(outbound_urls));
        }
        Ok(sinks
            .into_iter()
            .map(|sink| Relay {
                db: db.clone(),
                clock: clock.clone(),
                sink,
                batch: config.events.relay_batch.max(1),
                poll: Duration::from_millis(config.events.relay_poll_ms.max(10)),
                metrics: metrics.clone(),
            })
            .collect())
    }

    /// Runs until the process ends: publishes whenever a local commit may
    /// have written rows, and every `poll` for rows written elsewhere.
    pub fn spawn(mut self, mut wake: watch::Receiver<u64>) {
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let began = tokio::time::Instant::now();
                match self.publish_once().await {
                    Ok(n) => {
                        if matches!(self.sink, Sink::Redis(_)) {
                            self.metrics.events_published.inc_by(n as u64);
                        }
                        backoff = Duration::from_millis(100);
                        if n as u64 >= self.batch {
                            continue;
                        }
                    }
                    Err(e) => {
                        self.metrics.relay_failures.inc();
                        tracing::warn!(
                            sink = self.sink.name(),
                            error = e.for_log(),
                            "event relay: publish failed; rows wait and are retried"
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
                if !super::next_turn(&mut wake, self.poll, began, super::RELAY_GAP).await {
                    return;
                }
            }
        });
    }

    /// Hands one batch to the sink; returns how many rows it took.
    pub async fn publish_once(&mut self) -> AppResult<usize> {
        let db = self.db.clone();
        match db::change_log::take_turn(&db, self.sink.outlet()).await? {
            // Another replica is feeding this sink.
            Turn::Busy => Ok(0),
            Turn::Held(txn) => {
                let rows = self.unpublished(&txn).await?;
                if rows.is_empty() {
                    return Ok(0);
                }
                self.send(&txn, &rows).await?;
                self.mark(&txn, &rows).await?;
                txn.commit().await?;
                Ok(rows.len())
            }
            Turn::Alone => match &self.sink {
                Sink::Redis(_) => {
                    // One process owns a SQLite file: no lock to take, and
                    // the writer gate is not held across the Redis round trip.
                    let rows = self.unpublished(&db.conn).await?;
                    if rows.is_empty() {
                        return Ok(0);
                    }
                    self.send(&db.conn, &rows).await?;
                    let txn = db.write().await?;
                    self.mark(&*txn, &rows).await?;
                    txn.commit().await?;
                    Ok(rows.len())
                }
                Sink::Outbound(_) => {
                    let rows = self.unpublished(&db.conn).await?;
                    if rows.is_empty() {
                        return Ok(0);
                    }
                    let txn = db.write().await?;
                    self.send(&*txn, &rows).await?;
                    self.mark(&*txn, &rows).await?;
                    txn.commit().await?;
                    Ok(rows.len())
                }
            },
        }
    }

    async fn unpublished(&self, c: &impl Conn) -> AppResult<Vec<EntitlementEvent>> {
        Ok(db::change_log::untaken(c, self.sink.outlet(), self.batch)
            .await?
            .iter()
            .map(EntitlementEvent::from)
            .collect())
    }

    /// Redis: publishes the rows. Outbound: queues their deliveries on `c`,
    /// in the transaction that marks them.
    async fn send(&mut self, c: &impl Conn, rows: &[EntitlementEvent]) -> AppResult<()> {
        match &mut self.sink {
            Sink::Redis(redis) => redis.publish(rows).await,
            Sink::Outbound(urls) => {
                let ids: Vec<i64> = rows.iter().map(|r| r.seq).collect();
                db::change_log::queue_deliveries(c, &ids, urls, self.clock.now()).await
            }
        }
    }

    async fn mark(&self, c: &impl Conn, rows: &[EntitlementEvent]) -> AppResult<()> {
        let ids: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        db::change_log::mark_taken(c, self.sink.outlet(), ids, Utc::now()).await
    }
}
