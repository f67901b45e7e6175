//! Publishes unpublished change-log rows, in id order, to the Redis stream
//! and queues them for outbound webhooks, then marks them published. At
//! least once: a crash between the publish and the mark publishes the rows
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
    config::Config,
    error::{AppError, AppResult},
    metrics::Metrics,
    service::Core,
};

/// Any constant shared by every replica: the PostgreSQL advisory lock that
/// lets one relay at a time publish, so rows leave in order and never twice
/// concurrently.
const RELAY_LOCK: i64 = 0x656e_7469_746c_6501;

pub struct Relay {
    core: Arc<Core>,
    redis: Option<RedisSink>,
    outbound_urls: Vec<String>,
    batch: u64,
    poll: Duration,
    metrics: Arc<Metrics>,
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
    /// `None` when there is nowhere to publish: no `redis_url` and no
    /// outbound endpoints. Rows then stay unpublished in the change log.
    pub fn new(
        config: &Config,
        core: Arc<Core>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Option<Relay>> {
        let redis = match &config.redis_url {
            Some(url) => Some(RedisSink {
                client: redis::Client::open(url.expose())
                    .map_err(|_| anyhow::anyhow!("invalid configuration: redis_url"))?,
                conn: None,
                key: config.events.stream_key.clone(),
                max_len: config.events.stream_max_len,
            }),
            None => None,
        };
        let outbound_urls: Vec<String> = config
            .outbound
            .endpoints
            .iter()
            .map(|e| e.url.clone())
            .collect();
        if redis.is_none() && outbound_urls.is_empty() {
            return Ok(None);
        }
        Ok(Some(Relay {
            core,
            redis,
            outbound_urls,
            batch: config.events.relay_batch.max(1),
            poll: Duration::from_millis(config.events.relay_poll_ms.max(10)),
            metrics,
        }))
    }

    /// Runs until the process ends: publishes whenever a local commit may
    /// have written rows, and every `poll` for rows written elsewhere.
    pub fn spawn(mut self, mut wake: watch::Receiver<u64>) {
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.publish_once().await {
                    Ok(n) => {
                        self.metrics.events_published.inc_by(n as u64);
                        backoff = Duration::from_millis(100);
                        if n as u64 >= self.batch {
                            continue;
                        }
                    }
                    Err(e) => {
                        self.metrics.relay_failures.inc();
                        tracing::warn!(
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

    /// Publishes one batch; returns how many rows it published.
    pub async fn publish_once(&mut self) -> AppResult<usize> {
        let core = self.core.clone();
        let db = &core.db;
        match db.backend() {
            DbBackend::Postgres => {
                let txn = db.conn.begin().await?;
                let locked = txn
                    .query_one_raw(Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        "SELECT pg_try_advisory_xact_lock($1) AS locked",
                        [RELAY_LOCK.into()],
                    ))
                    .await?
                    .map(|r| r.try_get::<bool>("", "locked"))
                    .transpose()?
                    .unwrap_or(false);
                if !locked {
                    // Another replica is publishing.
                    return Ok(0);
                }
                let rows = self.unpublished(&txn).await?;
                if rows.is_empty() {
                    return Ok(0);
                }
                self.send(&rows).await?;
                self.mark(&txn, &rows).await?;
                txn.commit().await?;
                Ok(rows.len())
            }
            _ => {
                // One process owns a SQLite file: no lock to take, and the
                // writer gate is not held across the Redis round trip.
                let rows = self.unpublished(&db.conn).await?;
                if rows.is_empty() {
                    return Ok(0);
                }
                self.send(&rows).await?;
                let txn = db.write().await?;
                self.mark(&*txn, &rows).await?;
                txn.commit().await?;
                Ok(rows.len())
            }
        }
    }

    async fn unpublished(&self, c: &impl ConnectionTrait) -> AppResult<Vec<EntitlementEvent>> {
        Ok(entitlement_events::Entity::find()
            .filter(entitlement_events::Column::PublishedAt.is_null())
            .order_by_asc(entitlement_events::Column::Id)
            .limit(self.batch)
            .all(c)
            .await?
            .iter()
            .map(EntitlementEvent::from)
            .collect())
    }

    async fn send(&mut self, rows: &[EntitlementEvent]) -> AppResult<()> {
        if let Some(redis) = &mut self.redis {
            redis.publish(rows).await?;
        }
        Ok(())
    }

    async fn mark(&self, c: &impl ConnectionTrait, rows: &[EntitlementEvent]) -> AppResult<()> {
        let now = Utc::now();
        let ids: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        if !self.outbound_urls.is_empty() {
            let business_now = self.core.now();
            let queued = rows.iter().flat_map(|r| {
                self.outbound_urls
                    .iter()
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
        }
        entitlement_events::Entity::update_many()
            .col_expr(entitlement_events::Column::PublishedAt, Expr::value(now))
            .filter(entitlement_events::Column::Id.is_in(ids))
            .exec(c)
            .await?;
        Ok(())
    }
}
