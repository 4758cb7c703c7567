//! The SQLite backend: one writer connection that commits batches of writes (group commit),
//! and a pool of readers. WAL mode lets readers run beside the writer; `synchronous=FULL`
//! makes a commit durable before anyone is told it happened.
//!
//! The writer is a thread of its own that calls SQLite directly; the readers go through
//! sqlx. Both link the same SQLite.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::Sqlite;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use tokio::sync::{mpsc, oneshot};

use super::exec::Writing;
use super::{
    Acceptance, Accepted, AttemptRecord, Claimed, CommitStats, CorrelationWrite, Counters, Millis,
    QueueItem, RecordChange, StoreError,
};

/// Each reader's page cache, in KiB.
const READER_CACHE_KIB: u32 = 256;

/// Writes waiting beyond this many go into the next transaction.
const MAX_BATCH: usize = 512;

/// A write for the writer task, and who waits for its result.
struct Job {
    work: Work,
    reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// What a job writes.
enum Work {
    Accept(Box<Accepted>),
    Attempt(Box<AttemptRecord>),
    Correlate(Vec<CorrelationWrite>, Vec<RecordChange>),
    Claim {
        flow: String,
        target: String,
        limit: u32,
        lease_until: Millis,
    },
    Release(Vec<(i64, Millis)>),
    Prune(Millis),
    FirstSight {
        scope: String,
        id: String,
        expires_at: Millis,
    },
    ForgetSight {
        scope: String,
        id: String,
    },
    Enqueue {
        queue: String,
        payload: String,
        headers: String,
    },
    ClaimQueue {
        queue: String,
        limit: u32,
        lease_until: Millis,
    },
    FinishQueue {
        id: i64,
        retry_at: Option<Millis>,
    },
    /// The heartbeat: its commit shows the store takes writes now.
    Probe,
    /// Ends the writer once what is queued before it is done.
    Stop,
}

/// Declares [`Done`], what a job gives back by kind, and how the call that asked for each
/// kind takes it out.
macro_rules! results {
    ($($variant:ident($type:ty)),* $(,)?) => {
        /// What a job gives back, by kind.
        enum Done {
            $($variant($type),)*
        }

        $(impl TryFrom<Done> for $type {
            type Error = StoreError;

            fn try_from(done: Done) -> Result<Self, StoreError> {
                match done {
                    Done::$variant(value) => Ok(value),
                    _ => Err(StoreError::Corrupt(
                        "the store writer answered with another job's result".into(),
                    )),
                }
            }
        })*
    };
}

results!(
    Accepted(Acceptance),
    Nothing(()),
    Claimed(Vec<Claimed>),
    Pruned(u64),
    Sighted(bool),
    Items(Vec<QueueItem>),
);

#[derive(Debug, Clone)]
pub(super) struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    read: SqlitePool,
    stats: Arc<Counters>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// Keeps the folder of a `sqlite::memory:` store alive as long as the store.
    _scratch: Option<Arc<tempfile::TempDir>>,
}

impl SqliteStore {
    pub(super) async fn open(url: &str) -> Result<Self, StoreError> {
        let (options, synchronous, scratch) = if url == "sqlite::memory:" {
            // Readers and the writer need one database, which SQLite's private in-memory
            // databases cannot share: a scratch file without syncs behaves the same.
            let dir = tempfile::tempdir().map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let options = SqliteConnectOptions::new()
                .filename(dir.path().join("ferry.db"))
                .synchronous(SqliteSynchronous::Off);
            (options, "OFF", Some(Arc::new(dir)))
        } else {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|_| StoreError::Url(url.to_owned()))?
                .synchronous(SqliteSynchronous::Full);
            if let Some(parent) = options.get_filename().parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    StoreError::Corrupt(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
            (options, "FULL", None)
        };
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);

