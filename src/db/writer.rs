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
    atomic::{AtomicU8, AtomicUsize, Ordering},
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

/// The member savepoint a batch has open. Each writer after the first
/// writes under one of its own, `w0` or `w1`, opened with the same call as its
/// first read, which also releases the previous writer's (see
/// [`Opening`]): a member writer costs no call of its own for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Savepoint {
    /// None open.
    None,
    /// `w<n>` is open, holding a finished writer's work (or nothing): to
    /// release.
    Kept(u32),
    /// `w<n>` is open, holding the work of a writer dropped mid-turn (its
    /// request was cancelled, or it returned early on an error): to roll
    /// back.
    Undo(u32),
    /// The call that opens `w<n>` was cut short or failed: whether it ran
    /// is unknown. Rolling back to it settles it: if it exists it holds
    /// only that writer's work; if not, that writer wrote nothing.
    Unknown(u32),
    /// Which savepoints are open is unknown, but the batch holds nothing
    /// to undo: it is committed as it stands before anyone writes in it
    /// again.
    Lost,
}

/// The statement that opens a member writer's savepoint, sent ahead of its
/// first read in the same call (or alone, ahead of a first write: SQLite
/// would count a write's changes into the savepoint statements' too).
/// Shared between the writer's connection, which sends it, and its turn,
/// which tells the batch how it went.
pub struct Opening {
    sql: String,
    name: u32,
    state: AtomicU8,
}

const PENDING: u8 = 0;
const SENDING: u8 = 1;
const OPENED: u8 = 2;

impl Opening {
    /// The statement to send now, if it is still to be sent: whoever gets
    /// it sends it first, and reports how it went with [`Opening::sent`].
    pub fn take(&self) -> Option<&str> {
        self.state
            .compare_exchange(PENDING, SENDING, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| self.sql.as_str())
    }

    /// The call carrying the statement returned: `ok` when it succeeded.
    /// A failed one stays in doubt, as one cut short does.
    pub fn sent(&self, ok: bool) {
        if ok {
            self.state.store(OPENED, Ordering::Release);
        }
    }

    fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// Taken and not known to have run: the call carrying it was cut
    /// short or failed. (Statements of one writer go one after another, so
    /// a statement that finds it so is not racing that call.)
    pub fn in_doubt(&self) -> bool {
        self.state() == SENDING
    }

    /// Not in doubt: never sent, or sent and run.
    fn settled(&self) -> bool {
        matches!(self.state(), PENDING | OPENED)
    }
}

/// SQLite's answer when rolling back to a savepoint that is not open.
fn no_such_savepoint(e: &sea_orm::DbErr) -> bool {
    e.to_string().contains("no such savepoint")
}

impl Batch {
    /// Rolls back a dropped writer's work, if one left any, and settles a
    /// savepoint whose opening is in doubt.
    async fn settle(&mut self) -> AppResult<()> {
        match self.savepoint {
            Savepoint::Undo(n) => {
                self.txn
                    .execute_unprepared(&format!("ROLLBACK TO w{n}"))
                    .await?;
                // Only once done: cut short, the next user does it again.
                self.savepoint = Savepoint::Kept(n);
            }
            Savepoint::Unknown(n) => {
                match self
                    .txn
                    .execute_unprepared(&format!("ROLLBACK TO w{n}"))
                    .await
                {
                    Ok(_) => self.savepoint = Savepoint::Kept(n),
                    Err(e) if no_such_savepoint(&e) => self.savepoint = Savepoint::Lost,
                    Err(e) => return Err(e.into()),
                }
            }
            Savepoint::None | Savepoint::Kept(_) | Savepoint::Lost => {}
        }
        Ok(())
    }

    /// The opening of the next writer's savepoint, releasing the last one's.
    /// Two names take turns: the one opened is never the one open, so a
    /// rollback to it cannot reach another writer's work, and the
    /// statement's text (a cached prepared statement) takes few forms.
    fn next_opening(&self) -> Arc<Opening> {
        let (name, sql) = match self.savepoint {
            Savepoint::Kept(p) => (p ^ 1, format!("RELEASE w{p}; SAVEPOINT w{}", p ^ 1)),
            _ => (0, "SAVEPOINT w0".to_string()),
        };
        Arc::new(Opening {
            sql,
            name,
            state: AtomicU8::new(PENDING),
        })
    }

