-- govflow's schema: the tables other services read (README.md, "Guarantees") and the
-- unique keys that make every effect exactly-once.

CREATE TABLE workflows (
    name        text        NOT NULL,
    version     integer     NOT NULL,
    entity      text        NOT NULL,
    trigger     text        NOT NULL,
    definition  jsonb       NOT NULL,
    enabled     boolean     NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

CREATE TABLE workflow_executions (
    id               uuid        PRIMARY KEY,
    workflow_name    text        NOT NULL,
    workflow_version integer     NOT NULL,
    event_id         text        NOT NULL,
    entity_type      text        NOT NULL,
    entity_id        text        NOT NULL,
    tenant           text        NOT NULL,
    status           text        NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'retrying', 'completed', 'dead_lettered')),
    attempts         integer     NOT NULL DEFAULT 0,
    last_error       text,
    event_occurred_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (event_id, workflow_name),
    FOREIGN KEY (workflow_name, workflow_version) REFERENCES workflows (name, version)
);
CREATE INDEX workflow_executions_status ON workflow_executions (status, updated_at);
CREATE INDEX workflow_executions_entity ON workflow_executions (entity_id, created_at);
CREATE INDEX workflow_executions_created ON workflow_executions (created_at DESC);

CREATE TABLE execution_steps (
    execution_id uuid        NOT NULL REFERENCES workflow_executions (id) ON DELETE CASCADE,
    step         integer     NOT NULL,
    action       text        NOT NULL,
    status       text        NOT NULL CHECK (status IN ('running', 'failed', 'completed')),
    attempts     integer     NOT NULL DEFAULT 0,
    error        text,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (execution_id, step)
);

CREATE TABLE approvals (
    execution_id uuid        NOT NULL REFERENCES workflow_executions (id) ON DELETE CASCADE,
    step         integer     NOT NULL,
    entity_id    text        NOT NULL,
    approvers    jsonb       NOT NULL,
    due_at       timestamptz,
    status       text        NOT NULL DEFAULT 'pending',
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (execution_id, step)
);

CREATE TABLE tasks (
    execution_id uuid        NOT NULL REFERENCES workflow_executions (id) ON DELETE CASCADE,
    step         integer     NOT NULL,
    entity_id    text        NOT NULL,
    title        text        NOT NULL,
    assignee     text,
    status       text        NOT NULL DEFAULT 'open',
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (execution_id, step)
);

CREATE TABLE assignments (
    execution_id uuid        NOT NULL REFERENCES workflow_executions (id) ON DELETE CASCADE,
    step         integer     NOT NULL,
    entity_id    text        NOT NULL,
    assignee     text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (execution_id, step)
);

CREATE TABLE notifications (
    execution_id    uuid        NOT NULL REFERENCES workflow_executions (id) ON DELETE CASCADE,
    step            integer     NOT NULL,
    webhook         text        NOT NULL,
    message         text        NOT NULL,
    idempotency_key text        NOT NULL,
    response_status integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (execution_id, step)
);

-- The status an entity was moved to by a change_status step; the chained event itself
-- leaves through the outbox, in the same transaction.
CREATE TABLE status_changes (
    execution_id uuid        NOT NULL REFERENCES workflow_executions (id) ON DELETE CASCADE,
    step         integer     NOT NULL,
    entity_type  text        NOT NULL,
    entity_id    text        NOT NULL,
    from_status  text,
    to_status    text        NOT NULL,
    event_id     text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (execution_id, step)
);

CREATE TABLE dead_letters (
    id           bigserial   PRIMARY KEY,
    stream       text        NOT NULL,
    message_id   text        NOT NULL,
    payload      jsonb       NOT NULL,
    error        text        NOT NULL,
    attempts     integer     NOT NULL,
    event_id     text,
    event_type   text,
    execution_id uuid,
    created_at   timestamptz NOT NULL DEFAULT now(),
    replayed_at  timestamptz,
    replayed_by  text,
    replay_reason text,
    replay_count integer     NOT NULL DEFAULT 0,
    purged_at    timestamptz,
    purged_by    text,
    UNIQUE (stream, message_id)
);
CREATE INDEX dead_letters_open ON dead_letters (created_at) WHERE replayed_at IS NULL AND purged_at IS NULL;

-- The transactional outbox: services insert here inside their own transaction; the relay
-- publishes rows in id order.
CREATE TABLE outbox (
    id           bigserial   PRIMARY KEY,
    event        jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('govflow_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
