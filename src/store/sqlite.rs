//! The SQLite backend: one writer connection that commits batches of writes (group commit),
//! and a pool of readers. WAL mode lets readers run beside the writer; `synchronous=FULL`
//! makes a commit durable before anyone is told it happened.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{
    AcceptOutcome, Accepted, AttemptOutcome, AttemptRecord, Claimed, CommitStats, Correlation,
    CorrelationWrite, Event, MessageDetail, MessageStatus, MessageSummary, Millis, OutboxEntry,
    QueueItem, ReplaySource, StateChange, StoreError, StoredReply, Trace, merge, now_ms, rfc3339,
};

/// Writes waiting beyond this many go into the next transaction.
const MAX_BATCH: usize = 512;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A write for the writer task.
enum Job {
    Accept(Box<Accepted>, Reply<AcceptOutcome>),
    Attempt(Box<AttemptRecord>, Reply<()>),
    Correlate(Vec<CorrelationWrite>, Reply<()>),
    Claim {
        flow: String,
        target: String,
        limit: u32,
        lease_until: Millis,
        reply: Reply<Vec<Claimed>>,
    },
    Prune(Millis, Reply<u64>),
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
    /// Nothing to write: its commit shows the write lock can be taken.
    Probe(Reply<()>),
}

#[derive(Debug, Default)]
struct Stats {
    commits: AtomicU64,
    writes: AtomicU64,
    messages: AtomicU64,
}

