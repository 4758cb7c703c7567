//! The SQL both backends run. Each backend compiles this module for its own database
//! (`#[path]`), naming it `Conn` and `Row` (what reads go through), `WriteConn` (what
//! writes go through, an [`Exec`]), itself `DbStore` (with a `reader` and a `snapshot` to
//! read through), and provides [`pruning_turn`](super::pruning_turn) and the `skip_locked!`,
//! `for_update!` and `keys_locked!` suffixes of claims, locked reads and the saving of a
//! correlation record: what the one SQLite writer gets by running alone, PostgreSQL gets from
//! row and advisory locks.

use serde_json::Value;
use sqlx::Row as _;

use super::{Conn, DbStore, Row, WriteConn, pruning_turn};
use crate::json;
use crate::store::exec::{self, Exec, Param, params};
use crate::store::{
    Acceptance, Accepted, AfterAttempt, AttemptRecord, Claimed, Correlation, CorrelationWrite,
    Event, FlowCounts, MessageDetail, MessageFilter, MessageStatus, MessageSummary, Millis,
    OutboxEntry, Overview, Prior, QueueItem, Recipient, RecordChange, ReplaySource, StateChange,
    StoreError, Stored, StoredReply, TargetBacklog, Trace, arrival_entries, merge, now_ms, rfc3339,
};

/// A delivery still to be made, a row of `outbox`: what keeps its message `accepted`, and
/// the condition of the `outbox_open` index, which finds such rows without a scan.
macro_rules! open_delivery {
    () => {
        "outbox.state IN ('pending', 'in_flight')"
    };
}

/// A message's status as it stands, read from a row of `messages`. Its deliveries decide it
/// without writing it: a message is `accepted` while one is still to be made, and `delivered`
/// once none is (a row written `delivered` said so when it was stored). Recording each
/// delivery rewrote the message's row, its largest, only to say so.
macro_rules! status_now {
    () => {
        concat!(
            "CASE WHEN messages.status = 'accepted' AND NOT EXISTS (SELECT 1 FROM outbox
                  WHERE outbox.message_id = messages.id AND ",
            open_delivery!(),
            ") THEN 'delivered' ELSE messages.status END"
        )
    };
}

/// When a message last changed, read from a row of `messages`: its own row, or a delivery
/// of it since.
macro_rules! updated_now {
    () => {
        "COALESCE((SELECT MAX(outbox.updated_at) FROM outbox
                   WHERE outbox.message_id = messages.id AND outbox.updated_at > messages.updated_at),
                  messages.updated_at)"
    };
}

/// A message's summary columns, as they stand, from a row of `messages`.
macro_rules! summary_columns {
    () => {
        concat!(
            "messages.id, messages.flow, ",
            status_now!(),
            " AS status, messages.correlation_id, messages.error, messages.received_at, ",
            updated_now!(),
            " AS updated_at"
        )
    };
}

/// The reads, the same calls on both backends: a single query on a pooled connection, several
/// in one snapshot.
impl DbStore {
    pub(in crate::store) async fn reply_for(
        &self,
        flow: &str,
        key: &str,
    ) -> Result<Option<Prior>, StoreError> {
        reply_for(&mut *self.reader().await?, flow, key).await
    }

    pub(in crate::store) async fn next_due(
        &self,
        flow: &str,
        target: &str,
    ) -> Result<Option<Millis>, StoreError> {
        next_due(&mut *self.reader().await?, flow, target).await
    }

    pub(in crate::store) async fn oldest_undelivered(&self) -> Result<Option<Millis>, StoreError> {
        oldest_undelivered(&mut *self.reader().await?).await
    }

    pub(in crate::store) async fn undelivered(&self) -> Result<u64, StoreError> {
        undelivered(&mut *self.reader().await?).await
    }

    pub(in crate::store) async fn queue_depth(&self, queue: &str) -> Result<u64, StoreError> {
        queue_depth(&mut *self.reader().await?, queue).await
    }

    pub(in crate::store) async fn find_messages(
        &self,
        filter: &MessageFilter,
    ) -> Result<Vec<MessageSummary>, StoreError> {
        find_messages(&mut *self.reader().await?, filter).await
    }

    pub(in crate::store) async fn overview(&self) -> Result<Overview, StoreError> {
        let mut snapshot = self.snapshot().await?;
        let read = overview(&mut snapshot).await;
        snapshot.rollback().await?;
        read
    }

    pub(in crate::store) async fn replay_source(
        &self,
        id: &str,
    ) -> Result<Option<ReplaySource>, StoreError> {
        replay_source(&mut *self.reader().await?, id).await
    }

    pub(in crate::store) async fn find_correlation(
        &self,
        context: &str,
        keys: &[String],
    ) -> Result<Option<Correlation>, StoreError> {
        let mut snapshot = self.snapshot().await?;
        let read = find_correlation(&mut snapshot, context, keys).await;
        snapshot.rollback().await?;
        read
    }

    pub(in crate::store) async fn message(
        &self,
        id: &str,
    ) -> Result<Option<MessageDetail>, StoreError> {
        let mut snapshot = self.snapshot().await?;
        let read = message(&mut snapshot, id).await;
        snapshot.rollback().await?;
        read
    }

    pub(in crate::store) async fn trace(&self, key: &str) -> Result<Option<Trace>, StoreError> {
        let mut snapshot = self.snapshot().await?;
        let read = trace(&mut snapshot, key).await;
        snapshot.rollback().await?;
        read
    }
}

