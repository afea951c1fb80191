-- +goose Up
-- Lineage of runs started from a step of another run (StartRequest.parent): the parent,
-- the tree's root and the depth below it. A root run has none of the ids and depth 0.
-- The scheduler refuses a child deeper than max_depth or whose tree already has
-- max_tree_runs unfinished runs, so a run that starts runs that start runs cannot grow
-- without bound. Constant defaults: adding the columns rewrites nothing.
ALTER TABLE workflow_runs
    ADD COLUMN parent_id uuid NULL,
    ADD COLUMN root_id uuid NULL,
    ADD COLUMN depth integer NOT NULL DEFAULT 0;

-- Counts a tree's unfinished runs at every child insert; finished runs leave the index,
-- so the count costs what the tree has pending, not what it ever made.
CREATE INDEX workflow_runs_tree_unfinished ON workflow_runs (root_id)
    WHERE root_id IS NOT NULL AND status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'WAITING');

-- +goose Down
DROP INDEX workflow_runs_tree_unfinished;
ALTER TABLE workflow_runs DROP COLUMN depth, DROP COLUMN root_id, DROP COLUMN parent_id;
