-- govflow's Postgres roles: each part of govflow connects as a role that may do what it
-- needs and nothing more.
--
--   govflow_migrator  owns the schema: `govflow migrate` runs as it
--   govflow_worker    `govflow run` (triggers, actions, relay): reads definitions, writes
--                     executions, steps, effects, dead letters; publishes the outbox;
--                     expires approvals and tasks at their due time; prunes what the
--                     retention allows
--   govflow_operator  `govflow dlq`, `executions cancel|retry`, `approvals`, `tasks`, the
--                     API and dashboard: reads everything, marks dead letters replayed or
--                     purged, moves an execution's status, records decisions
--   govflow_reader    reporting: reads everything, writes nothing
--   govflow_producer  services that use the transactional outbox: INSERT into outbox
--
-- Run it as a superuser (or a role with CREATEROLE that owns the database) in govflow's
-- database, twice: before the first `govflow migrate` (it creates the roles), and after
-- every migrate (it grants on the tables the migration made). It is safe to run again.
--
--   psql -v ON_ERROR_STOP=1 -d govflow -f deploy/postgres/roles.sql
--   ALTER ROLE govflow_migrator PASSWORD '...';   -- and so on for each role that logs in
--   GOVFLOW_DATABASE_URL=postgresql://govflow_migrator:...@db/govflow govflow migrate
--   psql -v ON_ERROR_STOP=1 -d govflow -f deploy/postgres/roles.sql
--
-- The roles log in but have no password: set one before use (pg_hba.conf decides the rest).
-- tests/test_pg_roles.py applies this file and runs govflow under these roles.

DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['govflow_migrator', 'govflow_worker', 'govflow_operator',
                                'govflow_reader', 'govflow_producer'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I LOGIN', name);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- there already (or created by a concurrent run of this file)
        END;
    END LOOP;
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO govflow_migrator, govflow_worker,'
                   ' govflow_operator, govflow_reader, govflow_producer', current_database());
    EXECUTE format('GRANT CREATE ON DATABASE %I TO govflow_migrator', current_database());
END $$;

-- PUBLIC may not create in public (the default since Postgres 15; made explicit for 14).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO govflow_migrator;
GRANT USAGE ON SCHEMA public TO govflow_worker, govflow_operator, govflow_reader, govflow_producer;

-- Tables a later migration adds are readable by the reader and the operator at once; every
-- other grant names its tables below, so run this file again after each migrate.
ALTER DEFAULT PRIVILEGES FOR ROLE govflow_migrator IN SCHEMA public
    GRANT SELECT ON TABLES TO govflow_reader, govflow_operator;

DO $$
DECLARE
    grant_ record;
