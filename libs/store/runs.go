package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kagzi/kagzi/libs/wire"
)

// Dispatch is a transition into QUEUED that must be announced with a task message after
// the transaction that made it has committed.
type Dispatch struct {
	RunID       wire.RunID
	Namespace   string
	Workflow    string
	DispatchSeq int64
	// Resend is non-zero when this announces again a dispatch published before (the
	// reconciler's relay; workflow_runs.relays): it tells the copies apart for
	// JetStream's de-duplication, while the dispatch itself, and every doorbell already
	// queued for it, stays valid.
	Resend int64
	// Lapses: attempts in a row that ended with the lease lapsing (ClaimedRun.Lapses).
	Lapses int
}

// RunInsertParams describes a new run.
type RunInsertParams struct {
	ID             wire.RunID
	Namespace      string
	Workflow       string
	Version        string
	Input          []byte
	IdempotencyKey string
	MaxAttempts    int
}

// RunInsertResult says which run the start produced.
type RunInsertResult struct {
	Dispatch
	Existing bool        // the key already named a run; nothing was written
	Status   wire.Status // the run's status now (QUEUED for a new run)
}

const runInsertSQL = `
INSERT INTO workflow_runs (id, namespace, workflow, version, status, input, idempotency_key, max_attempts)
VALUES ($1, $2, $3, $4, 'QUEUED', $5, $6, $7)
ON CONFLICT (namespace, workflow, idempotency_key) DO NOTHING
RETURNING dispatch_seq`

// Uses the workflow_runs_idempotency unique index.
const runByIdempotencyKeySQL = `
SELECT id, input, status, dispatch_seq FROM workflow_runs
WHERE namespace = $1 AND workflow = $2 AND idempotency_key = $3`

// RunInsert creates a QUEUED run, or returns the run that already holds the idempotency
// key. A key reused with a different input is wire.ErrIdempotencyConflict.
func (s *Store) RunInsert(ctx context.Context, p RunInsertParams) (RunInsertResult, error) {
	if p.MaxAttempts <= 0 {
		p.MaxAttempts = 5
	}
	res := RunInsertResult{Dispatch: Dispatch{RunID: p.ID, Namespace: p.Namespace, Workflow: p.Workflow}, Status: wire.StatusQueued}
	err := s.db.QueryRow(ctx, runInsertSQL, p.ID, p.Namespace, p.Workflow, p.Version, p.Input, p.IdempotencyKey, p.MaxAttempts).
		Scan(&res.DispatchSeq)
	if err == nil {
		return res, nil
	}
	if isUniqueViolation(err) {
		// Not the idempotency key (that one is the arbiter): the run id is taken.
		return RunInsertResult{}, wire.Errorf(wire.ErrIdempotencyConflict, "run id %s is already taken", p.ID)
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return RunInsertResult{}, fmt.Errorf("insert run %s: %w", p.ID, err)
	}
	return s.existingRun(ctx, p, res)
}

// existingRun reads the run that holds p's idempotency key into res (Existing), with
// wire.ErrIdempotencyConflict when that run was started with another input.
func (s *Store) existingRun(ctx context.Context, p RunInsertParams, res RunInsertResult) (RunInsertResult, error) {
	var input []byte
	err := s.db.QueryRow(ctx, runByIdempotencyKeySQL, p.Namespace, p.Workflow, p.IdempotencyKey).
		Scan(&res.RunID, &input, &res.Status, &res.DispatchSeq)
	if err != nil {
		// The conflicting row cannot vanish (runs are never deleted by the engine), so
		// this is a real failure.
		return RunInsertResult{}, fmt.Errorf("read run for idempotency key %q: %w", p.IdempotencyKey, err)
	}
	res.Existing = true
	return res, sameInput(p, res.RunID, input)
}

// sameInput says whether a start may take the run its key already names: only with the
// input that run was started with.
func sameInput(p RunInsertParams, runID wire.RunID, input []byte) error {
	if bytes.Equal(input, p.Input) {
		return nil
	}
	return wire.Errorf(wire.ErrIdempotencyConflict, "key %q already started run %s with another input", p.IdempotencyKey, runID)
}

// RunClaimParams identifies one dispatch of one run.
type RunClaimParams struct {
	RunID       wire.RunID
	DispatchSeq int64
	Namespace   string
	Workflow    string
	Owner       string
	Lease       time.Duration
}

