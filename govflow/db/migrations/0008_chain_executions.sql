-- How many executions the change_status chain of each root event has caused, so that a
-- chain's breadth is bounded as its depth is (GOVFLOW_MAX_CHAIN_EXECUTIONS).

CREATE TABLE chain_executions (
    tenant      text        NOT NULL,
    root_id     text        NOT NULL,
    executions  integer     NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, root_id)
);
