-- Standard Webhooks ids already taken, until their signatures expire: a replay is refused
-- whichever replica it reaches.
CREATE TABLE webhook_ids (
    scope       TEXT NOT NULL,
    id          TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    PRIMARY KEY (scope, id)
);
CREATE INDEX webhook_ids_expiry ON webhook_ids (expires_at);