// ClaimedRun is a run an executor now holds, with every step recorded so far.
type ClaimedRun struct {
	ID          wire.RunID
	Namespace   string
	Workflow    string
	Version     string
	Input       []byte
	Attempt     int
	MaxAttempts int
	Fence       int64
	Owner       string // the lease owner that claimed it
	// DBNow is the database clock as the claim's row was written (clock_timestamp(), not
	// the transaction's start, which a batch of claims can put milliseconds earlier):
	// replay compares wake times to it, and a run held until its wake time counts the
	// wait from it. It is read before the answer leaves, so never later than the moment
	// the executor gets it.
	DBNow          time.Time
	LeaseExpiresAt time.Time
	// Lapses counts the attempts in a row before this one that ended with the lease
	// lapsing (workflow_runs.lapses): a run with several may be what kills its executor.
	Lapses int
	// NotBefore is the run's wake time when it is still ahead at the claim: the timer
	// queues sleepers and retries a little early (its WakeLead), and the run goes on no
	// sooner than this.
	NotBefore *time.Time
	Steps     []Step
}

// Fenced names the run as its claimer's writes must: its fence and its owner.
func (r ClaimedRun) Fenced() FencedParams {
	return FencedParams{RunID: r.ID, Fence: r.Fence, Owner: r.Owner}
}

// The claim names the dispatch it answers (dispatch_seq), so a stale, duplicated or forged
// doorbell changes nothing. Primary-key update; the steps are read in the same round trip.
const runClaimSQL = `
UPDATE workflow_runs SET
    status = 'RUNNING', fence = fence + 1, lease_owner = $5,
    lease_expires_at = now() + $6::bigint * interval '1 microsecond',
    started_at = coalesce(started_at, now()), updated_at = now()
WHERE id = $1 AND dispatch_seq = $2 AND namespace = $3 AND workflow = $4 AND status = 'QUEUED'
RETURNING version, input, attempt, max_attempts, fence, clock_timestamp(), lease_expires_at, lapses,
    CASE WHEN wake_at > now() THEN wake_at END`

// RunClaim takes a QUEUED run for this executor: status RUNNING, fence+1, a lease from
// the database clock. ok is false when the dispatch is stale or the run is not QUEUED
// (a no-op claim: the caller acks the message and moves on).
func (s *Store) RunClaim(ctx context.Context, p RunClaimParams) (run ClaimedRun, ok bool, err error) {
	b := &pgx.Batch{}
	b.Queue(asyncCommitSQL) // as in RunsClaim
	b.Queue(runClaimSQL, p.RunID, p.DispatchSeq, p.Namespace, p.Workflow, p.Owner, micros(p.Lease))
	// Same round trip (and implicit transaction) as the claim; a no-op claim ignores it.
	// A first dispatch has no steps to read (as in RunsClaim).
	loadSteps := p.DispatchSeq != firstDispatchSeq
	if loadSteps {
		b.Queue(stepsLoadSQL, p.RunID)
	}
	br := s.db.SendBatch(ctx, b)
	defer br.Close()

	run = ClaimedRun{ID: p.RunID, Namespace: p.Namespace, Workflow: p.Workflow, Owner: p.Owner}
	if _, err := br.Exec(); err != nil {
		return ClaimedRun{}, false, fmt.Errorf("claim run %s: %w", p.RunID, err)
	}
	err = br.QueryRow().Scan(&run.Version, &run.Input, &run.Attempt, &run.MaxAttempts, &run.Fence, &run.DBNow, &run.LeaseExpiresAt, &run.Lapses, &run.NotBefore)
	if errors.Is(err, pgx.ErrNoRows) {
		return ClaimedRun{}, false, nil
	}
	if err != nil {
		return ClaimedRun{}, false, fmt.Errorf("claim run %s: %w", p.RunID, err)
	}
	if loadSteps {
		rows, err := br.Query()
		if err != nil {
			return ClaimedRun{}, false, fmt.Errorf("load steps of run %s: %w", p.RunID, err)
		}
		if run.Steps, err = scanSteps(rows); err != nil {
			return ClaimedRun{}, false, fmt.Errorf("load steps of run %s: %w", p.RunID, err)
		}
	}
	if err := br.Close(); err != nil {
		return ClaimedRun{}, false, fmt.Errorf("claim run %s: %w", p.RunID, err)
	}
	return run, true, nil
}