    /// Where a member's turn leaves the batch's savepoint; `kept` when it
    /// ends with its work to keep. `None` when its work is to be rolled
    /// back by the caller, to `w<n>`.
    fn after_turn(&mut self, opening: &Opening, kept: bool) -> Option<u32> {
        match opening.state() {
            // It sent nothing: the previous savepoint stands as it was.
            PENDING => None,
            OPENED if kept => {
                self.savepoint = Savepoint::Kept(opening.name);
                None
            }
            OPENED => {
                // Undone by whoever comes next if the rollback is cut short.
                self.savepoint = Savepoint::Undo(opening.name);
                Some(opening.name)
            }
            _ => {
                self.savepoint = Savepoint::Unknown(opening.name);
                None
            }
        }
    }
}

/// A writer's turn: the writer is its own until it commits or drops it.
pub struct Turn {
    /// Held for the turn; taken when the turn ends.
    guard: Option<OwnedMutexGuard<Slot>>,
    /// A member writes under a savepoint of its own in the batch, rather
    /// than in a transaction it began: the opening of that savepoint.
    opening: Option<Arc<Opening>>,
    /// Ended by commit or abandon, rather than dropped.
    ended: bool,
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // A writer that began the transaction leaves it to be rolled back
        // as it is dropped; a member leaves its savepoint to the next user.
        if let Some(opening) = &self.opening
            && let Some(batch) = self.guard.as_mut().and_then(|g| g.open.as_mut())
        {
            batch.after_turn(opening, false);
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

impl Turn {
    /// The opening of a member writer's savepoint, to send with its first
    /// statement.
    pub fn opening(&self) -> Option<Arc<Opening>> {
        self.opening.clone()
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
        if let Some(batch) = guard.open.as_mut() {
            batch.settle().await?;
        }
        if guard
            .open
            .as_ref()
            .is_some_and(|b| b.savepoint == Savepoint::Lost)
            && let Some(batch) = guard.open.take()
        {
            // Nothing in it to undo: committed as it stands, and this
            // writer starts a transaction of its own.
            self.commit_batch(batch).await;
        }
        let (txn, opening) = match guard.open.as_mut() {
            Some(batch) => (batch.txn.clone(), Some(batch.next_opening())),
            None => (
                Arc::new(
                    self.conn
                        .begin_with_options(TransactionOptions {
                            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                            ..Default::default()
                        })
                        .await?,
                ),
                None,
            ),
        };
        Ok((
            txn,
            Turn {
                guard: Some(guard),
                opening,
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
        if turn.opening.is_none() {
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
        mut effects: Option<Effects>,
    ) -> AppResult<()> {
        let mut refused = false;
        if let Some(opening) = turn.opening.clone() {
            let batch = turn
                .guard
                .as_mut()
                .and_then(|g| g.open.as_mut())
                .ok_or_else(|| {
                    AppError::Internal(anyhow::anyhow!("the write batch was no longer open"))
                })?;
            if effects.is_some() && !opening.settled() {
                // Whether its first statement ran inside its savepoint is
                // unknown: its work cannot be told apart, so it is undone.
                effects = None;
                refused = true;
            }
            if let Some(n) = batch.after_turn(&opening, effects.is_some()) {
                // Cut short here, the turn leaves its work to undo.
                txn.execute_unprepared(&format!("ROLLBACK TO w{n}")).await?;
                batch.savepoint = Savepoint::Kept(n);
            }
        }
        turn.ended = true;
        let mut guard = turn
            .guard
            .take()
            .ok_or_else(|| AppError::Internal(anyhow::anyhow!("a write turn ended twice")))?;
        let slot = &mut *guard;
        let batch = if turn.opening.is_some() {
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
        self.wait(id, done).await?;
        if refused {
            return Err(AppError::Internal(anyhow::anyhow!(
                "a write's savepoint could not be confirmed open"
            )));
        }
        Ok(())
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
    async fn read(t: &crate::db::WriteTxn, sql: &str) -> Result<(), sea_orm::DbErr> {
        t.query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Sqlite,
            sql,
        ))
        .await
        .map(|_| ())
    }

    /// A member opens its savepoint with its first read, in that read's
    /// call, and still rolls back alone: the member dropped after writing
    /// leaves nothing, the writers around it keep theirs.
    #[tokio::test]
    async fn a_member_opens_its_savepoint_with_its_first_read() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite(dir.path()).await;
        let (first, _) = creating(&db, "a").await;
        assert!(first.conn.opening.is_none(), "the first writer began it");
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let dropped = {
            let db = db.clone();
            tokio::spawn(async move {
                let t = db.write().await.unwrap();
                read(&t, "SELECT 1").await.unwrap();
                let opening = t.conn.opening.clone().expect("a member");
                assert_eq!(opening.state(), OPENED, "opened with the read");
                crate::db::ensure_customer(&t, "b", Utc::now())
                    .await
                    .unwrap();
                wait.await.ok();
                drop(t);
            })
        };
        queued(&db, 1).await;
        let kept = {
            let db = db.clone();
            tokio::spawn(async move {
                let t = db.write().await.unwrap();
                read(&t, "SELECT 1").await.unwrap();
                crate::db::ensure_customer(&t, "c", Utc::now())
                    .await
                    .unwrap();
                t.commit().await
            })
        };
        queued(&db, 2).await;
        let commits = db.stats.write_commits.get();
        let committing = tokio::spawn(async move { first.commit().await });
        go.send(()).unwrap();
        dropped.await.unwrap();
        kept.await.unwrap().unwrap();
        committing.await.unwrap().unwrap();
        assert_eq!(db.stats.write_commits.get() - commits, 1);
        for (id, present) in [("a", true), ("b", false), ("c", true)] {
            assert_eq!(exists(&db, id).await, present, "{id}");
        }
    }

    /// A member whose first read fails, or is cut short, may or may not
    /// have opened its savepoint: it can write nothing more, and the batch
    /// keeps the others' work and none of its own, whether the savepoint
    /// was opened or never reached the database.
    #[tokio::test]
    async fn a_savepoint_in_doubt_stops_its_writer_and_spares_the_batch() {
        for how in [
            "fails",
            "cut short while running",
            "cut short before sending",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let db = sqlite(dir.path()).await;
            let (first, _) = creating(&db, "a").await;
            let member = {
                let db = db.clone();
                tokio::spawn(async move {
                    let t = db.write().await.unwrap();
                    match how {
                        "fails" => {
                            assert!(read(&t, "SELECT * FROM no_such_table").await.is_err());
                        }
                        "cut short while running" => {
                            // Runs for far longer than it is given.
                            let slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL \
                                SELECT x + 1 FROM c WHERE x < 3000000) SELECT count(*) FROM c";
                            let r = tokio::time::timeout(Duration::from_millis(2), read(&t, slow))
                                .await;
                            assert!(r.is_err(), "cut short");
                        }
                        _ => {
                            // As if dropped before its call left for the database.
                            let opening = t.conn.opening.clone().expect("a member");
                            assert!(opening.take().is_some());
                        }
                    }
                    let refused = crate::db::ensure_customer(&t, "m", Utc::now()).await;
                    assert!(refused.is_err(), "no write once in doubt");
                    assert!(read(&t, "SELECT 1").await.is_err(), "nor a read");
                })
            };
            queued(&db, 1).await;
            let committing = tokio::spawn(async move { first.commit().await });
            member.await.unwrap();
            tokio::time::timeout(Duration::from_secs(5), committing)
                .await
                .expect("committed")
                .unwrap()
                .unwrap();
            let (t, _) = creating(&db, "c").await;
            t.commit().await.unwrap();
            for (id, present) in [("a", true), ("m", false), ("c", true)] {
                assert_eq!(exists(&db, id).await, present, "{id} ({how})");
            }
        }
    }
}
