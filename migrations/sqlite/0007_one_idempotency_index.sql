-- One index serves both lookups by idempotency key: a flow's (unique per flow) and an
-- operator's (in any flow). Two indexes on these random keys wrote two pages scattered
-- through the file for each message.
DROP INDEX messages_idempotency_key;
DROP INDEX messages_idempotency;
CREATE UNIQUE INDEX messages_idempotency ON messages (idempotency_key, flow) WHERE idempotency_key IS NOT NULL;