// FencedParams names the run, the fence an executor holds it with and the executor
// (its lease owner). The owner is checked beside the fence because a claim is committed
// without waiting for its WAL flush (see asyncCommitSQL): a crash of PostgreSQL may undo
// it, and the next claim then hands out the same fence again, to another executor. Owners
// are unique per process, so the pair never names two holders.
type FencedParams struct {
	RunID wire.RunID
	Fence int64
	Owner string
}

const runCompleteSQL = `
UPDATE workflow_runs SET status = 'COMPLETED', output = $3, error = NULL,
    lease_owner = NULL, lease_expires_at = NULL, finished_at = now(), updated_at = now()
WHERE id = $1 AND fence = $2 AND lease_owner = $4 AND status = 'RUNNING'`

// RunComplete records the run's output. wire.ErrLeaseLost when the fence is stale or
// names another owner.
func (s *Store) RunComplete(ctx context.Context, p FencedParams, output []byte) error {
	tag, err := s.db.Exec(ctx, runCompleteSQL, p.RunID, p.Fence, output, p.Owner)
	if err != nil {
		return fmt.Errorf("complete run %s: %w", p.RunID, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("complete run %s (fence %d): %w", p.RunID, p.Fence, wire.ErrLeaseLost)
	}
	return nil
}

// RunFailParams describes a failed attempt.
type RunFailParams struct {
	FencedParams
	Error string
	// Retry asks for another attempt after Backoff; it is granted while attempts remain.
	Retry   bool
	Backoff time.Duration
}

// RunFailResult says what became of the run.
type RunFailResult struct {
	Status  wire.Status // SLEEPING (a retry is due at WakeAt) or FAILED
	Attempt int
	WakeAt  *time.Time
}

// A retry is a durable sleep: SLEEPING with wake_at, woken by the timer like any sleeper.
const runFailSQL = `
UPDATE workflow_runs SET
    status = CASE WHEN $4 AND attempt < max_attempts THEN 'SLEEPING' ELSE 'FAILED' END,
    wake_at = CASE WHEN $4 AND attempt < max_attempts THEN now() + $5::bigint * interval '1 microsecond' ELSE wake_at END,
    finished_at = CASE WHEN $4 AND attempt < max_attempts THEN NULL ELSE now() END,
    attempt = CASE WHEN $4 AND attempt < max_attempts THEN attempt + 1 ELSE attempt END,
    error = $3, lapses = 0, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
WHERE id = $1 AND fence = $2 AND lease_owner = $6 AND status = 'RUNNING'
RETURNING status, attempt, CASE WHEN status = 'SLEEPING' THEN wake_at END`

// RunFail ends an attempt with an error: a durable retry while attempts remain, FAILED
// (the dead letter, with the last error) after that or when Retry is false.
func (s *Store) RunFail(ctx context.Context, p RunFailParams) (RunFailResult, error) {
	var r RunFailResult
	err := s.db.QueryRow(ctx, runFailSQL, p.RunID, p.Fence, p.Error, p.Retry, micros(p.Backoff), p.Owner).
		Scan(&r.Status, &r.Attempt, &r.WakeAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return r, fmt.Errorf("fail run %s (fence %d): %w", p.RunID, p.Fence, wire.ErrLeaseLost)
	}
	if err != nil {
		return r, fmt.Errorf("fail run %s: %w", p.RunID, err)
	}
	return r, nil
}

// RunSleepParams records a durable sleep.
type RunSleepParams struct {
	FencedParams
	StepKey string
	Seq     int
	// Exactly one of Duration (new sleep: wake at the database's now() + Duration) and
	// Until (an absolute wake time, or the recorded one on a re-sleep) is used; Until wins.
	Duration time.Duration
	Until    *time.Time
}

// One statement: the fenced status change and the sleep's step row commit together. On
// a re-sleep the row exists already and ON CONFLICT keeps it.
const runSleepSQL = `
WITH r AS (
    UPDATE workflow_runs SET status = 'SLEEPING',
        wake_at = coalesce($5::timestamptz, now() + $6::bigint * interval '1 microsecond'),
        lapses = 0, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
    WHERE id = $1 AND fence = $2 AND lease_owner = $7 AND status = 'RUNNING'
    RETURNING id, wake_at, attempt
), s AS (
    INSERT INTO step_runs (run_id, step_key, seq, kind, status, wake_at, attempt)
    SELECT id, $3, $4, 'sleep', 'COMPLETED', wake_at, attempt FROM r
    ON CONFLICT (run_id, step_key) DO NOTHING
)
SELECT wake_at FROM r`

// A sleep that runSleepSQL already committed under this fence, seen again by its own
// retry: only a park under the fence makes a run SLEEPING at it, and one execution parks
// once. A parked run has no lease owner left to compare: should a claim undone by a crash
// have handed the fence to a second executor that parked the run, the first takes that
// park for its own, and stops, as it must. Primary-key lookups of the run and of its step.
const runSleepOwnParkSQL = `
SELECT r.wake_at FROM workflow_runs r
JOIN step_runs s ON s.run_id = r.id AND s.step_key = $3
WHERE r.id = $1 AND r.fence = $2 AND r.status = 'SLEEPING' AND s.kind = 'sleep' AND s.wake_at = r.wake_at`

// RunSleep parks the run until its wake time and releases it. The wake time comes from
// the database clock. A retry of a park that committed though its answer was lost gets
// the same answer again.
func (s *Store) RunSleep(ctx context.Context, p RunSleepParams) (wakeAt time.Time, err error) {
	var until any
	if p.Until != nil {
		until = *p.Until
	}
	err = s.db.QueryRow(ctx, runSleepSQL, p.RunID, p.Fence, p.StepKey, p.Seq, until, micros(p.Duration), p.Owner).Scan(&wakeAt)
	if errors.Is(err, pgx.ErrNoRows) {
		err = s.db.QueryRow(ctx, runSleepOwnParkSQL, p.RunID, p.Fence, p.StepKey).Scan(&wakeAt)
		if err == nil {
			return wakeAt, nil
		}
	}
	if errors.Is(err, pgx.ErrNoRows) {
		return time.Time{}, fmt.Errorf("sleep run %s step %q (fence %d): %w", p.RunID, p.StepKey, p.Fence, wire.ErrLeaseLost)
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("sleep run %s step %q: %w", p.RunID, p.StepKey, err)
	}
	return wakeAt, nil
}

const runReleaseSQL = `
UPDATE workflow_runs SET status = 'QUEUED', dispatch_seq = dispatch_seq + 1, queued_at = now(),
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
WHERE id = $1 AND fence = $2 AND lease_owner = $3 AND status = 'RUNNING'
RETURNING namespace, workflow, dispatch_seq, lapses`

// RunRelease hands a held run back to the queue without spending an attempt (graceful
// shutdown). The caller publishes the returned dispatch.
func (s *Store) RunRelease(ctx context.Context, p FencedParams) (Dispatch, error) {
	d := Dispatch{RunID: p.RunID}
	err := s.db.QueryRow(ctx, runReleaseSQL, p.RunID, p.Fence, p.Owner).Scan(&d.Namespace, &d.Workflow, &d.DispatchSeq, &d.Lapses)
	if errors.Is(err, pgx.ErrNoRows) {
		return d, fmt.Errorf("release run %s (fence %d): %w", p.RunID, p.Fence, wire.ErrLeaseLost)
	}
	if err != nil {
		return d, fmt.Errorf("release run %s: %w", p.RunID, err)
	}
	return d, nil
}

// Held is a run an executor holds, for lease extension.
type Held struct {
	RunID wire.RunID
	Fence int64
}

// Primary-key lookups for each held run, one statement for all of them.
const runsExtendLeasesSQL = `
UPDATE workflow_runs r SET lease_expires_at = now() + $4::bigint * interval '1 microsecond'
FROM unnest($1::uuid[], $2::bigint[]) AS h(id, fence),
    (` + lockRunsInOrder + `) l
WHERE r.id = ANY ($1::uuid[]) AND r.id = l.id AND r.id = h.id AND r.fence = h.fence AND r.status = 'RUNNING' COLLATE "C"
  AND r.lease_owner = $3
RETURNING r.id::text`

// RunsExtendLeases renews the leases of every run an executor holds in one statement and
// returns the ids still held; a run missing from the answer was lost.
func (s *Store) RunsExtendLeases(ctx context.Context, owner string, lease time.Duration, held []Held) (map[wire.RunID]bool, error) {
	ids := make([]string, len(held))
	fences := make([]int64, len(held))
	for i, h := range held {
		ids[i], fences[i] = h.RunID, h.Fence
	}
	rows, err := s.db.Query(ctx, runsExtendLeasesSQL, ids, fences, owner, micros(lease))
	if err != nil {
		return nil, fmt.Errorf("extend leases of %d runs: %w", len(held), err)
	}
	kept := make(map[wire.RunID]bool, len(held))
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			rows.Close()
			return nil, fmt.Errorf("extend leases: %w", err)
		}
		kept[id] = true
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("extend leases of %d runs: %w", len(held), err)
	}
	return kept, nil
}