        // Migrating through a pool keeps this future `Send` (sqlx's `Acquire` on a bare
        // connection is not general enough for that).
        let migrating = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&migrating).await?;
        // This process owns the file: whatever was in flight when it last stopped is due again.
        sqlx::query(
            "UPDATE outbox SET state = 'pending', lease_until = NULL WHERE state = 'in_flight'",
        )
        .execute(&migrating)
        .await?;
        migrating.close().await;
        let writer = Writer::open(options.get_filename().to_owned(), synchronous)?;
        // Readers answer operators and the gauges now and then, from pages the system's own
        // cache holds as well. With SQLite's 2 MiB page cache each, they held 2.6 MiB of the
        // process at the speed bench's peak; with 256 KiB, 0.6 MiB.
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(
                options
                    .read_only(true)
                    .pragma("cache_size", format!("-{READER_CACHE_KIB}")),
            )
            .await?;
        let stats = Arc::new(Counters::default());
        let (jobs, rx) = mpsc::channel(4096);
        let counters = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("ferry-store-writer".into())
            .spawn(move || write_loop(writer, rx, &counters))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the store writer: {e}")))?;
        Ok(Self {
            jobs,
            read,
            stats,
            writer: Arc::new(Mutex::new(Some(thread))),
            _scratch: scratch,
        })
    }

    async fn submit<T: TryFrom<Done, Error = StoreError>>(
        &self,
        work: Work,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { work, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)??.try_into()
    }

    pub(super) async fn writable(&self) -> Result<(), StoreError> {
        self.submit(Work::Probe).await
    }

    pub(super) async fn accept(&self, accepted: Accepted) -> Result<Acceptance, StoreError> {
        self.submit(Work::Accept(Box::new(accepted))).await
    }

    pub(super) async fn record_attempt(&self, attempt: AttemptRecord) -> Result<(), StoreError> {
        self.submit(Work::Attempt(Box::new(attempt))).await
    }

    pub(super) async fn correlate(
        &self,
        writes: Vec<CorrelationWrite>,
        then: Vec<RecordChange>,
    ) -> Result<(), StoreError> {
        self.submit(Work::Correlate(writes, then)).await
    }

    pub(super) async fn claim(
        &self,
        flow: &str,
        target: &str,
        limit: u32,
        lease_until: Millis,
    ) -> Result<Vec<Claimed>, StoreError> {
        self.submit(Work::Claim {
            flow: flow.to_owned(),
            target: target.to_owned(),
            limit,
            lease_until,
        })
        .await
    }

    pub(super) async fn release(&self, entries: Vec<(i64, Millis)>) -> Result<(), StoreError> {
        self.submit(Work::Release(entries)).await
    }

    pub(super) async fn first_sight(
        &self,
        scope: &str,
        id: &str,
        expires_at: Millis,
    ) -> Result<bool, StoreError> {
        self.submit(Work::FirstSight {
            scope: scope.to_owned(),
            id: id.to_owned(),
            expires_at,
        })
        .await
    }

    pub(super) async fn forget_sight(&self, scope: &str, id: &str) -> Result<(), StoreError> {
        self.submit(Work::ForgetSight {
            scope: scope.to_owned(),
            id: id.to_owned(),
        })
        .await
    }

    pub(super) async fn prune(&self, before: Millis) -> Result<u64, StoreError> {
        self.submit(Work::Prune(before)).await
    }

    pub(super) async fn enqueue(
        &self,
        queue: &str,
        payload: String,
        headers: String,
    ) -> Result<(), StoreError> {
        self.submit(Work::Enqueue {
            queue: queue.to_owned(),
            payload,
            headers,
        })
        .await
    }

    pub(super) async fn claim_queue(
        &self,
        queue: &str,
        limit: u32,
        lease_until: Millis,
    ) -> Result<Vec<QueueItem>, StoreError> {
        self.submit(Work::ClaimQueue {
            queue: queue.to_owned(),
            limit,
            lease_until,
        })
        .await
    }

    pub(super) async fn finish_queue(
        &self,
        id: i64,
        retry_at: Option<Millis>,
    ) -> Result<(), StoreError> {
        self.submit(Work::FinishQueue { id, retry_at }).await
    }

    pub(super) fn commit_stats(&self) -> CommitStats {
        self.stats.get()
    }

    pub(super) async fn close(&self) {
        let thread = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            // The writer ends once every sender is gone; ours may not be the last, so stop it
            // after the queue drains instead of waiting for clones elsewhere.
            let _ = self.submit::<()>(Work::Stop).await;
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.read.close().await;
    }

    /// A read transaction: queries in it see one snapshot, even when a commit lands between
    /// them (a status must never pair a new state with old data). End it with `rollback`
    /// right after reading: left to the pool, it stays open until the connection's next use
    /// and holds back checkpoints meanwhile.
    async fn snapshot(&self) -> Result<sqlx::Transaction<'static, Sqlite>, StoreError> {
        Ok(self.read.begin().await?)
    }

    /// A connection for a single read.
    async fn reader(&self) -> Result<sqlx::pool::PoolConnection<Sqlite>, StoreError> {
        Ok(self.read.acquire().await?)
    }
}

