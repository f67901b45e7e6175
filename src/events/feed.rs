//! The live feed behind GraphQL `entitlementChanged`: every replica tails the
//! change log, so a subscriber sees changes whichever replica made them, with
//! or without Redis.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use entities::entitlement_events;
use tokio::sync::{broadcast, watch};

use super::EntitlementEvent;
use crate::{
    db::{self, Db, change_log::Span},
    error::AppResult,
};

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

    /// Positions the feed at the end of the log, then tails it. Call before
    /// serving, so every row committed after a subscription attaches reaches it.
    pub async fn spawn(
        &self,
        db: Db,
        poll: Duration,
        mut wake: watch::Receiver<u64>,
    ) -> AppResult<()> {
        let tx = self.tx.clone();
        let mut tail = Tail::default();
        tail.reposition(&db).await?;
        tokio::spawn(async move {
            loop {
                let began = tokio::time::Instant::now();
                if let Err(e) = tail.step(&db, &tx).await {
                    tracing::warn!(
                        error = e.for_log(),
                        "event feed: cannot read the change log"
                    );
                }
                let gap = super::feed_gap(tx.receiver_count());
                if !super::next_turn(&mut wake, poll, began, gap).await {
                    return;
                }
            }
        });
        Ok(())
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
        let max = db::change_log::last_id(&db.conn).await?;
        self.last = Some(max.unwrap_or(0));
        self.gaps.clear();
        Ok(())
    }

    /// Delivers the rows committed since the last step. With nobody
    /// listening it reads ids only, to keep its place and its gaps; and if a
    /// subscriber attached while it read, it keeps its old place, so the next
    /// step delivers what that subscriber may have been waiting for.
    async fn step(
        &mut self,
        db: &Db,
        tx: &broadcast::Sender<Arc<EntitlementEvent>>,
    ) -> AppResult<()> {
        let Some(mut last) = self.last else {
            return self.reposition(db).await;
        };
        let listening = tx.receiver_count() > 0;
        self.gaps.retain(|_, at| at.elapsed() < GAP_WAIT);
        let mut gaps = self.gaps.clone();
        let mut out = Vec::new();
        // Late commits into gaps first (they are the older rows), asked for
        // by id so that a long delivered stretch above a gap cannot crowd
        // them out of a page.
        if !gaps.is_empty() {
            let wanted: Vec<i64> = gaps.keys().take(PAGE as usize).copied().collect();
            for row in rows(db, listening, Span::Ids(wanted)).await? {
                gaps.remove(&row.id);
                out.push(row);
            }
        }
        loop {
            let page = rows(
                db,
                listening,
                Span::After {
                    id: last,
                    limit: PAGE,
                },
            )
            .await?;
            let now = Instant::now();
            for row in &page {
                // A jump far ahead (a sequence skipped after a crash) is not
                // waited for beyond MAX_GAPS ids.
                let upto = row.id.min(last.saturating_add(1 + MAX_GAPS as i64));
                for missing in (last + 1)..upto {
                    if gaps.len() >= MAX_GAPS {
                        break;
                    }
                    gaps.insert(missing, now);
                }
                last = row.id;
            }
            let full = page.len() as u64 >= PAGE;
            out.extend(page);
            if !full {
                break;
            }
        }
        if !listening && tx.receiver_count() > 0 {
            return Ok(());
        }
        for row in out {
            if let Some(row) = row.model {
                // No receivers is not an error worth reporting.
                let _ = tx.send(Arc::new(EntitlementEvent::from(&row)));
            }
        }
        self.last = Some(last);
        self.gaps = gaps;
        Ok(())
    }
}

/// A change-log row seen by the feed: its id, and the whole row when
/// someone is listening.
struct Seen {
    id: i64,
    model: Option<entitlement_events::Model>,
}

async fn rows(db: &Db, whole: bool, span: Span) -> AppResult<Vec<Seen>> {
    Ok(if whole {
        db::change_log::rows_in(&db.conn, span)
            .await?
            .into_iter()
            .map(|m| Seen {
                id: m.id,
                model: Some(m),
            })
            .collect()
    } else {
        db::change_log::ids_in(&db.conn, span)
            .await?
            .into_iter()
            .map(|id| Seen { id, model: None })
            .collect()
    })
}