async fn reply_for(
    conn: &mut impl Exec,
    flow: &str,
    key: &str,
) -> Result<Option<Prior>, StoreError> {
    let row = conn
        .fetch_optional(
            "SELECT reply, fingerprint FROM messages WHERE flow = $1 AND idempotency_key = $2",
            &params![flow, key],
        )
        .await?;
    row.map(|r| prior(&r)).transpose()
}

/// The first submission in a row of `reply, fingerprint`.
fn prior(row: &exec::Row) -> Result<Prior, StoreError> {
    Ok(Prior {
        reply: parse::<StoredReply>(row.text(0)?)?,
        fingerprint: row.opt_text(1)?.map(str::to_owned),
    })
}

/// Writes the heartbeat: a commit that writes, as every accepted message does.
pub(super) async fn heartbeat(conn: &mut WriteConn<'_>) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO heartbeat (id, at) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
        &params![now_ms()],
    )
    .await?;
    Ok(())
}

async fn find_correlation(
    conn: &mut Conn,
    context: &str,
    keys: &[String],
) -> Result<Option<Correlation>, StoreError> {
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    match record_with_key(conn, context, &keys).await? {
        Some(id) => load_correlation(conn, id).await,
        None => Ok(None),
    }
}

/// The id of the record in `context` found by the first of `keys` that names one.
async fn record_with_key(
    conn: &mut impl Exec,
    context: &str,
    keys: &[&str],
) -> Result<Option<i64>, StoreError> {
    let holders = key_holders(conn, context, keys).await?;
    Ok(first_holder(keys, &holders, None))
}

/// Which record holds each of `keys` that one holds, as `(key, record id)`, in no order.
async fn key_holders(
    conn: &mut impl Exec,
    context: &str,
    keys: &[&str],
) -> Result<Vec<(String, i64)>, StoreError> {
    let keys: Vec<&str> = keys.iter().copied().filter(|k| !k.is_empty()).collect();
    let mut holders = Vec::new();
    // Every key in one statement: statements, not rows, are what cost here. One lookup per
    // key joined by `UNION ALL`, not `key IN (…)`: SQLite builds a temporary table for the
    // list of an `IN`, which costs more than the lookups. SQLite joins at most 500 selects in
    // one statement, so a step with more keys than that takes several.
    for keys in keys.chunks(KEYS_PER_LOOKUP) {
        let sql = (0..keys.len())
            .map(|n| {
                format!(
                    "SELECT key, correlation_id FROM correlation_keys WHERE context = $1 AND key = ${}",
                    n + 2
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let mut bound = vec![Param::from(context)];
        bound.extend(keys.iter().map(|key| Param::from(*key)));
        for row in conn.fetch(&sql, &bound).await? {
            holders.push((row.text(0)?.to_owned(), row.int(1)?));
        }
    }
    Ok(holders)
}

/// The record that holds the first of `keys` held by one, leaving `except` out.
fn first_holder(keys: &[&str], holders: &[(String, i64)], except: Option<i64>) -> Option<i64> {
    keys.iter().find_map(|key| {
        holders
            .iter()
            .find(|(held, id)| held == key && Some(*id) != except)
            .map(|(_, id)| *id)
    })
}

/// The most keys one statement names: a lookup of [`key_holders`], or a delete of
/// [`delete_keys`].
const KEYS_PER_LOOKUP: usize = 100;

async fn next_due(conn: &mut Conn, flow: &str, target: &str) -> Result<Option<Millis>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT MIN(next_attempt_at) FROM outbox WHERE flow = $1 AND target = $2 AND state = 'pending'",
    )
    .bind(flow)
    .bind(target)
    .fetch_one(&mut *conn)
    .await?)
}

async fn oldest_undelivered(conn: &mut Conn) -> Result<Option<Millis>, StoreError> {
    Ok(sqlx::query_scalar(concat!(
        "SELECT MIN(created_at) FROM outbox WHERE ",
        open_delivery!()
    ))
    .fetch_one(&mut *conn)
    .await?)
}

async fn undelivered(conn: &mut Conn) -> Result<u64, StoreError> {
    let count: i64 = sqlx::query_scalar(concat!(
        "SELECT COUNT(*) FROM outbox WHERE ",
        open_delivery!()
    ))
    .fetch_one(&mut *conn)
    .await?;
    Ok(u64::try_from(count).unwrap_or_default())
}

async fn queue_depth(conn: &mut Conn, queue: &str) -> Result<u64, StoreError> {
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM queue_messages WHERE queue = $1")
        .bind(queue)
        .fetch_one(&mut *conn)
        .await?;
    Ok(u64::try_from(count).unwrap_or_default())
}

