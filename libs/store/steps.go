package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kagzi/kagzi/libs/wire"
)

// Step is one recorded step of a run.
type Step struct {
	Key       string
	Seq       int
	Kind      wire.StepKind
	Status    string // COMPLETED or FAILED
	Output    []byte
	Error     string
	Attempt   int
	WakeAt    *time.Time
	CreatedAt time.Time
}

// Info is the step as callers see it.
func (s Step) Info() wire.StepInfo {
	return wire.StepInfo{Key: s.Key, Seq: s.Seq, Kind: s.Kind, Status: s.Status, Output: s.Output,
		Error: s.Error, WakeAt: s.WakeAt, CreatedAt: s.CreatedAt}
}

// Uses the step_runs primary key (run_id, step_key) prefix.
const stepsLoadSQL = `
SELECT step_key, seq, kind, status, output, coalesce(error, ''), attempt, wake_at, created_at
FROM step_runs WHERE run_id = $1 ORDER BY seq`

func scanSteps(rows pgx.Rows) ([]Step, error) {
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (Step, error) {
		var st Step
		err := row.Scan(&st.Key, &st.Seq, &st.Kind, &st.Status, &st.Output, &st.Error, &st.Attempt, &st.WakeAt, &st.CreatedAt)
		return st, err
	})
}

// StepInsertParams records one step result under a fence.
type StepInsertParams struct {
	FencedParams
	Key     string
	Seq     int
	Kind    wire.StepKind
	Status  string // COMPLETED, or FAILED for a terminal step error
	Output  []byte
	Error   string
	Attempt int
}

// The run row is locked FOR SHARE with the fence condition in the same statement: a
// concurrent claim (which bumps the fence) either waits for this insert to commit or
// makes the condition fail on re-check, so a stale executor can never record a step.
const stepInsertSQL = `
INSERT INTO step_runs (run_id, step_key, seq, kind, status, output, error, attempt)
SELECT r.id, $3, $4, $5, $6, $7, nullif($8, ''), $9
FROM (SELECT id FROM workflow_runs WHERE id = $1 AND fence = $2 AND lease_owner = $10 AND status = 'RUNNING' FOR SHARE) r`

// StepInsert records a step result. wire.ErrLeaseLost when the fence is stale; a second
// record of the same key is an error (the fence makes it impossible short of a bug).
func (s *Store) StepInsert(ctx context.Context, p StepInsertParams) error {
	tag, err := s.db.Exec(ctx, stepInsertSQL, stepInsertArgs(p)...)
	if err != nil {
		if isUniqueViolation(err) {
			return fmt.Errorf("record step %q of run %s: %w", p.Key, p.RunID, ErrStepExists)
		}
		return fmt.Errorf("record step %q of run %s: %w", p.Key, p.RunID, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("record step %q of run %s (fence %d): %w", p.Key, p.RunID, p.Fence, wire.ErrLeaseLost)
	}
	return nil
}

// withDefaults fills in what a caller may leave out: status COMPLETED, attempt 1.
func (p StepInsertParams) withDefaults() StepInsertParams {
	if p.Status == "" {
		p.Status = "COMPLETED"
	}
	if p.Attempt <= 0 {
		p.Attempt = 1
	}
	return p
}

// stepInsertArgs are stepInsertSQL's parameters (and stepInsertOrKeepSQL's).
func stepInsertArgs(p StepInsertParams) []any {
	p = p.withDefaults()
	return []any{p.RunID, p.Fence, p.Key, p.Seq, p.Kind, p.Status, p.Output, p.Error, p.Attempt, p.Owner}
}

// ErrStepExists means a step key was recorded twice for one run.
var ErrStepExists = errors.New("step already recorded")

// A sleep the executor waits out in process: the step row records the wake time (from the
// database clock) under the fence, and the run stays RUNNING, held by its lease. Like
// every step row it names the attempt that recorded it: a lapse later in the attempt
// counts it as progress (leaseEndSQL).
const stepSleepInsertSQL = `
INSERT INTO step_runs (run_id, step_key, seq, kind, status, wake_at, attempt)
SELECT r.id, $3, $4, 'sleep', 'COMPLETED', coalesce($5::timestamptz, now() + $6::bigint * interval '1 microsecond'), r.attempt
FROM (SELECT id, attempt FROM workflow_runs WHERE id = $1 AND fence = $2 AND lease_owner = $7 AND status = 'RUNNING' FOR SHARE) r
ON CONFLICT (run_id, step_key) DO NOTHING
RETURNING wake_at, now()`

// Primary-key lookups of both tables.
const stepSleepOwnSQL = `
SELECT s.wake_at, now() FROM step_runs s JOIN workflow_runs r ON r.id = s.run_id
WHERE s.run_id = $1 AND s.step_key = $3 AND s.kind = 'sleep' AND r.fence = $2 AND r.lease_owner = $4 AND r.status = 'RUNNING'`

// StepSleepInsert records a sleep without parking the run and returns its wake time and
// the database's now. wire.ErrLeaseLost when the fence is stale (or the row exists: a
// retry after an ambiguous commit reads it back with StepsLoad).
func (s *Store) StepSleepInsert(ctx context.Context, p RunSleepParams) (wakeAt, dbNow time.Time, err error) {
	var until any
	if p.Until != nil {
		until = *p.Until
	}
	err = s.db.QueryRow(ctx, stepSleepInsertSQL, p.RunID, p.Fence, p.StepKey, p.Seq, until, micros(p.Duration), p.Owner).Scan(&wakeAt, &dbNow)
	if errors.Is(err, pgx.ErrNoRows) {
		// Either the fence is stale, or this is a retry after an ambiguous commit and the
		// row is our own: read it back under the same fence condition.
		err = s.db.QueryRow(ctx, stepSleepOwnSQL, p.RunID, p.Fence, p.StepKey, p.Owner).Scan(&wakeAt, &dbNow)
	}
	if errors.Is(err, pgx.ErrNoRows) {
		return wakeAt, dbNow, fmt.Errorf("record sleep %q of run %s (fence %d): %w", p.StepKey, p.RunID, p.Fence, wire.ErrLeaseLost)
	}
	if err != nil {
		return wakeAt, dbNow, fmt.Errorf("record sleep %q of run %s: %w", p.StepKey, p.RunID, err)
	}
	return wakeAt, dbNow, nil
}
