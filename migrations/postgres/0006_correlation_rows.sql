-- A correlation record keeps its keys and its states in its own row: saving one writes a
-- row and its keys' index entries, not a row per key and per state with an index each.
-- `keys` lists the keys the record holds, in the order it got them; `history` its states,
-- oldest first. correlation_keys stays the index that finds a record by a key; records
-- delete their keys themselves, by `keys`.
ALTER TABLE correlations
    ADD COLUMN keys TEXT NOT NULL DEFAULT '[]',
    ADD COLUMN history TEXT NOT NULL DEFAULT '[]';
UPDATE correlations c SET
    keys = COALESCE((SELECT json_agg(k.key ORDER BY k.rowid)::text FROM correlation_keys k
                     WHERE k.correlation_id = c.id), '[]'),
    history = COALESCE((SELECT json_agg(json_build_object('state', s.state, 'at', s.at,
                                                          'message_id', s.message_id)
                                        ORDER BY s.id)::text
                        FROM correlation_states s WHERE s.correlation_id = c.id), '[]');
ALTER TABLE correlation_keys DROP CONSTRAINT IF EXISTS correlation_keys_correlation_id_fkey;
DROP INDEX correlation_keys_record;
ALTER TABLE correlation_keys DROP COLUMN rowid;
DROP TABLE correlation_states;