// SweepParams bounds one timer sweep.
type SweepParams struct {
	Now   *time.Time // nil: the database clock
	Limit int
	// WakeLead (RunsWakeDue only) wakes runs due within this much of Now: early enough
	// for an executor to have them claimed by their wake time, which it
	// then waits for (ClaimedRun.NotBefore).
	WakeLead time.Duration
}

// Uses workflow_runs_sleeping_wake. SKIP LOCKED lets timer replicas split the work.
const runsWakeDueSQL = `
WITH due AS (
    SELECT id FROM workflow_runs
    WHERE status = 'SLEEPING' AND wake_at <= coalesce($1::timestamptz, now()) + $3::bigint * interval '1 microsecond'
    ORDER BY wake_at LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE workflow_runs r SET status = 'QUEUED', dispatch_seq = r.dispatch_seq + 1,
    queued_at = now(), updated_at = now()
FROM due WHERE r.id = due.id
RETURNING r.id::text, r.namespace, r.workflow, r.dispatch_seq`

// RunsWakeDue moves due sleepers and retries to QUEUED and returns the dispatches to
// announce.
func (s *Store) RunsWakeDue(ctx context.Context, p SweepParams) ([]Dispatch, error) {
	return s.queryDispatches(ctx, "wake due runs", runsWakeDueSQL, nowArg(p.Now), p.Limit, micros(p.WakeLead))
}

