//! The durable store: accepted messages, the delivery outbox, correlation records and every
//! message's timeline.
//!
//! [`Store`] is the one interface flows and delivery use; the backend behind it is chosen by
//! URL, and both backends run the same queries (`sql.rs`). SQLite (a file, or
//! `sqlite::memory:`) is the embedded default: one process, whose concurrent writes share
//! transactions (group commit), so durability costs one sync per batch, not one per request.
//! PostgreSQL (`postgres://…`) is shared by any number of processes, which split the work
//! between them through row locks and leases.

mod exec;
mod postgres;
mod sqlite;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Unix time in milliseconds, as stored.
pub type Millis = i64;

/// The current time in unix milliseconds.
pub fn now_ms() -> Millis {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Formats unix milliseconds as RFC 3339 in UTC, always with three decimals: stamps then
/// sort as text in time order, which timelines rely on (trimmed decimals would put
/// `…:52Z` after `…:52.001Z`, and `…:52.71Z` after `…:52.715Z`).
pub fn rfc3339(ms: Millis) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_default()
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed.
    #[error("store: {0}")]
    Database(#[from] sqlx::Error),
    /// SQLite refused or failed a write.
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Schema migration failed at start.
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The URL names no supported store.
    #[error(
        "unsupported store URL \"{0}\"; use sqlite://PATH, sqlite::memory: or postgres://USER@HOST/DATABASE"
    )]
    Url(String),
    /// The claim an attempt was made under ran out, and another worker took the entry over:
    /// its outcome, not this one, counts.
    #[error("the claim on this delivery ran out and another worker took it over")]
    LeaseLost,
    /// The database takes no writes: a standby in recovery, say.
    #[error("store: the database takes no writes (a standby in recovery)")]
    ReadOnly,
    /// The store is shutting down.
    #[error("store is closed")]
    Closed,
    /// Stored data could not be read back.
    #[error("store data: {0}")]
    Corrupt(String),
}

/// A store that fails leaves the caller nothing accepted: `503 unavailable`.
impl From<StoreError> for crate::error::ServeError {
    fn from(error: StoreError) -> Self {
        Self::Flow(crate::error::FlowError::Unavailable(error.to_string()))
    }
}

/// The reply a caller got, kept so a repeated submission gets the same one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredReply {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// JSON body.
    pub body: Value,
}

/// The first submission under an idempotency key: its reply, and what identified it.
#[derive(Debug, Clone, PartialEq)]
pub struct Prior {
    /// The reply it got.
    pub reply: StoredReply,
    /// Its fingerprint ([`crate::message::Message::fingerprint`]); none for messages stored
    /// before fingerprints were kept.
    pub fingerprint: Option<String>,
}

impl Prior {
    /// Whether a submission with `fingerprint` repeats this one (the same request sent
    /// again) rather than reusing its key for another.
    pub fn repeated_by(&self, fingerprint: Option<&str>) -> bool {
        match (self.fingerprint.as_deref(), fingerprint) {
            (Some(first), Some(again)) => first == again,
            _ => true,
        }
    }
}

/// Where a stored message stands.
///
/// A message with deliveries to make is stored `Accepted` and read as `Delivered` once none is
/// left: its deliveries, not a write to the message, say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageStatus {
    /// Committed; deliveries pending.
    Accepted,
    /// Every delivery done (stored as such when there was nothing to deliver).
    Delivered,
    /// A delivery failed for good, or the message could not be correlated: a dead letter.
    Dead,
}

impl MessageStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
        }
    }
}

/// A timeline entry to record.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// What happened: `received`, `step`, `queued`, `attempt`, `delivered`, `dead`, `replayed`…
    pub kind: &'static str,
    /// Details, as JSON.
    pub detail: Value,
}

/// A change to a correlation record.
#[derive(Debug, Clone, PartialEq)]
pub enum CorrelationWrite {
    /// Create the record found by any of `keys` in `context`, or update it.
    Save {
        /// Namespace of the record, such as `test-request`.
        context: String,
        /// Keys it can be found by; the first is its main key.
        keys: Vec<String>,
        /// Fields merged into its data.
        data: Value,
        /// A lifecycle state to append.
        state: Option<String>,
    },
    /// Update a known record.
    Update {
        /// The record.
        record_id: i64,
        /// More keys it can be found by.
        keys: Vec<String>,
        /// Fields merged into its data.
        data: Value,
        /// A lifecycle state to append.
        state: Option<String>,
    },
}

