-- A record's keys are indexed by the key first, then the context: every context shares a
-- handful of names, so with the context first each comparison in the index went past it to
-- the key; and `ferry trace` finds a record by a key alone, which now takes the index
-- instead of reading every key.
CREATE TABLE correlation_index (
    context         TEXT NOT NULL,
    key             TEXT NOT NULL,
    correlation_id  INTEGER NOT NULL,
    PRIMARY KEY (key, context)
) WITHOUT ROWID;
INSERT INTO correlation_index (context, key, correlation_id)
    SELECT context, key, correlation_id FROM correlation_keys;
DROP TABLE correlation_keys;
ALTER TABLE correlation_index RENAME TO correlation_keys;