BEGIN
    FOR grant_ IN
        SELECT * FROM (VALUES
            -- govflow_worker
            ('workflows',           'SELECT',                         'govflow_worker'),
            ('workflow_generation', 'SELECT',                         'govflow_worker'),
            ('workflow_executions', 'SELECT, INSERT, UPDATE',         'govflow_worker'),
            ('execution_steps',     'SELECT, INSERT, UPDATE',         'govflow_worker'),
            -- the deadline service expires approvals and tasks past their due time
            ('approvals',           'SELECT, INSERT, UPDATE',         'govflow_worker'),
            ('tasks',               'SELECT, INSERT, UPDATE',         'govflow_worker'),
            ('assignments',         'SELECT, INSERT',                 'govflow_worker'),
            ('notifications',       'SELECT, INSERT',                 'govflow_worker'),
            ('status_changes',      'SELECT, INSERT',                 'govflow_worker'),
            ('dead_letters',        'SELECT, INSERT',                 'govflow_worker'),
            -- the events the trigger matcher took; the reconciler deletes old ones
            ('received_events',     'SELECT, INSERT, UPDATE, DELETE', 'govflow_worker'),
            ('chain_executions',    'SELECT, INSERT, UPDATE',         'govflow_worker'),
            -- the prefix `govflow migrate` recorded, which every process checks
            ('deployment',          'SELECT',                         'govflow_worker'),
            -- the keys that sign webhooks
            ('webhook_keys',        'SELECT',                         'govflow_worker'),
            -- the relay publishes the outbox, marks its rows and deletes old ones
            ('outbox',              'SELECT, INSERT, UPDATE, DELETE', 'govflow_worker'),
            -- with GOVFLOW_EXECUTION_RETENTION set, finished executions (with their steps
            -- and effects; their interventions cascade) and closed dead letters are pruned
            ('workflow_executions', 'DELETE',                         'govflow_worker'),
            ('execution_steps',     'DELETE',                         'govflow_worker'),
            ('approvals',           'DELETE',                         'govflow_worker'),
            ('tasks',               'DELETE',                         'govflow_worker'),
            ('assignments',         'DELETE',                         'govflow_worker'),
            ('notifications',       'DELETE',                         'govflow_worker'),
            ('status_changes',      'DELETE',                         'govflow_worker'),
            ('dead_letters',        'DELETE',                         'govflow_worker'),
            ('execution_interventions', 'SELECT',                     'govflow_worker'),
            -- govflow_reader and govflow_operator: everything, read-only
            ('workflows',           'SELECT', 'govflow_reader, govflow_operator'),
            ('workflow_generation', 'SELECT', 'govflow_reader, govflow_operator'),
            ('workflow_executions', 'SELECT', 'govflow_reader, govflow_operator'),
            ('execution_steps',     'SELECT', 'govflow_reader, govflow_operator'),
            ('approvals',           'SELECT', 'govflow_reader, govflow_operator'),
            ('tasks',               'SELECT', 'govflow_reader, govflow_operator'),
            ('assignments',         'SELECT', 'govflow_reader, govflow_operator'),
            ('notifications',       'SELECT', 'govflow_reader, govflow_operator'),
            ('status_changes',      'SELECT', 'govflow_reader, govflow_operator'),
            ('chain_executions',    'SELECT', 'govflow_reader, govflow_operator'),
            ('dead_letters',        'SELECT', 'govflow_reader, govflow_operator'),
            ('received_events',     'SELECT', 'govflow_reader, govflow_operator'),
            ('outbox',              'SELECT', 'govflow_reader, govflow_operator'),
            ('schema_migrations',   'SELECT', 'govflow_reader, govflow_operator'),
            ('deployment',          'SELECT', 'govflow_reader, govflow_operator'),
            ('approval_decisions',  'SELECT', 'govflow_reader, govflow_operator'),
            ('execution_interventions', 'SELECT', 'govflow_reader, govflow_operator'),
            -- govflow_operator: a replay or a purge is recorded on its dead letter
            ('dead_letters',
             'UPDATE (replayed_at, replayed_by, replay_reason, replay_count, purged_at, purged_by)',
             'govflow_operator'),
            -- a replay or a retry queues its execution again; a cancel fences it off;
            -- a decision resumes the execution that waited (each recorded)
            ('workflow_executions', 'UPDATE (status, updated_at, epoch, finished_at)',
             'govflow_operator'),
            ('execution_interventions', 'INSERT', 'govflow_operator'),
            ('approvals',           'UPDATE (status, decided_at)', 'govflow_operator'),
            ('tasks',               'UPDATE (status, completed_by, completed_at)',
             'govflow_operator'),
            ('approval_decisions',  'INSERT', 'govflow_operator'),
            -- govflow_producer: the outbox, insert only (and the new row's id, which
            -- db.outbox.enqueue returns: INSERT ... RETURNING id reads that column)
            ('outbox',              'INSERT, SELECT (id)', 'govflow_producer')
        ) AS g (tbl, privileges, grantees)
    LOOP
        IF to_regclass(format('public.%I', grant_.tbl)) IS NOT NULL THEN
            EXECUTE format('GRANT %s ON public.%I TO %s',
                           grant_.privileges, grant_.tbl, grant_.grantees);
        END IF;
    END LOOP;
    -- Signing keys are secrets: not for reporting (the default privileges granted it).
    IF to_regclass('public.webhook_keys') IS NOT NULL THEN
        REVOKE ALL ON public.webhook_keys FROM govflow_reader, govflow_operator;
    END IF;
    -- The bigserial ids of the rows the worker and the producers insert.
    IF to_regclass('public.dead_letters_id_seq') IS NOT NULL THEN
        GRANT USAGE ON SEQUENCE public.dead_letters_id_seq TO govflow_worker;
    END IF;
    IF to_regclass('public.execution_interventions_id_seq') IS NOT NULL THEN
        GRANT USAGE ON SEQUENCE public.execution_interventions_id_seq TO govflow_operator;
    END IF;
    IF to_regclass('public.outbox_id_seq') IS NOT NULL THEN
        GRANT USAGE ON SEQUENCE public.outbox_id_seq TO govflow_worker, govflow_producer;
    END IF;
END $$;