/// What a delivery changes in its message's correlation record (`on_delivered` /
/// `on_failed`), before the record is known.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordChange {
    /// More keys it can be found by.
    pub keys: Vec<String>,
    /// Fields merged into its data.
    pub data: Value,
    /// A lifecycle state to append.
    pub state: Option<String>,
}

impl RecordChange {
    /// This change, made to `record`.
    #[must_use]
    pub fn to(self, record: i64) -> CorrelationWrite {
        CorrelationWrite::Update {
            record_id: record,
            keys: self.keys,
            data: self.data,
            state: self.state,
        }
    }
}

/// A message to commit, with its deliveries, correlation changes and timeline.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Message id.
    pub id: String,
    /// Flow name.
    pub flow: String,
    /// Correlation id (from `meta`).
    pub correlation_id: String,
    /// The caller's idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// What identifies the request besides its key, to tell a repeat from a conflict.
    pub fingerprint: Option<String>,
    /// When it was received.
    pub received_at: Millis,
    /// The body as received, as JSON text.
    pub inbound: String,
    /// `meta` as received, as JSON text.
    pub meta: String,
    /// `{body, vars, meta}` after the steps, as JSON text.
    pub document: String,
    /// Content type of a text body.
    pub content_type: Option<String>,
    /// Accepted, or dead when it could not be handled.
    pub status: MessageStatus,
    /// Why it is dead.
    pub error: Option<String>,
    /// What the caller is answered.
    pub reply: StoredReply,
    /// Deliveries to make, one per target.
    pub targets: Vec<Queued>,
    /// Correlation changes the steps made.
    pub correlation: Vec<CorrelationWrite>,
    /// Timeline entries.
    pub events: Vec<NewEvent>,
    /// Whether this replays a stored message (same id) instead of storing a new one: its
    /// `inbound` and `meta` stay as first stored, and these fields are not read.
    pub replay: bool,
}

/// A delivery a message is accepted with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// The target.
    pub target: String,
    /// Until when the accepting process holds the delivery when its worker takes it over as
    /// the message commits: the entry is stored claimed (in flight) instead of pending, so the
    /// worker sends it without claiming it and reading the message back. A replay's entries
    /// are always pending.
    pub claimed_until: Option<Millis>,
}

impl Queued {
    /// A delivery left pending, for whichever worker claims it.
    pub fn pending(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            claimed_until: None,
        }
    }
}

/// What accepting a message came to: stored, or found to repeat an earlier one.
#[derive(Debug, Clone, PartialEq)]
pub enum Acceptance {
    /// Stored.
    Stored(Stored),
    /// The flow already has a message with this idempotency key.
    Duplicate(Prior),
}

/// What a stored message's deliveries need to be sent without reading it back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// The outbox entry of each of [`Accepted::targets`] stored claimed, in their order;
    /// `None` for one left pending.
    pub claimed: Vec<Option<i64>>,
    /// The message's correlation record.
    pub record_id: Option<i64>,
    /// When its deliveries were queued: their retry budgets run from here.
    pub queued_at: Millis,
}

/// A correlation record as flows and operators see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Correlation {
    /// Record id.
    #[serde(skip)]
    pub id: i64,
    /// Namespace.
    pub context: String,
    /// Main key.
    pub key: String,
    /// Every key it can be found by.
    pub keys: Vec<String>,
    /// Its data.
    pub data: Value,
    /// The latest lifecycle state.
    pub state: Option<String>,
    /// Every state it went through, oldest first.
    pub history: Vec<StateChange>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// Every target its messages went to, and whether each has them.
    pub recipients: Vec<Recipient>,
}

