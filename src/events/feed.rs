//! The live feed behind GraphQL `entitlementChanged`: every replica tails the
//! change log, so a subscriber sees changes whichever replica made them, with
//! or without Redis.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use entities::entitlement_events;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tokio::sync::{broadcast, watch};

use super::EntitlementEvent;
use crate::{db::Db, error::AppResult};

/// How long a gap in the ids is waited for. On PostgreSQL ids are taken at
/// insert and become visible at commit, so a lower id can appear after a
/// higher one; an id whose transaction rolled back never appears.
const GAP_WAIT: Duration = Duration::from_secs(10);
const MAX_GAPS: usize = 10_000;
const PAGE: u64 = 500;

#[derive(Clone)]
pub struct Feed {
    tx: broadcast::Sender<Arc<EntitlementEvent>>,
}

impl Feed {
    pub fn new() -> Feed {
        Feed {
            tx: broadcast::channel(4096).0,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EntitlementEvent>> {
        self.tx.subscribe()
    }

    /// Live subscriptions on this process.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    pub fn spawn(&self, db: Db, poll: Duration, mut wake: watch::Receiver<u64>) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut tail = Tail::default();
            loop {
                let res = if tx.receiver_count() == 0 {
                    // Nobody listening: keep up with the end of the log
                    // cheaply, so a new subscriber gets every row committed
                    // after it subscribed.
                    tail.reposition(&db).await
                } else {
                    tail.step(&db, &tx).await
                };
                if let Err(e) = res {
                    tracing::warn!(
                        error = e.for_log(),
                        "event feed: cannot read the change log"
                    );
                }
                tokio::select! {
                    r = wake.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        });
    }
}

impl Default for Feed {
    fn default() -> Self {
        Feed::new()
    }
}

#[derive(Default)]
struct Tail {
    /// Highest id delivered; `None` until positioned at the end of the log.
    last: Option<i64>,
    /// Ids below `last` not seen yet, with when they were first missed.
    gaps: BTreeMap<i64, Instant>,
}

impl Tail {
    async fn reposition(&mut self, db: &Db) -> AppResult<()> {
        let max: Option<i64> = entitlement_events::Entity::find()
            .select_only()
            .column_as(entitlement_events::Column::Id.max(), "max")
            .into_tuple::<Option<i64>>()
            .one(&db.conn)
            .await?
            .flatten();
        self.last = Some(max.unwrap_or(0));
        self.gaps.clear();
        Ok(())
    }

    async fn step(
        &mut self,
        db: &Db,
        tx: &broadcast::Sender<Arc<EntitlementEvent>>,
    ) -> AppResult<()> {
        let Some(last) = self.last else {
            return self.reposition(db).await;
        };
        self.gaps.retain(|_, at| at.elapsed() < GAP_WAIT);
        let from = self.gaps.keys().next().map_or(last, |g| (g - 1).min(last));
        let rows = entitlement_events::Entity::find()
            .filter(entitlement_events::Column::Id.gt(from))
            .order_by_asc(entitlement_events::Column::Id)
            .limit(PAGE)
            .all(&db.conn)
            .await?;
        let mut last = last;
        for row in &rows {
            if row.id <= last {
                if self.gaps.remove(&row.id).is_none() {
                    continue; // delivered already
                }
            } else {
                let now = Instant::now();
                for missing in (last + 1)..row.id {
                    if self.gaps.len() < MAX_GAPS {
                        self.gaps.insert(missing, now);
                    }
                }
                last = row.id;
            }
            // No receivers is not an error worth reporting.
            let _ = tx.send(Arc::new(EntitlementEvent::from(row)));
        }
        self.last = Some(last);
        Ok(())
    }
}
