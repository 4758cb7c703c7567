//! The SQLite backend: one writer connection that commits batches of writes (group commit),
//! and a pool of readers. WAL mode lets readers run beside the writer; `synchronous=FULL`
//! makes a commit durable before anyone is told it happened.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, Sqlite};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{
    Acceptance, Accepted, AttemptRecord, Claimed, CommitStats, CorrelationWrite, Counters, Lock,
    Millis, QueueItem, StoreError,
};

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
    Correlate(Vec<CorrelationWrite>),
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
    writer: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// Keeps the folder of a `sqlite::memory:` store alive as long as the store.
    _scratch: Option<Arc<tempfile::TempDir>>,
}

impl SqliteStore {
    pub(super) async fn open(url: &str) -> Result<Self, StoreError> {
        let (options, scratch) = if url == "sqlite::memory:" {
            // Readers and the writer need one database, which SQLite's private in-memory
            // databases cannot share: a scratch file without syncs behaves the same.
            let dir = tempfile::tempdir().map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let options = SqliteConnectOptions::new()
                .filename(dir.path().join("ferry.db"))
                .synchronous(SqliteSynchronous::Off);
            (options, Some(Arc::new(dir)))
        } else {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|_| StoreError::Url(url.to_owned()))?
                .synchronous(SqliteSynchronous::Full);
            if let Some(parent) = options.get_filename().parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    StoreError::Corrupt(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
            (options, None)
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
        migrating.close().await;
        let mut writer = SqliteConnection::connect_with(&options).await?;
        // This process owns the file: whatever was in flight when it last stopped is due again.
        sqlx::query(
            "UPDATE outbox SET state = 'pending', lease_until = NULL WHERE state = 'in_flight'",
        )
        .execute(&mut writer)
        .await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone().read_only(true))
            .await?;
        let stats = Arc::new(Counters::default());
        let (jobs, rx) = mpsc::channel(4096);
        let writer = Writer {
            conn: Some(writer),
            options,
        };
        let task = tokio::spawn(write_loop(writer, rx, Arc::clone(&stats)));
        Ok(Self {
            jobs,
            read,
            stats,
            writer: Arc::new(Mutex::new(Some(task))),
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

    pub(super) async fn correlate(&self, writes: Vec<CorrelationWrite>) -> Result<(), StoreError> {
        self.submit(Work::Correlate(writes)).await
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
        let task = self.writer.lock().await.take();
        if let Some(task) = task {
            // The writer ends once every sender is gone; ours may not be the last, so stop it
            // after the queue drains instead of waiting for clones elsewhere.
            let _ = self.submit::<()>(Work::Probe).await;
            task.abort();
            let _ = task.await;
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

/// The SQL both backends share, compiled for SQLite.
#[path = "sql.rs"]
#[allow(
    clippy::duplicate_mod,
    reason = "compiled once for each database, on purpose"
)]
mod sql;

type DbStore = SqliteStore;
type Db = Sqlite;
type Conn = SqliteConnection;
type Row = sqlx::sqlite::SqliteRow;

/// Every write runs on the one writer connection, one after another: nothing to lock.
async fn lock(_conn: &mut Conn, _lock: Lock<'_>) -> Result<bool, StoreError> {
    Ok(true)
}

/// The one writer connection, and how to open it again.
struct Writer {
    /// `None` after a failed commit until a new connection opens.
    conn: Option<SqliteConnection>,
    options: SqliteConnectOptions,
}

impl Writer {
    /// The connection, opened again if the last commit failed.
    async fn conn(&mut self) -> Result<&mut SqliteConnection, sqlx::Error> {
        if self.conn.is_none() {
            self.conn = Some(SqliteConnection::connect_with(&self.options).await?);
            tracing::info!("store writer connection opened again");
        }
        Ok(self.conn.as_mut().expect("just opened"))
    }

    /// Drops a connection whose commit failed. SQLite may have rolled the transaction back
    /// itself (a full disk, an I/O error) or not, and the driver's own idea of whether one is
    /// open can disagree with it: a new connection starts clean, with nothing half-done.
    async fn discard(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }
}

/// Takes writes off the queue and commits them in batches: whatever queued up while the
/// previous commit was syncing shares the next one. A failed commit fails its batch (each
/// caller sees the error; nothing of the batch is stored) and the next batch starts on a new
/// connection, so the store recovers as soon as the cause (a full disk, say) has passed.
async fn write_loop(mut writer: Writer, mut jobs: mpsc::Receiver<Job>, stats: Arc<Counters>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let messages = batch
            .iter()
            .filter(|j| matches!(j.work, Work::Accept(..)))
            .count();
        let started = std::time::Instant::now();
        let committed = match writer.conn().await {
            Ok(conn) => commit_batch(conn, &batch).await,
            Err(error) => Err(error),
        };
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
                writer.discard().await;
                for job in batch.drain(..) {
                    let failed = StoreError::Corrupt(format!("commit failed: {error}"));
                    let _ = job.reply.send(Err(failed));
                }
            }
        }
    }
}

/// Commits `batch` in one transaction; returns each job's result in order.
///
/// Each job is atomic on its own: a failing one is undone without its neighbours. That takes
/// a savepoint around each job, one more statement per job, which the batches that go
/// through whole (nearly all) do without: when a job fails there, the batch is rolled back and
/// run again with them.
async fn commit_batch(
    conn: &mut SqliteConnection,
    batch: &[Job],
) -> Result<Vec<Result<Done, StoreError>>, sqlx::Error> {
    match run_batch(conn, batch, false).await? {
        Some(results) => Ok(results),
        None => Ok(run_batch(conn, batch, true).await?.unwrap_or_default()),
    }
}

/// Runs `batch` in a transaction, each job in a savepoint of its own when `isolated`; `None`
/// when a job failed outside a savepoint (then nothing was committed).
async fn run_batch(
    conn: &mut SqliteConnection,
    batch: &[Job],
    isolated: bool,
) -> Result<Option<Vec<Result<Done, StoreError>>>, sqlx::Error> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    if isolated {
        sqlx::raw_sql("SAVEPOINT job").execute(&mut *tx).await?;
    }
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let result = run_job(&mut tx, &job.work).await;
        if isolated {
            // Ending one job's savepoint and opening the next's is one call, not two.
            let next = if result.is_ok() {
                "RELEASE job; SAVEPOINT job"
            } else {
                "ROLLBACK TO job; RELEASE job; SAVEPOINT job"
            };
            sqlx::raw_sql(next).execute(&mut *tx).await?;
        } else if result.is_err() {
            tx.rollback().await?;
            return Ok(None);
        }
        results.push(result);
    }
    // COMMIT ends the last job's savepoint with the transaction.
    tx.commit().await?;
    Ok(Some(results))
}

/// Runs one job.
async fn run_job(conn: &mut SqliteConnection, work: &Work) -> Result<Done, StoreError> {
    Ok(match work {
        Work::Accept(accepted) => Done::Accepted(sql::accept(conn, accepted).await?),
        Work::Probe => Done::Nothing(sql::heartbeat(conn).await?),
        Work::Attempt(attempt) => Done::Nothing(sql::attempt_done(conn, attempt).await?),
        Work::Correlate(writes) => Done::Nothing(sql::correlate_all(conn, writes).await?),
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
