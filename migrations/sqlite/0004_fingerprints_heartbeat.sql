-- What identifies a request besides its idempotency key (a hash of method, path and body): a
-- key reused for a different request is refused instead of answered with another's reply.
ALTER TABLE messages ADD COLUMN fingerprint TEXT;

-- One row that readiness writes: a store that cannot take this write cannot take messages.
CREATE TABLE heartbeat (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    at  INTEGER NOT NULL
);
