//! Queries over the entities, and the write-transaction discipline that keeps
//! SQLite from failing with "database is locked" under concurrent writers.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use chrono::{DateTime, Utc};
use entities::{
    account_tokens, customer_aliases, customers, devices, entitlement_events, purchases,
};
use migration::{Migrator, MigratorTrait};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DatabaseTransaction, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait, TryInsertResult,
    sea_query::{Expr, ExprTrait, LikeExpr},
};

use crate::{
    config::Config,
    domain::{Change, PurchaseFacts},
    error::{AppError, AppResult},
};

pub mod api_key;
mod cache;
pub mod change_log;
pub mod customer;
pub mod delivery_queue;
pub mod device;
pub mod held_purchase;
pub mod jobs;
pub mod outbound_endpoint;
pub mod purchase;
pub mod receipt;
pub mod signing_key;
pub mod store_purchases;
pub mod webhook_claim;
pub mod webhook_log;
mod writer;
pub use cache::{CachedCustomer, CachedDevice, ReadCache, device_key};
/// What services take a connection or transaction as, without naming the ORM.
pub use sea_orm::ConnectionTrait as Conn;

#[derive(Clone)]
pub struct Db {
    pub conn: DatabaseConnection,
    /// SQLite's writer (see `connect_pool` and [`writer`]); `None` on
    /// PostgreSQL, where writers share the pool. SQLite has one writer at a
    /// time; queueing writers in process is cheaper and fairer than letting
    /// them spin on the busy handler.
    writer: Option<Arc<writer::Writer>>,
    pub cache: Arc<ReadCache<CachedCustomer>>,
    pub device_cache: Arc<ReadCache<CachedDevice>>,
    /// What every commit changes in the process (caches, known customers).
    after: Arc<writer::AfterCommit>,
    /// Bumped after every commit, to wake the event relay and feed at once
    /// instead of at their next poll.
    pub commits: Arc<tokio::sync::watch::Sender<u64>>,
    /// Statements run and write transactions committed, for `/metrics` and
    /// the benchmark's statements-per-event figure.
    pub stats: DbStats,
    /// PostgreSQL: marks this process's cache notices, so its listener skips
    /// its own (already applied at commit).
    listener_id: Option<Arc<str>>,
}

/// Customer ids seen committed. Customers are never deleted (a merge
/// leaves the merged-away row in place), so once one is known to exist it
/// exists for good, in every replica: a write that must make sure of a
/// known customer needs no statement for it. Bounded: forgotten wholesale
/// when full, which costs only the statements it saved.
#[derive(Default)]
pub struct KnownCustomers(std::sync::Mutex<std::collections::HashSet<Box<str>>>);

impl KnownCustomers {
    const CAPACITY: usize = 16_384;

    fn contains(&self, id: &str) -> bool {
        self.0.lock().expect("known customers").contains(id)
    }

    fn extend(&self, ids: impl IntoIterator<Item = String>) {
        let mut known = self.0.lock().expect("known customers");
        for id in ids {
            if known.len() >= Self::CAPACITY {
                known.clear();
            }
            known.insert(id.into_boxed_str());
        }
    }
}

/// Drops what another replica's write changed.
fn apply_cache_notice(
    me: &str,
    payload: &str,
    cache: &ReadCache<CachedCustomer>,
    devices: &ReadCache<CachedDevice>,
) {
    #[derive(serde::Deserialize)]
    struct Notice {
        from: String,
        #[serde(default)]
        all: bool,
        #[serde(default)]
        customers: Vec<String>,
        #[serde(default)]
        devices: Vec<String>,
    }
    match serde_json::from_str::<Notice>(payload) {
        Ok(n) if n.from == me => {}
        Ok(n) if !n.all => {
            cache.invalidate(n.customers.iter());
            devices.invalidate(n.devices.iter());
        }
        // "all", or a notice this version cannot read: drop everything.
        _ => {
            cache.reset(true);
            devices.reset(true);
        }
    }
}

#[derive(Clone, Default)]
pub struct DbStats {
    pub statements: prometheus_client::metrics::counter::Counter,
    pub write_commits: prometheus_client::metrics::counter::Counter,
    pub cache_listening: prometheus_client::metrics::gauge::Gauge,
}

/// A write transaction. On SQLite it holds the writer's turn: a transaction
/// of its own or a savepoint in a batch (see [`writer`]).
pub struct WriteTxn {
    conn: TxnConn,
    turn: Option<(Arc<writer::Writer>, writer::Turn)>,
    /// Customers this transaction locked or created: their cached reads are
    /// dropped once it commits.
    touched: std::sync::Mutex<Vec<String>>,
    /// Devices (by `device_key`) it wrote.
    touched_devices: std::sync::Mutex<Vec<String>>,
    /// Customers this transaction already made sure exist: customers are
    /// never deleted, so asking again within it would change nothing.
    ensured: std::sync::Mutex<std::collections::HashSet<String>>,
    /// PostgreSQL: customer rows and store purchases this transaction holds
    /// locked; a lock is held to the end, so taking it again is a no-op
    /// round trip saved.
    locked: std::sync::Mutex<std::collections::HashSet<String>>,
    /// PostgreSQL: customers found unmerged while this transaction held
    /// their lock, so unmerged to its end (a merge must take that lock).
    settled: std::sync::Mutex<std::collections::HashSet<String>>,
    /// PostgreSQL: this process's mark on the cache notifications it sends.
    notify_as: Option<Arc<str>>,
    /// PostgreSQL: how many customers and devices were touched when the
    /// cache notice went with the last statement; the commit sends another
    /// only if more were touched since.
    notified: std::sync::Mutex<Option<(usize, usize)>>,
    after: Arc<writer::AfterCommit>,
    /// SQLite: writes whose result nobody reads, sent with the next
    /// statement that must go anyway (see [`WriteTxn::defer`]).
    deferred: std::sync::Mutex<Vec<sea_orm::Statement>>,
    statements: prometheus_client::metrics::counter::Counter,
}

impl std::ops::Deref for WriteTxn {
    type Target = TxnConn;
    fn deref(&self) -> &TxnConn {
        &self.conn
    }
}

/// A statement that only reads: it cannot change what was read before it.
fn is_plain_read(sql: &str) -> bool {
    sql.trim_start()
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("select "))
}

/// A write transaction's connection. On SQLite, a writer that joins a
/// group commit writes under a savepoint of its own, opened by the same
/// call as its first read (see [`writer::Opening`]).
pub struct TxnConn {
    /// Shared with the batch it writes in, on SQLite.
    txn: Arc<DatabaseTransaction>,
    opening: Option<Arc<writer::Opening>>,
    /// SQLite: a customer's purchase facts, read in the same call as a
    /// store id lookup, for the write that follows it. Dropped by any
    /// statement other than a plain read: a write may change them.
    prefetched: std::sync::Mutex<Option<(String, Vec<PurchaseFacts>)>>,
    /// Writes whose result nobody reads, held back to travel with the
    /// transaction's last statement (see [`WriteTxn::defer_ordered`]); any
    /// other statement sends them ahead of itself, so every later statement
    /// sees them.
    ordered: std::sync::Mutex<Vec<sea_orm::Statement>>,
    statements: prometheus_client::metrics::counter::Counter,
}

