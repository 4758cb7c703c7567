//! The PostgreSQL backend: any number of ferry processes share one database.
//!
//! Each write is a transaction of its own on a bounded pool, so a process's writes run side
//! by side and PostgreSQL shares the WAL flushes of concurrent commits. Claims take rows with
//! `FOR UPDATE SKIP LOCKED`: two replicas never take the same entry and never wait for each
//! other's. Where the SQLite backend relies on its one writer, this one takes row and
//! advisory locks ([`lock`]). A connection that breaks is replaced by the pool on the next
//! use; meanwhile every call fails quickly and its caller backs off.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Postgres;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use super::{
    Acceptance, Accepted, AttemptRecord, Claimed, CommitStats, CorrelationWrite, Counters, Millis,
    QueueItem, RecordChange, StoreError,
};

/// What claims add to the rows they select: rows another replica is claiming are passed over,
/// not waited for.
macro_rules! skip_locked {
    () => {
        " FOR UPDATE SKIP LOCKED"
    };
}

/// What a read of a row about to be changed adds: the row stays locked until the change.
macro_rules! for_update {
    () => {
        " FOR UPDATE"
    };
}

/// The row a new correlation record's insert adds (`$1` to `$6`), once it has taken a lock on
/// each key it looks up (the keys a JSON array in `$7`), so that two saves of one key at once
/// make one record. In one order, whoever asks: saves of overlapping keys cannot deadlock. A
/// condition run before the row goes in, not a statement of its own.
macro_rules! keys_locked {
    () => {
        " SELECT $1, $2, $3, $4, $5, $6, $6 WHERE (SELECT count(*) FROM (
               SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || k, 0))
               FROM (SELECT DISTINCT json_array_elements_text($7::json) AS k ORDER BY 1) AS sorted
           ) AS locked) >= 0"
    };
}

/// The SQL both backends share, compiled for PostgreSQL.
#[path = "sql.rs"]
#[allow(
    clippy::duplicate_mod,
    reason = "compiled once for each database, on purpose"
)]
mod sql;

type DbStore = PgStore;
type Conn = PgConnection;
/// What writes go through: a transaction's connection (the lifetime is SQLite's writer's).
type WriteConn<'c> = PgConnection;
type Row = sqlx::postgres::PgRow;

/// The advisory lock pruning holds (two-key form: apart from the one-key locks on
/// correlation keys).
const PRUNING: (i32, i32) = (0x6665_7272, 1); // "ferr", 1

/// How long opening waits for a database that does not answer yet.
const START_WAIT: Duration = Duration::from_secs(30);

/// How often a transaction that lost a deadlock or a serialization conflict is run again.
const RETRIES: u32 = 5;

/// Whether this store has the turn to prune, until its transaction ends: one store at a time
/// prunes, the others skip their turn rather than wait.
async fn pruning_turn(conn: &mut Conn) -> Result<bool, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, $2)")
            .bind(PRUNING.0)
            .bind(PRUNING.1)
            .fetch_one(&mut *conn)
            .await?,
    )
}

/// Whether PostgreSQL undid the transaction only because it met another (a deadlock, or a
/// serialization failure), so running it again can succeed.
fn conflicted(error: &StoreError) -> bool {
    let StoreError::Database(sqlx::Error::Database(error)) = error else {
        return false;
    };
    matches!(error.code().as_deref(), Some("40001" | "40P01"))
}