/// What claims add to the rows they select: nothing here. SQLite has no `SKIP LOCKED`, and
/// with one writer, `UPDATE … RETURNING` claims atomically.
macro_rules! skip_locked {
    () => {
        ""
    };
}

/// What a read of a row about to be changed adds: nothing, the one writer runs alone.
macro_rules! for_update {
    () => {
        ""
    };
}

/// The row a new correlation record's insert adds (`$1` to `$6`), with no lock to take: the
/// one writer runs alone (`$7`, the keys, goes unused).
macro_rules! keys_locked {
    () => {
        " VALUES ($1, $2, $3, $4, $5, $6, $6)"
    };
}

/// The SQL both backends share, compiled for SQLite.
#[path = "sql.rs"]
#[allow(
    clippy::duplicate_mod,
    reason = "compiled once for each database, on purpose"
)]
mod sql;

type DbStore = SqliteStore;
type Conn = SqliteConnection;
type WriteConn<'c> = Writing<'c>;
type Row = sqlx::sqlite::SqliteRow;

/// Whether this store has the turn to prune: always, the one writer runs alone.
async fn pruning_turn(_conn: &mut WriteConn<'_>) -> Result<bool, StoreError> {
    Ok(true)
}

/// The one writer connection, and how to open it again.
struct Writer {
    /// `None` after a failed commit until a new connection opens.
    conn: Option<rusqlite::Connection>,
    path: PathBuf,
    synchronous: &'static str,
}

impl Writer {
    fn open(path: PathBuf, synchronous: &'static str) -> Result<Self, StoreError> {
        let conn = Some(connect(&path, synchronous)?);
        Ok(Self {
            conn,
            path,
            synchronous,
        })
    }

    /// The connection, a new one if the last commit failed. A connection whose commit
    /// failed is dropped: SQLite may have rolled the transaction back itself (a full disk, an
    /// I/O error) or not, and a new connection starts clean, with nothing half-done.
    fn take(&mut self) -> Result<rusqlite::Connection, StoreError> {
        if let Some(conn) = self.conn.take() {
            return Ok(conn);
        }
        let conn = connect(&self.path, self.synchronous)?;
        tracing::info!("store writer connection opened again");
        Ok(conn)
    }
}

/// The pages the write-ahead log holds (40 MB at SQLite's 4 KiB) before the writer copies
/// them into the database. SQLite's default, 1,000, checkpointed several times a second
/// under load, each time copying the pages that messages, outbox and indexes change over
/// and over, and syncing the database file. Ten times as many pages between checkpoints
/// took about 15% off the durable path's CPU per message (accepting while delivering, in
/// the speed bench).
const CHECKPOINT_PAGES: u32 = 10_000;

/// Opens the writer's connection to the database at `path`, set as sqlx sets the readers.
fn connect(path: &Path, synchronous: &str) -> Result<rusqlite::Connection, StoreError> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; PRAGMA foreign_keys = ON;
         PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES};"
    ))?;
    // Plans that do not depend on bound values: otherwise SQLite plans a claim again whenever
    // its LIMIT changes, which a worker's growing claims do.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(conn)
}

