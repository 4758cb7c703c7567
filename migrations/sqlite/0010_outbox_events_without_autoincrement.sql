-- Deliveries and timeline entries take the next rowid instead of AUTOINCREMENT's, which
-- read and wrote a row of sqlite_sequence with every insert (three per message). Nothing
-- outside a row's own table refers to these ids, and the newest rows, whose ids a new row
-- could take again once deleted, belong to messages too recent to be pruned.
CREATE TABLE outbox_rowid (
    id              INTEGER PRIMARY KEY,
    message_id      TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    flow            TEXT NOT NULL,
    target          TEXT NOT NULL,
    state           TEXT NOT NULL,           -- pending | in_flight | delivered | dead | replayed
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER,
    last_status     INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
INSERT INTO outbox_rowid (id, message_id, flow, target, state, attempts, next_attempt_at,
                          lease_until, last_status, last_error, created_at, updated_at)
    SELECT id, message_id, flow, target, state, attempts, next_attempt_at,
           lease_until, last_status, last_error, created_at, updated_at
    FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_rowid RENAME TO outbox;
CREATE INDEX outbox_due ON outbox (flow, target, state, next_attempt_at);
CREATE INDEX outbox_message ON outbox (message_id);
CREATE INDEX outbox_open ON outbox (created_at) WHERE state IN ('pending', 'in_flight');

CREATE TABLE events_rowid (
    id          INTEGER PRIMARY KEY,
    message_id  TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    at          INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '{}'
);
INSERT INTO events_rowid (id, message_id, at, kind, detail)
    SELECT id, message_id, at, kind, detail FROM events;
DROP TABLE events;
ALTER TABLE events_rowid RENAME TO events;
CREATE INDEX events_message ON events (message_id, id);

DELETE FROM sqlite_sequence WHERE name IN ('outbox', 'events');
