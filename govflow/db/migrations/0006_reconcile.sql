-- Postgres is the record, Redis the queue: what the reconciler needs to put lost work back
-- (govflow/consumers/reconcile.py).

-- Every event the trigger matcher took, by its identity (tenant, id): an outbox row whose
-- event is here was taken up. The event itself is kept when it matched a workflow, so an
-- execution whose command Redis lost can be emitted again; NULL when it matched none. Text,
-- not jsonb: a valid event may hold "\u0000", which jsonb refuses.
CREATE TABLE received_events (
    tenant      text        NOT NULL,
    event_id    text        NOT NULL,
    event       text,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, event_id)
);
CREATE INDEX received_events_age ON received_events (received_at);

-- When the reconciler saw an outbox row's event taken up; until then a published row is
-- published again once it is overdue. Rows published before this column existed count as
-- taken up.
ALTER TABLE outbox ADD COLUMN taken_at timestamptz;
UPDATE outbox SET taken_at = published_at WHERE published_at IS NOT NULL;
CREATE INDEX outbox_untaken ON outbox (published_at)
    WHERE taken_at IS NULL AND published_at IS NOT NULL;