impl TxnConn {
    /// Refuses a statement once the call that opened the savepoint was cut
    /// short or failed: whether it ran is unknown, so what this writer
    /// writes next could land outside it, beyond its own rollback.
    fn check(&self, sql: &str) -> Result<(), sea_orm::DbErr> {
        if !is_plain_read(sql) {
            self.prefetched.lock().expect("prefetched").take();
        }
        match &self.opening {
            Some(o) if o.in_doubt() => Err(sea_orm::DbErr::Custom(
                "this write's savepoint may not be open: it cannot go on".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Opens the savepoint on its own, if it is still to be opened: a
    /// write is about to go, and SQLite would add the savepoint
    /// statements' change counts to the write's.
    async fn open_alone(&self, sql: &str) -> Result<(), sea_orm::DbErr> {
        self.check(sql)?;
        if let Some(o) = &self.opening
            && let Some(sql) = o.take()
        {
            let r = self.txn.execute_unprepared(sql).await;
            o.sent(r.is_ok());
            r?;
        }
        Ok(())
    }

    /// `stmt`, preceded in the same call by the savepoint's opening if it
    /// is still to be opened; the opening, to report on.
    fn with_opening(
        &self,
        mut stmt: sea_orm::Statement,
    ) -> Result<(sea_orm::Statement, Option<&writer::Opening>), sea_orm::DbErr> {
        self.check(&stmt.sql)?;
        Ok(match self.opening.as_deref() {
            Some(o) => match o.take() {
                Some(sql) => {
                    stmt.sql = format!("{sql}; {}", stmt.sql);
                    (stmt, Some(o))
                }
                None => (stmt, None),
            },
            None => (stmt, None),
        })
    }

    /// Runs a read with `run`, the savepoint's opening ahead of it in the
    /// same call when it is still to be sent, and reports how that went.
    async fn read<T, F>(
        &self,
        stmt: sea_orm::Statement,
        run: impl FnOnce(sea_orm::Statement) -> F,
    ) -> Result<T, sea_orm::DbErr>
    where
        F: std::future::Future<Output = Result<T, sea_orm::DbErr>>,
    {
        let (stmt, opening) = self.with_opening(stmt)?;
        let r = run(stmt).await;
        if let Some(o) = opening {
            o.sent(r.is_ok());
        }
        r
    }

    /// Sends the writes held back by [`WriteTxn::defer_ordered`], in one
    /// call, ahead of a statement that is not the transaction's last.
    async fn flush_ordered(&self) -> Result<(), sea_orm::DbErr> {
        let pending = std::mem::take(&mut *self.ordered.lock().expect("ordered"));
        if let Some(stmt) = join_statements(pending, &self.statements) {
            self.open_alone(&stmt.sql).await?;
            self.txn.execute_raw(stmt).await?;
        }
        Ok(())
    }

    /// The purchase facts of `customer_id` read with the last store id
    /// lookup, if nothing but reads ran since.
    pub fn take_prefetched_facts(&self, customer_id: &str) -> Option<Vec<PurchaseFacts>> {
        let mut p = self.prefetched.lock().expect("prefetched");
        match p.take() {
            Some((c, facts)) if c == customer_id => Some(facts),
            _ => None,
        }
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for TxnConn {
    fn get_database_backend(&self) -> DbBackend {
        self.txn.get_database_backend()
    }

    async fn execute_raw(
        &self,
        stmt: sea_orm::Statement,
    ) -> Result<sea_orm::ExecResult, sea_orm::DbErr> {
        self.flush_ordered().await?;
        self.open_alone(&stmt.sql).await?;
        self.txn.execute_raw(stmt).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<sea_orm::ExecResult, sea_orm::DbErr> {
        self.flush_ordered().await?;
        self.open_alone(sql).await?;
        self.txn.execute_unprepared(sql).await
    }

    async fn query_one_raw(
        &self,
        stmt: sea_orm::Statement,
    ) -> Result<Option<sea_orm::QueryResult>, sea_orm::DbErr> {
        self.flush_ordered().await?;
        self.read(stmt, |s| self.txn.query_one_raw(s)).await
    }

    async fn query_all_raw(
        &self,
        stmt: sea_orm::Statement,
    ) -> Result<Vec<sea_orm::QueryResult>, sea_orm::DbErr> {
        self.flush_ordered().await?;
        self.read(stmt, |s| self.txn.query_all_raw(s)).await
    }

    fn support_returning(&self) -> bool {
        self.txn.support_returning()
    }
}

/// `sql` with each PostgreSQL parameter `$n` made `$(n + offset)`, outside
/// quoted text, so it can follow `offset` values of another statement.
fn renumber_parameters(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let mut quoted: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (Some(q), c) if c == q => quoted = None,
            (None, '\'' | '"') => quoted = Some(c),
            (None, '$') if chars.peek().is_some_and(char::is_ascii_digit) => {
                let mut n = 0usize;
                while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                    n = n * 10 + d as usize;
                    chars.next();
                }
                out.push('$');
                out.push_str(&(n + offset).to_string());
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// Statements joined to run as one, in order: on SQLite one after another
/// in one call, each taking the next values; on PostgreSQL the earlier ones
/// as data-modifying WITH clauses of the last, their `$n` renumbered.
/// Counted as the statements they are, however they travel.
fn join_statements(
    parts: Vec<sea_orm::Statement>,
    statements: &prometheus_client::metrics::counter::Counter,
) -> Option<sea_orm::Statement> {
    if parts.len() > 1 {
        // The statement count is of statements, however they travel.
        statements.inc_by(parts.len() as u64 - 1);
    }
    let mut parts = parts.into_iter();
    let mut all = parts.next()?;
    let postgres = all.db_backend == DbBackend::Postgres;
    let mut clauses = Vec::new();
    for next in parts {
        let offset = all.values.as_ref().map_or(0, |v| v.0.len());
        if postgres {
            // The statement so far becomes a WITH clause of the next;
            // PostgreSQL runs each to completion, read or not.
            clauses.push(std::mem::take(&mut all.sql));
            all.sql = renumber_parameters(&next.sql, offset);
        } else {
            all.sql.push_str("; ");
            all.sql.push_str(&next.sql);
        }
        match (&mut all.values, next.values) {
            (Some(a), Some(b)) => a.0.extend(b.0),
            (a @ None, b) => *a = b,
            (Some(_), None) => {}
        }
    }
    if !clauses.is_empty() {
        let with: Vec<String> = clauses
            .iter()
            .enumerate()
            .map(|(i, c)| format!("deferred_{i} AS ({c})"))
            .collect();
        // A last statement with a WITH of its own continues this one.
        all.sql = match all.sql.strip_prefix("WITH ") {
            Some(rest) => format!("WITH {}, {rest}", with.join(", ")),
            None => format!("WITH {} {}", with.join(", "), all.sql),
        };
    }
    Some(all)
}

/// A transaction that is only this writer's (PostgreSQL, or a pool of one).
fn own(txn: Arc<DatabaseTransaction>) -> AppResult<DatabaseTransaction> {
    Arc::try_unwrap(txn).map_err(|_| {
        AppError::Internal(anyhow::anyhow!("a transaction was still shared at its end"))
    })
}

impl WriteTxn {
    /// Runs a write whose result nobody reads with the next statement sent
    /// through [`WriteTxn::query_last`], or at the commit: one
    /// round trip instead of two (on SQLite, to the connection's thread; on
    /// PostgreSQL, to the server). Only for tables this transaction does
    /// not read again (the change log, a customer's Stripe record): a read
    /// in between would not see the write.
    pub async fn defer(&self, stmt: sea_orm::Statement) -> AppResult<()> {
        // SQLite runs several statements in one call only with positional
        // parameters, each taking the next values in order; PostgreSQL
        // runs the deferred writes as data-modifying WITH clauses of the
        // next statement, their `$n` renumbered.
        let joins = match stmt.db_backend {
            DbBackend::Sqlite => !stmt.sql.contains('$'),
            DbBackend::Postgres => true,
            _ => false,
        };
        if joins {
            self.deferred.lock().expect("deferred").push(stmt);
            return Ok(());
        }
        self.conn.execute_raw(stmt).await?;
        Ok(())
    }

    /// Holds back a write whose result nobody reads, to travel with the
    /// transaction's last statement ([`WriteTxn::query_last`], or the
    /// commit): one round trip fewer. Unlike [`WriteTxn::defer`], any
    /// other statement sends it ahead of itself first, so nothing later in
    /// the transaction can miss it, whatever table it reads.
    pub async fn defer_ordered(&self, stmt: sea_orm::Statement) -> AppResult<()> {
        // A write may change the facts read with a lookup.
        self.conn.prefetched.lock().expect("prefetched").take();
        let joins = match stmt.db_backend {
            DbBackend::Sqlite => !stmt.sql.contains('$'),
            DbBackend::Postgres => true,
            _ => false,
        };
        if joins {
            self.conn.ordered.lock().expect("ordered").push(stmt);
            return Ok(());
        }
        self.conn.execute_raw(stmt).await?;
        Ok(())
    }

    /// Runs `stmt`, the transaction's last statement before its commit,
    /// after the deferred writes, in one call; its rows. On PostgreSQL the
    /// cache notice goes with it when it returns rows, rather than in a
    /// round trip of its own at the commit (which sends it again only if
    /// something was touched after).
    pub async fn query_last(
        &self,
        mut stmt: sea_orm::Statement,
    ) -> AppResult<Vec<sea_orm::QueryResult>> {
        let notice = match (&self.notify_as, stmt.db_backend) {
            (Some(me), DbBackend::Postgres) => self.cache_notice(me),
            _ => None,
        };
        if let Some((payload, _)) = &notice {
            let n = stmt.values.as_ref().map_or(0, |v| v.0.len());
            // Queued by PostgreSQL, and delivered only if this commits.
            stmt.sql = format!(
                "WITH last AS ({}) SELECT last.* FROM last, \
                 (SELECT pg_notify(${}, ${})) notice",
                stmt.sql,
                n + 1,
                n + 2
            );
            let values = stmt
                .values
                .get_or_insert_with(|| sea_orm::Values(Vec::new()));
            values.0.push(CACHE_CHANNEL.into());
            values.0.push(payload.clone().into());
        }
        let rows = match self.with_deferred(Some(stmt)) {
            Some(stmt) => self.conn.query_all_raw(stmt).await?,
            None => Vec::new(),
        };
        if let Some((_, touched)) = notice
            && !rows.is_empty()
        {
            *self.notified.lock().expect("notified") = Some(touched);
        }
        Ok(rows)
    }

    /// The cache notice of what this transaction touched so far, unless it
    /// was sent already; with how many customers and devices it names.
    fn cache_notice(&self, me: &str) -> Option<(String, (usize, usize))> {
        let customers = self.touched.lock().expect("touched");
        let devices = self.touched_devices.lock().expect("touched");
        let touched = (customers.len(), devices.len());
        if *self.notified.lock().expect("notified") == Some(touched) {
            return None;
        }
        cache_notice(me, &customers, &devices).map(|p| (p, touched))
    }

    /// The writes held back (ordered, then deferred) and then `last`, as
    /// one statement to run.
    fn with_deferred(&self, last: Option<sea_orm::Statement>) -> Option<sea_orm::Statement> {
        let ordered = std::mem::take(&mut *self.conn.ordered.lock().expect("ordered"));
        let pending = std::mem::take(&mut *self.deferred.lock().expect("deferred"));
        let parts = ordered.into_iter().chain(pending).chain(last).collect();
        join_statements(parts, &self.statements)
    }

    pub async fn commit(self) -> AppResult<()> {
        if let Some(stmt) = self.with_deferred(None) {
            self.conn.execute_raw(stmt).await?;
        }
        if let Some(me) = &self.notify_as
            && let Some((payload, _)) = self.cache_notice(me)
        {
            // Delivered to the listeners only if and when this commits.
            self.conn
                .execute_raw(sea_orm::Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT pg_notify($1, $2)",
                    [CACHE_CHANNEL.into(), payload.into()],
                ))
                .await?;
        }
        let effects = writer::Effects {
            customers: std::mem::take(&mut *self.touched.lock().expect("touched")),
            devices: std::mem::take(&mut *self.touched_devices.lock().expect("touched")),
            ensured: std::mem::take(&mut *self.ensured.lock().expect("ensured"))
                .into_iter()
                .collect(),
        };
        match self.turn {
            Some((writer, turn)) => writer.commit(self.conn.txn, turn, effects).await,
            None => {
                own(self.conn.txn)?.commit().await?;
                self.after.apply(effects);
                Ok(())
            }
        }
    }

    /// Undoes this transaction's writes. Use it, rather than dropping the
    /// transaction, when what the caller answers next rests on a write it
    /// found in its way (a row another writer inserted first): on SQLite
    /// that writer may share this one's commit, still to come, and this
    /// returns only once it is made. (On PostgreSQL such a conflict is only
    /// seen once the other transaction committed.)
    pub async fn abandon(self) -> AppResult<()> {
        match self.turn {
            Some((writer, turn)) => writer.abandon(self.conn.txn, turn).await,
            None => Ok(own(self.conn.txn)?.rollback().await?),
        }
    }

    /// Records that this transaction writes the device row.
    pub fn touch_device(&self, platform: &str, device_id: &str) {
        self.touched_devices
            .lock()
            .expect("touched")
            .push(device_key(platform, device_id));
    }

    /// True when this transaction holds the customer's row lock.
    fn holds_customer(&self, id: &str) -> bool {
        self.locked
            .lock()
            .expect("locked")
            .contains(&format!("customer:{id}"))
    }

    fn is_settled(&self, id: &str) -> bool {
        self.settled.lock().expect("settled").contains(id)
    }

    /// True the first time this transaction asks for the lock `key`.
    fn first_lock(&self, key: String) -> bool {
        self.locked.lock().expect("locked").insert(key)
    }

    fn touch(&self, customer_id: &str) {
        self.touched
            .lock()
            .expect("touched")
            .push(customer_id.to_string());
    }
}

/// SQLite plans a statement with the values bound to it where they matter
/// to the plan (a `LIMIT ?`, as every single-row read has), and marks the
/// prepared statement stale the moment any of them is bound again: every
/// such read was parsed and planned anew on each run, a tenth of a write's
/// CPU. Plans that ignore bound values keep cached statements reusable.
fn stable_query_plans(db: std::ptr::NonNull<libsqlite3_sys::sqlite3>) {
    // SAFETY: `db` is the open handle of a connection locked by the caller
    // for the duration of the call; this option takes two integer-sized
    // arguments (on/off and an out pointer, which may be null).
    let rc = unsafe {
        libsqlite3_sys::sqlite3_db_config(
            db.as_ptr(),
            libsqlite3_sys::SQLITE_DBCONFIG_ENABLE_QPSG,
            1 as std::ffi::c_int,
            std::ptr::null_mut::<std::ffi::c_int>(),
        )
    };
    if rc != libsqlite3_sys::SQLITE_OK {
        tracing::warn!(
            rc,
            "SQLite kept parameter-sensitive plans (statements are re-planned)"
        );
    }
}

/// The PostgreSQL channel on which write transactions name what they wrote.
const CACHE_CHANNEL: &str = "entitle_cache";
/// NOTIFY payloads must stay under 8000 bytes; a bigger write says "all".
const NOTICE_LIMIT: usize = 7900;

/// What a write transaction tells other replicas to drop from their read
/// caches: `None` when it wrote nothing cached.
fn cache_notice(me: &str, customers: &[String], devices: &[String]) -> Option<String> {
    if customers.is_empty() && devices.is_empty() {
        return None;
    }
    let notice = serde_json::json!({ "from": me, "customers": customers, "devices": devices });
    let text = notice.to_string();
    Some(match text.len() > NOTICE_LIMIT {
        true => serde_json::json!({ "from": me, "all": true }).to_string(),
        false => text,
    })
}

/// How long a pooled connection may sit idle before the pool checks it is
/// still alive on handing it out.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(30);

/// The advisory lock key migrations take on PostgreSQL ("entitle" in ASCII).
const MIGRATION_LOCK: i64 = 0x0065_6e74_6974_6c65;

/// A SQLite reader connection's page cache, in SQLite's terms (negative:
/// KiB).
const READER_PAGE_CACHE: &str = "-512";

/// Every SQLite connection's settings.
fn sqlite_connection(
    o: sea_orm::sqlx::sqlite::SqliteConnectOptions,
) -> sea_orm::sqlx::sqlite::SqliteConnectOptions {
    o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
        // A writer of a group commit writes under a savepoint: SQLite
        // keeps the pages it changes there (and those a statement may have
        // to undo) in a sub-journal, which by default spills to a
        // temporary file past 64 KiB, at one write call per page. Here it
        // stays in memory: a few pages per writer, a batch at most.
        .pragma("temp_store", "memory")
}

impl Db {
    /// Connects and brings the schema up to date.
    pub async fn connect(config: &Config) -> anyhow::Result<Db> {
        // Migrate on a pool of its own: SQLite connections that saw the old
        // schema keep it cached and reject statements against the new one
        // ("ON CONFLICT clause does not match"), so the serving pool opens after.
        Self::migrate_only(config).await?;
        Self::connect_only(config).await
    }

    /// Brings the schema up to date on a pool of its own, then closes it.
    pub async fn migrate_only(config: &Config) -> anyhow::Result<()> {
        // One connection: on PostgreSQL the migration lock is held by a
        // session, so taking it and migrating must share that session.
        let migrator = Self::connect_pool(config, 1).await?;
        migrator.migrate().await?;
        migrator
            .conn
            .close()
            .await
            .context("closing the migration pool")
    }

    pub async fn connect_only(config: &Config) -> anyhow::Result<Db> {
        Self::connect_pool(config, config.max_connections()).await
    }

    async fn connect_pool(config: &Config, max_connections: u32) -> anyhow::Result<Db> {
        let mut opts = ConnectOptions::new(config.database_connect_url());
        opts.max_connections(max_connections)
            .min_connections(1)
            .connect_timeout(Duration::from_secs(10))
            .acquire_timeout(Duration::from_secs(10))
            // The pool pinged every connection it handed out: one more round
            // trip (a network one on PostgreSQL, a hop to the connection's
            // thread on SQLite) before every read and every transaction. Only
            // a connection left idle long enough for a server or a firewall to
            // have dropped it is worth asking first.
            .test_before_acquire_if_idle_for(IDLE_BEFORE_PING)
            .sqlx_logging(false);
        let sqlite = !config.is_postgres();
        if sqlite {
            opts.map_sqlx_sqlite_opts(sqlite_connection)
                .map_sqlx_sqlite_pool_opts(|o| {
                    o.after_connect(|conn, _| {
                        Box::pin(async move {
                            let mut handle = conn.lock_handle().await?;
                            stable_query_plans(handle.as_raw_handle());
                            Ok(())
                        })
                    })
                });
        }
        // SQLite: every write transaction runs on one connection of its own.
        // A connection that sees another one's commit throws its whole page
        // cache away, so writers taking turns over the pool's connections
        // re-read and re-allocate every page they touch; the single writer
        // keeps its cache warm (SQLite has one writer at a time anyway).
        let mut writer_opts = opts.clone();
        writer_opts.max_connections(1);
        if sqlite && max_connections > 1 {
            // For the same reason a reader's cache holds little for long
            // while webhooks are being written, yet each would grow to
            // SQLite's default 2 MB: a pool of eight held 15 MB more at the
            // peak than one of four. The file's pages stay in the kernel's
            // cache, and reads are mostly answered from the read cache.
            // (The options' function is replaced, not added to.)
            opts.map_sqlx_sqlite_opts(|o| {
                sqlite_connection(o).pragma("cache_size", READER_PAGE_CACHE)
            });
        }
        // The URL may carry a password: never echo it.
        let mut conn = Database::connect(opts)
            .await
            .context("cannot connect to the database (database_url)")?;
        let stats = DbStats::default();
        let count = |conn: &mut DatabaseConnection| {
            let statements = stats.statements.clone();
            conn.set_metric_callback(move |info| {
                statements.inc();
                // The text only: bound values may be payloads or secrets.
                tracing::trace!(target: "entitle::sql", sql = %info.statement.sql);
            });
        };
        count(&mut conn);
        let postgres = !sqlite;
        let (cache, device_cache) = (
            Arc::new(ReadCache::new(config.cache_ttl())),
            Arc::new(ReadCache::new(config.cache_ttl())),
        );
        let commits = Arc::new(tokio::sync::watch::channel(0).0);
        let after = Arc::new(writer::AfterCommit {
            cache: cache.clone(),
            device_cache: device_cache.clone(),
            commits: commits.clone(),
            write_commits: stats.write_commits.clone(),
            known: Default::default(),
        });
        let writer = match (sqlite, max_connections > 1) {
            (true, true) => {
                let mut w = Database::connect(writer_opts)
                    .await
                    .context("cannot connect to the database (database_url)")?;
                count(&mut w);
                Some(Arc::new(writer::Writer::new(w, true, after.clone())))
            }
            // The pool's one connection: a batch left open would hold it.
            (true, false) => Some(Arc::new(writer::Writer::new(
                conn.clone(),
                false,
                after.clone(),
            ))),
            (false, _) => None,
        };
        if postgres {
            // Until its listener is in place a replica cannot tell what
            // others wrote.
            cache.reset(false);
            device_cache.reset(false);
        } else {
            stats.cache_listening.set(1);
        }
        Ok(Db {
            listener_id: postgres.then(|| {
                use rand::RngCore;
                let mut b = [0u8; 8];
                rand::rng().fill_bytes(&mut b);
                Arc::from(hex::encode(b))
            }),
            stats,
            writer,
            conn,
            cache,
            device_cache,
            commits,
            after,
        })
    }

    /// Brings the schema up to date. On PostgreSQL, replicas started
    /// together against a fresh database would race to create the same
    /// tables and the loser would fail to start: a session advisory lock
    /// makes them take turns, and the later ones find nothing left to do.
    /// Runs on a pool of one connection (`migrate_only`), or the lock and
    /// the migration could land on different sessions.
    async fn migrate(&self) -> anyhow::Result<()> {
        let postgres = self.backend() == DbBackend::Postgres;
        if postgres {
            self.conn
                .execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
                .await
                .context("taking the migration lock")?;
        }
        let result = Migrator::up(&self.conn, None)
            .await
            .context("database migration failed");
        if postgres {
            // Closing the session releases it too; unlock so a long-lived
            // pool does not hold it.
            let _ = self
                .conn
                .execute_unprepared(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
                .await;
        }
        result
    }

    pub fn backend(&self) -> DbBackend {
        self.conn.get_database_backend()
    }

    pub async fn write(&self) -> AppResult<WriteTxn> {
        let (txn, turn) = match &self.writer {
            Some(w) => {
                let (txn, turn) = w.begin().await?;
                (txn, Some((w.clone(), turn)))
            }
            None => (Arc::new(self.conn.begin().await?), None),
        };
        let opening = turn.as_ref().and_then(|(_, t)| t.opening());
        Ok(WriteTxn {
            conn: TxnConn {
                txn,
                opening,
                prefetched: Default::default(),
                ordered: Default::default(),
                statements: self.stats.statements.clone(),
            },
            turn,
            touched: Default::default(),
            touched_devices: Default::default(),
            ensured: Default::default(),
            locked: Default::default(),
            settled: Default::default(),
            notify_as: self.listener_id.clone(),
            notified: Default::default(),
            after: self.after.clone(),
            deferred: Default::default(),
            statements: self.stats.statements.clone(),
        })
    }

    /// PostgreSQL: listens for other replicas' cache notices for as long as
    /// the process runs. The caches stay off until the first LISTEN is in
    /// place, and go off again (emptied) whenever the connection is lost, as
    /// notices sent meanwhile are lost with it. The returned receiver
    /// changes each time the caches come on (empty), so they can be warmed.
    pub fn spawn_cache_listener(&self, url: String) -> tokio::sync::watch::Receiver<u64> {
        let (live_tx, live_rx) = tokio::sync::watch::channel(0u64);
        let Some(me) = self.listener_id.clone() else {
            return live_rx;
        };
        let (cache, devices) = (self.cache.clone(), self.device_cache.clone());
        let listening = self.stats.cache_listening.clone();
        tokio::spawn(async move {
            use sea_orm::sqlx::postgres::PgListener;
            let mut backoff = Duration::from_millis(100);
            loop {
                let mut listener = match PgListener::connect(&url).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "read cache listener: cannot connect; cache off");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                };
                if let Err(e) = listener.listen(CACHE_CHANNEL).await {
                    tracing::warn!(error = %e, "read cache listener: LISTEN failed; cache off");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                backoff = Duration::from_millis(100);
                // Whatever was written before the LISTEN was never heard.
                cache.reset(true);
                devices.reset(true);
                listening.set(1);
                live_tx.send_modify(|n| *n += 1);
                // Ends when the connection is lost: so may notices have been.
                while let Ok(Some(n)) = listener.try_recv().await {
                    apply_cache_notice(&me, n.payload(), &cache, &devices);
                }
                listening.set(0);
                cache.reset(false);
                devices.reset(false);
                tracing::warn!("read cache listener: connection lost; cache off until it is back");
            }
        });
        live_rx
    }

    pub async fn ping(&self) -> bool {
        self.conn.ping().await.is_ok()
    }
}

pub fn purchase_facts(m: &purchases::Model) -> AppResult<PurchaseFacts> {
    FactsRow {
        id: m.id,
        store: m.store.clone(),
        product_id: m.product_id.clone(),
        environment: m.environment.clone(),
        status: m.status.clone(),
        period_type: m.period_type.clone(),
        purchased_at: m.purchased_at,
        expires_at: m.expires_at,
        grace_expires_at: m.grace_expires_at,
        auto_renew: m.auto_renew,
        revoked_at: m.revoked_at,
    }
    .into_facts()
}

pub async fn purchases_of(
    c: &impl ConnectionTrait,
    customer_id: &str,
) -> AppResult<Vec<purchases::Model>> {
    Ok(purchases::Entity::find()
        .filter(purchases::Column::CustomerId.eq(customer_id))
        .order_by_asc(purchases::Column::Id)
        .all(c)
        .await?)
}

/// The columns entitlements are computed from: a purchase row without its
/// store payload, which is large and is read on every write of the customer.
#[derive(sea_orm::FromQueryResult)]
struct FactsRow {
    id: i64,
    store: String,
    product_id: String,
    environment: String,
    status: String,
    period_type: String,
    purchased_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    grace_expires_at: Option<DateTime<Utc>>,
    auto_renew: bool,
    revoked_at: Option<DateTime<Utc>>,
}

impl FactsRow {
    fn into_facts(self) -> AppResult<PurchaseFacts> {
        let id = self.id;
        let parse_err = |e: crate::domain::UnknownValue| {
            AppError::Internal(anyhow::anyhow!("purchase {id}: {e}"))
        };
        Ok(PurchaseFacts {
            id,
            store: self.store.parse().map_err(parse_err)?,
            environment: self.environment.parse().map_err(parse_err)?,
            status: self.status.parse().map_err(parse_err)?,
            period_type: self.period_type.parse().map_err(parse_err)?,
            product_id: self.product_id,
            purchased_at: self.purchased_at,
            expires_at: self.expires_at,
            grace_expires_at: self.grace_expires_at,
            auto_renew: self.auto_renew,
            revoked_at: self.revoked_at,
        })
    }
}

/// The purchases query selecting exactly the columns of [`FactsRow`].
fn facts_query() -> sea_orm::Select<purchases::Entity> {
    use purchases::Column as P;
    purchases::Entity::find()
        .select_only()
        .columns([
            P::Id,
            P::Store,
            P::ProductId,
            P::Environment,
            P::Status,
            P::PeriodType,
            P::PurchasedAt,
            P::ExpiresAt,
            P::GraceExpiresAt,
            P::AutoRenew,
            P::RevokedAt,
        ])
        .order_by_asc(P::Id)
}

pub async fn purchase_facts_of(
    c: &impl ConnectionTrait,
    customer_id: &str,
) -> AppResult<Vec<PurchaseFacts>> {
    let rows = facts_query()
        .filter(purchases::Column::CustomerId.eq(customer_id))
        .into_model::<FactsRow>()
        .all(c)
        .await?;
    rows.into_iter().map(FactsRow::into_facts).collect()
}

/// The purchase facts of several customers at once, by customer (for
/// warming the read cache).
pub async fn purchase_facts_of_many(
    c: &impl ConnectionTrait,
    customer_ids: &[String],
) -> AppResult<std::collections::HashMap<String, Vec<PurchaseFacts>>> {
    #[derive(sea_orm::FromQueryResult)]
    struct Row {
        customer_id: String,
        #[sea_orm(nested)]
        facts: FactsRow,
    }
    let rows = facts_query()
        .column(purchases::Column::CustomerId)
        .filter(purchases::Column::CustomerId.is_in(customer_ids.iter().cloned()))
        .into_model::<Row>()
        .all(c)
        .await?;
    let mut out: std::collections::HashMap<String, Vec<PurchaseFacts>> =
        std::collections::HashMap::new();
    for r in rows {
        out.entry(r.customer_id)
            .or_default()
            .push(r.facts.into_facts()?);
    }
    Ok(out)
}

/// Ids of the most recently created customers, newest first.
pub async fn recent_customer_ids(c: &impl ConnectionTrait, limit: u64) -> AppResult<Vec<String>> {
    Ok(customers::Entity::find()
        .select_only()
        .column(customers::Column::Id)
        .order_by_desc(customers::Column::CreatedAt)
        .limit(limit)
        .into_tuple()
        .all(c)
        .await?)
}

/// Customer rows by id.
pub async fn customers_by_ids(
    c: &impl ConnectionTrait,
    ids: &[String],
) -> AppResult<Vec<customers::Model>> {
    Ok(customers::Entity::find()
        .filter(customers::Column::Id.is_in(ids.iter().cloned()))
        .all(c)
        .await?)
}

/// Row ids of the most recently seen devices, most recent first.
pub async fn recent_device_rows(c: &impl ConnectionTrait, limit: u64) -> AppResult<Vec<i64>> {
    Ok(devices::Entity::find()
        .select_only()
        .column(devices::Column::Id)
        .order_by_desc(devices::Column::LastSeenAt)
        .limit(limit)
        .into_tuple()
        .all(c)
        .await?)
}

/// Device rows by row id.
pub async fn devices_by_rows(
    c: &impl ConnectionTrait,
    rows: &[i64],
) -> AppResult<Vec<devices::Model>> {
    Ok(devices::Entity::find()
        .filter(devices::Column::Id.is_in(rows.iter().copied()))
        .all(c)
        .await?)
}

/// Creates the customer if absent; safe against concurrent creators. A
/// customer this process has seen committed costs no statement.
pub async fn ensure_customer(txn: &WriteTxn, id: &str, now: DateTime<Utc>) -> AppResult<bool> {
    txn.touch(id);
    if txn.after.known.contains(id) || !txn.ensured.lock().expect("ensured").insert(id.to_string())
    {
        return Ok(false);
    }
    let c = &**txn;
    let res = customers::Entity::insert(customers::ActiveModel {
        id: Set(id.to_string()),
        created_at: Set(now),
        attributes: Set(serde_json::json!({})),
        ..Default::default()
    })
    .on_conflict_do_nothing_on([customers::Column::Id])
    .exec_without_returning(c)
    .await?;
    let created = matches!(res, TryInsertResult::Inserted(n) if n > 0);
    if created {
        // Indexed with the customer, so a store message carrying only the
        // token finds them.
        for t in crate::domain::tokens::account_tokens(id) {
            account_tokens::Entity::insert(account_tokens::ActiveModel {
                token: Set(t.hyphenated().to_string()),
                customer_id: Set(id.to_string()),
            })
            .on_conflict_do_nothing_on([account_tokens::Column::Token])
            .exec_without_returning(c)
            .await?;
        }
    }
    Ok(created)
}

/// Reads the customer and, on PostgreSQL, row-locks it for the rest of the
/// transaction, so that concurrent changes to one customer are serialised
/// and each computes its change-log rows against the other's committed state.
/// (SQLite's single writer already serialises them.)
pub async fn lock_customer(txn: &WriteTxn, id: &str) -> AppResult<Option<customers::Model>> {
    txn.touch(id);
    let c = &**txn;
    let mut q = customers::Entity::find_by_id(id.to_string());
    if c.get_database_backend() == DbBackend::Postgres {
        txn.first_lock(format!("customer:{id}"));
        q = q.lock_exclusive();
    }
    Ok(q.one(c).await?)
}

/// Holds the customer for the rest of the transaction without reading it:
/// a row lock on PostgreSQL; on SQLite the single writer already holds
/// everything, so no statement. Either way its cached reads are dropped
/// once the transaction commits.
pub async fn hold_customer(txn: &WriteTxn, id: &str) -> AppResult<()> {
    if txn.get_database_backend() == DbBackend::Postgres && txn.first_lock(format!("customer:{id}"))
    {
        // (A failed statement ends the transaction: no later ask follows.)
        lock_customer(txn, id).await?;
    } else {
        txn.touch(id);
    }
    Ok(())
}

/// Serialises, on PostgreSQL, every transaction that applies one store
/// purchase: its owner is only known after reading the row, so the customer
/// lock alone would let two first sightings both try to insert it. (SQLite's
/// single writer already serialises them.)
pub async fn lock_store_purchase(
    txn: &WriteTxn,
    store: &str,
    store_purchase_id: &str,
) -> AppResult<()> {
    let c = &**txn;
    if c.get_database_backend() == DbBackend::Postgres
        && txn.first_lock(format!("purchase:{store}:{store_purchase_id}"))
    {
        c.execute_raw(sea_orm::Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            [format!("{store}:{store_purchase_id}").into()],
        ))
        .await?;
    }
    Ok(())
}

/// [`hold_customer`] then [`lock_store_purchase`], in that order, as one
/// statement on PostgreSQL when neither is held yet: one round trip for
/// both, with the same lock order as the two calls.
pub async fn hold_customer_and_store_purchase(
    txn: &WriteTxn,
    customer: &str,
    store: &str,
    store_purchase_id: &str,
) -> AppResult<()> {
    let customer_key = format!("customer:{customer}");
    let purchase_key = format!("purchase:{store}:{store_purchase_id}");
    let both = txn.get_database_backend() == DbBackend::Postgres && {
        let locked = txn.locked.lock().expect("locked");
        !locked.contains(&customer_key) && !locked.contains(&purchase_key)
    };
    if !both {
        hold_customer(txn, customer).await?;
        return lock_store_purchase(txn, store, store_purchase_id).await;
    }
    txn.first_lock(customer_key);
    txn.first_lock(purchase_key);
    txn.touch(customer);
    // The row lock is the CASE's condition, so it is taken (or waited for)
    // before the advisory lock, whatever the plan; a missing row locks
    // nothing, as `SELECT ... FOR UPDATE` alone would.
    txn.execute_raw(sea_orm::Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT CASE WHEN (SELECT count(*) FROM \
           (SELECT 1 FROM customers WHERE id = $1 FOR UPDATE) c) >= 0 \
         THEN pg_advisory_xact_lock(hashtextextended($2, 0)) END",
        [
            customer.into(),
            format!("{store}:{store_purchase_id}").into(),
        ],
    ))
    .await?;
    Ok(())
}

/// The customer an id names now: itself, or the account it was merged
/// into. Every path that takes a customer id from outside (reads, device
/// registration, purchases, webhooks, payment links) goes through here, so an
/// old id keeps landing on the account.
pub async fn resolve_customer(c: &impl ConnectionTrait, id: &str) -> AppResult<String> {
    Ok(customer_aliases::Entity::find_by_id(id.to_string())
        .select_only()
        .column(customer_aliases::Column::CustomerId)
        .into_tuple::<String>()
        .one(c)
        .await?
        .unwrap_or_else(|| id.to_string()))
}

/// The row of the customer `id` names after following a merge, in one
/// statement (a read-cache miss is on the hot path): `None` when there is
/// no such customer.
pub async fn resolved_customer_row(
    c: &impl ConnectionTrait,
    id: &str,
) -> AppResult<Option<customers::Model>> {
    let resolved = match c.get_database_backend() {
        DbBackend::Postgres => Expr::cust_with_values(
            "COALESCE((SELECT customer_id FROM customer_aliases WHERE alias_id = $1), $2)",
            [id, id],
        ),
        _ => Expr::cust_with_values(
            "COALESCE((SELECT customer_id FROM customer_aliases WHERE alias_id = ?), ?)",
            [id, id],
        ),
    };
    Ok(customers::Entity::find()
        .filter(Expr::col(customers::Column::Id).eq(resolved))
        .one(c)
        .await?)
}

/// Resolves `id` and locks the customer it names; see [`lock_canonical`].
pub async fn lock_resolved_customer(txn: &WriteTxn, id: &str) -> AppResult<String> {
    let resolved = resolve_customer(&**txn, id).await?;
    lock_canonical(txn, &resolved).await
}

/// [`purchase::lookup_store_id`] in a write transaction. A bound customer
/// the transaction held locked when the lookup found it unmerged is settled:
/// [`lock_canonical`] needs no second look at it.
pub async fn lookup_store_id_in(
    txn: &WriteTxn,
    store: &str,
    store_purchase_id: &str,
    bound: Option<&str>,
) -> AppResult<purchase::StoreIdLookup> {
    // Asked before the lookup runs: a lock taken after it proves nothing.
    let held = bound.filter(|b| txn.holds_customer(b)).map(str::to_string);
    // On SQLite the single writer holds every customer; on PostgreSQL the
    // facts read with the lookup are the ones a write would read only if
    // their owner's lock was held before it ran (no other write to them can
    // commit in between). Without the bound customer held, the owner is
    // rarely held either, and the facts would be read for nothing.
    let sqlite = txn.get_database_backend() == DbBackend::Sqlite;
    let lookup = if sqlite || held.is_some() {
        let (lookup, facts) =
            purchase::lookup_store_id_with_facts(&**txn, store, store_purchase_id, bound).await?;
        if sqlite {
            // Counted as the statement it is, though it travelled with the lookup.
            txn.statements.inc();
        }
        if let Some(owner) = lookup.candidate_owner()
            && (sqlite || txn.holds_customer(owner))
        {
            *txn.conn.prefetched.lock().expect("prefetched") = Some((owner.to_string(), facts));
        }
        lookup
    } else {
        purchase::lookup_store_id(&**txn, store, store_purchase_id, bound).await?
    };
    if let (Some(h), Some((_, r))) = (held, &lookup.bound)
        && h == *r
    {
        txn.settled.lock().expect("settled").insert(h);
    }
    Ok(lookup)
}

/// Locks a customer id already resolved, returning the id that holds once
/// locked. On PostgreSQL a merge of that customer holds its row lock, so
/// resolving again once the lock is held sees an alias the merge just
/// committed. SQLite's single writer means nothing moved since the resolve.
pub async fn lock_canonical(txn: &WriteTxn, resolved: &str) -> AppResult<String> {
    if txn.get_database_backend() != DbBackend::Postgres {
        txn.touch(resolved);
        return Ok(resolved.to_string());
    }
    let mut current = resolved.to_string();
    // Aliases are one hop and never form a cycle; the bound is a guard.
    for _ in 0..4 {
        hold_customer(txn, &current).await?;
        if txn.is_settled(&current) {
            return Ok(current);
        }
        let again = resolve_customer(&**txn, &current).await?;
        if again == current {
            return Ok(current);
        }
        current = again;
    }
    Err(AppError::Internal(anyhow::anyhow!(
        "customer alias chain does not settle"
    )))
}

pub async fn find_device(
    c: &impl ConnectionTrait,
    platform: &str,
    device_id: &str,
) -> AppResult<Option<devices::Model>> {
    Ok(devices::Entity::find()
        .filter(devices::Column::Platform.eq(platform))
        .filter(devices::Column::DeviceId.eq(device_id))
        .one(c)
        .await?)
}

/// Appends the change-log rows of one state change, in the caller's transaction.
pub async fn record_changes(
    c: &impl ConnectionTrait,
    customer_id: &str,
    changes: &[Change],
    now: DateTime<Utc>,
) -> AppResult<()> {
    let dated: Vec<(Change, DateTime<Utc>)> = changes.iter().map(|ch| (ch.clone(), now)).collect();
    record_dated_changes(c, customer_id, &dated).await
}

/// [`record_changes`] in a write transaction, sent with its next
/// statement that must go anyway (see [`WriteTxn::defer`]).
pub async fn record_changes_deferred(
    txn: &WriteTxn,
    customer_id: &str,
    changes: &[Change],
    now: DateTime<Utc>,
) -> AppResult<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let rows = changes.iter().map(|ch| change_row(customer_id, ch, now));
    let stmt = sea_orm::QueryTrait::build(
        &entitlement_events::Entity::insert_many(rows),
        txn.get_database_backend(),
    );
    txn.defer(stmt).await
}

fn change_row(
    customer_id: &str,
    ch: &Change,
    at: DateTime<Utc>,
) -> entitlement_events::ActiveModel {
    entitlement_events::ActiveModel {
        customer_id: Set(customer_id.to_string()),
        entitlement: Set(ch.entitlement.clone()),
        kind: Set(ch.kind.as_str().to_string()),
        old_status: Set(ch.old_status.map(str::to_string)),
        new_status: Set(ch.new_status.to_string()),
        reason: Set(Some(ch.reason.to_string())),
        purchase_id: Set(ch.purchase_id),
        occurred_at: Set(at),
        published_at: Set(None),
        outbound_queued_at: Set(None),
        ..Default::default()
    }
}

/// Appends change-log rows each dated at its own instant.
pub async fn record_dated_changes(
    c: &impl ConnectionTrait,
    customer_id: &str,
    changes: &[(Change, DateTime<Utc>)],
) -> AppResult<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let rows = changes
        .iter()
        .map(|(ch, at)| change_row(customer_id, ch, *at));
    entitlement_events::Entity::insert_many(rows)
        .exec_without_returning(c)
        .await?;
    Ok(())
}

/// The newest status the change log holds for one of a customer's entitlements.
pub async fn last_logged_status(
    c: &impl ConnectionTrait,
    customer_id: &str,
    entitlement: &str,
) -> AppResult<Option<String>> {
    Ok(entitlement_events::Entity::find()
        .select_only()
        .column(entitlement_events::Column::NewStatus)
        .filter(entitlement_events::Column::CustomerId.eq(customer_id))
        .filter(entitlement_events::Column::Entitlement.eq(entitlement))
        .order_by_desc(entitlement_events::Column::Id)
        .limit(1)
        .into_tuple::<String>()
        .one(c)
        .await?)
}

pub async fn devices_of(
    c: &impl ConnectionTrait,
    customer_id: &str,
) -> AppResult<Vec<devices::Model>> {
    Ok(devices::Entity::find()
        .filter(devices::Column::CustomerId.eq(customer_id))
        .order_by_asc(devices::Column::Id)
        .all(c)
        .await?)
}

pub async fn receipts_of(
    c: &impl ConnectionTrait,
    customer_id: &str,
    limit: u64,
) -> AppResult<Vec<entities::receipts::Model>> {
    use entities::receipts;
    Ok(receipts::Entity::find()
        .filter(receipts::Column::CustomerId.eq(customer_id))
        .order_by_desc(receipts::Column::Id)
        .limit(limit)
        .all(c)
        .await?)
}

pub async fn events_of(
    c: &impl ConnectionTrait,
    customer_id: &str,
    limit: u64,
) -> AppResult<Vec<entitlement_events::Model>> {
    Ok(entitlement_events::Entity::find()
        .filter(entitlement_events::Column::CustomerId.eq(customer_id))
        .order_by_desc(entitlement_events::Column::Id)
        .limit(limit)
        .all(c)
        .await?)
}

/// One page of customers ordered by id, after the cursor `after`, that
/// `search` finds: by customer id prefix (or a merged-away id), device id,
/// store purchase id (Apple original transaction id, Play purchase token,
/// Stripe subscription or session id), Play order id, Stripe customer id or
/// e-mail. Each exact key has its own index. Fetches one extra row to tell
/// whether more follow.
pub async fn customers_page(
    c: &impl ConnectionTrait,
    search: Option<&str>,
    after: Option<&str>,
    first: u64,
) -> AppResult<(Vec<customers::Model>, bool)> {
    use entities::{customer_aliases, purchase_aliases};
    use sea_orm::sea_query::{Condition, Query};
    let mut q = customers::Entity::find().order_by_asc(customers::Column::Id);
    if let Some(s) = search.map(str::trim).filter(|s| !s.is_empty()) {
        // Escape LIKE's wildcards so a search for `a_b` means exactly that.
        let escaped = s
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        let id = || Expr::col((customers::Entity, customers::Column::Id));
        let purchases_where = |col: purchases::Column, value: &str| {
            Query::select()
                .column(purchases::Column::CustomerId)
                .from(purchases::Entity)
                .and_where(Expr::col(col).eq(value))
                .to_owned()
        };
        let any = Condition::any()
            .add(id().like(LikeExpr::new(format!("{escaped}%")).escape('\\')))
            .add(customers::Column::StripeCustomerId.eq(s))
            .add(customers::Column::Email.eq(s.to_lowercase()))
            .add(
                id().in_subquery(
                    Query::select()
                        .column(devices::Column::CustomerId)
                        .from(devices::Entity)
                        .and_where(devices::Column::DeviceId.eq(s))
                        .to_owned(),
                ),
            )
            .add(id().in_subquery(purchases_where(purchases::Column::StorePurchaseId, s)))
            .add(id().in_subquery(purchases_where(
                purchases::Column::OrderId,
                crate::providers::google::base_order_id(s),
            )))
            // A Play token replaced by a newer one still finds its owner.
            .add(
                id().in_subquery(
                    Query::select()
                        .column((purchases::Entity, purchases::Column::CustomerId))
                        .from(purchases::Entity)
                        .inner_join(
                            purchase_aliases::Entity,
                            Expr::col((
                                purchase_aliases::Entity,
                                purchase_aliases::Column::PurchaseId,
                            ))
                            .equals((purchases::Entity, purchases::Column::Id)),
                        )
                        .and_where(
                            Expr::col((
                                purchase_aliases::Entity,
                                purchase_aliases::Column::StorePurchaseId,
                            ))
                            .eq(s),
                        )
                        .to_owned(),
                ),
            )
            .add(
                id().in_subquery(
                    Query::select()
                        .column(customer_aliases::Column::CustomerId)
                        .from(customer_aliases::Entity)
                        .and_where(customer_aliases::Column::AliasId.eq(s))
                        .to_owned(),
                ),
            );
        q = q.filter(any);
    }
    if let Some(a) = after {
        q = q.filter(customers::Column::Id.gt(a));
    }
    let mut rows = q.limit(first + 1).all(c).await?;
    let more = rows.len() as u64 > first;
    rows.truncate(first as usize);
    Ok((rows, more))
}

/// A fresh, empty database on each backend the tests have: SQLite always,
/// PostgreSQL when `ENTITLE_TEST_POSTGRES_URL` names a server.
#[cfg(test)]
pub(crate) async fn fresh_test_database_urls(dir: &std::path::Path) -> Vec<String> {
    let mut urls = vec![format!("sqlite://{}?mode=rwc", dir.join("t.db").display())];
    if let Ok(pg) = std::env::var("ENTITLE_TEST_POSTGRES_URL") {
        let name = format!("entitle_t_{:016x}", rand::random::<u64>());
        let admin = Database::connect(pg.as_str()).await.unwrap();
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        admin.close().await.unwrap();
        let mut url = url::Url::parse(&pg).unwrap();
        url.set_path(&name);
        urls.push(url.to_string());
    }
    urls
}

#[cfg(test)]
mod tests {
    use sea_orm::{ConnectionTrait, PaginatorTrait, Statement};

    use super::*;

    async fn cache_size(c: &impl ConnectionTrait) -> i64 {
        let row = c
            .query_one_raw(Statement::from_string(
                c.get_database_backend(),
                "PRAGMA cache_size",
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get_by_index(0).unwrap()
    }

    /// Readers keep a small page cache; the one writer keeps SQLite's
    /// default, which its transactions reuse.
    #[tokio::test]
    async fn sqlite_readers_keep_a_small_page_cache_and_the_writer_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.database_url = crate::config::Secret::new(format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("t.db").display()
        ));
        let db = Db::connect_only(&config).await.unwrap();
        let reader = READER_PAGE_CACHE.parse::<i64>().unwrap();
        assert_eq!(cache_size(&db.conn).await, reader);
        let txn = db.write().await.unwrap();
        let writer = cache_size(&*txn).await;
        assert_ne!(writer, reader);
        assert_eq!(writer, -2000, "SQLite's default");
    }

    async fn fresh_dbs(dir: &std::path::Path) -> Vec<Db> {
        connect_all(super::fresh_test_database_urls(dir).await).await
    }

    /// The fresh database of one backend, if the tests have it.
    async fn fresh_dbs_of(dir: &std::path::Path, backend: DbBackend) -> Vec<Db> {
        let urls = super::fresh_test_database_urls(dir).await;
        let sqlite = |u: &String| u.starts_with("sqlite:");
        let urls = urls
            .into_iter()
            .filter(|u| sqlite(u) == (backend == DbBackend::Sqlite));
        connect_all(urls.collect()).await
    }

    async fn connect_all(urls: Vec<String>) -> Vec<Db> {
        let mut dbs = Vec::new();
        for u in urls {
            let mut config = Config::default();
            config.database_url = crate::config::Secret::new(u);
            dbs.push(Db::connect(&config).await.unwrap());
        }
        dbs
    }

    fn statements(db: &Db) -> u64 {
        db.stats.statements.get()
    }

    /// A customer becomes known once its creation commits; a known one
    /// costs no statement, one rolled back is created again.
    #[tokio::test]
    async fn a_customer_is_known_once_its_creation_commits() {
        let dir = tempfile::tempdir().unwrap();
        for db in fresh_dbs(dir.path()).await {
            let now = Utc::now();
            let txn = db.write().await.unwrap();
            assert!(ensure_customer(&txn, "c1", now).await.unwrap());
            drop(txn);
            let txn = db.write().await.unwrap();
            assert!(
                ensure_customer(&txn, "c1", now).await.unwrap(),
                "the first insert was rolled back"
            );
            txn.commit().await.unwrap();
            let txn = db.write().await.unwrap();
            let before = statements(&db);
            assert!(!ensure_customer(&txn, "c1", now).await.unwrap());
            assert_eq!(statements(&db), before, "{:?}", db.backend());
            txn.commit().await.unwrap();
        }
    }

    #[test]
    fn parameters_are_renumbered_outside_quoted_text() {
        assert_eq!(
            renumber_parameters(
                r#"UPDATE "t$1" SET a = $1, b = '$2' || $2::text WHERE c = $10"#,
                3
            ),
            r#"UPDATE "t$1" SET a = $4, b = '$2' || $5::text WHERE c = $13"#
        );
    }

    /// Recording a customer's Stripe customer keeps their other attributes
    /// and e-mail, sets the indexed column, and is one statement whether or
    /// not it changes anything (on SQLite, sent with the commit).
    #[tokio::test]
    async fn the_stripe_customer_is_recorded_in_one_statement() {
        let dir = tempfile::tempdir().unwrap();
        for db in fresh_dbs(dir.path()).await {
            let txn = db.write().await.unwrap();
            ensure_customer(&txn, "c1", Utc::now()).await.unwrap();
            customers::Entity::update_many()
                .col_expr(
                    customers::Column::Attributes,
                    sea_orm::sea_query::Expr::value(serde_json::json!({ "plan": "team" })),
                )
                .col_expr(
                    customers::Column::Email,
                    sea_orm::sea_query::Expr::value("old@example.com"),
                )
                .filter(customers::Column::Id.eq("c1"))
                .exec(&*txn)
                .await
                .unwrap();
            txn.commit().await.unwrap();
            for (sc, email, want_email) in [
                ("cus_1", None, "old@example.com"),
                ("cus_1", None, "old@example.com"),
                ("cus_2", Some("new@example.com"), "new@example.com"),
                ("cus_2", None, "new@example.com"),
            ] {
                let txn = db.write().await.unwrap();
                let before = statements(&db);
                store_purchases::remember_stripe_customer(
                    &txn,
                    "c1",
                    "stripe_customer_id",
                    sc,
                    email,
                )
                .await
                .unwrap();
                txn.commit().await.unwrap();
                assert_eq!(statements(&db) - before, 1, "{:?}", db.backend());
                let c = customers::Entity::find_by_id("c1".to_string())
                    .one(&db.conn)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    c.attributes,
                    serde_json::json!({ "plan": "team", "stripe_customer_id": sc }),
                    "{:?}",
                    db.backend()
                );
                assert_eq!(c.stripe_customer_id.as_deref(), Some(sc));
                assert_eq!(c.email.as_deref(), Some(want_email));
            }
        }
    }

    /// Change-log rows deferred in a write reach the database with the
    /// claim that follows them (one call on SQLite, each still counted), or
    /// at the commit; a write rolled back leaves none.
    #[tokio::test]
    async fn deferred_change_log_rows_travel_with_the_claim() {
        use crate::domain::{Change, EventKind};
        let dir = tempfile::tempdir().unwrap();
        for db in fresh_dbs(dir.path()).await {
            let change = Change {
                entitlement: "pro".into(),
                kind: EventKind::Granted,
                old_status: None,
                new_status: crate::domain::STATUS_ACTIVE,
                reason: EventKind::Granted.as_str(),
                purchase_id: None,
            };
            let logged = |db: &Db| {
                let conn = db.conn.clone();
                async move {
                    entitlement_events::Entity::find()
                        .count(&conn)
                        .await
                        .unwrap()
                }
            };
            let claim = |id: &'static str| webhook_claim::Claim {
                source: "stripe",
                event_id: id,
                payload: &serde_json::Value::Null,
                outcome: "applied",
                customer_id: Some("c1"),
                at: Utc::now(),
            };
            let txn = db.write().await.unwrap();
            ensure_customer(&txn, "c1", Utc::now()).await.unwrap();
            record_changes_deferred(&txn, "c1", std::slice::from_ref(&change), Utc::now())
                .await
                .unwrap();
            let before = statements(&db);
            assert!(
                webhook_claim::insert_new(&txn, claim("evt_1"))
                    .await
                    .unwrap()
            );
            // The row deferred and the claim, counted apart though sent
            // together.
            assert_eq!(statements(&db) - before, 2, "{:?}", db.backend());
            txn.commit().await.unwrap();
            assert_eq!(logged(&db).await, 1);

            // A second claim of the same event: nothing claimed, and the
            // rows deferred before it go when the write is rolled back.
            let txn = db.write().await.unwrap();
            record_changes_deferred(&txn, "c1", std::slice::from_ref(&change), Utc::now())
                .await
                .unwrap();
            assert!(
                !webhook_claim::insert_new(&txn, claim("evt_1"))
                    .await
                    .unwrap()
            );
            txn.abandon().await.unwrap();
            assert_eq!(logged(&db).await, 1);

            // Deferred with no claim after them: written at the commit.
            let txn = db.write().await.unwrap();
            record_changes_deferred(&txn, "c1", std::slice::from_ref(&change), Utc::now())
                .await
                .unwrap();
            txn.commit().await.unwrap();
            assert_eq!(logged(&db).await, 2);
        }
    }

    /// Locks a transaction already holds are not asked for again (on
    /// SQLite the single writer holds everything: none are asked for).
    #[tokio::test]
    async fn a_transaction_takes_each_lock_once() {
        let dir = tempfile::tempdir().unwrap();
        for db in fresh_dbs(dir.path()).await {
            let txn = db.write().await.unwrap();
            ensure_customer(&txn, "c2", Utc::now()).await.unwrap();
            txn.commit().await.unwrap();
            let txn = db.write().await.unwrap();
            let before = statements(&db);
            for _ in 0..2 {
                hold_customer(&txn, "c2").await.unwrap();
                lock_store_purchase(&txn, "stripe", "sub_1").await.unwrap();
            }
            let held = statements(&db) - before;
            assert_eq!(lock_canonical(&txn, "c2").await.unwrap(), "c2");
            let after_canonical = statements(&db) - before;
            lock_customer(&txn, "c2").await.unwrap();
            hold_customer(&txn, "c2").await.unwrap();
            let total = statements(&db) - before;
            txn.commit().await.unwrap();
            match db.backend() {
                DbBackend::Postgres => {
                    assert_eq!(held, 2, "one customer lock, one purchase lock");
                    // Resolving again under the lock still reads the alias.
                    assert_eq!(after_canonical, 3);
                    // A read is always made; holding again is not.
                    assert_eq!(total, 4);
                }
                _ => {
                    assert_eq!(held, 0);
                    assert_eq!(after_canonical, 0);
                    assert_eq!(total, 1, "the read");
                }
            }
        }
    }

    /// A bound customer the lookup found unmerged while its lock was held
    /// needs no second resolve; one looked up before its lock was taken, or
    /// found merged, does.
    #[tokio::test]
    async fn a_customer_found_unmerged_under_its_lock_is_not_resolved_again() {
        let dir = tempfile::tempdir().unwrap();
        for db in fresh_dbs(dir.path()).await {
            let now = Utc::now();
            let txn = db.write().await.unwrap();
            for c in ["held", "later", "merged", "into"] {
                ensure_customer(&txn, c, now).await.unwrap();
            }
            customer::add_alias(&*txn, "merged", "into", now)
                .await
                .unwrap();
            txn.commit().await.unwrap();
            let pg = db.backend() == DbBackend::Postgres;
            let txn = db.write().await.unwrap();
            // Locked first, then found unmerged.
            hold_customer(&txn, "held").await.unwrap();
            lookup_store_id_in(&txn, "stripe", "sub_a", Some("held"))
                .await
                .unwrap();
            let before = statements(&db);
            assert_eq!(lock_canonical(&txn, "held").await.unwrap(), "held");
            assert_eq!(statements(&db) - before, 0, "settled: no resolve");
            // Found unmerged before its lock was taken: resolved again.
            lookup_store_id_in(&txn, "stripe", "sub_b", Some("later"))
                .await
                .unwrap();
            let before = statements(&db);
            assert_eq!(lock_canonical(&txn, "later").await.unwrap(), "later");
            assert_eq!(
                statements(&db) - before,
                if pg { 2 } else { 0 },
                "lock, then resolve"
            );
            // Held and found merged: the account is locked and resolved.
            hold_customer(&txn, "merged").await.unwrap();
            let look = lookup_store_id_in(&txn, "stripe", "sub_c", Some("merged"))
                .await
                .unwrap();
            assert_eq!(look.resolved("merged"), Some("into"));
            let before = statements(&db);
            assert_eq!(lock_canonical(&txn, "into").await.unwrap(), "into");
            assert_eq!(statements(&db) - before, if pg { 2 } else { 0 });
            txn.commit().await.unwrap();
        }
    }

    /// Customers `owner`, `into`, and `merged`, merged into `into`.
    /// [`owner_and_merged_customers`], with a Play purchase for each
    /// (customer, token).
    async fn owned_purchases(txn: &WriteTxn, now: DateTime<Utc>, owned: &[(&str, &str)]) {
        owner_and_merged_customers(txn, now).await;
        for (customer, token) in owned {
            purchase::insert(&**txn, play_purchase(customer, token, now, None))
                .await
                .unwrap();
        }
    }

    async fn owner_and_merged_customers(txn: &WriteTxn, now: DateTime<Utc>) {
        for c in ["owner", "merged", "into"] {
            ensure_customer(txn, c, now).await.unwrap();
        }
        customer::add_alias(&**txn, "merged", "into", now)
            .await
            .unwrap();
    }

    /// An active Play purchase of `customer` under `token`.
    fn play_purchase(
        customer: &str,
        token: &str,
        now: DateTime<Utc>,
        raw: Option<serde_json::Value>,
    ) -> purchase::PurchaseFields {
        purchase::PurchaseFields {
            customer_id: customer.into(),
            store: "play_store".into(),
            store_purchase_id: token.into(),
            product_id: "p".into(),
            environment: "production".into(),
            status: "active".into(),
            period_type: "normal".into(),
            purchased_at: now,
            expires_at: None,
            grace_expires_at: None,
            auto_renew: true,
            canceled_at: None,
            revoked_at: None,
            renewal_count: 0,
            source_updated_at: now,
            raw,
            order_id: None,
        }
    }

    /// SQLite: a store id lookup in a write brings, in the same call, the
    /// purchase facts of the customer the purchase would go to (its row's
    /// owner, else the binding's account). They serve that customer's next
    /// facts read, once, and only while nothing but reads ran since.
    #[tokio::test]
    async fn a_lookup_brings_its_owners_facts_until_something_is_written() {
        let dir = tempfile::tempdir().unwrap();
        for db in fresh_dbs_of(dir.path(), DbBackend::Sqlite).await {
            let now = Utc::now();
            let txn = db.write().await.unwrap();
            owned_purchases(&txn, now, &[("owner", "tok-owner"), ("into", "tok-into")]).await;
            let facts = |c: &'static str| {
                let txn = &txn;
                async move { purchase_facts_of(&**txn, c).await.unwrap() }
            };
            let (owner, into) = (facts("owner").await, facts("into").await);
            assert_eq!((owner.len(), into.len()), (1, 1));
            let before = statements(&db);
            lookup_store_id_in(&txn, "play_store", "tok-owner", None)
                .await
                .unwrap();
            assert_eq!(statements(&db) - before, 2, "counted as two statements");
            assert_eq!(txn.take_prefetched_facts("owner"), Some(owner.clone()));
            assert_eq!(txn.take_prefetched_facts("owner"), None, "once");
            // No row yet: the binding's account.
            lookup_store_id_in(&txn, "play_store", "tok-new", Some("merged"))
                .await
                .unwrap();
            facts("owner").await;
            assert_eq!(
                txn.take_prefetched_facts("into"),
                Some(into.clone()),
                "a read since changes nothing"
            );
            lookup_store_id_in(&txn, "play_store", "tok-new", Some("merged"))
                .await
                .unwrap();
            ensure_customer(&txn, "someone", now).await.unwrap();
            assert_eq!(txn.take_prefetched_facts("into"), None, "a write since");
            lookup_store_id_in(&txn, "play_store", "tok-owner", None)
                .await
                .unwrap();
            assert_eq!(txn.take_prefetched_facts("into"), None, "not the owner");
            lookup_store_id_in(&txn, "play_store", "tok-new", None)
                .await
                .unwrap();
            assert_eq!(txn.take_prefetched_facts("owner"), None, "nobody's");
            txn.commit().await.unwrap();
        }
    }

