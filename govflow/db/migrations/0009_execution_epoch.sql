-- The fencing token of an execution: bumped each time a worker starts a delivery of it.
-- Every status and effect write of that delivery commits only while the epoch is still
-- the one its start returned (govflow/db/fencing.py), so a worker that stalled past its
-- claim cannot overwrite what the delivery that took over wrote.

ALTER TABLE workflow_executions ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
