-- Publish a govflow event from any language: insert it into the outbox table in the same
-- transaction as the change it describes. Both commit, or neither does; the relay
-- (`govflow run --role relay`, part of `--role all`) publishes committed rows in id order,
-- also those committed while Redis was down.
--
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f deploy/examples/outbox.sql
--
-- `event` is the wire format (`govflow schema` prints its JSON Schema). `id` is yours to
-- choose and is the event's identity: an event inserted twice with one id runs once.
-- `policies` stands for your service's own table.

BEGIN;

UPDATE policies SET status = 'pending_approval' WHERE id = 'POL-1042';

INSERT INTO outbox (event) VALUES ('{
  "id": "0b6f6c9e-6a55-4f4e-9d7c-1f0e3f1b2a11",
  "type": "policy.status_changed",
  "tenant": "acme",
  "entity_id": "POL-1042",
  "occurred_at": "2026-11-28T09:30:00Z",
  "actor": "user-17",
  "data": {"title": "Access control", "status": "pending_approval", "risk": "high", "owner": "user-17"},
  "changes": {"status": {"from": "draft", "to": "pending_approval"}},
  "schema_version": 1
}'::jsonb);

COMMIT;

-- The same, with Postgres choosing a fresh id and the time (gen_random_uuid: Postgres 13+).

BEGIN;

UPDATE policies SET status = 'approved' WHERE id = 'POL-1042';

INSERT INTO outbox (event)
SELECT jsonb_build_object(
    'id', gen_random_uuid()::text,
    'type', 'policy.status_changed',
    'tenant', 'acme',
    'entity_id', p.id,
    'occurred_at', now(),
    'actor', 'user-17',
    'data', jsonb_build_object('title', 'Access control', 'status', p.status),
    'changes', jsonb_build_object('status', jsonb_build_object('from', 'pending_approval', 'to', p.status)),
    'schema_version', 1
)
FROM policies p WHERE p.id = 'POL-1042';

COMMIT;
