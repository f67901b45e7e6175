//! Feeds the change log to its sinks, each on its own: the Redis stream
//! (rows published in id order, then marked `published_at`) and the
//! outbound webhook queue (a delivery per endpoint queued, then marked
//! `outbound_queued_at`). Redis being down holds back only the stream. At
//! least once: a crash between a publish and its mark publishes the rows
//! again, with the same `eventId`.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use entities::{entitlement_events, outbound_deliveries};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement, TransactionTrait, sea_query::Expr,
};
use tokio::sync::watch;

use super::EntitlementEvent;
use crate::{
    clock::Clock,
    config::Config,
    db::Db,
    error::{AppError, AppResult},
    metrics::Metrics,
};

/// Constants shared by every replica: the PostgreSQL advisory locks that
/// let one relay per sink at a time take rows, so rows leave in order and
/// never twice concurrently.
const RELAY_LOCK: i64 = 0x656e_7469_746c_6501;
const OUTBOUND_LOCK: i64 = 0x656e_7469_746c_6502;

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
    /// The column that records this sink has taken a row.
    fn column(&self) -> entitlement_events::Column {
        match self {
            Sink::Redis(_) => entitlement_events::Column::PublishedAt,
            Sink::Outbound(_) => entitlement_events::Column::OutboundQueuedAt,
        }
    }

    fn lock(&self) -> i64 {
        match self {
            Sink::Redis(_) => RELAY_LOCK,
            Sink::Outbound(_) => OUTBOUND_LOCK,
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
                tokio::select! {
                    r = wake.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(self.poll) => {}
                }
            }
        });
    }

    /// Hands one batch to the sink; returns how many rows it took.
    pub async fn publish_once(&mut self) -> AppResult<usize> {
        let db = self.db.clone();
        match db.backend() {
            DbBackend::Postgres => {
                let txn = db.conn.begin().await?;
                let locked = txn
                    .query_one_raw(Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        "SELECT pg_try_advisory_xact_lock($1) AS locked",
                        [self.sink.lock().into()],
                    ))
                    .await?
                    .map(|r| r.try_get::<bool>("", "locked"))
                    .transpose()?
                    .unwrap_or(false);
                if !locked {
                    // Another replica is feeding this sink.
                    return Ok(0);
                }
                let rows = self.unpublished(&txn).await?;
                if rows.is_empty() {
                    return Ok(0);
                }
                self.send(&txn, &rows).await?;
                self.mark(&txn, &rows).await?;
                txn.commit().await?;
                Ok(rows.len())
            }
            _ => match &self.sink {
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

    async fn unpublished(&self, c: &impl ConnectionTrait) -> AppResult<Vec<EntitlementEvent>> {
        Ok(entitlement_events::Entity::find()
            .filter(self.sink.column().is_null())
            .order_by_asc(entitlement_events::Column::Id)
            .limit(self.batch)
            .all(c)
            .await?
            .iter()
            .map(EntitlementEvent::from)
            .collect())
    }

    /// Redis: publishes the rows. Outbound: queues their deliveries on `c`,
    /// in the transaction that marks them.
    async fn send(&mut self, c: &impl ConnectionTrait, rows: &[EntitlementEvent]) -> AppResult<()> {
        match &mut self.sink {
            Sink::Redis(redis) => redis.publish(rows).await,
            Sink::Outbound(urls) => {
                let business_now = self.clock.now();
                let queued = rows.iter().flat_map(|r| {
                    urls.iter()
                        .map(move |url| outbound_deliveries::ActiveModel {
                            event_id: Set(r.seq),
                            endpoint_url: Set(url.clone()),
                            attempts: Set(0),
                            next_attempt_at: Set(business_now),
                            delivered_at: Set(None),
                            last_error: Set(None),
                            created_at: Set(business_now),
                            ..Default::default()
                        })
                });
                outbound_deliveries::Entity::insert_many(queued)
                    .on_conflict_do_nothing_on([
                        outbound_deliveries::Column::EventId,
                        outbound_deliveries::Column::EndpointUrl,
                    ])
                    .exec_without_returning(c)
                    .await?;
                Ok(())
            }
        }
    }

    async fn mark(&self, c: &impl ConnectionTrait, rows: &[EntitlementEvent]) -> AppResult<()> {
        let ids: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        entitlement_events::Entity::update_many()
            .col_expr(self.sink.column(), Expr::value(Utc::now()))
            .filter(entitlement_events::Column::Id.is_in(ids))
            .exec(c)
            .await?;
        Ok(())
    }
}
