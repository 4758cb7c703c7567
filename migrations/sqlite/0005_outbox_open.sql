-- The deliveries not yet done, for the backlog gauges (how many, since when) without walking
-- every delivery ever made; PostgreSQL has had this index from the start.
CREATE INDEX outbox_open ON outbox (created_at) WHERE state IN ('pending', 'in_flight');