#[derive(Debug, Clone)]
pub(super) struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    read: SqlitePool,
    stats: Arc<Stats>,
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

        let mut writer = SqliteConnection::connect_with(&options).await?;
        sqlx::migrate!("migrations/sqlite").run(&mut writer).await?;
        // This process owns the file: whatever was in flight when it last stopped is due again.
        sqlx::query(
            "UPDATE outbox SET state = 'pending', lease_until = NULL WHERE state = 'in_flight'",
        )
        .execute(&mut writer)
        .await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        let stats = Arc::new(Stats::default());
        let (jobs, rx) = mpsc::channel(4096);
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

    pub(super) async fn accept(&self, accepted: Accepted) -> Result<AcceptOutcome, StoreError> {
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

    pub(super) async fn prune(&self, before: Millis) -> Result<u64, StoreError> {
        self.submit(|reply| Job::Prune(before, reply)).await
    }

    pub(super) async fn enqueue(
        &self,
        queue: &str,
        payload: String,
        headers: std::collections::BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let headers =
            serde_json::to_string(&headers).map_err(|e| StoreError::Corrupt(e.to_string()))?;
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

    pub(super) async fn queue_depth(&self, queue: &str) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM queue_messages WHERE queue = $1")
            .bind(queue)
            .fetch_one(&self.read)
            .await?;
        Ok(u64::try_from(count).unwrap_or_default())
    }

    pub(super) fn commit_stats(&self) -> CommitStats {
        CommitStats {
            commits: self.stats.commits.load(Ordering::Relaxed),
            writes: self.stats.writes.load(Ordering::Relaxed),
            messages: self.stats.messages.load(Ordering::Relaxed),
        }
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

    pub(super) async fn reply_for(
        &self,
        flow: &str,
        key: &str,
    ) -> Result<Option<StoredReply>, StoreError> {
        let row =
            sqlx::query("SELECT reply FROM messages WHERE flow = $1 AND idempotency_key = $2")
                .bind(flow)
                .bind(key)
                .fetch_optional(&self.read)
                .await?;
        row.map(|r| parse::<StoredReply>(&r.get::<String, _>(0)))
            .transpose()
    }

    /// A read transaction: queries in it see one snapshot, even when a commit lands between
    /// them (a status must never pair a new state with old data).
    async fn snapshot(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.read.begin().await?)
    }

    pub(super) async fn find_correlation(
        &self,
        context: &str,
        keys: &[String],
    ) -> Result<Option<Correlation>, StoreError> {
        let mut conn = self.snapshot().await?;
        for key in keys.iter().filter(|k| !k.is_empty()) {
            let id: Option<i64> = sqlx::query_scalar(
                "SELECT correlation_id FROM correlation_keys WHERE context = $1 AND key = $2",
            )
            .bind(context)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(id) = id {
                return load_correlation(&mut conn, id).await;
            }
        }
        Ok(None)
    }

    pub(super) async fn next_due(
        &self,
        flow: &str,
        target: &str,
    ) -> Result<Option<Millis>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE flow = $1 AND target = $2 AND state = 'pending'",
        )
        .bind(flow)
        .bind(target)
        .fetch_one(&self.read)
        .await?)
    }

    pub(super) async fn oldest_undelivered(&self) -> Result<Option<Millis>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(created_at) FROM outbox WHERE state IN ('pending', 'in_flight')",
        )
        .fetch_one(&self.read)
        .await?)
    }

    pub(super) async fn undelivered(&self) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'in_flight')",
        )
        .fetch_one(&self.read)
        .await?;
        Ok(u64::try_from(count).unwrap_or_default())
    }

    pub(super) async fn list_messages(
        &self,
        flow: Option<&str>,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<MessageSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, flow, status, correlation_id, error, received_at, updated_at FROM messages
             WHERE ($1 IS NULL OR flow = $1) AND ($2 IS NULL OR status = $2)
             ORDER BY received_at DESC, id DESC LIMIT $3",
        )
        .bind(flow)
        .bind(status)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        Ok(rows.iter().map(summary).collect())
    }

    pub(super) async fn message(&self, id: &str) -> Result<Option<MessageDetail>, StoreError> {
        let mut conn = self.snapshot().await?;
        let Some(row) = sqlx::query(
            "SELECT id, flow, status, correlation_id, error, received_at, updated_at, inbound, reply, record_id
             FROM messages WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        else {
            return Ok(None);
        };
        let deliveries = sqlx::query(
            "SELECT target, state, attempts, last_status, last_error, next_attempt_at FROM outbox
             WHERE message_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| OutboxEntry {
            target: r.get("target"),
            state: r.get("state"),
            attempts: u32::try_from(r.get::<i64, _>("attempts")).unwrap_or_default(),
            last_status: r
                .get::<Option<i64>, _>("last_status")
                .and_then(|s| u16::try_from(s).ok()),
            last_error: r.get("last_error"),
            next_attempt_at: rfc3339(r.get("next_attempt_at")),
        })
        .collect();
        let timeline = events(&mut conn, &[id.to_owned()]).await?;
        let correlation = match row.get::<Option<i64>, _>("record_id") {
            Some(record) => load_correlation(&mut conn, record).await?,
            None => None,
        };
        Ok(Some(MessageDetail {
            summary: summary(&row),
            inbound: parse(&row.get::<String, _>("inbound"))?,
            reply: parse(&row.get::<String, _>("reply"))?,
            deliveries,
            timeline,
            correlation,
        }))
    }

    pub(super) async fn replay_source(&self, id: &str) -> Result<Option<ReplaySource>, StoreError> {
        let row = sqlx::query("SELECT flow, inbound, meta FROM messages WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        row.map(|r| {
            Ok(ReplaySource {
                flow: r.get("flow"),
                inbound: parse(&r.get::<String, _>("inbound"))?,
                meta: parse(&r.get::<String, _>("meta"))?,
            })
        })
        .transpose()
    }

    pub(super) async fn trace(&self, key: &str) -> Result<Option<Trace>, StoreError> {
        let mut conn = self.snapshot().await?;
        let by_message: Option<Option<i64>> =
            sqlx::query_scalar("SELECT record_id FROM messages WHERE id = $1")
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?;
        let record = match by_message {
            Some(record) => record,
            None => {
                sqlx::query_scalar("SELECT correlation_id FROM correlation_keys WHERE key = $1 ORDER BY correlation_id LIMIT 1")
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await?
            }
        };
        let rows = match record {
            Some(record) => {
                sqlx::query(
                    "SELECT id, flow, status, correlation_id, error, received_at, updated_at FROM messages
                     WHERE record_id = $1 OR id = $2 ORDER BY received_at, id",
                )
                .bind(record)
                .bind(key)
                .fetch_all(&mut *conn)
                .await?
            }
            None if by_message.is_some() => {
                sqlx::query(
                    "SELECT id, flow, status, correlation_id, error, received_at, updated_at FROM messages WHERE id = $1",
                )
                .bind(key)
                .fetch_all(&mut *conn)
                .await?
            }
            None => return Ok(None),
        };
        let messages: Vec<MessageSummary> = rows.iter().map(summary).collect();
        let ids: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
        let mut timeline = events(&mut conn, &ids).await?;
        let correlation = match record {
            Some(record) => load_correlation(&mut conn, record).await?,
            None => None,
        };
        if let Some(correlation) = &correlation {
            for change in &correlation.history {
                timeline.push(Event {
                    at: change.at.clone(),
                    message_id: change.message_id.clone().unwrap_or_default(),
                    flow: String::new(),
                    kind: "state".into(),
                    detail: serde_json::json!({"context": correlation.context, "state": change.state}),
                });
            }
        }
        // RFC 3339 in UTC with the same precision sorts as text; the sort is stable, so
        // entries of one instant keep their recorded order.
        timeline.sort_by(|a, b| a.at.cmp(&b.at));
        Ok(Some(Trace {
            correlation,
            messages,
            timeline,
        }))
    }
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn summary(row: &SqliteRow) -> MessageSummary {
    MessageSummary {
        id: row.get("id"),
        flow: row.get("flow"),
        status: row.get("status"),
        correlation_id: row.get("correlation_id"),
        error: row.get("error"),
        received_at: rfc3339(row.get("received_at")),
        updated_at: rfc3339(row.get("updated_at")),
    }
}

