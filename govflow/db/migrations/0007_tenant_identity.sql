-- Events are identified by (tenant, id): two tenants may publish the same id, and each
-- event runs its workflows once. Existing rows keep their ids (the default tenant's new
-- ids are derived as before; another tenant's event is found by this key).

ALTER TABLE workflow_executions DROP CONSTRAINT IF EXISTS workflow_executions_event_id_workflow_name_key;
ALTER TABLE workflow_executions
    ADD CONSTRAINT workflow_executions_tenant_event_id_workflow_name_key
    UNIQUE (tenant, event_id, workflow_name);

-- A dead letter names its event by (tenant, id) too.
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS tenant text;
