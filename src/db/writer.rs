//! SQLite's one writer, with group commit.
//!
//! SQLite takes one write transaction at a time, so writers queue here, in
//! process. A writer that finds another queued behind it does not commit:
//! it leaves its transaction open and the next writer continues it, inside
//! a savepoint of its own, so each writer's work still rolls back alone.
//! The last writer of such a batch (or the 32nd) commits it, and every
//! writer in it is answered only after that commit: what one was told is
//! written is as durable as before, while the commit's work (its WAL
//! frames, a checkpoint now and then) is paid once per batch instead of
//! once per writer.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, SqliteTransactionMode,
    TransactionOptions, TransactionTrait,
};
use tokio::sync::{Mutex, OwnedMutexGuard, watch};

use super::{CachedCustomer, CachedDevice, KnownCustomers, ReadCache};
use crate::error::{AppError, AppResult};

/// Writers one commit answers at most: a batch that never ended would keep
/// its first writer waiting for as long as load lasted.
const MAX_BATCH: usize = 32;

/// How long a writer waits for the batch it joined to be committed before
/// it commits it itself. The writer it left the batch open for normally
/// does, at once; this covers one that gave up while queued (its request
/// was dropped) or that rolled back as the batch's last writer.
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(20);

/// What a committed write changed that the process remembers: read-cache
/// entries to drop, customers now known to exist.
#[derive(Default)]
pub struct Effects {
    pub customers: Vec<String>,
    pub devices: Vec<String>,
    pub ensured: Vec<String>,
}

impl Effects {
    fn extend(&mut self, other: Effects) {
        self.customers.extend(other.customers);
        self.devices.extend(other.devices);
        self.ensured.extend(other.ensured);
    }
}

/// Applies a commit's effects to the process's state, once it committed.
pub struct AfterCommit {
    pub cache: Arc<ReadCache<CachedCustomer>>,
    pub device_cache: Arc<ReadCache<CachedDevice>>,
    pub commits: Arc<watch::Sender<u64>>,
    pub write_commits: prometheus_client::metrics::counter::Counter,
    pub known: Arc<KnownCustomers>,
}

impl AfterCommit {
    pub fn apply(&self, effects: Effects) {
        self.cache.invalidate(effects.customers.iter());
        self.device_cache.invalidate(effects.devices.iter());
        self.write_commits.inc();
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
        // Only now: a rolled-back insert made nobody exist.
        self.known.extend(effects.ensured);
    }
}

/// The writer connection and its queue.
pub struct Writer {
    conn: DatabaseConnection,
    slot: Arc<Mutex<Slot>>,
    /// Writers waiting for their turn.
    queued: AtomicUsize,
    /// False when the writer is the pool's only connection: a batch left
    /// open would hold it from readers.
    batching: bool,
    after: Arc<AfterCommit>,
}

#[derive(Default)]
struct Slot {
    open: Option<Batch>,
    next_id: u64,
}

/// A transaction left open for the writers queued behind its first one.
struct Batch {
    id: u64,
    /// Shared with the writer whose turn it is; only the batch holds it
    /// between turns, so it can be taken back to commit.
    txn: Arc<DatabaseTransaction>,
    members: usize,
    savepoint: Savepoint,
    done: watch::Sender<Option<Result<(), Arc<str>>>>,
    effects: Effects,
}

/// The one member savepoint, `w`, a batch can have open. Each writer after
/// the first writes under it; it is released as the next one takes it (in
/// the same call) or by the commit, so a writer costs one call of its own
/// rather than the two of a driver's nested transaction, each of which
/// also waits for its answer to be received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Savepoint {
    /// None open.
    None,
    /// Open, holding a finished writer's work (or nothing): to release.
    Kept,
    /// Open, holding the work of a writer dropped mid-turn (its request
    /// was cancelled, or it returned early on an error): to roll back.
    Undo,
    /// A call that opens it was cut short: whether it ran is unknown. The
    /// batch holds nothing to undo either way, so it is committed as it
    /// stands before anyone writes in it again.
    Unknown,
}

impl Batch {
    /// Rolls back a dropped writer's work, if one left any.
    async fn settle(&mut self) -> AppResult<()> {
        if self.savepoint == Savepoint::Undo {
            self.txn.execute_unprepared("ROLLBACK TO w").await?;
            // Only once done: cut short, the next user does it again.
            self.savepoint = Savepoint::Kept;
        }
        Ok(())
    }