async fn events(conn: &mut SqliteConnection, ids: &[String]) -> Result<Vec<Event>, StoreError> {
    let mut all = Vec::new();
    for id in ids {
        let rows = sqlx::query(
            "SELECT e.at, e.message_id, m.flow, e.kind, e.detail FROM events e JOIN messages m ON m.id = e.message_id
             WHERE e.message_id = $1 ORDER BY e.id",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            all.push(Event {
                at: rfc3339(row.get("at")),
                message_id: row.get("message_id"),
                flow: row.get("flow"),
                kind: row.get("kind"),
                detail: parse(&row.get::<String, _>("detail"))?,
            });
        }
    }
    Ok(all)
}

async fn load_correlation(
    conn: &mut SqliteConnection,
    id: i64,
) -> Result<Option<Correlation>, StoreError> {
    let Some(row) =
        sqlx::query("SELECT context, key, data, created_at FROM correlations WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
    else {
        return Ok(None);
    };
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT key FROM correlation_keys WHERE correlation_id = $1 ORDER BY rowid",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let history: Vec<StateChange> = sqlx::query(
        "SELECT state, at, message_id FROM correlation_states WHERE correlation_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| StateChange { state: r.get("state"), at: rfc3339(r.get("at")), message_id: r.get("message_id") })
    .collect();
    Ok(Some(Correlation {
        id,
        context: row.get("context"),
        key: row.get("key"),
        keys,
        data: parse(&row.get::<String, _>("data"))?,
        state: history.last().map(|h| h.state.clone()),
        history,
        created_at: rfc3339(row.get("created_at")),
    }))
}

/// Takes writes off the queue and commits them in batches: whatever queued up while the
/// previous commit was syncing shares the next one.
async fn write_loop(mut conn: SqliteConnection, mut jobs: mpsc::Receiver<Job>, stats: Arc<Stats>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let messages = batch
            .iter()
            .filter(|j| matches!(j, Job::Accept(..)))
            .count();
        let started = std::time::Instant::now();
        let committed = commit_batch(&mut conn, &mut batch).await;
        metrics::histogram!("ferry_store_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match committed {
            Ok(done) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats.writes.fetch_add(done.len() as u64, Ordering::Relaxed);
                stats.messages.fetch_add(messages as u64, Ordering::Relaxed);
                for finish in done {
                    finish(None);
                }
            }
            Err((done, error)) => {
                tracing::error!(%error, "store commit failed");
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
    for job in batch.drain(..) {
        // Each write is atomic on its own: a failing one is undone without its neighbours.
        if let Err(error) = sqlx::query("SAVEPOINT job").execute(&mut *tx).await {
            done.push(fail(job, &error));
            continue;
        }
        let finish = run_job(&mut tx, job).await;
        let end = if finish.1 {
            "RELEASE job"
        } else {
            "ROLLBACK TO job; RELEASE job"
        };
        let _ = sqlx::raw_sql(end).execute(&mut *tx).await;
        done.push(finish.0);
    }
    match tx.commit().await {
        Ok(()) => Ok(done),
        Err(error) => Err((done, error)),
    }
}

fn fail(job: Job, error: &sqlx::Error) -> Finish {
    let error = || StoreError::Corrupt(error.to_string());
    match job {
        Job::Accept(_, reply) => finisher(reply, Err(error())),
        Job::Attempt(_, reply) | Job::Correlate(_, reply) => finisher(reply, Err(error())),
        Job::Claim { reply, .. } => finisher(reply, Err(error())),
        Job::Prune(_, reply) => finisher(reply, Err(error())),
        Job::Enqueue { reply, .. } | Job::FinishQueue { reply, .. } | Job::Probe(reply) => {
            finisher(reply, Err(error()))
        }
        Job::ClaimQueue { reply, .. } => finisher(reply, Err(error())),
    }
}

/// Runs one job; returns how to report it and whether it succeeded.
async fn run_job(conn: &mut SqliteConnection, job: Job) -> (Finish, bool) {
    fn done<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> (Finish, bool) {
        let ok = result.is_ok();
        (finisher(reply, result), ok)
    }
    match job {
        Job::Accept(accepted, reply) => done(reply, accept(conn, *accepted).await),
        Job::Probe(reply) => done(reply, Ok(())),
        Job::Attempt(attempt, reply) => done(reply, attempt_done(conn, *attempt).await),
        Job::Correlate(writes, reply) => {
            let mut result = Ok(());
            for write in writes {
                if let Err(error) = correlate(conn, write, None).await {
                    result = Err(error);
                    break;
                }
            }
            done(reply, result)
        }
        Job::Claim {
            flow,
            target,
            limit,
            lease_until,
            reply,
        } => done(reply, claim(conn, &flow, &target, limit, lease_until).await),
        Job::Prune(before, reply) => done(reply, prune(conn, before).await),
        Job::Enqueue {
            queue,
            payload,
            headers,
            reply,
        } => {
            let now = now_ms();
            let result = sqlx::query(
                "INSERT INTO queue_messages (queue, payload, headers, state, next_attempt_at, created_at)
                 VALUES ($1, $2, $3, 'pending', $4, $4)",
            )
            .bind(queue)
            .bind(payload)
            .bind(headers)
            .bind(now)
            .execute(&mut *conn)
            .await;
            done(reply, result.map(|_| ()).map_err(Into::into))
        }
        Job::ClaimQueue {
            queue,
            limit,
            lease_until,
            reply,
        } => done(reply, claim_queue(conn, &queue, limit, lease_until).await),
        Job::FinishQueue {
            id,
            retry_at,
            reply,
        } => {
            let result = match retry_at {
                None => sqlx::query("DELETE FROM queue_messages WHERE id = $1").bind(id).execute(&mut *conn).await,
                Some(at) => {
                    sqlx::query(
                        "UPDATE queue_messages SET state = 'pending', attempts = attempts + 1, next_attempt_at = $1,
                                lease_until = NULL WHERE id = $2",
                    )
                    .bind(at)
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                }
            };
            done(reply, result.map(|_| ()).map_err(Into::into))
        }
    }
}

async fn accept(conn: &mut SqliteConnection, a: Accepted) -> Result<AcceptOutcome, StoreError> {
    let now = now_ms();
    let reply = serde_json::to_string(&a.reply).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if a.replay {
        sqlx::query(
            "UPDATE messages SET status = $1, document = $2, content_type = $3, error = $4, reply = $5, updated_at = $6
             WHERE id = $7",
        )
        .bind(a.status.as_str())
        .bind(a.document.to_string())
        .bind(&a.content_type)
        .bind(&a.error)
        .bind(&reply)
        .bind(now)
        .bind(&a.id)
        .execute(&mut *conn)
        .await?;
        sqlx::query("UPDATE outbox SET state = 'replayed', updated_at = $1 WHERE message_id = $2 AND state = 'dead'")
            .bind(now)
            .bind(&a.id)
            .execute(&mut *conn)
            .await?;
    } else {
        let inserted = sqlx::query(
            "INSERT INTO messages (id, flow, correlation_id, idempotency_key, status, inbound, meta, document,
                                   content_type, reply, error, received_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT DO NOTHING",
        )
        .bind(&a.id)
        .bind(&a.flow)
        .bind(&a.correlation_id)
        .bind(&a.idempotency_key)
        .bind(a.status.as_str())
        .bind(a.inbound.to_string())
        .bind(a.meta.to_string())
        .bind(a.document.to_string())
        .bind(&a.content_type)
        .bind(&reply)
        .bind(&a.error)
        .bind(a.received_at)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        if inserted.rows_affected() == 0 {
            let original: Option<String> = sqlx::query_scalar(
                "SELECT reply FROM messages WHERE (flow = $1 AND idempotency_key = $2) OR id = $3",
            )
            .bind(&a.flow)
            .bind(&a.idempotency_key)
            .bind(&a.id)
            .fetch_optional(&mut *conn)
            .await?;
            let original =
                original.ok_or_else(|| StoreError::Corrupt("duplicate without original".into()))?;
            return Ok(AcceptOutcome::Duplicate(parse(&original)?));
        }
    }
    let mut record = None;
    for write in a.correlation {
        record = Some(correlate(conn, write, Some(&a.id)).await?);
    }
    if let Some(record) = record {
        sqlx::query("UPDATE messages SET record_id = $1 WHERE id = $2")
            .bind(record)
            .bind(&a.id)
            .execute(&mut *conn)
            .await?;
    }
    for target in &a.targets {
        sqlx::query(
            "INSERT INTO outbox (message_id, flow, target, state, attempts, next_attempt_at, created_at, updated_at)
             VALUES ($1, $2, $3, 'pending', 0, $4, $4, $4)",
        )
        .bind(&a.id)
        .bind(&a.flow)
        .bind(target)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    if !a.events.is_empty() {
        // One statement for the whole timeline: statements, not rows, are what cost here.
        let mut insert =
            sqlx::QueryBuilder::new("INSERT INTO events (message_id, at, kind, detail) ");
        insert.push_values(&a.events, |mut row, event| {
            row.push_bind(&a.id)
                .push_bind(now)
                .push_bind(event.kind)
                .push_bind(event.detail.to_string());
        });
        insert.build().execute(&mut *conn).await?;
    }
    Ok(AcceptOutcome::Stored)
}

async fn insert_event(
    conn: &mut SqliteConnection,
    message_id: &str,
    at: Millis,
    kind: &str,
    detail: &Value,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO events (message_id, at, kind, detail) VALUES ($1, $2, $3, $4)")
        .bind(message_id)
        .bind(at)
        .bind(kind)
        .bind(detail.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Applies a correlation change and returns the record's id.
async fn correlate(
    conn: &mut SqliteConnection,
    write: CorrelationWrite,
    message_id: Option<&str>,
) -> Result<i64, StoreError> {
    let now = now_ms();
    let (id, context, keys, patch, state) = match write {
        CorrelationWrite::Save {
            context,
            keys,
            data,
            state,
        } => {
            let keys: Vec<String> = keys.into_iter().filter(|k| !k.is_empty()).collect();
            let Some(main) = keys.first().cloned() else {
                return Err(StoreError::Corrupt(
                    "a correlation record needs a key".into(),
                ));
            };
            let mut existing = None;
            for key in &keys {
                existing = sqlx::query_scalar(
                    "SELECT correlation_id FROM correlation_keys WHERE context = $1 AND key = $2",
                )
                .bind(&context)
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?;
                if existing.is_some() {
                    break;
                }
            }
            let id = match existing {
                Some(id) => id,
                None => {
                    sqlx::query_scalar(
                        "INSERT INTO correlations (context, key, data, created_at, updated_at)
                         VALUES ($1, $2, '{}', $3, $3) RETURNING id",
                    )
                    .bind(&context)
                    .bind(&main)
                    .bind(now)
                    .fetch_one(&mut *conn)
                    .await?
                }
            };
            (id, context, keys, data, state)
        }
        CorrelationWrite::Update {
            record_id,
            keys,
            data,
            state,
        } => {
            let context: String =
                sqlx::query_scalar("SELECT context FROM correlations WHERE id = $1")
                    .bind(record_id)
                    .fetch_one(&mut *conn)
                    .await?;
            (record_id, context, keys, data, state)
        }
    };
    if !patch.is_null() {
        let current: String = sqlx::query_scalar("SELECT data FROM correlations WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *conn)
            .await?;
        let mut data: Value = parse(&current)?;
        merge(&mut data, &patch);
        sqlx::query("UPDATE correlations SET data = $1, updated_at = $2 WHERE id = $3")
            .bind(data.to_string())
            .bind(now)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    for key in keys.iter().filter(|k| !k.is_empty()) {
        sqlx::query(
            "INSERT INTO correlation_keys (context, key, correlation_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(&context)
        .bind(key)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    if let Some(state) = state {
        sqlx::query("INSERT INTO correlation_states (correlation_id, state, message_id, at) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(state)
            .bind(message_id)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        sqlx::query("UPDATE correlations SET updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(id)
}

async fn claim(
    conn: &mut SqliteConnection,
    flow: &str,
    target: &str,
    limit: u32,
    lease_until: Millis,
) -> Result<Vec<Claimed>, StoreError> {
    let now = now_ms();
    // SQLite has no SKIP LOCKED; with one writer, UPDATE … RETURNING claims atomically.
    let rows = sqlx::query(
        "UPDATE outbox SET state = 'in_flight', lease_until = $1, updated_at = $2
         WHERE id IN (SELECT id FROM outbox WHERE flow = $3 AND target = $4
                      AND ((state = 'pending' AND next_attempt_at <= $2) OR (state = 'in_flight' AND lease_until < $2))
                      ORDER BY next_attempt_at, id LIMIT $5)
         RETURNING id, message_id, attempts",
    )
    .bind(lease_until)
    .bind(now)
    .bind(flow)
    .bind(target)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        let message_id: String = row.get("message_id");
        let message =
            sqlx::query("SELECT document, content_type, record_id FROM messages WHERE id = $1")
                .bind(&message_id)
                .fetch_one(&mut *conn)
                .await?;
        claimed.push(Claimed {
            outbox_id: row.get("id"),
            attempts: u32::try_from(row.get::<i64, _>("attempts")).unwrap_or_default(),
            document: parse(&message.get::<String, _>("document"))?,
            content_type: message.get("content_type"),
            record_id: message.get("record_id"),
            message_id,
        });
    }
    Ok(claimed)
}

async fn claim_queue(
    conn: &mut SqliteConnection,
    queue: &str,
    limit: u32,
    lease_until: Millis,
) -> Result<Vec<QueueItem>, StoreError> {
    let now = now_ms();
    let rows = sqlx::query(
        "UPDATE queue_messages SET state = 'in_flight', lease_until = $1
         WHERE id IN (SELECT id FROM queue_messages WHERE queue = $2
                      AND ((state = 'pending' AND next_attempt_at <= $3) OR (state = 'in_flight' AND lease_until < $3))
                      ORDER BY next_attempt_at, id LIMIT $4)
         RETURNING id, payload, headers, attempts",
    )
    .bind(lease_until)
    .bind(queue)
    .bind(now)
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await?;
    let mut items: Vec<QueueItem> = rows
        .iter()
        .map(|row| {
            Ok(QueueItem {
                id: row.get("id"),
                payload: row.get("payload"),
                headers: parse(&row.get::<String, _>("headers"))?,
                attempts: u32::try_from(row.get::<i64, _>("attempts")).unwrap_or_default(),
            })
        })
        .collect::<Result<_, StoreError>>()?;
    items.sort_by_key(|item| item.id);
    Ok(items)
}

async fn attempt_done(conn: &mut SqliteConnection, a: AttemptRecord) -> Result<(), StoreError> {
    let now = now_ms();
    let (state, next) = match a.outcome {
        AttemptOutcome::Delivered => ("delivered", now),
        AttemptOutcome::RetryAt(at) => ("pending", at),
        AttemptOutcome::Dead => ("dead", now),
    };
    sqlx::query(
        "UPDATE outbox SET state = $1, attempts = $2, next_attempt_at = $3, last_status = $4, last_error = $5,
                           lease_until = NULL, updated_at = $6
         WHERE id = $7",
    )
    .bind(state)
    .bind(i64::from(a.attempt))
    .bind(next)
    .bind(a.status.map(i64::from))
    .bind(&a.error)
    .bind(now)
    .bind(a.outbox_id)
    .execute(&mut *conn)
    .await?;
    match a.outcome {
        AttemptOutcome::Delivered => {
            sqlx::query(
                "UPDATE messages SET status = 'delivered', updated_at = $1 WHERE id = $2
                 AND NOT EXISTS (SELECT 1 FROM outbox WHERE message_id = $2 AND state NOT IN ('delivered', 'replayed'))",
            )
            .bind(now)
            .bind(&a.message_id)
            .execute(&mut *conn)
            .await?;
        }
        AttemptOutcome::Dead => {
            sqlx::query(
                "UPDATE messages SET status = $1, error = $2, updated_at = $3 WHERE id = $4",
            )
            .bind(MessageStatus::Dead.as_str())
            .bind(&a.error)
            .bind(now)
            .bind(&a.message_id)
            .execute(&mut *conn)
            .await?;
        }
        AttemptOutcome::RetryAt(_) => {}
    }
    let outcome = match a.outcome {
        AttemptOutcome::Delivered => "delivered".to_owned(),
        AttemptOutcome::RetryAt(at) => format!("retry at {}", rfc3339(at)),
        AttemptOutcome::Dead => "dead".to_owned(),
    };
    let detail = serde_json::json!({
        "target": a.target, "attempt": a.attempt, "status": a.status, "latency_ms": a.latency_ms,
        "error": a.error, "outcome": outcome,
    });
    insert_event(conn, &a.message_id, now, "attempt", &detail).await?;
    if let Some(write) = a.correlation {
        correlate(conn, write, Some(&a.message_id)).await?;
    }
    Ok(())
}

async fn prune(conn: &mut SqliteConnection, before: Millis) -> Result<u64, StoreError> {
    let pruned = sqlx::query("DELETE FROM messages WHERE status = 'delivered' AND updated_at < $1")
        .bind(before)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    sqlx::query(
        "DELETE FROM correlations WHERE updated_at < $1
         AND NOT EXISTS (SELECT 1 FROM messages WHERE record_id = correlations.id)",
    )
    .bind(before)
    .execute(&mut *conn)
    .await?;
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn accepted(id: &str, key: Option<&str>) -> Accepted {
        Accepted {
            id: id.into(),
            flow: "f".into(),
            correlation_id: id.into(),
            idempotency_key: key.map(Into::into),
            received_at: now_ms(),
            inbound: json!({"a": 1}),
            meta: json!({"id": id}),
            document: json!({"body": {"a": 1}, "vars": {}, "meta": {"id": id}}),
            content_type: None,
            status: MessageStatus::Accepted,
            error: None,
            reply: StoredReply {
                status: 202,
                headers: vec![],
                body: json!({"id": id}),
            },
            targets: vec!["lab".into()],
            correlation: vec![CorrelationWrite::Save {
                context: "req".into(),
                keys: vec![id.into(), format!("ref-{id}")],
                data: json!({"ref": format!("ref-{id}")}),
                state: Some("accepted".into()),
            }],
            events: vec![super::super::NewEvent {
                kind: "received",
                detail: json!({}),
            }],
            replay: false,
        }
    }

    #[tokio::test]
    async fn accept_claim_deliver_and_trace() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&format!("sqlite://{}/s.db", dir.path().display()))
            .await
            .unwrap();
        assert_eq!(
            store.accept(accepted("m1", Some("k1"))).await.unwrap(),
            AcceptOutcome::Stored
        );
        // The same idempotency key gives the original reply.
        let again = store.accept(accepted("m2", Some("k1"))).await.unwrap();
        assert!(matches!(again, AcceptOutcome::Duplicate(r) if r.body == json!({"id": "m1"})));

        let claimed = store
            .claim("f", "lab", 10, now_ms() + 60_000)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        assert!(
            store
                .claim("f", "lab", 10, now_ms() + 60_000)
                .await
                .unwrap()
                .is_empty(),
            "claimed once"
        );
        let record = claimed[0].record_id.unwrap();
        store
            .record_attempt(AttemptRecord {
                outbox_id: claimed[0].outbox_id,
                message_id: "m1".into(),
                target: "lab".into(),
                attempt: 1,
                outcome: AttemptOutcome::Delivered,
                status: Some(201),
                error: None,
                latency_ms: 3,
                correlation: Some(CorrelationWrite::Update {
                    record_id: record,
                    keys: vec!["LAB-1".into()],
                    data: json!({"lab_order_id": "LAB-1"}),
                    state: Some("sent".into()),
                }),
            })
            .await
            .unwrap();

        let found = store
            .find_correlation("req", &["nope".into(), "LAB-1".into()])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.key, "m1");
        assert_eq!(
            found.data,
            json!({"ref": "ref-m1", "lab_order_id": "LAB-1"})
        );
        assert_eq!(found.state.as_deref(), Some("sent"));
        assert_eq!(found.history.len(), 2);
        let trace = store.trace("ref-m1").await.unwrap().unwrap();
        assert_eq!(trace.messages.len(), 1);
        assert_eq!(trace.messages[0].status, "delivered");
        let kinds: Vec<&str> = trace.timeline.iter().map(|e| e.kind.as_str()).collect();
        assert!(
            kinds.contains(&"attempt") && kinds.contains(&"state"),
            "{kinds:?}"
        );
        assert_eq!(store.undelivered().await.unwrap(), 0);
        assert_eq!(store.prune(now_ms() + 1).await.unwrap(), 1);
        assert!(store.message("m1").await.unwrap().is_none());
    }
}
