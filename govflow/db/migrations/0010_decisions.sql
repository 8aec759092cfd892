-- Human decisions: approvals and tasks a workflow may wait for, their deadlines, and the
-- decisions recorded on them (govflow/operations/decisions.py, govflow/consumers/deadlines.py).

-- An execution that waits for a person holds nothing on any stream: Postgres alone says
-- it is `waiting`, and a decision or a deadline puts it back on the commands stream.
ALTER TABLE workflow_executions DROP CONSTRAINT IF EXISTS workflow_executions_status_check;
ALTER TABLE workflow_executions ADD CONSTRAINT workflow_executions_status_check
    CHECK (status IN ('queued', 'running', 'retrying', 'waiting', 'completed', 'dead_lettered'));

-- Approvals: `approved` once `required` approvals are in, `rejected` at the first
-- rejection, `expired` when `due_at` passes first. `wait` says the execution waits here.
ALTER TABLE approvals ADD COLUMN id uuid NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE approvals ADD CONSTRAINT approvals_id_key UNIQUE (id);
ALTER TABLE approvals ADD COLUMN required integer NOT NULL DEFAULT 1 CHECK (required >= 1);
ALTER TABLE approvals ADD COLUMN wait boolean NOT NULL DEFAULT false;
ALTER TABLE approvals ADD COLUMN decided_at timestamptz;
ALTER TABLE approvals ADD CONSTRAINT approvals_status_check
    CHECK (status IN ('pending', 'approved', 'rejected', 'expired'));
CREATE INDEX approvals_due ON approvals (due_at) WHERE status = 'pending' AND due_at IS NOT NULL;
CREATE INDEX approvals_open ON approvals (created_at) WHERE status = 'pending';
CREATE INDEX approvals_entity ON approvals (entity_id, created_at);

-- One decision per person per approval: a second is refused, never applied twice.
CREATE TABLE approval_decisions (
    approval_id uuid        NOT NULL REFERENCES approvals (id) ON DELETE CASCADE,
    "by"        text        NOT NULL,
    decision    text        NOT NULL CHECK (decision IN ('approve', 'reject')),
    comment     text,
    decided_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (approval_id, "by")
);

-- Tasks: `done` by a completion, or `expired` when `due_at` passes first.
ALTER TABLE tasks ADD COLUMN id uuid NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE tasks ADD CONSTRAINT tasks_id_key UNIQUE (id);
ALTER TABLE tasks ADD COLUMN wait boolean NOT NULL DEFAULT false;
ALTER TABLE tasks ADD COLUMN due_at timestamptz;
ALTER TABLE tasks ADD COLUMN completed_by text;
ALTER TABLE tasks ADD COLUMN completed_at timestamptz;
ALTER TABLE tasks ADD CONSTRAINT tasks_status_check CHECK (status IN ('open', 'done', 'expired'));
CREATE INDEX tasks_due ON tasks (due_at) WHERE status = 'open' AND due_at IS NOT NULL;
CREATE INDEX tasks_open ON tasks (created_at) WHERE status = 'open';
CREATE INDEX tasks_entity ON tasks (entity_id, created_at);

-- Waiting executions are counted by `govflow lag`.
CREATE INDEX workflow_executions_waiting ON workflow_executions (updated_at) WHERE status = 'waiting';