    /// Opens the savepoint for the next writer, releasing the last one's.
    async fn open_savepoint(&mut self) -> AppResult<()> {
        self.settle().await?;
        let sql = match self.savepoint {
            Savepoint::None => "SAVEPOINT w",
            _ => "RELEASE w; SAVEPOINT w",
        };
        self.savepoint = Savepoint::Unknown;
        self.txn.execute_unprepared(sql).await?;
        self.savepoint = Savepoint::Kept;
        Ok(())
    }
}

/// A writer's turn: the writer is its own until it commits or drops it.
pub struct Turn {
    /// Held for the turn; taken when the turn ends.
    guard: Option<OwnedMutexGuard<Slot>>,
    /// It writes under the batch's savepoint, rather than in a
    /// transaction it began.
    member: bool,
    /// Ended by commit or abandon, rather than dropped.
    ended: bool,
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.ended || !self.member {
            // A writer that began the transaction leaves it to be rolled
            // back as it is dropped.
            return;
        }
        if let Some(batch) = self.guard.as_mut().and_then(|g| g.open.as_mut()) {
            batch.savepoint = Savepoint::Undo;
        }
    }
}

/// Counts a writer as queued for as long as it waits, however the wait ends.
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Queued(n)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Writer {
    pub fn new(conn: DatabaseConnection, batching: bool, after: Arc<AfterCommit>) -> Writer {
        Writer {
            conn,
            slot: Default::default(),
            queued: AtomicUsize::new(0),
            batching,
            after,
        }
    }

    /// Waits for the writer's turn; the transaction to write in: a new
    /// IMMEDIATE one (a read-then-write never dies with
    /// SQLITE_BUSY_SNAPSHOT), or the batch the previous writer left open,
    /// under the batch's savepoint (see [`Savepoint`]).
    pub async fn begin(&self) -> AppResult<(Arc<DatabaseTransaction>, Turn)> {
        let mut guard = {
            let _queued = Queued::new(&self.queued);
            self.slot.clone().lock_owned().await
        };
        if guard
            .open
            .as_ref()
            .is_some_and(|b| b.savepoint == Savepoint::Unknown)
            && let Some(batch) = guard.open.take()
        {
            // Nothing in it to undo: committed as it stands, and this
            // writer starts a transaction of its own.
            self.commit_batch(batch).await;
        }
        let (txn, member) = match guard.open.as_mut() {
            Some(batch) => {
                batch.open_savepoint().await?;
                (batch.txn.clone(), true)
            }
            None => (
                Arc::new(
                    self.conn
                        .begin_with_options(TransactionOptions {
                            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                            ..Default::default()
                        })
                        .await?,
                ),
                false,
            ),
        };
        Ok((
            txn,
            Turn {
                guard: Some(guard),
                member,
                ended: false,
            },
        ))
    }

    /// Commits a writer's transaction; returns once it is durable.
    pub async fn commit(
        self: &Arc<Self>,
        txn: Arc<DatabaseTransaction>,
        turn: Turn,
        effects: Effects,
    ) -> AppResult<()> {
        self.end(txn, turn, Some(effects)).await
    }

    /// Rolls a writer's transaction back. What it read of the writers
    /// before it in the batch (a row it then found taken, say) is not yet
    /// committed: this returns once it is, so what the caller answers from
    /// it holds.
    pub async fn abandon(
        self: &Arc<Self>,
        txn: Arc<DatabaseTransaction>,
        mut turn: Turn,
    ) -> AppResult<()> {
        if !turn.member {
            // Alone in its transaction: nothing of anyone else's to wait for.
            turn.ended = true;
            drop(turn);
            return match Arc::try_unwrap(txn) {
                Ok(txn) => Ok(txn.rollback().await?),
                // Cannot happen (only the writer holds a transaction it
                // began); dropping the last reference rolls it back.
                Err(_) => Ok(()),
            };
        }
        self.end(txn, turn, None).await
    }

    /// Ends a writer's turn: its savepoint kept (`effects`) or rolled back
    /// (`None`), then the batch left open for the next writer or committed;
    /// returns once the batch is.
    async fn end(
        self: &Arc<Self>,
        txn: Arc<DatabaseTransaction>,
        mut turn: Turn,
        effects: Option<Effects>,
    ) -> AppResult<()> {
        if turn.member && effects.is_none() {
            // Cut short here, the turn leaves its work to undo.
            txn.execute_unprepared("ROLLBACK TO w").await?;
        }
        turn.ended = true;
        let mut guard = turn
            .guard
            .take()
            .ok_or_else(|| AppError::Internal(anyhow::anyhow!("a write turn ended twice")))?;
        let slot = &mut *guard;
        let batch = if turn.member {
            drop(txn);
            slot.open.as_mut().ok_or_else(|| {
                AppError::Internal(anyhow::anyhow!("the write batch was no longer open"))
            })?
        } else {
            let id = slot.next_id;
            slot.next_id += 1;
            slot.open.insert(Batch {
                id,
                txn,
                members: 0,
                savepoint: Savepoint::None,
                done: watch::channel(None).0,
                effects: Effects::default(),
            })
        };
        batch.members += 1;
        batch.effects.extend(effects.unwrap_or_default());
        let (id, done) = (batch.id, batch.done.subscribe());
        if self.batching && batch.members < MAX_BATCH && self.queued.load(Ordering::Acquire) > 0 {
            drop(guard);
        } else {
            self.clone().finish(guard);
        }
        self.wait(id, done).await
    }

    /// Commits the open batch, on a task of its own: a writer whose request
    /// is dropped while it waits must not take the others' commit with it.
    fn finish(self: Arc<Self>, mut guard: OwnedMutexGuard<Slot>) {
        tokio::spawn(async move {
            if let Some(batch) = guard.open.take() {
                self.commit_batch(batch).await;
            }
            drop(guard);
        });
    }

    /// Commits a batch (its dropped writer's work undone first) and
    /// answers its writers.
    async fn commit_batch(&self, mut batch: Batch) {
        let committed = match batch.settle().await {
            Ok(()) => match Arc::try_unwrap(batch.txn) {
                Ok(txn) => txn.commit().await.map_err(AppError::from),
                Err(_) => Err(AppError::Internal(anyhow::anyhow!(
                    "a writer still held the batch at its commit"
                ))),
            },
            Err(e) => Err(e),
        };
        let result = match committed {
            Ok(()) => {
                self.after.apply(batch.effects);
                Ok(())
            }
            Err(e) => {
                tracing::error!(
                    error = e.for_log(),
                    writes = batch.members,
                    "a write batch failed to commit"
                );
                Err(Arc::from("the write could not be committed"))
            }
        };
        batch.done.send_replace(Some(result));
    }

    async fn wait(
        self: &Arc<Self>,
        id: u64,
        mut done: watch::Receiver<Option<Result<(), Arc<str>>>>,
    ) -> AppResult<()> {
        loop {
            tokio::select! {
                r = outcome(&mut done) => {
                    return match r {
                        Some(Ok(())) => Ok(()),
                        Some(Err(m)) => Err(AppError::Internal(anyhow::anyhow!("{m}"))),
                        None => Err(AppError::Internal(anyhow::anyhow!(
                            "the write batch ended without committing"
                        ))),
                    };
                }
                _ = tokio::time::sleep(FLUSH_AFTER) => {
                    // The writer is free and nobody waits for it (a waiter
                    // would have been handed it): nobody else will commit.
                    if let Ok(guard) = self.slot.clone().try_lock_owned()
                        && guard.open.as_ref().is_some_and(|b| b.id == id)
                    {
                        self.clone().finish(guard);
                    }
                }
            }
        }
    }
}

