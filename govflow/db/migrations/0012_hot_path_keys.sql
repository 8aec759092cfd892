-- The rows a batch writes for every event check no foreign key.
--
-- Each check is a keyed lookup of the parent that locks it FOR KEY SHARE: five an event
-- (the execution's workflow version; the step rows, the task, the assignment of a
-- typical workflow), about a sixth of Postgres's time an event in a drain, though the
-- transaction that writes them already holds the execution's row. Only the workers write
-- these rows, each in a transaction that first locks its execution under its fencing
-- token (govflow/db/fencing.py), so none can name an execution that does not exist; and
-- retention deletes an execution's rows with it, in one statement (govflow/db/prune.py).
-- The rows people write (decisions, interventions) keep their keys.
ALTER TABLE workflow_executions
    DROP CONSTRAINT IF EXISTS workflow_executions_workflow_name_workflow_version_fkey;
ALTER TABLE execution_steps DROP CONSTRAINT IF EXISTS execution_steps_execution_id_fkey;
ALTER TABLE approvals DROP CONSTRAINT IF EXISTS approvals_execution_id_fkey;
ALTER TABLE tasks DROP CONSTRAINT IF EXISTS tasks_execution_id_fkey;
ALTER TABLE assignments DROP CONSTRAINT IF EXISTS assignments_execution_id_fkey;
ALTER TABLE notifications DROP CONSTRAINT IF EXISTS notifications_execution_id_fkey;
ALTER TABLE status_changes DROP CONSTRAINT IF EXISTS status_changes_execution_id_fkey;
