-- A counter that every change to the workflows table moves on, in the same transaction.
-- The workers read it once per batch (one row, one index lookup) and reload the
-- definitions when it moved, so an event published after `govflow workflows apply`
-- returns is matched against what was applied. A statement trigger rather than the
-- apply code bumps it, so a change made with plain SQL counts as well.

CREATE TABLE workflow_generation (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    generation bigint  NOT NULL
);
INSERT INTO workflow_generation (generation) VALUES (0);

CREATE FUNCTION bump_workflow_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE workflow_generation SET generation = generation + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER workflows_bump_generation
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON workflows
    FOR EACH STATEMENT EXECUTE FUNCTION bump_workflow_generation();