/// The batch's result once there is one; `None` if it ended without one.
async fn outcome(
    done: &mut watch::Receiver<Option<Result<(), Arc<str>>>>,
) -> Option<Result<(), Arc<str>>> {
    done.wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|v| v.clone())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;
    use entities::customers;
    use sea_orm::EntityTrait;

    use super::*;
    use crate::{config::Config, db::Db};

    async fn sqlite(dir: &std::path::Path) -> Db {
        let mut config = Config::default();
        config.database_url =
            crate::config::Secret::new(format!("sqlite://{}?mode=rwc", dir.join("t.db").display()));
        config.database_max_connections = Some(4);
        Db::connect(&config).await.unwrap()
    }

    /// A write transaction that creates customer `id`; whether it did.
    async fn creating(db: &Db, id: &str) -> (crate::db::WriteTxn, bool) {
        let t = db.write().await.unwrap();
        let created = crate::db::ensure_customer(&t, id, Utc::now())
            .await
            .unwrap();
        (t, created)
    }

    async fn exists(db: &Db, id: &str) -> bool {
        customers::Entity::find_by_id(id.to_string())
            .one(&db.conn)
            .await
            .unwrap()
            .is_some()
    }

    async fn queued(db: &Db, n: usize) {
        let w = db.writer.clone().unwrap();
        while w.queued.load(Ordering::Acquire) != n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Writers queued behind one share its commit, and each still rolls
    /// back alone: the one that gave up leaves no trace, the others' rows
    /// are all there once their commits return.
    #[tokio::test]
    async fn queued_writers_share_one_commit_and_roll_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite(dir.path()).await;
        let (first, _) = creating(&db, "w0").await;
        let mut tasks = Vec::new();
        for i in 1..=3 {
            let writer = db.clone();
            tasks.push(tokio::spawn(async move {
                let (t, _) = creating(&writer, &format!("w{i}")).await;
                if i == 2 {
                    return None;
                }
                Some(t.commit().await)
            }));
            // One at a time, so they queue in this order.
            queued(&db, i).await;
        }
        let commits = db.stats.write_commits.get();
        first.commit().await.unwrap();
        for t in tasks {
            if let Some(r) = t.await.unwrap() {
                r.unwrap();
            }
        }
        assert_eq!(
            db.stats.write_commits.get() - commits,
            1,
            "one commit for all"
        );
        for (id, kept) in [("w0", true), ("w1", true), ("w2", false), ("w3", true)] {
            assert_eq!(exists(&db, id).await, kept, "{id}");
        }
    }

    /// The writer a batch was left open for rolls back and nobody follows:
    /// the batch is committed all the same, and its writers answered.
    #[tokio::test]
    async fn a_batch_whose_last_writer_rolls_back_still_commits() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite(dir.path()).await;
        let (first, _) = creating(&db, "kept").await;
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let second = {
            let db = db.clone();
            tokio::spawn(async move {
                let (t, _) = creating(&db, "dropped").await;
                wait.await.ok();
                drop(t);
            })
        };
        queued(&db, 1).await;
        let committing = tokio::spawn(async move { first.commit().await });
        go.send(()).unwrap();
        second.await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), committing)
            .await
            .expect("the batch is committed without another writer")
            .unwrap()
            .unwrap();
        assert!(exists(&db, "kept").await);
        assert!(!exists(&db, "dropped").await);
    }

    /// A writer that finds its row taken by the writer before it, in the
    /// same batch, and gives up: by the time `abandon` returns, that row is
    /// committed, so reading it back answers the truth.
    #[tokio::test]
    async fn abandoning_waits_for_the_write_found_in_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite(dir.path()).await;
        let (first, created) = creating(&db, "taken").await;
        assert!(created);
        let second = {
            let db = db.clone();
            tokio::spawn(async move {
                let (t, inserted) = creating(&db, "taken").await;
                t.abandon().await.unwrap();
                (inserted, exists(&db, "taken").await)
            })
        };
        queued(&db, 1).await;
        first.commit().await.unwrap();
        let (inserted, seen) = second.await.unwrap();
        assert!(!inserted, "the first writer's row was in the way");
        assert!(seen, "committed once abandon returned");
    }

    /// A writer that gives up while queued (its request was dropped) leaves
    /// nobody waiting on it.
    #[tokio::test]
    async fn a_queued_writer_that_gives_up_leaves_nobody_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite(dir.path()).await;
        let (first, _) = creating(&db, "kept").await;
        let queued_writer = {
            let db = db.clone();
            tokio::spawn(async move {
                let _t = db.write().await.unwrap();
                std::future::pending::<()>().await;
            })
        };
        queued(&db, 1).await;
        let committing = tokio::spawn(async move { first.commit().await });
        queued_writer.abort();
        tokio::time::timeout(Duration::from_secs(5), committing)
            .await
            .expect("committed")
            .unwrap()
            .unwrap();
        assert!(exists(&db, "kept").await);
        // And the writer is free again.
        let (t, _) = creating(&db, "after").await;
        t.commit().await.unwrap();
        assert!(exists(&db, "after").await);
    }
}
