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

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A write for the writer task.
enum Job {
    Accept(Box<Accepted>, Reply<Acceptance>),
    Attempt(Box<AttemptRecord>, Reply<()>),
    Correlate(Vec<CorrelationWrite>, Reply<()>),
    Claim {
        flow: String,
        target: String,
        limit: u32,
        lease_until: Millis,
        reply: Reply<Vec<Claimed>>,
    },
    Release(Vec<(i64, Millis)>, Reply<()>),
    Prune(Millis, Reply<u64>),
    FirstSight {
        scope: String,
        id: String,
        expires_at: Millis,
        reply: Reply<bool>,
    },
    ForgetSight {
        scope: String,
        id: String,
        reply: Reply<()>,
    },
    Enqueue {
        queue: String,
        payload: String,
        headers: String,
        reply: Reply<()>,
    },
    ClaimQueue {
        queue: String,
        limit: u32,
        lease_until: Millis,
        reply: Reply<Vec<QueueItem>>,
    },
    FinishQueue {
        id: i64,
        retry_at: Option<Millis>,
        reply: Reply<()>,
    },
    /// The heartbeat: its commit shows the store takes writes now.
    Probe(Reply<()>),
}

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

    async fn submit<T>(&self, make: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(make(tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub(super) async fn writable(&self) -> Result<(), StoreError> {
        self.submit(Job::Probe).await
    }

    pub(super) async fn accept(&self, accepted: Accepted) -> Result<Acceptance, StoreError> {
        self.submit(|reply| Job::Accept(Box::new(accepted), reply))
            .await
    }

    pub(super) async fn record_attempt(&self, attempt: AttemptRecord) -> Result<(), StoreError> {
        self.submit(|reply| Job::Attempt(Box::new(attempt), reply))
            .await
    }

    pub(super) async fn correlate(&self, writes: Vec<CorrelationWrite>) -> Result<(), StoreError> {
        self.submit(|reply| Job::Correlate(writes, reply)).await
    }

    pub(super) async fn claim(
        &self,
        flow: &str,
        target: &str,
        limit: u32,
        lease_until: Millis,
    ) -> Result<Vec<Claimed>, StoreError> {
        let (flow, target) = (flow.to_owned(), target.to_owned());
        self.submit(|reply| Job::Claim {
            flow,
            target,
            limit,
            lease_until,
            reply,
        })
        .await
    }

    pub(super) async fn release(&self, entries: Vec<(i64, Millis)>) -> Result<(), StoreError> {
        self.submit(|reply| Job::Release(entries, reply)).await
    }

    pub(super) async fn first_sight(
        &self,
        scope: &str,
        id: &str,
        expires_at: Millis,
    ) -> Result<bool, StoreError> {
        let (scope, id) = (scope.to_owned(), id.to_owned());
        self.submit(|reply| Job::FirstSight {
            scope,
            id,
            expires_at,
            reply,
        })
        .await
    }

    pub(super) async fn forget_sight(&self, scope: &str, id: &str) -> Result<(), StoreError> {
        let (scope, id) = (scope.to_owned(), id.to_owned());
        self.submit(|reply| Job::ForgetSight { scope, id, reply })
            .await
    }

    pub(super) async fn prune(&self, before: Millis) -> Result<u64, StoreError> {
        self.submit(|reply| Job::Prune(before, reply)).await
    }

    pub(super) async fn enqueue(
        &self,
        queue: &str,
        payload: String,
        headers: String,
    ) -> Result<(), StoreError> {
        let queue = queue.to_owned();
        self.submit(|reply| Job::Enqueue {
            queue,
            payload,
            headers,
            reply,
        })
        .await
    }

    pub(super) async fn claim_queue(
        &self,
        queue: &str,
        limit: u32,
        lease_until: Millis,
    ) -> Result<Vec<QueueItem>, StoreError> {
        let queue = queue.to_owned();
        self.submit(|reply| Job::ClaimQueue {
            queue,
            limit,
            lease_until,
            reply,
        })
        .await
    }

    pub(super) async fn finish_queue(
        &self,
        id: i64,
        retry_at: Option<Millis>,
    ) -> Result<(), StoreError> {
        self.submit(|reply| Job::FinishQueue {
            id,
            retry_at,
            reply,
        })
        .await
    }

    pub(super) fn commit_stats(&self) -> CommitStats {
        self.stats.get()
    }

    pub(super) async fn close(&self) {
        let task = self.writer.lock().await.take();
        if let Some(task) = task {
            // The writer ends once every sender is gone; ours may not be the last, so stop it
            // after the queue drains instead of waiting for clones elsewhere.
            let (tx, rx) = oneshot::channel();
            if self.jobs.send(Job::Correlate(Vec::new(), tx)).await.is_ok() {
                let _ = rx.await;
            }
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
            .filter(|j| matches!(j, Job::Accept(..)))
            .count();
        let started = std::time::Instant::now();
        let committed = match writer.conn().await {
            Ok(conn) => commit_batch(conn, &mut batch).await,
            Err(error) => Err((
                batch.drain(..).map(|job| fail(job, &error)).collect(),
                error,
            )),
        };
        metrics::histogram!("ferry_store_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match committed {
            Ok(done) => {
                stats.add(done.len() as u64, messages as u64);
                for finish in done {
                    finish(None);
                }
            }
            Err((done, error)) => {
                tracing::error!(%error, "store commit failed");
                writer.discard().await;
                let message = error.to_string();
                for finish in done {
                    finish(Some(&message));
                }
            }
        }
    }
}

/// Sends a job's result, or the commit's failure, to whoever waits for it.
type Finish = Box<dyn FnOnce(Option<&str>) + Send>;

fn finisher<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Finish {
    Box::new(move |commit_error| {
        let result = match commit_error {
            None => result,
            Some(error) => Err(StoreError::Corrupt(format!("commit failed: {error}"))),
        };
        let _ = reply.send(result);
    })
}

async fn commit_batch(
    conn: &mut SqliteConnection,
    batch: &mut Vec<Job>,
) -> Result<Vec<Finish>, (Vec<Finish>, sqlx::Error)> {
    let mut done = Vec::with_capacity(batch.len());
    let mut tx = match conn.begin_with("BEGIN IMMEDIATE").await {
        Ok(tx) => tx,
        Err(error) => {
            done.extend(batch.drain(..).map(|job| fail(job, &error)));
            return Err((done, error));
        }
    };
    // Each write is atomic on its own: a failing one is undone without its neighbours. Ending
    // one job's savepoint and opening the next's is one call to the database, not two.
    let mut open = sqlx::raw_sql("SAVEPOINT job").execute(&mut *tx).await;
    for job in batch.drain(..) {
        if let Err(error) = &open {
            done.push(fail(job, error));
            open = sqlx::raw_sql("SAVEPOINT job").execute(&mut *tx).await;
            continue;
        }
        let (finish, ok) = run_job(&mut tx, job).await;
        done.push(finish);
        let next = if ok {
            "RELEASE job; SAVEPOINT job"
        } else {
            "ROLLBACK TO job; RELEASE job; SAVEPOINT job"
        };
        open = sqlx::raw_sql(next).execute(&mut *tx).await;
    }
    // COMMIT ends the last job's savepoint with the transaction.
    match tx.commit().await {
        Ok(()) => Ok(done),
        Err(error) => Err((done, error)),
    }
}

fn fail(job: Job, error: &sqlx::Error) -> Finish {
    let error = || StoreError::Corrupt(error.to_string());
    match job {
        Job::Accept(_, reply) => finisher(reply, Err(error())),
        Job::Attempt(_, reply) | Job::Correlate(_, reply) | Job::Release(_, reply) => {
            finisher(reply, Err(error()))
        }
        Job::Claim { reply, .. } => finisher(reply, Err(error())),
        Job::Prune(_, reply) => finisher(reply, Err(error())),
        Job::Enqueue { reply, .. }
        | Job::FinishQueue { reply, .. }
        | Job::ForgetSight { reply, .. }
        | Job::Probe(reply) => finisher(reply, Err(error())),
        Job::ClaimQueue { reply, .. } => finisher(reply, Err(error())),
        Job::FirstSight { reply, .. } => finisher(reply, Err(error())),
    }
}

/// Runs one job; returns how to report it and whether it succeeded.
async fn run_job(conn: &mut SqliteConnection, job: Job) -> (Finish, bool) {
    fn done<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> (Finish, bool) {
        let ok = result.is_ok();
        (finisher(reply, result), ok)
    }
    match job {
        Job::Accept(accepted, reply) => done(reply, sql::accept(conn, &accepted).await),
        Job::Probe(reply) => done(reply, sql::heartbeat(conn).await),
        Job::Attempt(attempt, reply) => done(reply, sql::attempt_done(conn, &attempt).await),
        Job::Correlate(writes, reply) => done(reply, sql::correlate_all(conn, &writes).await),
        Job::Claim {
            flow,
            target,
            limit,
            lease_until,
            reply,
        } => done(
            reply,
            sql::claim(conn, &flow, &target, limit, lease_until).await,
        ),
        Job::Release(entries, reply) => done(reply, sql::release(conn, &entries).await),
        Job::Prune(before, reply) => done(reply, sql::prune(conn, before).await),
        Job::FirstSight {
            scope,
            id,
            expires_at,
            reply,
        } => done(reply, sql::first_sight(conn, &scope, &id, expires_at).await),
        Job::ForgetSight { scope, id, reply } => {
            done(reply, sql::forget_sight(conn, &scope, &id).await)
        }
        Job::Enqueue {
            queue,
            payload,
            headers,
            reply,
        } => done(reply, sql::enqueue(conn, &queue, &payload, &headers).await),
        Job::ClaimQueue {
            queue,
            limit,
            lease_until,
            reply,
        } => done(
            reply,
            sql::claim_queue(conn, &queue, limit, lease_until).await,
        ),
        Job::FinishQueue {
            id,
            retry_at,
            reply,
        } => done(reply, sql::finish_queue(conn, id, retry_at).await),
    }
}
