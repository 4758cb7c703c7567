-- Accepted messages: what came in, what the steps made of it, and the reply the caller got.
CREATE TABLE messages (
    id              TEXT PRIMARY KEY,
    flow            TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    idempotency_key TEXT,
    status          TEXT NOT NULL,           -- accepted | delivered | dead
    record_id       INTEGER,                 -- the correlation record the message belongs to
    inbound         TEXT NOT NULL,           -- the body as received (JSON)
    meta            TEXT NOT NULL,           -- meta as received (JSON)
    document        TEXT NOT NULL,           -- {body, vars, meta} after the steps (JSON)
    content_type    TEXT,                    -- set when the body is text
    reply           TEXT NOT NULL,           -- {status, headers, body} answered to the caller
    error           TEXT,
    received_at     INTEGER NOT NULL,        -- unix milliseconds
    updated_at      INTEGER NOT NULL
);
CREATE UNIQUE INDEX messages_idempotency ON messages (flow, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX messages_status ON messages (status, updated_at);
CREATE INDEX messages_flow ON messages (flow, received_at);
CREATE INDEX messages_record ON messages (record_id);

-- The delivery outbox: one row per message and target until delivered or dead.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id      TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    flow            TEXT NOT NULL,
    target          TEXT NOT NULL,
    state           TEXT NOT NULL,           -- pending | in_flight | delivered | dead
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER,
    last_status     INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX outbox_due ON outbox (flow, target, state, next_attempt_at);
CREATE INDEX outbox_message ON outbox (message_id);

-- Each message's timeline.
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    at          INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX events_message ON events (message_id, id);

-- Correlation records: what one conversation (a Test Request and its results) shares
-- across flows, found by any of its keys.
CREATE TABLE correlations (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    context     TEXT NOT NULL,
    key         TEXT NOT NULL,               -- the first key it was saved under
    data        TEXT NOT NULL DEFAULT '{}',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE TABLE correlation_keys (
    context         TEXT NOT NULL,
    key             TEXT NOT NULL,
    correlation_id  INTEGER NOT NULL REFERENCES correlations (id) ON DELETE CASCADE,
    PRIMARY KEY (context, key)
);
CREATE INDEX correlation_keys_record ON correlation_keys (correlation_id);
CREATE TABLE correlation_states (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    correlation_id  INTEGER NOT NULL REFERENCES correlations (id) ON DELETE CASCADE,
    state           TEXT NOT NULL,
    message_id      TEXT,
    at              INTEGER NOT NULL
);
CREATE INDEX correlation_states_record ON correlation_states (correlation_id, id);