/// Takes writes off the queue and commits them in batches: whatever queued up while the
/// previous commit was syncing shares the next one. A failed commit fails its batch (each
/// caller sees the error; nothing of the batch is stored) and the next batch starts on a new
/// connection, so the store recovers as soon as the cause (a full disk, say) has passed.
fn write_loop(mut writer: Writer, mut jobs: mpsc::Receiver<Job>, stats: &Counters) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while next_batch(&mut jobs, &mut batch) {
        match writer.take() {
            Ok(conn) => {
                if write_through(&conn, &mut jobs, &mut batch, stats) == Ended::Stopped {
                    return;
                }
            }
            Err(error) => {
                tracing::error!(%error, "store writer cannot open its connection");
                fail(&mut batch, &error);
            }
        }
    }
}

/// How the writer's run on one connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Stopped,
    CommitFailed,
}

/// Commits `batch`, and each batch after it, through `conn` (its statements prepared once)
/// until the writer stops or a commit fails.
fn write_through(
    conn: &rusqlite::Connection,
    jobs: &mut mpsc::Receiver<Job>,
    batch: &mut Vec<Job>,
    stats: &Counters,
) -> Ended {
    let mut writing = Writing::new(conn);
    loop {
        let messages = batch
            .iter()
            .filter(|j| matches!(j.work, Work::Accept(..)))
            .count();
        let stop = batch.iter().any(|j| matches!(j.work, Work::Stop));
        let started = std::time::Instant::now();
        let committed = commit_batch(&mut writing, batch);
        metrics::histogram!("ferry_store_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match committed {
            Ok(results) => {
                stats.add(batch.len() as u64, messages as u64);
                for (job, result) in batch.drain(..).zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(error) => {
                tracing::error!(%error, "store commit failed");
                fail(batch, &error);
                if !stop {
                    return Ended::CommitFailed;
                }
            }
        }
        if stop || !next_batch(jobs, batch) {
            return Ended::Stopped;
        }
    }
}

/// Waits for a write and takes with it whatever else is queued, up to [`MAX_BATCH`]; false
/// once no more can come.
fn next_batch(jobs: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>) -> bool {
    let Some(job) = jobs.blocking_recv() else {
        return false;
    };
    batch.push(job);
    // Where this thread shares a busy CPU with the tasks that queue writes, they run first
    // and queue theirs: one commit, and one sync, for more writes. On an idle CPU this
    // returns at once.
    std::thread::yield_now();
    while batch.len() < MAX_BATCH {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    true
}

/// Tells each job of `batch` that its commit failed.
fn fail(batch: &mut Vec<Job>, error: &StoreError) {
    for job in batch.drain(..) {
        let failed = StoreError::Corrupt(format!("commit failed: {error}"));
        let _ = job.reply.send(Err(failed));
    }
}

/// Commits `batch` in one transaction; returns each job's result in order.
///
/// Each job is atomic on its own: a failing one is undone without its neighbours. That takes
/// a savepoint around each job, one more statement per job, which the batches that go
/// through whole (nearly all) do without: when a job fails there, the batch is rolled back and
/// run again with them.
fn commit_batch(
    conn: &mut Writing<'_>,
    batch: &[Job],
) -> Result<Vec<Result<Done, StoreError>>, StoreError> {
    match run_batch(conn, batch, false)? {
        Some(results) => Ok(results),
        None => Ok(run_batch(conn, batch, true)?.unwrap_or_default()),
    }
}

/// Runs `batch` in a transaction, each job in a savepoint of its own when `isolated`; `None`
/// when a job failed outside a savepoint (then nothing was committed). On an error the
/// transaction may still be open: the caller drops the connection.
fn run_batch(
    conn: &mut Writing<'_>,
    batch: &[Job],
    isolated: bool,
) -> Result<Option<Vec<Result<Done, StoreError>>>, StoreError> {
    conn.conn().execute_batch(if isolated {
        "BEGIN IMMEDIATE; SAVEPOINT job"
    } else {
        "BEGIN IMMEDIATE"
    })?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let result = ready(run_job(conn, &job.work));
        if isolated {
            // Ending one job's savepoint and opening the next's is one call, not two.
            conn.conn().execute_batch(if result.is_ok() {
                "RELEASE job; SAVEPOINT job"
            } else {
                "ROLLBACK TO job; RELEASE job; SAVEPOINT job"
            })?;
        } else if result.is_err() {
            conn.conn().execute_batch("ROLLBACK")?;
            return Ok(None);
        }
        results.push(result);
    }
    // COMMIT ends the last job's savepoint with the transaction.
    conn.conn().execute_batch("COMMIT")?;
    Ok(Some(results))
}

/// The outcome of a write, which never waits: the writer's statements call SQLite directly,
/// on this thread, so their futures are ready when first polled.
pub(super) fn ready<T>(
    write: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let mut write = std::pin::pin!(write);
    match write
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(result) => result,
        std::task::Poll::Pending => Err(StoreError::Corrupt(
            "a store write waited, which the writer cannot".into(),
        )),
    }
}

