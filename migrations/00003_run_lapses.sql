-- +goose Up
-- How many attempts in a row ended with the run's lease lapsing (its executor crashed,
-- was killed or was cut off) rather than by the workflow's own doing. A run that took its
-- executor down twice in a row is likely what brings it down (os.Exit or a fatal error
-- in a step), so executors run it alone: should it crash again, no other run shares its
-- fate and loses an attempt for it. Reset when an attempt ends any other way.
ALTER TABLE workflow_runs ADD COLUMN lapses integer NOT NULL DEFAULT 0;

-- +goose Down
ALTER TABLE workflow_runs DROP COLUMN lapses;