async fn find_messages(
    conn: &mut Conn,
    filter: &MessageFilter,
) -> Result<Vec<MessageSummary>, StoreError> {
    // A page of messages is found by what is stored, each message written `accepted` asked
    // whether it is still (the deliveries still to be made are read once, not per message),
    // and only the page's are read as they stand.
    let rows = sqlx::query(concat!(
        "SELECT ",
        summary_columns!(),
        " FROM (SELECT id, flow, status, correlation_id, error, received_at, updated_at FROM messages
         WHERE (CAST($1 AS TEXT) IS NULL OR flow = $1)
           AND (CAST($2 AS TEXT) IS NULL OR (status = $2 AND $2 <> 'accepted')
                OR (status = 'accepted' AND $2 = CASE WHEN id IN (SELECT message_id FROM outbox WHERE ",
        open_delivery!(),
        ") THEN 'accepted' ELSE 'delivered' END))
           AND (CAST($3 AS TEXT) IS NULL OR EXISTS (SELECT 1 FROM outbox
                WHERE outbox.message_id = messages.id AND outbox.target = $3 AND outbox.state = 'dead'))
           AND (CAST($4 AS BIGINT) IS NULL OR received_at >= $4)
           AND (CAST($5 AS BIGINT) IS NULL OR received_at < $5)
         ORDER BY received_at DESC, id DESC LIMIT $6) AS messages
         ORDER BY received_at DESC, id DESC"
    ))
    .bind(&filter.flow)
    .bind(&filter.status)
    .bind(&filter.dead_target)
    .bind(filter.since)
    .bind(filter.until)
    .bind(i64::from(filter.limit))
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.iter().map(summary).collect())
}

async fn overview(conn: &mut Conn) -> Result<Overview, StoreError> {
    let count = |row: &Row, column: &str| u64::try_from(row.get::<i64, _>(column)).unwrap_or(0);
    let mut flows: Vec<FlowCounts> = Vec::new();
    for row in sqlx::query(
        "SELECT flow, status, COUNT(*) AS n FROM messages GROUP BY flow, status ORDER BY flow",
    )
    .fetch_all(&mut *conn)
    .await?
    {
        let flow: String = row.get("flow");
        if flows.last().is_none_or(|f| f.flow != flow) {
            flows.push(FlowCounts {
                flow,
                ..FlowCounts::default()
            });
        }
        let counts = flows.last_mut().expect("pushed above");
        let n = count(&row, "n");
        match row.get::<String, _>("status").as_str() {
            "accepted" => counts.accepted = n,
            "delivered" => counts.delivered = n,
            _ => counts.dead += n,
        }
    }
    // Of the messages written `accepted`, those with no delivery left to make are delivered
    // (`status_now!`): the few that have one are counted from the deliveries, rather than
    // every message from its own.
    let open: Vec<(String, i64)> = sqlx::query_as(concat!(
        "SELECT flow, COUNT(DISTINCT message_id) FROM outbox WHERE ",
        open_delivery!(),
        " AND EXISTS (SELECT 1 FROM messages WHERE messages.id = outbox.message_id AND messages.status = 'accepted')
         GROUP BY flow"
    ))
    .fetch_all(&mut *conn)
    .await?;
    for counts in &mut flows {
        let undelivered = open
            .iter()
            .find(|(flow, _)| *flow == counts.flow)
            .map_or(0, |(_, n)| u64::try_from(*n).unwrap_or(0))
            .min(counts.accepted);
        counts.delivered += counts.accepted - undelivered;
        counts.accepted = undelivered;
    }
    let mut targets: Vec<TargetBacklog> = Vec::new();
    for row in sqlx::query(concat!(
        "SELECT flow, target, COUNT(*) AS open, SUM(CASE WHEN attempts > 0 THEN 1 ELSE 0 END) AS retrying,
                MIN(created_at) AS oldest, 0 AS dead
         FROM outbox WHERE ",
        open_delivery!(),
        " GROUP BY flow, target
         UNION ALL
         SELECT flow, target, 0, 0, NULL, COUNT(*) FROM outbox WHERE state = 'dead' GROUP BY flow, target"
    ))
    .fetch_all(&mut *conn)
    .await?
    {
        let (flow, target): (String, String) = (row.get("flow"), row.get("target"));
        let at = match targets
            .iter()
            .position(|t| t.flow == flow && t.target == target)
        {
            Some(at) => at,
            None => {
                targets.push(TargetBacklog {
                    flow,
                    target,
                    ..TargetBacklog::default()
                });
                targets.len() - 1
            }
        };
        let backlog = &mut targets[at];
        backlog.open += count(&row, "open");
        backlog.retrying += row.get::<Option<i64>, _>("retrying").map_or(0, |n| u64::try_from(n).unwrap_or(0));
        backlog.dead += count(&row, "dead");
        backlog.oldest_open = backlog.oldest_open.or(row.get("oldest"));
    }
    for backlog in targets.iter_mut().filter(|t| t.retrying > 0) {
        backlog.failing = sqlx::query_scalar(
            "SELECT last_error FROM outbox WHERE flow = $1 AND target = $2 AND state = 'pending' AND attempts > 0
             ORDER BY updated_at DESC LIMIT 1",
        )
        .bind(&backlog.flow)
        .bind(&backlog.target)
        .fetch_optional(&mut *conn)
        .await?
        .flatten();
    }
    targets.sort_by(|a, b| (&a.flow, &a.target).cmp(&(&b.flow, &b.target)));
    Ok(Overview { flows, targets })
}

async fn replay_source(conn: &mut Conn, id: &str) -> Result<Option<ReplaySource>, StoreError> {
    let row = sqlx::query("SELECT flow, inbound, meta FROM messages WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
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

async fn message(conn: &mut Conn, id: &str) -> Result<Option<MessageDetail>, StoreError> {
    let Some(row) = sqlx::query(concat!(
        "SELECT ",
        summary_columns!(),
        ", inbound, document, reply, record_id FROM messages WHERE id = $1"
    ))
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
    let timeline = events(conn, &[id.to_owned()]).await?;
    let correlation = match row.get::<Option<i64>, _>("record_id") {
        Some(record) => load_correlation(conn, record).await?,
        None => None,
    };
    Ok(Some(MessageDetail {
        summary: summary(&row),
        inbound: parse(&row.get::<String, _>("inbound"))?,
        document: parse(&row.get::<String, _>("document"))?,
        reply: parse(&row.get::<String, _>("reply"))?,
        deliveries,
        timeline,
        correlation,
    }))
}

async fn trace(conn: &mut Conn, key: &str) -> Result<Option<Trace>, StoreError> {
    // The messages `key` names itself (its id, request id or idempotency key) lead to their
    // record; a correlation key names one directly.
    let by_message: Option<Option<i64>> = sqlx::query_scalar(
        "SELECT record_id FROM messages WHERE id = $1 OR correlation_id = $1 OR idempotency_key = $1
         ORDER BY record_id IS NULL LIMIT 1",
    )
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
    if by_message.is_none() && record.is_none() {
        return Ok(None);
    }
    let rows = sqlx::query(concat!(
        "SELECT ",
        summary_columns!(),
        " FROM messages
         WHERE record_id = $1 OR id = $2 OR correlation_id = $2 OR idempotency_key = $2
         ORDER BY received_at, id"
    ))
    .bind(record)
    .bind(key)
    .fetch_all(&mut *conn)
    .await?;
    let messages: Vec<MessageSummary> = rows.iter().map(summary).collect();
    let ids: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
    let mut timeline = events(conn, &ids).await?;
    let correlation = match record {
        Some(record) => load_correlation(conn, record).await?,
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

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn summary(row: &Row) -> MessageSummary {
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

async fn events(conn: &mut Conn, ids: &[String]) -> Result<Vec<Event>, StoreError> {
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
            all.extend(arrival_entries(Event {
                at: rfc3339(row.get("at")),
                message_id: row.get("message_id"),
                flow: row.get("flow"),
                kind: row.get("kind"),
                detail: parse(&row.get::<String, _>("detail"))?,
            }));
        }
    }
    Ok(all)
}

async fn load_correlation(conn: &mut Conn, id: i64) -> Result<Option<Correlation>, StoreError> {
    let Some(row) = sqlx::query(
        "SELECT context, key, data, keys, history, created_at FROM correlations WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let keys: Vec<String> = parse(&row.get::<String, _>("keys"))?;
    let history: Vec<StateChange> = parse::<Vec<HistoryEntry>>(&row.get::<String, _>("history"))?
        .into_iter()
        .map(StateChange::from)
        .collect();
    // The deliveries of its messages; a replayed one is superseded by the entry it made.
    let recipients = sqlx::query(
        "SELECT m.flow, o.target, o.state, o.attempts, o.updated_at
         FROM messages m JOIN outbox o ON o.message_id = m.id
         WHERE m.record_id = $1 AND o.state <> 'replayed' ORDER BY o.id",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| Recipient {
        flow: r.get("flow"),
        target: r.get("target"),
        state: r.get("state"),
        attempts: u32::try_from(r.get::<i64, _>("attempts")).unwrap_or(u32::MAX),
        updated_at: rfc3339(r.get("updated_at")),
    })
    .collect();
    Ok(Some(Correlation {
        id,
        recipients,
        context: row.get("context"),
        key: row.get("key"),
        keys,
        data: parse(&row.get::<String, _>("data"))?,
        state: history.last().map(|h| h.state.clone()),
        history,
        created_at: rfc3339(row.get("created_at")),
    }))
}

/// Commits a message with its outbox entries, correlation changes and timeline.
pub(super) async fn accept(
    conn: &mut WriteConn<'_>,
    a: &Accepted,
) -> Result<Acceptance, StoreError> {
    let now = now_ms();
    let reply = serde_json::to_string(&a.reply).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if a.replay {
        conn.execute(
            "UPDATE messages SET status = $1, document = $2, content_type = $3, error = $4, reply = $5, updated_at = $6
             WHERE id = $7",
            &params![a.status.as_str(), &a.document, &a.content_type, &a.error, &reply, now, &a.id],
        )
        .await?;
        conn.execute(
            "UPDATE outbox SET state = 'replayed', updated_at = $1 WHERE message_id = $2 AND state = 'dead'",
            &params![now, &a.id],
        )
        .await?;
    } else {
        let inserted = conn
            .execute(
                "INSERT INTO messages (id, flow, correlation_id, idempotency_key, fingerprint, status, inbound, meta,
                                       document, content_type, reply, error, received_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                 ON CONFLICT DO NOTHING",
                &params![
                    &a.id,
                    &a.flow,
                    &a.correlation_id,
                    &a.idempotency_key,
                    &a.fingerprint,
                    a.status.as_str(),
                    &a.inbound,
                    &a.meta,
                    &a.document,
                    &a.content_type,
                    &reply,
                    &a.error,
                    a.received_at,
                    now,
                ],
            )
            .await?;
        if inserted == 0 {
            let original = conn
                .fetch_optional(
                    "SELECT reply, fingerprint FROM messages
                     WHERE (flow = $1 AND idempotency_key = $2) OR id = $3",
                    &params![&a.flow, &a.idempotency_key, &a.id],
                )
                .await?
                .ok_or_else(|| StoreError::Corrupt("duplicate without original".into()))?;
            return Ok(Acceptance::Duplicate(prior(&original)?));
        }
    }
    let mut record = None;
    for write in &a.correlation {
        record = Some(correlate(conn, write, &[], Some(&a.id)).await?);
    }
    if let Some(record) = record {
        conn.execute(
            "UPDATE messages SET record_id = $1 WHERE id = $2",
            &params![record, &a.id],
        )
        .await?;
    }
    // A replay sends again only to the targets that do not have the message and are not about
    // to: a subscriber that failed is no reason to send the others a second copy. A new message
    // has no deliveries yet, and a plain insert is cheaper; each is pending, or in flight for
    // the worker that takes it over as this commits.
    let mut claimed = Vec::with_capacity(a.targets.len());
    for queued in &a.targets {
        if a.replay {
            conn.execute(
                "INSERT INTO outbox (message_id, flow, target, state, attempts, next_attempt_at, created_at, updated_at)
                 SELECT $1, $2, $3, 'pending', 0, $4, $4, $4
                 WHERE NOT EXISTS (SELECT 1 FROM outbox WHERE message_id = $1 AND target = $3
                                   AND state IN ('delivered', 'pending', 'in_flight'))",
                &params![&a.id, &a.flow, &queued.target, now],
            )
            .await?;
            claimed.push(None);
            continue;
        }
        let id = conn
            .insert_id(
                "INSERT INTO outbox (message_id, flow, target, state, attempts, next_attempt_at, lease_until,
                                     created_at, updated_at)
                 VALUES ($1, $2, $3, CASE WHEN $5 IS NULL THEN 'pending' ELSE 'in_flight' END, 0, $4, $5, $4, $4)",
                &params![&a.id, &a.flow, &queued.target, now, queued.claimed_until],
            )
            .await?;
        claimed.push(queued.claimed_until.map(|_| id));
    }
    let details: Vec<String> = a.events.iter().map(|e| json::text(&e.detail)).collect();
    let timeline: Vec<_> = a
        .events
        .iter()
        .zip(&details)
        .map(|(event, detail)| params![&a.id, now, event.kind, detail])
        .collect();
    conn.insert_rows(
        "INSERT INTO events (message_id, at, kind, detail)",
        &timeline,
        "",
    )
    .await?;
    Ok(Acceptance::Stored(Stored {
        claimed,
        record_id: record,
        queued_at: now,
    }))
}

async fn insert_event(
    conn: &mut WriteConn<'_>,
    message_id: &str,
    at: Millis,
    kind: &str,
    detail: &Value,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO events (message_id, at, kind, detail) VALUES ($1, $2, $3, $4)",
        &params![message_id, at, kind, &json::text(detail)],
    )
    .await?;
    Ok(())
}

/// Applies correlation changes that no message carries, and `then` to the record the last
/// of them made or found.
pub(super) async fn correlate_all(
    conn: &mut WriteConn<'_>,
    writes: &[CorrelationWrite],
    then: &[RecordChange],
) -> Result<(), StoreError> {
    for (n, write) in writes.iter().enumerate() {
        let last = n + 1 == writes.len();
        correlate(conn, write, if last { then } else { &[] }, None).await?;
    }
    Ok(())
}

/// A state in a record's `history` column.
#[derive(serde::Serialize, serde::Deserialize)]
struct HistoryEntry {
    state: String,
    at: Millis,
    message_id: Option<String>,
}

impl From<HistoryEntry> for StateChange {
    fn from(entry: HistoryEntry) -> Self {
        Self {
            state: entry.state,
            at: rfc3339(entry.at),
            message_id: entry.message_id,
        }
    }
}

/// Applies a correlation change, and `then` to the same record, and returns the record's
/// id. `then` costs no statement of its own: its data is merged into the write's, its keys
/// and states go in with the write's.
///
/// A record keeps its keys and states in its own row; `correlation_keys` finds it by a key.
/// A new record is one insert and one insert of its keys; a known one is read (locked),
/// given the keys it lacks and written back.
async fn correlate(
    conn: &mut WriteConn<'_>,
    write: &CorrelationWrite,
    then: &[RecordChange],
    message_id: Option<&str>,
) -> Result<i64, StoreError> {
    let now = now_ms();
    let (patch, state) = match write {
        CorrelationWrite::Save { data, state, .. }
        | CorrelationWrite::Update { data, state, .. } => (data, state),
    };
    let mut combined = None;
    for change in then.iter().filter(|change| !change.data.is_null()) {
        merge(combined.get_or_insert_with(|| patch.clone()), &change.data);
    }
    let patch = combined.as_ref().unwrap_or(patch);
    let states: Vec<HistoryEntry> = state
        .iter()
        .chain(then.iter().filter_map(|change| change.state.as_ref()))
        .map(|state| HistoryEntry {
            state: state.clone(),
            at: now,
            message_id: message_id.map(str::to_owned),
        })
        .collect();
    // Keys a delivery adds are not looked up: they are given to this record, unless another
    // holds them already.
    let added = then.iter().flat_map(|change| &change.keys);
    let (context, keys) = match write {
        CorrelationWrite::Update {
            record_id, keys, ..
        } => {
            let keys = distinct(keys.iter().chain(added));
            update_record(conn, *record_id, patch, keys, states, now).await?;
            return Ok(*record_id);
        }
        CorrelationWrite::Save { context, keys, .. } => (context, keys),
    };
    let looked_up = distinct(keys.iter());
    let Some(main) = looked_up.first().copied() else {
        return Err(StoreError::Corrupt(
            "a correlation record needs a key".into(),
        ));
    };
    let keys = distinct(keys.iter().chain(added));
    // A new record, the usual case, goes in without a lookup first: its row and its keys are
    // inserted, and only when a key turns out to be held already is it asked by which record.
    // Two saves of one key at once must find one record, not make two: the insert first takes
    // the keys it looks up (`keys_locked!`: the row is $1 to $6, the keys $7).
    let mut data = Value::Object(serde_json::Map::new());
    merge(&mut data, patch);
    let id = conn
        .insert_id(
            concat!(
                "INSERT INTO correlations (context, key, data, keys, history, created_at, updated_at)",
                keys_locked!()
            ),
            &params![
                context,
                main,
                &json::text(&data),
                &to_json(&keys)?,
                &to_json(&states)?,
                now,
                &to_json(&looked_up)?
            ],
        )
        .await?;
    if insert_keys(conn, context, id, &keys).await? {
        return Ok(id);
    }
    let holders = key_holders(conn, context, &keys).await?;
    // A key the step looks up names another record: that record is the one to change, and
    // the new one never was.
    if let Some(found) = first_holder(&looked_up, &holders, Some(id)) {
        delete_keys(conn, context, id, &keys).await?;
        conn.execute("DELETE FROM correlations WHERE id = $1", &params![id])
            .await?;
        update_record(conn, found, patch, keys, states, now).await?;
        return Ok(found);
    }
    // A key a delivery adds that another record holds stays that record's.
    let held = held_by(&keys, &holders, id);
    conn.execute(
        "UPDATE correlations SET keys = $1 WHERE id = $2",
        &params![&to_json(&held)?, id],
    )
    .await?;
    Ok(id)
}

/// Gives record `id` the `keys` it lacks, `patch` merged into its data and `states`
/// appended to its history.
async fn update_record(
    conn: &mut WriteConn<'_>,
    id: i64,
    patch: &Value,
    keys: Vec<&str>,
    states: Vec<HistoryEntry>,
    now: Millis,
) -> Result<(), StoreError> {
    // Read with its row locked, so nobody changes it between this read and the write.
    let row = conn
        .fetch_one(
            concat!(
                "SELECT context, data, keys, history FROM correlations WHERE id = $1",
                for_update!()
            ),
            &params![id],
        )
        .await?;
    let mut held: Vec<String> = parse(row.text(2)?)?;
    let missing: Vec<&str> = keys
        .into_iter()
        .filter(|key| !held.iter().any(|k| k == key))
        .collect();
    let added = add_keys(conn, row.text(0)?, id, &missing).await?;
    if patch.is_null() && states.is_empty() && added.is_empty() {
        return Ok(());
    }
    let data = if patch.is_null() {
        row.text(1)?.to_owned()
    } else {
        let mut data: Value = parse(row.text(1)?)?;
        merge(&mut data, patch);
        json::text(&data)
    };
    held.extend(added);
    let mut history: Vec<HistoryEntry> = parse(row.text(3)?)?;
    history.extend(states);
    conn.execute(
        "UPDATE correlations SET data = $1, keys = $2, history = $3, updated_at = $4 WHERE id = $5",
        &params![&data, &to_json(&held)?, &to_json(&history)?, now, id],
    )
    .await?;
    Ok(())
}

/// Makes `keys` of `context` find record `id`, and returns those that now do, in order: a
/// key another record holds stays that record's.
async fn add_keys(
    conn: &mut WriteConn<'_>,
    context: &str,
    id: i64,
    keys: &[&str],
) -> Result<Vec<String>, StoreError> {
    let held = if insert_keys(conn, context, id, keys).await? {
        keys.to_vec()
    } else {
        let holders = key_holders(conn, context, keys).await?;
        held_by(keys, &holders, id)
    };
    Ok(held.into_iter().map(str::to_owned).collect())
}

/// Those of `keys` that record `id` holds, by `holders` ([`key_holders`]), in order.
fn held_by<'k>(keys: &[&'k str], holders: &[(String, i64)], id: i64) -> Vec<&'k str> {
    keys.iter()
        .copied()
        .filter(|key| {
            holders
                .iter()
                .any(|(held, holder)| held == key && *holder == id)
        })
        .collect()
}