/// One target of a message that belongs to a correlation record: who was to receive it,
/// and how far that got.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recipient {
    /// The flow the message was accepted by.
    pub flow: String,
    /// The target: one of the flow's own, or a partner flow that takes or subscribes.
    pub target: String,
    /// `pending`, `in_flight`, `delivered` or `dead`.
    pub state: String,
    /// Attempts made.
    pub attempts: u32,
    /// When the state was last changed (RFC 3339).
    pub updated_at: String,
}

/// One lifecycle state of a correlation record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateChange {
    /// The state.
    pub state: String,
    /// When (RFC 3339).
    pub at: String,
    /// The message that set it.
    pub message_id: Option<String>,
}

impl Correlation {
    /// The record as flows read it in `vars`.
    pub fn to_value(&self) -> Value {
        json!({
            "key": self.key,
            "keys": self.keys,
            "data": self.data,
            "state": self.state,
            "history": self.history,
            "created_at": self.created_at,
            "recipients": self.recipients,
        })
    }
}

/// An outbox entry claimed for delivery.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Outbox row.
    pub outbox_id: i64,
    /// The message.
    pub message_id: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// When the delivery was queued (accepted, or replayed): its retry budget runs from here.
    pub queued_at: Millis,
    /// `{body, vars, meta}` after the steps.
    pub document: Value,
    /// Content type of a text body.
    pub content_type: Option<String>,
    /// The message's correlation record.
    pub record_id: Option<i64>,
    /// Until when the claim holds; the attempt's outcome is recorded only under it.
    pub lease_until: Millis,
}

/// Where a delivery stands after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    /// Delivered.
    Delivered,
    /// Try again at this time.
    RetryAt(Millis),
    /// Failed for good: a dead letter.
    Dead,
}

/// The result of one delivery attempt.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// Outbox row.
    pub outbox_id: i64,
    /// The message.
    pub message_id: String,
    /// The target's name.
    pub target: String,
    /// 1-based attempt number.
    pub attempt: u32,
    /// What happens next.
    pub outcome: AfterAttempt,
    /// The target's status, when it answered.
    pub status: Option<u16>,
    /// What went wrong, when something did.
    pub error: Option<String>,
    /// The start of what the target answered.
    pub answer: Option<String>,
    /// How long the attempt took.
    pub latency_ms: u64,
    /// The correlation change the outcome makes (`on_delivered` / `on_failed`).
    pub correlation: Option<CorrelationWrite>,
    /// The claim the attempt was made under ([`Claimed::lease_until`]).
    pub lease_until: Millis,
}

/// A stored message, for operators.
#[derive(Debug, Clone, Serialize)]
pub struct MessageSummary {
    /// Message id.
    pub id: String,
    /// Flow name.
    pub flow: String,
    /// `accepted`, `delivered` or `dead`.
    pub status: String,
    /// Correlation id.
    pub correlation_id: String,
    /// Why it is dead.
    pub error: Option<String>,
    /// When it was received (RFC 3339).
    pub received_at: String,
    /// When it last changed (RFC 3339).
    pub updated_at: String,
}

/// Which stored messages to list: every field that is set must match.
#[derive(Debug, Clone, Default)]
pub struct MessageFilter {
    /// Of this flow.
    pub flow: Option<String>,
    /// In this state: `accepted`, `delivered` or `dead`.
    pub status: Option<String>,
    /// With a delivery to this target that failed for good.
    pub dead_target: Option<String>,
    /// Received at or after.
    pub since: Option<Millis>,
    /// Received before.
    pub until: Option<Millis>,
    /// At most this many.
    pub limit: u32,
}

impl MessageFilter {
    /// At most `limit` dead letters, of `flow` and with a dead delivery to `target` when
    /// given.
    pub fn dead_letters(flow: Option<String>, target: Option<String>, limit: u32) -> Self {
        Self {
            flow,
            status: Some(MessageStatus::Dead.as_str().to_owned()),
            dead_target: target,
            limit,
            ..Self::default()
        }
    }
}

/// Where every flow and target stands: what operators look at first.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overview {
    /// Messages per flow and state.
    pub flows: Vec<FlowCounts>,
    /// Deliveries per target that are not done, or failed for good.
    pub targets: Vec<TargetBacklog>,
}

