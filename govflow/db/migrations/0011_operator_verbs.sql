-- What an operator does to executions, and what retention needs to find quickly.

-- `cancelled`: an operator stopped the execution (`govflow executions cancel`). Terminal
-- like `completed` and `dead_lettered`; `govflow executions retry` queues it again.
-- `waiting` is listed too, so this check is the same whichever migration adds it first.
ALTER TABLE workflow_executions DROP CONSTRAINT IF EXISTS workflow_executions_status_check;
ALTER TABLE workflow_executions ADD CONSTRAINT workflow_executions_status_check
    CHECK (status IN ('queued', 'running', 'retrying', 'waiting', 'completed', 'dead_lettered',
                      'cancelled'));

-- Who cancelled or retried an execution, when and why, as a dead letter records its
-- replays. A retry of a dead-lettered execution replays its dead letter: `dead_letter_id`.
CREATE TABLE execution_interventions (
    id             bigserial   PRIMARY KEY,
    execution_id   uuid        NOT NULL REFERENCES workflow_executions (id) ON DELETE CASCADE,
    kind           text        NOT NULL CHECK (kind IN ('cancel', 'retry')),
    from_status    text        NOT NULL,
    actor          text        NOT NULL,
    reason         text,
    dead_letter_id bigint,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX execution_interventions_execution ON execution_interventions (execution_id, id);

-- Retention deletes finished executions oldest first, a bounded batch at a time.
CREATE INDEX workflow_executions_finished ON workflow_executions (finished_at)
    WHERE status IN ('completed', 'dead_lettered', 'cancelled');

-- A retry finds an execution's dead letter; retention asks whether one is still open.
CREATE INDEX dead_letters_execution ON dead_letters (execution_id) WHERE execution_id IS NOT NULL;