/// Inserts `keys` of `context` for record `id`, but none another record holds; whether all
/// went in (the count of rows inserted tells: not `RETURNING`, which SQLite runs as a
/// trigger per row, dearer than the rare lookup of [`key_holders`] a shortfall takes).
async fn insert_keys(
    conn: &mut WriteConn<'_>,
    context: &str,
    id: i64,
    keys: &[&str],
) -> Result<bool, StoreError> {
    let rows: Vec<_> = keys.iter().map(|key| params![context, *key, id]).collect();
    let inserted = conn
        .insert_rows(
            "INSERT INTO correlation_keys (context, key, correlation_id)",
            &rows,
            "ON CONFLICT DO NOTHING",
        )
        .await?;
    Ok(inserted == keys.len() as u64)
}

/// The non-empty ones of `keys`, each once, in order.
fn distinct<'a>(keys: impl Iterator<Item = &'a String>) -> Vec<&'a str> {
    let mut seen: Vec<&str> = Vec::new();
    for key in keys.filter(|key| !key.is_empty()) {
        if !seen.contains(&key.as_str()) {
            seen.push(key);
        }
    }
    seen
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Claims up to `limit` due (or abandoned) outbox entries of `flow`'s `target`.
///
/// Abandoned entries (in flight past their lease) and due pending ones are claimed by two
/// statements, each an index range on `(flow, target, state, …)`: one statement with an `OR`
/// on the state would walk every row the target ever had, delivered ones included.
pub(super) async fn claim(
    conn: &mut WriteConn<'_>,
    flow: &str,
    target: &str,
    limit: u32,
    lease_until: Millis,
) -> Result<Vec<Claimed>, StoreError> {
    let now = now_ms();
    let abandoned = concat!(
        "UPDATE outbox SET lease_until = $1, updated_at = $2
         WHERE id IN (SELECT id FROM outbox WHERE flow = $3 AND target = $4
                      AND state = 'in_flight' AND lease_until < $2 LIMIT $5",
        skip_locked!(),
        ") RETURNING id, message_id, attempts, created_at"
    );
    let due = concat!(
        "UPDATE outbox SET state = 'in_flight', lease_until = $1, updated_at = $2
         WHERE id IN (SELECT id FROM outbox WHERE flow = $3 AND target = $4
                      AND state = 'pending' AND next_attempt_at <= $2
                      ORDER BY next_attempt_at, id LIMIT $5",
        skip_locked!(),
        ") RETURNING id, message_id, attempts, created_at"
    );
    let mut rows = Vec::new();
    for statement in [abandoned, due] {
        let left = i64::from(limit) - rows.len() as i64;
        if left <= 0 {
            break;
        }
        rows.extend(
            conn.fetch(statement, &params![lease_until, now, flow, target, left])
                .await?,
        );
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    // The messages of the whole claim in one read.
    let sql = format!(
        "SELECT id, document, content_type, record_id FROM messages WHERE id IN {}",
        exec::placeholders(1, 1, rows.len())
    );
    let ids = rows
        .iter()
        .map(|row| row.text(1).map(Param::from))
        .collect::<Result<Vec<_>, _>>()?;
    let messages = conn.fetch(&sql, &ids).await?;
    let messages: std::collections::HashMap<&str, &exec::Row> = messages
        .iter()
        .map(|row| Ok((row.text(0)?, row)))
        .collect::<Result<_, StoreError>>()?;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in &rows {
        let message_id = row.text(1)?;
        let message = messages.get(message_id).ok_or_else(|| {
            StoreError::Corrupt(format!("outbox entry without message {message_id}"))
        })?;
        claimed.push(Claimed {
            outbox_id: row.int(0)?,
            attempts: u32::try_from(row.int(2)?).unwrap_or_default(),
            queued_at: row.int(3)?,
            document: parse(message.text(1)?)?,
            content_type: message.opt_text(2)?.map(str::to_owned),
            record_id: message.opt_int(3)?,
            lease_until,
            message_id: message_id.to_owned(),
        });
    }
    claimed.sort_by_key(|c| c.outbox_id);
    Ok(claimed)
}

/// Gives claimed entries back unattempted: due again at once, for any worker, instead of when
/// their lease runs out. An entry whose claim already ran out is left to its new owner.
pub(super) async fn release(
    conn: &mut WriteConn<'_>,
    entries: &[(i64, Millis)],
) -> Result<(), StoreError> {
    let now = now_ms();
    for (id, lease_until) in entries {
        conn.execute(
            "UPDATE outbox SET state = 'pending', lease_until = NULL, updated_at = $1
             WHERE id = $2 AND state = 'in_flight' AND lease_until = $3",
            &params![now, *id, *lease_until],
        )
        .await?;
    }
    Ok(())
}

/// Claims up to `limit` due (or abandoned) messages of embedded queue `queue`.
pub(super) async fn claim_queue(
    conn: &mut WriteConn<'_>,
    queue: &str,
    limit: u32,
    lease_until: Millis,
) -> Result<Vec<QueueItem>, StoreError> {
    let now = now_ms();
    let rows = conn
        .fetch(
            concat!(
                "UPDATE queue_messages SET state = 'in_flight', lease_until = $1
                 WHERE id IN (SELECT id FROM queue_messages WHERE queue = $2
                              AND ((state = 'pending' AND next_attempt_at <= $3) OR (state = 'in_flight' AND lease_until < $3))
                              ORDER BY next_attempt_at, id LIMIT $4",
                skip_locked!(),
                ") RETURNING id, payload, headers, attempts"
            ),
            &params![lease_until, queue, now, i64::from(limit)],
        )
        .await?;
    let mut items: Vec<QueueItem> = rows
        .iter()
        .map(|row| {
            Ok(QueueItem {
                id: row.int(0)?,
                payload: row.text(1)?.to_owned(),
                headers: parse(row.text(2)?)?,
                attempts: u32::try_from(row.int(3)?).unwrap_or_default(),
            })
        })
        .collect::<Result<_, StoreError>>()?;
    items.sort_by_key(|item| item.id);
    Ok(items)
}

/// Appends a message to embedded queue `queue`.
pub(super) async fn enqueue(
    conn: &mut WriteConn<'_>,
    queue: &str,
    payload: &str,
    headers: &str,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO queue_messages (queue, payload, headers, state, next_attempt_at, created_at)
         VALUES ($1, $2, $3, 'pending', $4, $4)",
        &params![queue, payload, headers, now_ms()],
    )
    .await?;
    Ok(())
}

/// Removes a consumed queue message, or puts it back until `retry_at`.
pub(super) async fn finish_queue(
    conn: &mut WriteConn<'_>,
    id: i64,
    retry_at: Option<Millis>,
) -> Result<(), StoreError> {
    match retry_at {
        None => {
            conn.execute("DELETE FROM queue_messages WHERE id = $1", &params![id])
                .await?
        }
        Some(at) => {
            conn.execute(
                "UPDATE queue_messages SET state = 'pending', attempts = attempts + 1, next_attempt_at = $1,
                        lease_until = NULL WHERE id = $2",
                &params![at, id],
            )
            .await?
        }
    };
    Ok(())
}

/// Records an attempt's outcome, unless the claim it was made under has run out (another
/// worker owns the entry then, and its word counts).
pub(super) async fn attempt_done(
    conn: &mut WriteConn<'_>,
    a: &AttemptRecord,
) -> Result<(), StoreError> {
    let now = now_ms();
    let (state, next) = match a.outcome {
        AfterAttempt::Delivered => ("delivered", now),
        AfterAttempt::RetryAt(at) => ("pending", at),
        AfterAttempt::Dead => ("dead", now),
    };
    let updated = conn
        .execute(
            "UPDATE outbox SET state = $1, attempts = $2, next_attempt_at = $3, last_status = $4, last_error = $5,
                               lease_until = NULL, updated_at = $6
             WHERE id = $7 AND state = 'in_flight' AND lease_until = $8",
            &params![
                state,
                i64::from(a.attempt),
                next,
                a.status.map(i64::from),
                &a.error,
                now,
                a.outbox_id,
                a.lease_until,
            ],
        )
        .await?;
    if updated == 0 {
        return Err(StoreError::LeaseLost);
    }
    // A delivery leaves the message's row alone: the message reads `delivered` once no
    // delivery is left to make (`status_now!`). A dead one marks it, whatever the others do.
    if a.outcome == AfterAttempt::Dead {
        conn.execute(
            "UPDATE messages SET status = $1, error = $2, updated_at = $3 WHERE id = $4",
            &params![MessageStatus::Dead.as_str(), &a.error, now, &a.message_id],
        )
        .await?;
    }
    let outcome = match a.outcome {
        AfterAttempt::Delivered => "delivered".to_owned(),
        AfterAttempt::RetryAt(at) => format!("retry at {}", rfc3339(at)),
        AfterAttempt::Dead => "dead".to_owned(),
    };
    let detail = serde_json::json!({
        "target": a.target, "attempt": a.attempt, "status": a.status, "latency_ms": a.latency_ms,
        "error": a.error, "answer": a.answer, "outcome": outcome,
    });
    insert_event(conn, &a.message_id, now, "attempt", &detail).await?;
    if let Some(write) = &a.correlation {
        correlate(conn, write, &[], Some(&a.message_id)).await?;
    }
    Ok(())
}

/// Takes webhook id `id` in `scope` until `expires_at`; false when it was already taken.
pub(super) async fn first_sight(
    conn: &mut WriteConn<'_>,
    scope: &str,
    id: &str,
    expires_at: Millis,
) -> Result<bool, StoreError> {
    let taken = conn
        .execute(
            "INSERT INTO webhook_ids (scope, id, expires_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &params![scope, id, expires_at],
        )
        .await?;
    Ok(taken == 1)
}

/// Lets webhook id `id` in `scope` be taken again.
pub(super) async fn forget_sight(
    conn: &mut WriteConn<'_>,
    scope: &str,
    id: &str,
) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM webhook_ids WHERE scope = $1 AND id = $2",
        &params![scope, id],
    )
    .await?;
    Ok(())
}

/// Deletes delivered messages, and correlation records with no message left, last changed
/// before `before`, and webhook ids past their expiry; does nothing while another store
/// prunes.
pub(super) async fn prune(conn: &mut WriteConn<'_>, before: Millis) -> Result<u64, StoreError> {
    if !pruning_turn(conn).await? {
        return Ok(0);
    }
    conn.execute(
        "DELETE FROM webhook_ids WHERE expires_at < $1",
        &params![now_ms()],
    )
    .await?;
    let pruned = conn
        .execute(
            concat!(
                "DELETE FROM messages WHERE status IN ('accepted', 'delivered') AND updated_at < $1
                 AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.message_id = messages.id
                                 AND (outbox.updated_at >= $1 OR ",
                open_delivery!(),
                "))"
            ),
            &params![before],
        )
        .await?;
    // A record takes its keys with it.
    let records = conn
        .fetch(
            "DELETE FROM correlations WHERE updated_at < $1
             AND NOT EXISTS (SELECT 1 FROM messages WHERE record_id = correlations.id)
             RETURNING id, context, keys",
            &params![before],
        )
        .await?;
    for record in &records {
        let keys: Vec<String> = parse(record.text(2)?)?;
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        delete_keys(conn, record.text(1)?, record.int(0)?, &keys).await?;
    }
    Ok(pruned)
}

/// Deletes those of `keys` of `context` that record `id` holds. Named one by one, they are
/// found through the key index; `correlation_keys` has no index by record.
async fn delete_keys(
    conn: &mut WriteConn<'_>,
    context: &str,
    id: i64,
    keys: &[&str],
) -> Result<(), StoreError> {
    for keys in keys.chunks(KEYS_PER_LOOKUP) {
        let sql = format!(
            "DELETE FROM correlation_keys WHERE context = $1 AND correlation_id = $2 AND key IN {}",
            exec::placeholders(3, 1, keys.len())
        );
        let mut bound = params![context, id].to_vec();
        bound.extend(keys.iter().map(|key| Param::from(*key)));
        conn.execute(&sql, &bound).await?;
    }
    Ok(())
}
