-- The same tables as the SQLite store (see migrations/sqlite), for PostgreSQL: times are unix
-- milliseconds, JSON is kept as text, exactly as the shared queries write and read it.

-- Accepted messages: what came in, what the steps made of it, and the reply the caller got.
CREATE TABLE messages (
    id              TEXT PRIMARY KEY,
    flow            TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    idempotency_key TEXT,
    status          TEXT NOT NULL,           -- accepted | delivered | dead
    record_id       BIGINT,                  -- the correlation record the message belongs to
    inbound         TEXT NOT NULL,
    meta            TEXT NOT NULL,
    document        TEXT NOT NULL,
    content_type    TEXT,
    reply           TEXT NOT NULL,
    error           TEXT,
    received_at     BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE UNIQUE INDEX messages_idempotency ON messages (flow, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX messages_status ON messages (status, updated_at);
CREATE INDEX messages_flow ON messages (flow, received_at);
CREATE INDEX messages_record ON messages (record_id);

-- The delivery outbox: one row per message and target until delivered or dead. Replicas
-- claim rows with FOR UPDATE SKIP LOCKED and hold them until lease_until.
CREATE TABLE outbox (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    flow            TEXT NOT NULL,
    target          TEXT NOT NULL,
    state           TEXT NOT NULL,           -- pending | in_flight | delivered | dead | replayed
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until     BIGINT,
    last_status     BIGINT,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE INDEX outbox_due ON outbox (flow, target, state, next_attempt_at);
CREATE INDEX outbox_message ON outbox (message_id);
CREATE INDEX outbox_open ON outbox (created_at) WHERE state IN ('pending', 'in_flight');

-- Each message's timeline.
CREATE TABLE events (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id  TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    at          BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX events_message ON events (message_id, id);

-- Correlation records, found by any of their keys.
CREATE TABLE correlations (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    context     TEXT NOT NULL,
    key         TEXT NOT NULL,
    data        TEXT NOT NULL DEFAULT '{}',
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX correlations_updated ON correlations (updated_at);
CREATE TABLE correlation_keys (
    context         TEXT NOT NULL,
    key             TEXT NOT NULL,
    correlation_id  BIGINT NOT NULL REFERENCES correlations (id) ON DELETE CASCADE,
    -- Named like SQLite's implicit rowid, so one query lists a record's keys in the order
    -- they were added on both stores.
    rowid           BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (context, key)
);
CREATE INDEX correlation_keys_record ON correlation_keys (correlation_id);
CREATE INDEX correlation_keys_key ON correlation_keys (key);
CREATE TABLE correlation_states (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    correlation_id  BIGINT NOT NULL REFERENCES correlations (id) ON DELETE CASCADE,
    state           TEXT NOT NULL,
    message_id      TEXT,
    at              BIGINT NOT NULL
);
CREATE INDEX correlation_states_record ON correlation_states (correlation_id, id);

-- Embedded queues: messages published by flows, waiting for the flows that consume them.
CREATE TABLE queue_messages (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue           TEXT NOT NULL,
    payload         TEXT NOT NULL,
    headers         TEXT NOT NULL DEFAULT '{}',
    state           TEXT NOT NULL,           -- pending | in_flight
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until     BIGINT,
    created_at      BIGINT NOT NULL
);
CREATE INDEX queue_messages_due ON queue_messages (queue, state, next_attempt_at);