// LeaseExpiry is one run whose executor stopped renewing its lease.
type LeaseExpiry struct {
	Dispatch
	Status wire.Status // QUEUED (dispatch it) or FAILED (attempts exhausted)
}

// leaseEndSQL ends the attempts of the runs a CTE named due selects (RUNNING runs,
// locked FOR UPDATE SKIP LOCKED) exactly as a lapsed lease ends them. An ended lease
// costs an attempt, so a run that kills its executor every time (os.Exit in a step) ends
// FAILED instead of looping; it also counts a lapse, so that executors run a repeat
// offender alone. RunsExpireLeases, RunsExpirePredecessorLeases and
// RunsExpireOwnerLeases differ only in due.
//
// A lapse after an attempt that recorded a step starts the count again at 1: what kills
// its executor every time dies at the same point every time, before recording anything
// new, while a run that only stood beside it when the executor died gets on between two
// such deaths. Counted plainly, every run beside a culprit twice would be run alone, and
// each run alone stops a whole executor's intake while it drains. (It does not spare a
// run that dies beside the culprit again before recording anything, as the runs of one
// death handed back together do: see T14.) The probe reads the run's steps by the
// primary key prefix, on this path only: lapses are rare.
const leaseEndSQL = `
UPDATE workflow_runs r SET
    status = CASE WHEN r.attempt < r.max_attempts THEN 'QUEUED' ELSE 'FAILED' END,
    attempt = CASE WHEN r.attempt < r.max_attempts THEN r.attempt + 1 ELSE r.attempt END,
    dispatch_seq = CASE WHEN r.attempt < r.max_attempts THEN r.dispatch_seq + 1 ELSE r.dispatch_seq END,
    error = CASE WHEN r.attempt < r.max_attempts THEN r.error
        ELSE 'lease expired on attempt ' || r.attempt || ' of ' || r.max_attempts || ': the executor stopped renewing it (crashed, killed or partitioned)' END,
    finished_at = CASE WHEN r.attempt < r.max_attempts THEN NULL ELSE now() END,
    lapses = CASE WHEN EXISTS (SELECT 1 FROM step_runs s WHERE s.run_id = r.id AND s.attempt = r.attempt)
        THEN 1 ELSE r.lapses + 1 END,
    queued_at = now(), lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM due WHERE r.id = due.id
RETURNING r.id::text, r.namespace, r.workflow, r.dispatch_seq, r.lapses, r.status`

