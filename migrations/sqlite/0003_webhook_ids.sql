-- Standard Webhooks ids already taken, until their signatures expire: a replay is refused
-- whichever process it reaches.
CREATE TABLE webhook_ids (
    scope       TEXT NOT NULL,               -- the flow
    id          TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,            -- unix milliseconds
    PRIMARY KEY (scope, id)
);
CREATE INDEX webhook_ids_expiry ON webhook_ids (expires_at);
