-- An operator finds a message by its request id or idempotency key (an HL7 control id, say)
-- as well as by its id.
CREATE INDEX messages_correlation_id ON messages (correlation_id);
CREATE INDEX messages_idempotency_key ON messages (idempotency_key) WHERE idempotency_key IS NOT NULL;
