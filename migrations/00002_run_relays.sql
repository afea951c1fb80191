-- +goose Up
-- How many times the reconciler announced a run's current dispatch again because it sat
-- QUEUED unclaimed for KAGZI_STALE_AFTER. A relay keeps dispatch_seq (a late doorbell
-- stays valid), so this count is what tells the relays apart: it is part of their
-- Nats-Msg-Id, and operators and the bench read it. A constant default makes this a
-- catalogue-only change, instant on a table of any size.
ALTER TABLE workflow_runs ADD COLUMN relays integer NOT NULL DEFAULT 0;

-- +goose Down
ALTER TABLE workflow_runs DROP COLUMN relays;