// Uses workflow_runs_running_lease.
const runsExpireLeasesSQL = `
WITH due AS (
    SELECT id FROM workflow_runs
    WHERE status = 'RUNNING' AND lease_expires_at <= coalesce($1::timestamptz, now())
    ORDER BY lease_expires_at LIMIT $2
    FOR UPDATE SKIP LOCKED
)` + leaseEndSQL

// RunsExpireLeases re-queues runs whose lease lapsed (or fails them when their attempts
// are spent).
func (s *Store) RunsExpireLeases(ctx context.Context, p SweepParams) ([]LeaseExpiry, error) {
	return s.queryLeaseExpiries(ctx, "expire leases", runsExpireLeasesSQL, nowArg(p.Now), p.Limit)
}

// PredecessorLeasesParams names a worker that holds its stable name's lock (see
// WorkerNameTryLock): the earlier incarnations of that name are dead.
type PredecessorLeasesParams struct {
	Namespace string
	Name      string // the stable name; lease owners "<Name>/…" are its incarnations
	Self      string // the caller's own worker id ("<Name>/…"): its runs and its sandboxes' ("<Self>/…") are left alone
	Limit     int
}

// The scan is bounded by workflow_runs_running_lease: a partial index on status =
// 'RUNNING', so only the runs held right now (at most the executors' total concurrency)
// are read, in lease order, and filtered by namespace and owner. starts_with needs no
// LIKE escaping ('_' is valid in a name).
const runsExpirePredecessorLeasesSQL = `
WITH due AS (
    SELECT id FROM workflow_runs
    WHERE status = 'RUNNING' AND namespace = $1
      AND starts_with(lease_owner, $2 || '/') AND lease_owner <> $3 AND NOT starts_with(lease_owner, $3 || '/')
    ORDER BY lease_expires_at LIMIT $4
    FOR UPDATE SKIP LOCKED
)` + leaseEndSQL

// RunsExpirePredecessorLeases ends, at once, the attempts of the runs that earlier
// incarnations of a named worker still hold, as their lapsed leases would end them a
// lease later: re-queued (or FAILED when their attempts are spent), attempt and lapses
// counted. Only a worker holding the name's lock may call it: the lock proves that no
// earlier incarnation is alive. A run another statement has locked is skipped (the lease
// sweep takes it); a batch shorter than Limit means none is left.
func (s *Store) RunsExpirePredecessorLeases(ctx context.Context, p PredecessorLeasesParams) ([]LeaseExpiry, error) {
	if p.Name == "" || p.Self == "" {
		return nil, wire.Errorf(wire.ErrInvalidArgument, "expire predecessor leases: need Name and Self")
	}
	return s.queryLeaseExpiries(ctx, "expire leases of earlier incarnations of "+p.Name, runsExpirePredecessorLeasesSQL,
		p.Namespace, p.Name, p.Self, p.Limit)
}

// Uses workflow_runs_running_lease, as runsExpirePredecessorLeasesSQL does.
const runsExpireOwnerLeasesSQL = `
WITH due AS (
    SELECT id FROM workflow_runs
    WHERE status = 'RUNNING' AND namespace = $1 AND lease_owner = $2
    ORDER BY lease_expires_at LIMIT $3
    FOR UPDATE SKIP LOCKED
)` + leaseEndSQL

// RunsExpireOwnerLeases ends, at once, the attempts of the runs one worker holds, as
// their lapsed leases would end them a lease later. Only a caller that knows the owner
// is dead may call it: a worker whose sandbox process it saw exit. A batch shorter than
// limit means none is left.
func (s *Store) RunsExpireOwnerLeases(ctx context.Context, namespace, owner string, limit int) ([]LeaseExpiry, error) {
	if owner == "" {
		return nil, wire.Errorf(wire.ErrInvalidArgument, "expire leases of an owner: need the owner")
	}
	return s.queryLeaseExpiries(ctx, "expire leases of dead worker "+owner, runsExpireOwnerLeasesSQL, namespace, owner, limit)
}