/// How many of a flow's messages are in each state.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlowCounts {
    /// The flow.
    pub flow: String,
    /// Taken, with deliveries not yet done.
    pub accepted: u64,
    /// Every delivery done.
    pub delivered: u64,
    /// Dead letters.
    pub dead: u64,
}

/// A target's deliveries that are not done, and those that failed for good.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetBacklog {
    /// The flow.
    pub flow: String,
    /// The target.
    pub target: String,
    /// Deliveries waiting or in flight.
    pub open: u64,
    /// Of those, how many failed at least once and wait for their next attempt.
    pub retrying: u64,
    /// Deliveries that failed for good.
    pub dead: u64,
    /// When the oldest open delivery was queued.
    pub oldest_open: Option<Millis>,
    /// The error of the latest failed attempt among the open deliveries: the target is
    /// failing now when there is one.
    pub failing: Option<String>,
}

/// A timeline entry.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// When (RFC 3339).
    pub at: String,
    /// The message.
    pub message_id: String,
    /// The message's flow.
    pub flow: String,
    /// What happened.
    pub kind: String,
    /// Details.
    pub detail: Value,
}

/// A delivery, for operators.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxEntry {
    /// The target.
    pub target: String,
    /// `pending`, `in_flight`, `delivered`, `dead` or `replayed`.
    pub state: String,
    /// Attempts made.
    pub attempts: u32,
    /// The target's last status.
    pub last_status: Option<u16>,
    /// The last error.
    pub last_error: Option<String>,
    /// When the next attempt is due (RFC 3339).
    pub next_attempt_at: String,
}

/// A stored message with everything known about it.
#[derive(Debug, Clone, Serialize)]
pub struct MessageDetail {
    /// The summary.
    #[serde(flatten)]
    pub summary: MessageSummary,
    /// The body as received.
    pub inbound: Value,
    /// The message after its steps (`body`, `vars`, `meta`): what its targets render from.
    /// Not serialized: the flow's sensitive fields may sit anywhere in it.
    #[serde(skip)]
    pub document: Value,
    /// The reply the caller got.
    pub reply: Value,
    /// Deliveries.
    pub deliveries: Vec<OutboxEntry>,
    /// Timeline, oldest first.
    pub timeline: Vec<Event>,
    /// The correlation record it belongs to.
    pub correlation: Option<Correlation>,
}

/// What a replay needs: the message as it came in.
#[derive(Debug, Clone)]
pub struct ReplaySource {
    /// Flow name.
    pub flow: String,
    /// The body as received.
    pub inbound: Value,
    /// `meta` as received.
    pub meta: Value,
}

/// A journey across flows: a correlation record and every message in it.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    /// The record, when the key found one.
    pub correlation: Option<Correlation>,
    /// The messages, oldest first.
    pub messages: Vec<MessageSummary>,
    /// Every timeline entry of every message and every state, oldest first.
    pub timeline: Vec<Event>,
}

/// A message in an embedded queue.
#[derive(Debug, Clone)]
pub struct QueueItem {
    /// Row id.
    pub id: i64,
    /// The payload.
    pub payload: String,
    /// Its headers.
    pub headers: std::collections::BTreeMap<String, String>,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// Group-commit counters: how many writes shared how many commits.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CommitStats {
    /// Transactions committed.
    pub commits: u64,
    /// Writes (accepted messages, attempts, claims…) in them.
    pub writes: u64,
    /// Accepted messages in them.
    pub messages: u64,
}

/// How a store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// How long a claim on a delivery or an embedded-queue message holds. A worker that dies
    /// holding one lets it go when it runs out; keep it above the slowest target's timeout.
    pub lease: Duration,
    /// Most connections to a PostgreSQL store, per process.
    pub connections: u32,
    /// The longest a request waits for a PostgreSQL connection: while the database is
    /// away, callers get 503 after this, not after a pool's default.
    pub wait: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(60),
            connections: 10,
            wait: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone)]