/// Runs one job.
async fn run_job(conn: &mut Writing<'_>, work: &Work) -> Result<Done, StoreError> {
    Ok(match work {
        Work::Accept(accepted) => Done::Accepted(sql::accept(conn, accepted).await?),
        Work::Probe => Done::Nothing(sql::heartbeat(conn).await?),
        Work::Stop => Done::Nothing(()),
        Work::Attempt(attempt) => Done::Nothing(sql::attempt_done(conn, attempt).await?),
        Work::Correlate(writes, then) => {
            Done::Nothing(sql::correlate_all(conn, writes, then).await?)
        }
        Work::Claim {
            flow,
            target,
            limit,
            lease_until,
        } => Done::Claimed(sql::claim(conn, flow, target, *limit, *lease_until).await?),
        Work::Release(entries) => Done::Nothing(sql::release(conn, entries).await?),
        Work::Prune(before) => Done::Pruned(sql::prune(conn, *before).await?),
        Work::FirstSight {
            scope,
            id,
            expires_at,
        } => Done::Sighted(sql::first_sight(conn, scope, id, *expires_at).await?),
        Work::ForgetSight { scope, id } => Done::Nothing(sql::forget_sight(conn, scope, id).await?),
        Work::Enqueue {
            queue,
            payload,
            headers,
        } => Done::Nothing(sql::enqueue(conn, queue, payload, headers).await?),
        Work::ClaimQueue {
            queue,
            limit,
            lease_until,
        } => Done::Items(sql::claim_queue(conn, queue, *limit, *lease_until).await?),
        Work::FinishQueue { id, retry_at } => {
            Done::Nothing(sql::finish_queue(conn, *id, *retry_at).await?)
        }
    })
}

#[cfg(test)]
mod tests {
    use rusqlite::types::Value;

    /// The writer's settings are what the module promises: WAL, synchronous commits, and
    /// checkpoints only after `CHECKPOINT_PAGES`.
    #[test]
    fn the_writer_connection_is_set_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::connect(&dir.path().join("store.db"), "FULL").unwrap();
        let pragma = |name: &str| -> Value {
            conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
                .unwrap()
        };
        assert_eq!(pragma("journal_mode"), Value::Text("wal".into()));
        // 2 is FULL: a commit is synced before it is acknowledged.
        assert_eq!(pragma("synchronous"), Value::Integer(2));
        assert_eq!(pragma("foreign_keys"), Value::Integer(1));
        assert_eq!(
            pragma("wal_autocheckpoint"),
            Value::Integer(super::CHECKPOINT_PAGES.into())
        );
    }

    /// Readers keep a small page cache each, whichever of them answers.
    #[tokio::test]
    async fn readers_keep_a_small_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let store = super::SqliteStore::open(&url).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut reader = store.read.acquire().await.unwrap();
            let kib: i64 = sqlx::query_scalar("PRAGMA cache_size")
                .fetch_one(&mut *reader)
                .await
                .unwrap();
            assert_eq!(kib, -i64::from(super::READER_CACHE_KIB));
            held.push(reader);
        }
    }
}
