-- The keys that sign webhooks when GOVFLOW_WEBHOOK_SECRET is not set. The newest key
-- signs; a key rotated out (retired_at set) signs too until its grace period ends, so a
-- receiver can move to the new key without missing a delivery. The first key is made
-- here, from Postgres's strong random source (gen_random_uuid, 122 random bits each).

CREATE TABLE webhook_keys (
    id          bigserial   PRIMARY KEY,
    secret      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    retired_at  timestamptz
);

INSERT INTO webhook_keys (secret)
SELECT 'whsec_' || replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