/// Runs `$body`, with `$conn` bound to a transaction's connection, and commits; runs it again
/// in a new transaction when it lost a conflict.
macro_rules! transaction {
    ($store:expr, $writes:expr, $conn:ident => $body:expr) => {{
        let mut tries = 0;
        loop {
            let result: Result<_, StoreError> = async {
                let mut tx = $store.pool.begin().await?;
                let value = {
                    let $conn: &mut PgConnection = &mut tx;
                    $body.await?
                };
                tx.commit().await?;
                Ok(value)
            }
            .await;
            match result {
                Err(error) if tries < RETRIES && conflicted(&error) => {
                    tries += 1;
                    let pause = fastrand::u64(1..=10 * u64::from(tries));
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Ok(value) => {
                    let (writes, messages) = $writes;
                    $store.stats.add(writes, messages);
                    break Ok(value);
                }
                Err(error) => break Err(error),
            }
        }
    }};
}

#[derive(Debug, Clone)]
pub(super) struct PgStore {
    pool: PgPool,
    stats: Arc<Counters>,
}

impl PgStore {
    /// Connects with at most `connections` connections and migrates. Migrations hold
    /// PostgreSQL's advisory lock, so replicas starting together migrate once. A database
    /// that does not answer yet (starting beside ferry, say) is waited for, up to
    /// [`START_WAIT`], trying again less and less often.
    pub(super) async fn open(
        url: &str,
        connections: u32,
        wait: Duration,
    ) -> Result<Self, StoreError> {
        let options =
            PgConnectOptions::from_str(url).map_err(|_| StoreError::Url(url.to_owned()))?;
        let pool = PgPoolOptions::new()
            .max_connections(connections.max(2))
            .acquire_timeout(wait)
            .connect_lazy_with(options);
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match pool.acquire().await {
                Ok(_) => break,
                Err(error @ (sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut))
                    if started.elapsed() + pause < START_WAIT =>
                {
                    tracing::warn!(%error, ?pause, "the PostgreSQL store does not answer yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(error) => return Err(error.into()),
            }
        }
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(Self {
            pool,
            stats: Arc::new(Counters::default()),
        })
    }

    /// A read transaction that sees one snapshot across its queries. End it with `rollback`
    /// right after reading: left to the pool, it stays open until the connection's next use
    /// and holds back vacuum and schema changes meanwhile.
    async fn snapshot(&self) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
        Ok(self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?)
    }

    /// A connection for a single read.
    async fn reader(&self) -> Result<sqlx::pool::PoolConnection<Postgres>, StoreError> {
        Ok(self.pool.acquire().await?)
    }

    pub(super) async fn writable(&self) -> Result<(), StoreError> {
        let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&mut *self.reader().await?)
            .await?;
        if standby {
            return Err(StoreError::ReadOnly);
        }
        transaction!(self, (0, 0), conn => sql::heartbeat(conn))
    }

    pub(super) async fn accept(&self, accepted: Accepted) -> Result<Acceptance, StoreError> {
        transaction!(self, (1, 1), conn => sql::accept(conn, &accepted))
    }

    pub(super) async fn record_attempt(&self, attempt: AttemptRecord) -> Result<(), StoreError> {
        transaction!(self, (1, 0), conn => sql::attempt_done(conn, &attempt))
    }

    pub(super) async fn correlate(
        &self,
        writes: Vec<CorrelationWrite>,
        then: Vec<RecordChange>,
    ) -> Result<(), StoreError> {
        transaction!(self, (1, 0), conn => sql::correlate_all(conn, &writes, &then))
    }

    pub(super) async fn claim(
        &self,
        flow: &str,
        target: &str,
        limit: u32,
        lease_until: Millis,
    ) -> Result<Vec<Claimed>, StoreError> {
        transaction!(self, (1, 0), conn => sql::claim(conn, flow, target, limit, lease_until))
    }

    pub(super) async fn release(&self, entries: Vec<(i64, Millis)>) -> Result<(), StoreError> {
        transaction!(self, (1, 0), conn => sql::release(conn, &entries))
    }

    pub(super) async fn first_sight(
        &self,
        scope: &str,
        id: &str,
        expires_at: Millis,
    ) -> Result<bool, StoreError> {
        transaction!(self, (1, 0), conn => sql::first_sight(conn, scope, id, expires_at))
    }

    pub(super) async fn forget_sight(&self, scope: &str, id: &str) -> Result<(), StoreError> {
        transaction!(self, (1, 0), conn => sql::forget_sight(conn, scope, id))
    }

    pub(super) async fn prune(&self, before: Millis) -> Result<u64, StoreError> {
        transaction!(self, (1, 0), conn => sql::prune(conn, before))
    }

    pub(super) async fn enqueue(
        &self,
        queue: &str,
        payload: String,
        headers: String,
    ) -> Result<(), StoreError> {
        transaction!(self, (1, 0), conn => sql::enqueue(conn, queue, &payload, &headers))
    }

    pub(super) async fn claim_queue(
        &self,
        queue: &str,
        limit: u32,
        lease_until: Millis,
    ) -> Result<Vec<QueueItem>, StoreError> {
        transaction!(self, (1, 0), conn => sql::claim_queue(conn, queue, limit, lease_until))
    }

    pub(super) async fn finish_queue(
        &self,
        id: i64,
        retry_at: Option<Millis>,
    ) -> Result<(), StoreError> {
        transaction!(self, (1, 0), conn => sql::finish_queue(conn, id, retry_at))
    }

    pub(super) fn commit_stats(&self) -> CommitStats {
        self.stats.get()
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}
