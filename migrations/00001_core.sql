-- +goose Up
-- The durable core. workflow_runs is both the run table and the outbox: a QUEUED row
-- is a dispatch that must happen, and the timer's sweep of stale QUEUED rows is its relay.
CREATE TABLE workflow_runs (
    id               uuid        PRIMARY KEY,            -- UUIDv7: time-ordered, made by the scheduler
    namespace        text        NOT NULL,
    workflow         text        NOT NULL,
    version          text        NOT NULL DEFAULT '',
    status           text        NOT NULL CHECK (status IN
                        ('QUEUED','RUNNING','SLEEPING','WAITING','COMPLETED','FAILED','CANCELLED')),
    input            bytea       NOT NULL,
    output           bytea,
    error            text,
    idempotency_key  text        NOT NULL,               -- the caller's key, or the start request's id
    attempt          integer     NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    max_attempts     integer     NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    fence            bigint      NOT NULL DEFAULT 0,     -- incremented by every claim
    dispatch_seq     bigint      NOT NULL DEFAULT 1,     -- incremented by every transition into QUEUED
    lease_owner      text,
    lease_expires_at timestamptz,
    wake_at          timestamptz,
    queued_at        timestamptz NOT NULL DEFAULT now(), -- when the current dispatch was made
    parent_run_id    uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    CONSTRAINT workflow_runs_idempotency UNIQUE (namespace, workflow, idempotency_key)
);

-- Timer: due sleepers and retries (RunsWakeDue, RunsNextDue).
CREATE INDEX workflow_runs_sleeping_wake ON workflow_runs (wake_at) WHERE status = 'SLEEPING';
-- Timer: expired leases (RunsExpireLeases, RunsNextDue).
CREATE INDEX workflow_runs_running_lease ON workflow_runs (lease_expires_at) WHERE status = 'RUNNING';
-- Timer: lost dispatches (RunsRedispatchStale, RunsNextDue).
CREATE INDEX workflow_runs_queued_age ON workflow_runs (queued_at) WHERE status = 'QUEUED';
-- Listing a namespace's runs, newest first (RunList).
CREATE INDEX workflow_runs_namespace_created ON workflow_runs (namespace, created_at DESC);

-- One row per recorded step. No foreign key: every insert is fenced against the run's
-- row in the same statement, which already proves the run exists and is ours.
CREATE TABLE step_runs (
    run_id      uuid        NOT NULL,
    step_key    text        NOT NULL,
    seq         integer     NOT NULL,                   -- position in the run's step sequence
    kind        text        NOT NULL CHECK (kind IN ('step','sleep','event','child')),
    status      text        NOT NULL CHECK (status IN ('COMPLETED','FAILED')),
    output      bytea,
    error       text,
    attempt     integer     NOT NULL DEFAULT 1,
    wake_at     timestamptz,                            -- sleeps: when the run may go on
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, step_key)
);

-- Executors announce themselves and what they serve; the reconciler only re-dispatches
-- runs of workflows that a live worker serves.
CREATE TABLE workers (
    id           text        PRIMARY KEY,
    namespace    text        NOT NULL,
    workflows    text[]      NOT NULL,
    hostname     text        NOT NULL DEFAULT '',
    pid          integer     NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workers_heartbeat ON workers (heartbeat_at);

-- +goose Down
DROP TABLE workers;
DROP TABLE step_runs;
DROP TABLE workflow_runs;
