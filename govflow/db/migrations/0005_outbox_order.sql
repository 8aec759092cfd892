-- The outbox in id order for good: a transaction draws its row id only while it holds a
-- shared advisory lock (key 7453306090599446383, `govflow/producers/frontier.py`), which
-- it keeps until it commits or rolls back. Services still insert with plain SQL: the id's
-- default takes the lock. The relay publishes a row only once every transaction that
-- drew an id up to it has ended (it reads the holders of that lock in pg_locks), so a
-- row that commits late is never overtaken by a higher id. Producers never wait: shared
-- locks do not conflict, and the relay never takes the lock itself.

CREATE FUNCTION outbox_next_id() RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7453306090599446383);
    RETURN nextval('outbox_id_seq');
END
$$;

ALTER TABLE outbox ALTER COLUMN id SET DEFAULT outbox_next_id();
