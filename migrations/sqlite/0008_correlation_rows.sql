-- A correlation record keeps its keys and its states in its own row: saving one writes a
-- row and its keys' index entries, not a row per key and per state with an index each.
-- `keys` lists the keys the record holds, in the order it got them; `history` its states,
-- oldest first. correlation_keys stays the index that finds a record by a key.
ALTER TABLE correlations ADD COLUMN keys TEXT NOT NULL DEFAULT '[]';
ALTER TABLE correlations ADD COLUMN history TEXT NOT NULL DEFAULT '[]';
UPDATE correlations SET
    keys = COALESCE((SELECT json_group_array(k.key ORDER BY k.rowid) FROM correlation_keys k
                     WHERE k.correlation_id = correlations.id), '[]'),
    history = COALESCE((SELECT json_group_array(json_object('state', s.state, 'at', s.at,
                                                            'message_id', s.message_id)
                                                ORDER BY s.id)
                        FROM correlation_states s WHERE s.correlation_id = correlations.id), '[]');
CREATE TABLE correlation_index (
    context         TEXT NOT NULL,
    key             TEXT NOT NULL,
    correlation_id  INTEGER NOT NULL,
    PRIMARY KEY (context, key)
) WITHOUT ROWID;
INSERT INTO correlation_index (context, key, correlation_id)
    SELECT context, key, correlation_id FROM correlation_keys;
DROP TABLE correlation_keys;
ALTER TABLE correlation_index RENAME TO correlation_keys;
DROP TABLE correlation_states;