    /// PostgreSQL: the facts come with the lookup only for an owner whose
    /// lock was held when it ran (no other write to them can commit in
    /// between), in the lookup's own statement.
    #[tokio::test]
    async fn on_postgres_a_lookup_brings_the_facts_of_a_held_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        for db in fresh_dbs_of(dir.path(), DbBackend::Postgres).await {
            let now = Utc::now();
            let txn = db.write().await.unwrap();
            owned_purchases(
                &txn,
                now,
                &[
                    ("owner", "tok-owner"),
                    ("owner", "tok-2"),
                    ("into", "tok-into"),
                ],
            )
            .await;
            txn.commit().await.unwrap();
            let owner = purchase_facts_of(&db.conn, "owner").await.unwrap();
            let into = purchase_facts_of(&db.conn, "into").await.unwrap();
            assert_eq!((owner.len(), into.len()), (2, 1));

            let txn = db.write().await.unwrap();
            let before = statements(&db);
            lookup_store_id_in(&txn, "play_store", "tok-owner", Some("owner"))
                .await
                .unwrap();
            assert_eq!(txn.take_prefetched_facts("owner"), None, "not held");
            hold_customer(&txn, "owner").await.unwrap();
            let lookup = lookup_store_id_in(&txn, "play_store", "tok-owner", Some("owner"))
                .await
                .unwrap();
            assert_eq!(statements(&db) - before, 3, "two lookups and a lock");
            assert_eq!(lookup.row.unwrap().customer_id, "owner");
            assert_eq!(txn.take_prefetched_facts("owner"), Some(owner.clone()));
            assert_eq!(txn.take_prefetched_facts("owner"), None, "once");

            // A new token bound to a merged id: the account's facts, once
            // the account is held too.
            hold_customer(&txn, "merged").await.unwrap();
            lookup_store_id_in(&txn, "play_store", "tok-new", Some("merged"))
                .await
                .unwrap();
            assert_eq!(txn.take_prefetched_facts("into"), None, "into not held");
            hold_customer(&txn, "into").await.unwrap();
            lookup_store_id_in(&txn, "play_store", "tok-new", Some("merged"))
                .await
                .unwrap();
            assert_eq!(txn.take_prefetched_facts("into"), Some(into.clone()));
            // A customer with no purchase: none, rather than nothing known.
            lookup_store_id_in(&txn, "play_store", "tok-none", Some("owner"))
                .await
                .unwrap();
            ensure_customer(&txn, "empty", now).await.unwrap();
            hold_customer(&txn, "empty").await.unwrap();
            lookup_store_id_in(&txn, "play_store", "tok-none", Some("empty"))
                .await
                .unwrap();
            assert_eq!(txn.take_prefetched_facts("empty"), Some(Vec::new()));
            txn.commit().await.unwrap();
        }
    }

    /// PostgreSQL: a lookup that finds no row takes the new row's id from
    /// the sequence in the same statement, once however many facts come
    /// with it, so the insert can travel with the claim; the row reads as
    /// it was built.
    #[tokio::test]
    async fn on_postgres_a_new_purchase_takes_its_id_with_the_lookup() {
        let dir = tempfile::tempdir().unwrap();
        for db in fresh_dbs_of(dir.path(), DbBackend::Postgres).await {
            let now = Utc::now();
            let txn = db.write().await.unwrap();
            owned_purchases(&txn, now, &[("owner", "tok-1"), ("owner", "tok-2")]).await;
            txn.commit().await.unwrap();

            let txn = db.write().await.unwrap();
            hold_customer(&txn, "owner").await.unwrap();
            let known = lookup_store_id_in(&txn, "play_store", "tok-1", Some("owner"))
                .await
                .unwrap();
            assert_eq!(known.next_id, None, "a stored row keeps its id");
            let first = lookup_store_id_in(&txn, "play_store", "tok-new", Some("owner"))
                .await
                .unwrap();
            assert_eq!(txn.take_prefetched_facts("owner").map(|f| f.len()), Some(2));
            let again = lookup_store_id_in(&txn, "play_store", "tok-new", Some("owner"))
                .await
                .unwrap();
            let id = first.next_id.expect("an id for the new row");
            assert!(id > known.row.unwrap().id);
            assert_eq!(
                again.next_id,
                Some(id + 1),
                "one id per lookup, not per row"
            );

            let raw = serde_json::json!({"n": 1});
            let row = play_purchase("owner", "tok-new", now, Some(raw));
            let written = purchase::insert_deferred(&txn, id, row).await.unwrap();
            assert_eq!(written.id, id);
            let before = statements(&db);
            let claim = webhook_claim::Claim {
                source: "play_store",
                event_id: "e-new",
                payload: &serde_json::Value::Null,
                outcome: "applied",
                customer_id: Some("owner"),
                at: now,
            };
            assert!(webhook_claim::insert_new(&txn, claim).await.unwrap());
            assert_eq!(statements(&db) - before, 2, "the insert and the claim");
            txn.commit().await.unwrap();
            let stored = purchase::find_by_store_id(&db.conn, "play_store", "tok-new")
                .await
                .unwrap()
                .unwrap();
            assert_eq!(stored, written, "the row as it was built");

            // Read back in the transaction: sent ahead of the read.
            let txn = db.write().await.unwrap();
            hold_customer(&txn, "owner").await.unwrap();
            let next = lookup_store_id_in(&txn, "play_store", "tok-3", Some("owner"))
                .await
                .unwrap()
                .next_id
                .unwrap();
            let row = play_purchase("owner", "tok-3", now, None);
            let written = purchase::insert_deferred(&txn, next, row).await.unwrap();
            let read = purchase_facts_of(&*txn, "owner").await.unwrap();
            assert_eq!(read.len(), 4);
            assert_eq!(read.last().unwrap().id, written.id);
            drop(txn);
            let after = purchase::find_by_store_id(&db.conn, "play_store", "tok-3").await;
            assert!(after.unwrap().is_none(), "rolled back with the rest");
        }
    }

    /// The customer lock and the store purchase lock a Stripe event takes
    /// go in one statement on PostgreSQL, and both are held after it.
    #[tokio::test]
    async fn a_customer_and_its_store_purchase_are_locked_in_one_statement() {
        let dir = tempfile::tempdir().unwrap();
        for db in fresh_dbs(dir.path()).await {
            let txn = db.write().await.unwrap();
            ensure_customer(&txn, "c2", Utc::now()).await.unwrap();
            txn.commit().await.unwrap();
            let txn = db.write().await.unwrap();
            let before = statements(&db);
            hold_customer_and_store_purchase(&txn, "c2", "stripe", "sub_1")
                .await
                .unwrap();
            let both = statements(&db) - before;
            hold_customer(&txn, "c2").await.unwrap();
            lock_store_purchase(&txn, "stripe", "sub_1").await.unwrap();
            // Held already: the pair again costs what each lock does.
            hold_customer_and_store_purchase(&txn, "c2", "stripe", "sub_1")
                .await
                .unwrap();
            // No customer row: the purchase is locked all the same.
            hold_customer_and_store_purchase(&txn, "ghost", "stripe", "sub_2")
                .await
                .unwrap();
            let total = statements(&db) - before;
            if db.backend() != DbBackend::Postgres {
                assert_eq!((both, total), (0, 0));
                txn.commit().await.unwrap();
                continue;
            }
            assert_eq!((both, total), (1, 2));
            let other = |sql: &'static str| {
                let conn = db.conn.clone();
                async move {
                    conn.query_one_raw(sea_orm::Statement::from_string(DbBackend::Postgres, sql))
                        .await
                }
            };
            for key in ["stripe:sub_1", "stripe:sub_2"] {
                let row = conn_try_lock(&db, key).await;
                assert!(!row, "{key} is held");
            }
            let err = other("SELECT id FROM customers WHERE id = 'c2' FOR UPDATE NOWAIT").await;
            assert!(err.is_err(), "c2's row is locked");
            txn.commit().await.unwrap();
            assert!(
                conn_try_lock(&db, "stripe:sub_1").await,
                "released at the commit"
            );
            assert!(
                other("SELECT id FROM customers WHERE id = 'c2' FOR UPDATE NOWAIT")
                    .await
                    .is_ok()
            );
        }
    }

    /// PostgreSQL: the cache notice rides with the claim, the transaction's
    /// last statement, and the commit sends another only for what was
    /// touched after it.
    #[tokio::test]
    async fn the_cache_notice_goes_with_the_claim() {
        let dir = tempfile::tempdir().unwrap();
        for db in fresh_dbs_of(dir.path(), DbBackend::Postgres).await {
            let pool = db.conn.get_postgres_connection_pool().clone();
            let mut listener = sea_orm::sqlx::postgres::PgListener::connect_with(&pool)
                .await
                .unwrap();
            listener.listen(CACHE_CHANNEL).await.unwrap();
            let claim = |id: &'static str| webhook_claim::Claim {
                source: "stripe",
                event_id: id,
                payload: &serde_json::Value::Null,
                outcome: "applied",
                customer_id: Some("c1"),
                at: Utc::now(),
            };
            let customers = |payload: &str| {
                let v: serde_json::Value = serde_json::from_str(payload).unwrap();
                v["customers"].clone()
            };
            let wait = std::time::Duration::from_secs(5);
            let txn = db.write().await.unwrap();
            ensure_customer(&txn, "c1", Utc::now()).await.unwrap();
            assert!(
                webhook_claim::insert_new(&txn, claim("evt_n1"))
                    .await
                    .unwrap()
            );
            let before = statements(&db);
            txn.commit().await.unwrap();
            assert_eq!(statements(&db) - before, 0, "no notice of its own");
            let n = tokio::time::timeout(wait, listener.recv()).await;
            assert_eq!(
                customers(n.unwrap().unwrap().payload()),
                serde_json::json!(["c1"])
            );

            // Touched after the claim: the commit tells of it.
            let txn = db.write().await.unwrap();
            hold_customer(&txn, "c1").await.unwrap();
            assert!(
                webhook_claim::insert_new(&txn, claim("evt_n2"))
                    .await
                    .unwrap()
            );
            ensure_customer(&txn, "c3", Utc::now()).await.unwrap();
            txn.commit().await.unwrap();
            let mut heard = Vec::new();
            for _ in 0..2 {
                let n = tokio::time::timeout(wait, listener.recv()).await;
                heard.push(customers(n.unwrap().unwrap().payload()));
            }
            assert_eq!(heard[0], serde_json::json!(["c1"]));
            assert!(
                heard[1]
                    .as_array()
                    .unwrap()
                    .contains(&serde_json::json!("c3"))
            );

            // A claim that finds its event claimed sends nothing.
            let txn = db.write().await.unwrap();
            hold_customer(&txn, "c1").await.unwrap();
            assert!(
                !webhook_claim::insert_new(&txn, claim("evt_n1"))
                    .await
                    .unwrap()
            );
            txn.abandon().await.unwrap();
            let quiet =
                tokio::time::timeout(std::time::Duration::from_millis(300), listener.recv()).await;
            assert!(quiet.is_err(), "nothing heard: {quiet:?}");
        }
    }

    /// A purchase overwrite held back travels with the claim, and any other
    /// statement before the claim sends it first, so nothing after it in
    /// the transaction misses it; rolled back, it never happened.
    #[tokio::test]
    async fn an_ordered_write_goes_ahead_of_any_later_statement() {
        let dir = tempfile::tempdir().unwrap();
        for db in fresh_dbs(dir.path()).await {
            let now = Utc::now();
            let txn = db.write().await.unwrap();
            ensure_customer(&txn, "c1", now).await.unwrap();
            let row = purchase::insert(&*txn, play_purchase("c1", "tok-1", now, None))
                .await
                .unwrap();
            txn.commit().await.unwrap();
            let status = |db: &Db| {
                let conn = db.conn.clone();
                async move {
                    purchase::find_by_store_id(&conn, "play_store", "tok-1")
                        .await
                        .unwrap()
                        .unwrap()
                        .status
                }
            };
            let with_status = |s: &str| {
                let mut f = play_purchase("c1", "tok-1", now, Some(serde_json::json!({"n": s})));
                f.status = s.into();
                f
            };
            let claim = |id: &'static str| webhook_claim::Claim {
                source: "play_store",
                event_id: id,
                payload: &serde_json::Value::Null,
                outcome: "applied",
                customer_id: Some("c1"),
                at: now,
            };

            // Read back in the transaction: sent ahead of the read.
            let txn = db.write().await.unwrap();
            let written = purchase::overwrite_deferred(&txn, row.clone(), with_status("expired"))
                .await
                .unwrap();
            assert_eq!(written.status, "expired");
            assert_eq!(written.raw, Some(serde_json::json!({"n": "expired"})));
            let before = statements(&db);
            let read = purchase::find(&*txn, row.id).await.unwrap().unwrap();
            assert_eq!(read, written, "the row as the transaction reads it");
            assert_eq!(statements(&db) - before, 2, "the write, then the read");
            txn.commit().await.unwrap();
            assert_eq!(status(&db).await, "expired");

            // With the claim, as its last statement: both or neither.
            let txn = db.write().await.unwrap();
            let row = purchase::find(&*txn, row.id).await.unwrap().unwrap();
            purchase::overwrite_deferred(&txn, row.clone(), with_status("active"))
                .await
                .unwrap();
            let before = statements(&db);
            assert!(webhook_claim::insert_new(&txn, claim("e1")).await.unwrap());
            assert_eq!(statements(&db) - before, 2, "the write and the claim");
            txn.commit().await.unwrap();
            assert_eq!(status(&db).await, "active");

            // Rolled back: the held-back write is gone with the rest.
            let txn = db.write().await.unwrap();
            purchase::overwrite_deferred(&txn, row.clone(), with_status("revoked"))
                .await
                .unwrap();
            assert!(!webhook_claim::insert_new(&txn, claim("e1")).await.unwrap());
            txn.abandon().await.unwrap();
            assert_eq!(status(&db).await, "active");
            let txn = db.write().await.unwrap();
            purchase::overwrite_deferred(&txn, row.clone(), with_status("revoked"))
                .await
                .unwrap();
            drop(txn);
            assert_eq!(status(&db).await, "active");

            // Nothing after it but the commit: written at the commit.
            let txn = db.write().await.unwrap();
            purchase::overwrite_deferred(&txn, row, with_status("revoked"))
                .await
                .unwrap();
            txn.commit().await.unwrap();
            assert_eq!(status(&db).await, "revoked");
        }
    }

    /// Whether another session could take the advisory lock of `key` now.
    async fn conn_try_lock(db: &Db, key: &str) -> bool {
        let row = db
            .conn
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0)) AS ok",
                [key.into()],
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get::<bool>("", "ok").unwrap()
    }

    /// The one-statement lookup of a store id reads what the separate
    /// reads do, in each state a store id can be in.
    #[tokio::test]
    async fn a_store_id_lookup_reads_row_alias_hold_and_binding() {
        let dir = tempfile::tempdir().unwrap();
        for db in fresh_dbs(dir.path()).await {
            let now = Utc::now();
            let txn = db.write().await.unwrap();
            owner_and_merged_customers(&txn, now).await;
            let raw = Some(serde_json::json!({"k": "v"}));
            let row = purchase::insert(&*txn, play_purchase("owner", "tok-new", now, raw))
                .await
                .unwrap();
            purchase::add_replaced_id(&*txn, "play_store", "tok-old", row.id)
                .await
                .unwrap();
            held_purchase::insert(
                &*txn,
                "play_store",
                "tok-held",
                held_purchase::HeldState {
                    bound_key: None,
                    replaces: None,
                    state: serde_json::json!({}),
                    source_updated_at: now,
                },
                now,
            )
            .await
            .unwrap();
            let look = |id: &'static str, bound: Option<&'static str>| {
                let txn = &txn;
                async move {
                    purchase::lookup_store_id(&**txn, "play_store", id, bound)
                        .await
                        .unwrap()
                }
            };
            let found = look("tok-new", Some("owner")).await;
            assert_eq!(found.row.as_ref(), Some(&row));
            assert_eq!((found.replaced_by, found.held), (None, false));
            assert_eq!(found.resolved("owner"), Some("owner"));
            assert_eq!(found.resolved("someone"), None);

            let old = look("tok-old", None).await;
            assert_eq!(
                (old.row, old.replaced_by, old.held),
                (None, Some(row.id), false)
            );
            assert_eq!(old.bound, None);

            let held = look("tok-held", Some("merged")).await;
            assert_eq!(
                (&held.row, held.replaced_by, held.held),
                (&None, None, true)
            );
            assert_eq!(held.resolved("merged"), Some("into"));

            let none = look("tok-none", Some("nobody")).await;
            assert_eq!(
                (&none.row, none.replaced_by, none.held),
                (&None, None, false)
            );
            assert_eq!(none.resolved("nobody"), Some("nobody"));
            // Another store's id is another purchase.
            let other = purchase::lookup_store_id(&*txn, "app_store", "tok-new", None)
                .await
                .unwrap();
            assert_eq!((other.row, other.held), (None, false));
            txn.commit().await.unwrap();
        }
    }
}