func (s *Store) queryLeaseExpiries(ctx context.Context, what, sql string, args ...any) ([]LeaseExpiry, error) {
	rows, err := s.db.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (LeaseExpiry, error) {
		var e LeaseExpiry
		err := row.Scan(&e.RunID, &e.Namespace, &e.Workflow, &e.DispatchSeq, &e.Lapses, &e.Status)
		return e, err
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return out, nil
}

// RedispatchParams bounds one reconcile sweep.
type RedispatchParams struct {
	SweepParams
	StaleAfter time.Duration // QUEUED this long without a claim: the dispatch went missing
	LiveWithin time.Duration // a worker heartbeating within this serves its workflows
	// Backlogged names workflows ("namespace/workflow") whose doorbells are still
	// waiting in the task stream: a run of theirs may only be waiting its turn behind
	// them, so it is relayed only once QUEUED for BackloggedStaleAfter. Relaying every
	// run of a long queue each StaleAfter would bury the queue under no-op doorbells.
	Backlogged           []string
	BackloggedStaleAfter time.Duration
	// LostBefore, when set, makes due every run QUEUED before it, stale or not, and only
	// those: the task stream was made anew at that time, and every doorbell published
	// before it went with the old one. The stale rule is left to the sweep, which knows
	// the backlog; a relay of a lost stream that also relayed every stale run would, on
	// each restart of a timer, bury a backlogged queue under doorbells it already holds.
	LostBefore time.Time
}

// Uses workflow_runs_queued_age. Only runs a live worker serves are re-dispatched: a run
// of a workflow nobody serves stays QUEUED (visible as such) instead of piling up
// doorbells in the task stream.
const runsRedispatchStaleSQL = `
WITH due AS (
    SELECT r.id FROM workflow_runs r
    WHERE r.status = 'QUEUED'
      AND CASE WHEN $7::timestamptz IS NOT NULL THEN r.queued_at < $7::timestamptz
          ELSE r.queued_at <= coalesce($1::timestamptz, now()) - $3::bigint * interval '1 microsecond'
               AND (r.namespace || '/' || r.workflow <> ALL ($5::text[])
                    OR r.queued_at <= coalesce($1::timestamptz, now()) - $6::bigint * interval '1 microsecond') END
      AND EXISTS (SELECT 1 FROM workers w
                  WHERE w.namespace = r.namespace AND r.workflow = ANY (w.workflows)
                    AND w.heartbeat_at > coalesce($1::timestamptz, now()) - $4::bigint * interval '1 microsecond')
    ORDER BY r.queued_at LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE workflow_runs r SET relays = r.relays + 1, queued_at = now(), updated_at = now()
FROM due WHERE r.id = due.id
RETURNING r.id::text, r.namespace, r.workflow, r.dispatch_seq, r.relays, r.lapses`

// RunsRedispatchStale announces again the dispatch of runs that sat QUEUED unclaimed for
// StaleAfter: the relay of the QUEUED-row outbox. It keeps dispatch_seq: the doorbell
// may be late rather than lost (a backlog longer than StaleAfter), and a new sequence
// number would turn every doorbell still queued for the run into a no-op claim, so that
// behind a long queue executors would spend their claims on nothing. The run's
// queued_at restarts, so each run is relayed at most once per StaleAfter, and its relays
// count goes up by one.
func (s *Store) RunsRedispatchStale(ctx context.Context, p RedispatchParams) ([]Dispatch, error) {
	backlogged := p.Backlogged
	if backlogged == nil {
		backlogged = []string{}
	}
	rows, err := s.db.Query(ctx, runsRedispatchStaleSQL, nowArg(p.Now), p.Limit, micros(p.StaleAfter), micros(p.LiveWithin),
		backlogged, micros(max(p.BackloggedStaleAfter, p.StaleAfter)), timeArg(p.LostBefore))
	if err != nil {
		return nil, fmt.Errorf("redispatch stale runs: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Dispatch, error) {
		var d Dispatch
		err := row.Scan(&d.RunID, &d.Namespace, &d.Workflow, &d.DispatchSeq, &d.Resend, &d.Lapses)
		return d, err
	})
	if err != nil {
		return nil, fmt.Errorf("redispatch stale runs: %w", err)
	}
	return out, nil
}

func (s *Store) queryDispatches(ctx context.Context, what, sql string, args ...any) ([]Dispatch, error) {
	rows, err := s.db.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Dispatch, error) {
		var d Dispatch
		err := row.Scan(&d.RunID, &d.Namespace, &d.Workflow, &d.DispatchSeq)
		return d, err
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return out, nil
}

// NextDue is when the timer next has work, each nil when there is none of that kind.
type NextDue struct {
	DBNow       time.Time
	Wake        *time.Time // earliest sleeper or retry
	LeaseExpiry *time.Time // earliest lease expiry
	Stale       *time.Time // when the oldest QUEUED run becomes stale
}

// Earliest returns the soonest of the three, or nil.
func (n NextDue) Earliest() *time.Time {
	var min *time.Time
	for _, t := range []*time.Time{n.Wake, n.LeaseExpiry, n.Stale} {
		if t != nil && (min == nil || t.Before(*min)) {
			min = t
		}
	}
	return min
}

// Three probes of the partial indexes in one round trip. The stale probe skips runs no
// live worker serves, as RunsRedispatchStale does, so an unserved run never hides a
// served one behind it.
const runsNextDueSQL = `
SELECT now(),
    (SELECT wake_at FROM workflow_runs WHERE status = 'SLEEPING' ORDER BY wake_at LIMIT 1),
    (SELECT lease_expires_at FROM workflow_runs WHERE status = 'RUNNING' ORDER BY lease_expires_at LIMIT 1),
    (SELECT r.queued_at + $1::bigint * interval '1 microsecond' FROM workflow_runs r
     WHERE r.status = 'QUEUED' AND EXISTS (SELECT 1 FROM workers w
         WHERE w.namespace = r.namespace AND r.workflow = ANY (w.workflows)
           AND w.heartbeat_at > now() - $2::bigint * interval '1 microsecond')
     ORDER BY r.queued_at LIMIT 1)`

// RunsNextDue tells the timer when to look again.
func (s *Store) RunsNextDue(ctx context.Context, staleAfter, liveWithin time.Duration) (NextDue, error) {
	var n NextDue
	err := s.db.QueryRow(ctx, runsNextDueSQL, micros(staleAfter), micros(liveWithin)).Scan(&n.DBNow, &n.Wake, &n.LeaseExpiry, &n.Stale)
	if err != nil {
		return n, fmt.Errorf("read next due times: %w", err)
	}
	return n, nil
}

const runGetSQL = `
SELECT id::text, namespace, workflow, version, status, input, output, coalesce(error, ''), idempotency_key,
    attempt, max_attempts, wake_at, created_at, updated_at, started_at, finished_at
FROM workflow_runs WHERE id = $1 AND namespace = $2`

// RunGet reads a run and its steps. wire.ErrRunNotFound when the namespace has no such run.
func (s *Store) RunGet(ctx context.Context, namespace string, id wire.RunID) (wire.RunInfo, error) {
	var r wire.RunInfo
	var input, output []byte
	if !wire.ValidRunID(id) {
		return r, fmt.Errorf("get run %q: %w", id, wire.ErrRunNotFound)
	}
	b := &pgx.Batch{}
	b.Queue(runGetSQL, id, namespace)
	b.Queue(stepsLoadSQL, id)
	br := s.db.SendBatch(ctx, b)
	defer br.Close()
	err := br.QueryRow().Scan(&r.ID, &r.Namespace, &r.Workflow, &r.Version, &r.Status, &input, &output, &r.Error,
		&r.IdempotencyKey, &r.Attempt, &r.MaxAttempts, &r.WakeAt, &r.CreatedAt, &r.UpdatedAt, &r.StartedAt, &r.FinishedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return r, fmt.Errorf("get run %s: %w", id, wire.ErrRunNotFound)
	}
	if err != nil {
		return r, fmt.Errorf("get run %s: %w", id, err)
	}
	r.Input, r.Output = input, output
	rows, err := br.Query()
	if err != nil {
		return r, fmt.Errorf("get steps of run %s: %w", id, err)
	}
	steps, err := scanSteps(rows)
	if err != nil {
		return r, fmt.Errorf("get steps of run %s: %w", id, err)
	}
	for _, st := range steps {
		r.Steps = append(r.Steps, st.Info())
	}
	return r, nil
}
