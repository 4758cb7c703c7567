-- Embedded queues: messages published by flows, waiting for the flows that consume them.
CREATE TABLE queue_messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    queue           TEXT NOT NULL,
    payload         TEXT NOT NULL,
    headers         TEXT NOT NULL DEFAULT '{}',
    state           TEXT NOT NULL,           -- pending | in_flight
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER,
    created_at      INTEGER NOT NULL
);
CREATE INDEX queue_messages_due ON queue_messages (queue, state, next_attempt_at);