enum Backend {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

/// Calls the same method on whichever backend the store has, and awaits it.
///
/// PostgreSQL's futures (sqlx's) are about 15 KB: boxed, so that a future awaiting the store
/// does not carry their size whatever the backend. Futures move from caller to caller before
/// they run, and every move copies their whole size.
macro_rules! on_backend {
    ($self:ident, $backend:ident => $call:expr) => {
        match &$self.backend {
            Backend::Sqlite($backend) => $call.await,
            Backend::Postgres($backend) => Box::pin($call).await,
        }
    };
}

/// Commit counters a backend keeps.
#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    writes: AtomicU64,
    messages: AtomicU64,
}

impl Counters {
    /// Counts one commit of `writes` writes, `messages` of them accepted messages.
    fn add(&self, writes: u64, messages: u64) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(writes, Ordering::Relaxed);
        self.messages.fetch_add(messages, Ordering::Relaxed);
    }

    fn get(&self) -> CommitStats {
        CommitStats {
            commits: self.commits.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
        }
    }
}

/// The store. Cheap to clone; clones share one database.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
    lease: Duration,
}

impl Store {
    /// Opens the store at `url` with default options; see [`Store::open_with`].
    ///
    /// # Errors
    ///
    /// When the URL is not supported or the database cannot be opened or migrated.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, StoreOptions::default()).await
    }

    /// Opens the store at `url`, creating it and running migrations as needed.
    ///
    /// `sqlite://PATH` is a file (created with its folder), `sqlite::memory:` lives in memory;
    /// both belong to one process. `postgres://…` is a PostgreSQL database that any number of
    /// processes share.
    ///
    /// # Errors
    ///
    /// When the URL is not supported or the database cannot be opened or migrated.
    pub async fn open_with(url: &str, options: StoreOptions) -> Result<Self, StoreError> {
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite(sqlite::SqliteStore::open(url).await?)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres(
                postgres::PgStore::open(url, options.connections, options.wait).await?,
            )
        } else {
            return Err(StoreError::Url(url.to_owned()));
        };
        Ok(Self {
            backend,
            lease: options.lease,
        })
    }

    /// How long claims hold.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Until when a claim made now holds.
    pub fn lease_until(&self) -> Millis {
        now_ms().saturating_add(i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX))
    }

    /// Commits a message with its outbox entries, correlation changes and timeline.
    ///
    /// # Errors
    ///
    /// When the database fails; nothing of the message is stored then.
    pub async fn accept(&self, accepted: Accepted) -> Result<Acceptance, StoreError> {
        on_backend!(self, b => b.accept(accepted))
    }

    /// The first submission of `flow` under this idempotency key.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn reply_for(&self, flow: &str, key: &str) -> Result<Option<Prior>, StoreError> {
        on_backend!(self, b => b.reply_for(flow, key))
    }

    /// The record in `context` found by the first of `keys` that names one.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn find_correlation(
        &self,
        context: &str,
        keys: &[String],
    ) -> Result<Option<Correlation>, StoreError> {
        on_backend!(self, b => b.find_correlation(context, keys))
    }

    /// Commits correlation changes that no stored message carries, and `then` (what a
    /// synchronous delivery changes) to the record the last of `writes` made or found, in
    /// the same transaction.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn correlate(
        &self,
        writes: Vec<CorrelationWrite>,
        then: Vec<RecordChange>,
    ) -> Result<(), StoreError> {
        on_backend!(self, b => b.correlate(writes, then))
    }

    /// Claims up to `limit` due outbox entries of `flow`'s `target` for [`Store::lease`];
    /// entries whose claim ran out are due again.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn claim(
        &self,
        flow: &str,
        target: &str,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        let lease_until = self.lease_until();
        on_backend!(self, b => b.claim(flow, target, limit, lease_until))
    }

    /// Gives claimed entries (outbox id and the claim's `lease_until`) back unattempted, due
    /// again at once.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn release(&self, entries: Vec<(i64, Millis)>) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        on_backend!(self, b => b.release(entries))
    }

    /// When the next pending entry of `flow`'s `target` is due.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn next_due(&self, flow: &str, target: &str) -> Result<Option<Millis>, StoreError> {
        on_backend!(self, b => b.next_due(flow, target))
    }

    /// Records an attempt's outcome.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn record_attempt(&self, attempt: AttemptRecord) -> Result<(), StoreError> {
        on_backend!(self, b => b.record_attempt(attempt))
    }

    /// Stored messages, newest first, optionally of one flow and status.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn list_messages(
        &self,
        flow: Option<&str>,
        status: Option<&str>,
        limit: u32,
    ) -> Result<Vec<MessageSummary>, StoreError> {
        let filter = MessageFilter {
            flow: flow.map(str::to_owned),
            status: status.map(str::to_owned),
            limit,
            ..MessageFilter::default()
        };
        self.find_messages(&filter).await
    }

    /// Stored messages matching `filter`, newest first.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn find_messages(
        &self,
        filter: &MessageFilter,
    ) -> Result<Vec<MessageSummary>, StoreError> {
        on_backend!(self, b => b.find_messages(filter))
    }

    /// How many messages each flow holds in each state, and each target's backlog.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn overview(&self) -> Result<Overview, StoreError> {
        on_backend!(self, b => b.overview())
    }

    /// One message with its deliveries, timeline and correlation record.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn message(&self, id: &str) -> Result<Option<MessageDetail>, StoreError> {
        on_backend!(self, b => b.message(id))
    }

    /// What replaying message `id` needs.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn replay_source(&self, id: &str) -> Result<Option<ReplaySource>, StoreError> {
        on_backend!(self, b => b.replay_source(id))
    }

    /// The journey that `key` belongs to: `key` is a message id, a correlation (request) id,
    /// an idempotency key (an HL7 control id, say) or any correlation key.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn trace(&self, key: &str) -> Result<Option<Trace>, StoreError> {
        on_backend!(self, b => b.trace(key))
    }

    /// Deletes delivered messages, and correlation records with no message left, last
    /// changed before `before`. Returns how many messages went.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn prune(&self, before: Millis) -> Result<u64, StoreError> {
        on_backend!(self, b => b.prune(before))
    }

    /// Takes webhook id `id` of `scope` (a flow) until `expires_at`: true the first time,
    /// false for a replay, whichever process sharing the store saw it first.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn first_sight(
        &self,
        scope: &str,
        id: &str,
        expires_at: Millis,
    ) -> Result<bool, StoreError> {
        on_backend!(self, b => b.first_sight(scope, id, expires_at))
    }

    /// Lets webhook id `id` of `scope` be taken again: its message was not handled, and its
    /// sender will try again with the same id.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn forget_sight(&self, scope: &str, id: &str) -> Result<(), StoreError> {
        on_backend!(self, b => b.forget_sight(scope, id))
    }

    /// Appends a message to embedded queue `queue`.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn enqueue(
        &self,
        queue: &str,
        payload: String,
        headers: std::collections::BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let headers =
            serde_json::to_string(&headers).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        on_backend!(self, b => b.enqueue(queue, payload, headers))
    }

    /// Claims up to `limit` due messages of embedded queue `queue` for [`Store::lease`].
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn claim_queue(&self, queue: &str, limit: u32) -> Result<Vec<QueueItem>, StoreError> {
        let lease_until = self.lease_until();
        on_backend!(self, b => b.claim_queue(queue, limit, lease_until))
    }

    /// Removes a consumed queue message (`retry_at: None`), or puts it back until `retry_at`.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn finish_queue(&self, id: i64, retry_at: Option<Millis>) -> Result<(), StoreError> {
        on_backend!(self, b => b.finish_queue(id, retry_at))
    }

    /// Messages waiting in embedded queue `queue`, including those in flight.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn queue_depth(&self, queue: &str) -> Result<u64, StoreError> {
        on_backend!(self, b => b.queue_depth(queue))
    }

    /// When the oldest delivery not yet done was accepted.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn oldest_undelivered(&self) -> Result<Option<Millis>, StoreError> {
        on_backend!(self, b => b.oldest_undelivered())
    }

    /// Outbox entries not yet delivered or dead.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn undelivered(&self) -> Result<u64, StoreError> {
        on_backend!(self, b => b.undelivered())
    }

    /// Whether the store takes writes now: a commit that writes the heartbeat row, through
    /// the same writer as every other write.
    ///
    /// # Errors
    ///
    /// When the database cannot be written (locked by another process, a full disk, or a
    /// standby).
    pub async fn writable(&self) -> Result<(), StoreError> {
        on_backend!(self, b => b.writable())
    }

    /// Group-commit counters since the store opened.
    pub fn commit_stats(&self) -> CommitStats {
        match &self.backend {
            Backend::Sqlite(b) => b.commit_stats(),
            Backend::Postgres(b) => b.commit_stats(),
        }
    }

    /// Finishes pending writes and closes the database.
    pub async fn close(&self) {
        on_backend!(self, b => b.close());
    }
}

