-- The deployment this database belongs to: at most one row, its GOVFLOW_PREFIX. Written by
-- `govflow migrate`; every other govflow process refuses to use the database under
-- another prefix. Dead letters, the outbox and the relay's lock are not scoped by prefix,
-- so two deployments need two databases (README, "Configuration").

CREATE TABLE deployment (
    singleton   boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    prefix      text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