/// The timeline entries stored as `event`: a message's arrival (`received`, `replayed`) is
/// stored with the steps it went through and the targets it was queued for, one row for what
/// reads as a `steps` entry and a `queued` entry per target after it, at the same time.
pub(crate) fn arrival_entries(mut event: Event) -> Vec<Event> {
    let (steps, queued) = match (&event.kind[..], &mut event.detail) {
        ("received" | "replayed", Value::Object(detail)) => {
            (detail.remove("steps"), detail.remove("queued"))
        }
        _ => (None, None),
    };
    let entry = |kind: &str, detail: Value| Event {
        kind: kind.to_owned(),
        detail,
        ..event.clone()
    };
    let mut entries = Vec::new();
    if let Some(steps) = steps {
        entries.push(entry("steps", serde_json::json!({ "steps": steps })));
    }
    if let Some(Value::Array(targets)) = queued {
        for target in targets {
            entries.push(entry("queued", serde_json::json!({ "target": target })));
        }
    }
    entries.insert(0, event);
    entries
}

/// Merges `patch` into `data`, field by field; non-objects replace.
pub(crate) fn merge(data: &mut Value, patch: &Value) {
    match (data, patch) {
        (Value::Object(data), Value::Object(patch)) => {
            for (key, value) in patch {
                data.insert(key.clone(), value.clone());
            }
        }
        (data, patch) if !patch.is_null() => *data = patch.clone(),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::{Event, arrival_entries, rfc3339};
    use serde_json::json;

    fn event(kind: &str, detail: serde_json::Value) -> Event {
        Event {
            at: "2026-12-03T10:00:00.000Z".into(),
            message_id: "m1".into(),
            flow: "f".into(),
            kind: kind.into(),
            detail,
        }
    }

    #[test]
    fn an_arrival_reads_as_its_entries_and_other_entries_as_stored() {
        let stored = event(
            "received",
            json!({"flow": "f", "idempotency_key": "k", "steps": ["a", "b"], "queued": ["lab", "archive"]}),
        );
        let entries = arrival_entries(stored);
        let read: Vec<(&str, &serde_json::Value)> = entries
            .iter()
            .map(|e| (e.kind.as_str(), &e.detail))
            .collect();
        assert_eq!(
            read,
            [
                ("received", &json!({"flow": "f", "idempotency_key": "k"})),
                ("steps", &json!({"steps": ["a", "b"]})),
                ("queued", &json!({"target": "lab"})),
                ("queued", &json!({"target": "archive"})),
            ]
        );
        assert!(entries.iter().all(|e| e.at == entries[0].at));
        // Entries stored one per row, as before, and entries of other kinds, read as stored.
        for alone in [
            event("received", json!({"flow": "f", "idempotency_key": null})),
            event("steps", json!({"steps": ["a"]})),
            event("attempt", json!({"steps": 1, "queued": ["not an arrival"]})),
        ] {
            assert_eq!(arrival_entries(alone.clone()).len(), 1);
            assert_eq!(arrival_entries(alone.clone())[0].detail, alone.detail);
        }
    }

    #[test]
    fn stamps_sort_as_text_in_time_order() {
        let at = 1_796_000_000_000; // a whole second
        let stamps: Vec<String> = [0, 1, 9, 10, 99, 100, 710, 715, 999, 1000]
            .iter()
            .map(|ms| rfc3339(at + ms))
            .collect();
        assert_eq!(stamps[0], "2026-11-30T00:53:20.000Z");
        assert_eq!(stamps[6], "2026-11-30T00:53:20.710Z");
        assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:#?}");
    }
}
