package store

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/kagzi/kagzi/libs/wire"
)

// The batch forms of the executor's hot statements. Each serves many runs in one round
// trip and one commit (group commit); each row is still fenced exactly like the single
// forms, so batching changes throughput, never who may write.

// ClaimRequest is one doorbell to claim.
type ClaimRequest struct {
	RunID       wire.RunID
	DispatchSeq int64
	Workflow    string
}

// ClaimResult answers one ClaimRequest: OK with the run, or a no-op.
type ClaimResult struct {
	Run ClaimedRun
	OK  bool
	Err error
}

// Primary-key updates: the id = ANY condition is the only one an index can serve
// (byPrimaryKey). Steps of the claimed runs are read by the step_runs primary key prefix
// in the same round trip.
const runsClaimSQL = `
UPDATE workflow_runs r SET
    status = 'RUNNING', fence = r.fence + 1, lease_owner = $4,
    lease_expires_at = now() + $5::bigint * interval '1 microsecond',
    started_at = coalesce(r.started_at, now()), updated_at = now()
FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS t(id, seq, workflow)
WHERE r.id = ANY ($1::uuid[]) AND r.id = t.id AND r.dispatch_seq = t.seq AND r.workflow = t.workflow
  AND r.namespace = $6 COLLATE "C" AND r.status = 'QUEUED' COLLATE "C"
RETURNING r.id::text, r.dispatch_seq, r.version, r.input, r.attempt, r.max_attempts, r.fence, clock_timestamp(), r.lease_expires_at, r.lapses,
    CASE WHEN r.wake_at > now() THEN r.wake_at END`

const stepsLoadManySQL = `
SELECT run_id::text, step_key, seq, kind, status, output, coalesce(error, ''), attempt, wake_at, created_at
FROM step_runs WHERE run_id = ANY ($1::uuid[]) ORDER BY run_id, seq`

// firstDispatchSeq is workflow_runs.dispatch_seq of a run never queued again since its
// insert (the column's default; every later transition into QUEUED increments it).
const firstDispatchSeq = 1

// asyncCommitSQL, the first statement of a claim's batch, lets the claim commit without
// waiting for its WAL to reach disk (this transaction only), one flush fewer between a
// doorbell and the first step. Nothing relies on a claim before the claimer's next
// synchronous commit (a step, a sleep, the completion, a failure, a lease extension or a
// hand-back), and that commit flushes the WAL up to it and so the claim too. Should
// PostgreSQL crash first, the claim is undone as if never made: the run is QUEUED at its
// dispatch with its fence as before, the timer's relay dispatches it again (its doorbell
// was acked), and the next claim hands out the same fence once more. Every write of the
// first claimer names its owner beside the fence (FencedParams), so it is refused; a
// step body that ran meanwhile ran at least once, as a body does that its executor's
// crash interrupts before its record. Until then a reader may see the run RUNNING that
// later reads as QUEUED again.
const asyncCommitSQL = `SELECT set_config('synchronous_commit', 'off', true)`

type dispatchKey struct {
	run wire.RunID
	seq int64
}

// sortByRunID puts a claim batch in run-id order. Two executors may claim overlapping
// batches (twin doorbells, a relay beside the original) and deadlock if they lock rows in
// different orders; a plan driven by the arrays locks in their order. The claim cannot
// lock explicitly as the statements on held runs do (lockRunsInOrder): a sorted FOR NO
// KEY UPDATE ahead of it sent its plan astray on a table without statistics (4 ms to
// 450 ms for 64 runs), and a deadlock left between claims (a plan driven from the heap)
// is only a refused claim, tried again.
func sortByRunID(idx []int, runID func(i int) wire.RunID) {
	slices.SortStableFunc(idx, func(a, b int) int { return strings.Compare(runID(a), runID(b)) })
}

// RunsClaim claims many dispatches at once for one executor. Results are in request
// order. A run's current dispatch is claimed whatever else the batch holds for the same
// run (a stale doorbell beside it claims nothing); a repeat of the same dispatch in the
// batch is a no-op.
func (s *Store) RunsClaim(ctx context.Context, namespace, owner string, lease time.Duration, reqs []ClaimRequest) []ClaimResult {
	if len(reqs) == 1 { // batchOfOne
		r := reqs[0]
		run, ok, err := s.RunClaim(ctx, RunClaimParams{RunID: r.RunID, DispatchSeq: r.DispatchSeq, Namespace: namespace,
			Workflow: r.Workflow, Owner: owner, Lease: lease})
		return []ClaimResult{{Run: run, OK: ok, Err: err}}
	}
	out := make([]ClaimResult, len(reqs))
	ids := make([]string, 0, len(reqs))
	seqs := make([]int64, 0, len(reqs))
	wfs := make([]string, 0, len(reqs))
	first := make(map[dispatchKey]int, len(reqs))
	order := make([]int, 0, len(reqs))
	for i, r := range reqs {
		k := dispatchKey{r.RunID, r.DispatchSeq}
		if _, dup := first[k]; dup {
			continue
		}
		first[k] = i
		order = append(order, i)
	}
	sortByRunID(order, func(i int) wire.RunID { return reqs[i].RunID })
	for _, i := range order {
		r := reqs[i]
		ids, seqs, wfs = append(ids, r.RunID), append(seqs, r.DispatchSeq), append(wfs, r.Workflow)
	}
	fail := func(err error) []ClaimResult {
		for i := range out {
			out[i].Err = fmt.Errorf("claim %d runs: %w", len(ids), err)
		}
		return out
	}
	b := &pgx.Batch{}
	b.Queue(asyncCommitSQL)
	b.Queue(runsClaimSQL, ids, seqs, wfs, owner, micros(lease), namespace)
	// A run's first dispatch is its first claim: it has no steps yet, and a batch of
	// first dispatches (every start's claim) skips the read.
	loadSteps := slices.ContainsFunc(seqs, func(seq int64) bool { return seq != firstDispatchSeq })
	if loadSteps {
		b.Queue(stepsLoadManySQL, ids)
	}
	br := s.db.SendBatch(ctx, b)
	defer br.Close()

	if _, err := br.Exec(); err != nil {
		return fail(err)
	}
	rows, err := br.Query()
	if err != nil {
		return fail(err)
	}
	claimed := map[wire.RunID]*ClaimedRun{}
	claimedSeq := map[wire.RunID]int64{}
	for rows.Next() {
		var run ClaimedRun
		var seq int64
		if err := rows.Scan(&run.ID, &seq, &run.Version, &run.Input, &run.Attempt, &run.MaxAttempts, &run.Fence, &run.DBNow, &run.LeaseExpiresAt, &run.Lapses, &run.NotBefore); err != nil {
			rows.Close()
			return fail(err)
		}
		claimed[run.ID], claimedSeq[run.ID] = &run, seq
	}
	if err := rows.Err(); err != nil {
		return fail(err)
	}
	if loadSteps {
		if rows, err = br.Query(); err != nil {
			return fail(err)
		}
		for rows.Next() {
			var id string
			var st Step
			if err := rows.Scan(&id, &st.Key, &st.Seq, &st.Kind, &st.Status, &st.Output, &st.Error, &st.Attempt, &st.WakeAt, &st.CreatedAt); err != nil {
				rows.Close()
				return fail(err)
			}
			if run := claimed[id]; run != nil {
				run.Steps = append(run.Steps, st)
			}
		}
		if err := rows.Err(); err != nil {
			return fail(err)
		}
	}
	if err := br.Close(); err != nil {
		return fail(err)
	}
	for i, r := range reqs {
		run := claimed[r.RunID]
		if run == nil || claimedSeq[r.RunID] != r.DispatchSeq || first[dispatchKey{r.RunID, r.DispatchSeq}] != i {
			continue
		}
		run.Namespace, run.Workflow, run.Owner = namespace, r.Workflow, owner
		out[i] = ClaimResult{Run: *run, OK: true}
	}
	return out
}

// A claim is the only way a run becomes RUNNING under one owner for one dispatch: every
// later dispatch of the run has a higher dispatch_seq. Primary-key read.
const runClaimRecheckSQL = `
SELECT version, input, attempt, max_attempts, fence, clock_timestamp(), lease_expires_at, lapses,
    CASE WHEN wake_at > now() THEN wake_at END FROM workflow_runs
WHERE id = $1 AND dispatch_seq = $2 AND workflow = $3 AND namespace = $4
  AND status = 'RUNNING' AND lease_owner = $5 AND lease_expires_at > now()`

// RunClaimRecheck settles a claim whose answer was lost (an error came back, yet the
// statement may have committed). ok: the claim took and owner still holds the run, which
// is returned as RunsClaim would have returned it, steps included; its DBNow and
// LeaseExpiresAt are the database's now and the lease as they stand. Not ok: the claim
// did not take, or the run has moved on since.
func (s *Store) RunClaimRecheck(ctx context.Context, namespace, owner string, r ClaimRequest) (run ClaimedRun, ok bool, err error) {
	b := &pgx.Batch{}
	b.Queue(runClaimRecheckSQL, r.RunID, r.DispatchSeq, r.Workflow, namespace, owner)
	b.Queue(stepsLoadSQL, r.RunID)
	br := s.db.SendBatch(ctx, b)
	defer br.Close()

	run = ClaimedRun{ID: r.RunID, Namespace: namespace, Workflow: r.Workflow, Owner: owner}
	err = br.QueryRow().Scan(&run.Version, &run.Input, &run.Attempt, &run.MaxAttempts, &run.Fence, &run.DBNow, &run.LeaseExpiresAt, &run.Lapses, &run.NotBefore)
	if errors.Is(err, pgx.ErrNoRows) {
		return ClaimedRun{}, false, nil
	}
	if err != nil {
		return ClaimedRun{}, false, fmt.Errorf("re-check claim of run %s: %w", r.RunID, err)
	}
	rows, err := br.Query()
	if err != nil {
		return ClaimedRun{}, false, fmt.Errorf("load steps of run %s: %w", r.RunID, err)
	}
	if run.Steps, err = scanSteps(rows); err != nil {
		return ClaimedRun{}, false, fmt.Errorf("load steps of run %s: %w", r.RunID, err)
	}
	if err := br.Close(); err != nil {
		return ClaimedRun{}, false, fmt.Errorf("re-check claim of run %s: %w", r.RunID, err)
	}
	return run, true, nil
}

// Each row is inserted only if its run is RUNNING under the writer's fence, with the run
// row locked FOR SHARE (see stepInsertSQL). The subquery returns the latest version of a
// row it had to wait for, so a fence bumped meanwhile makes the join fail.
const stepsInsertSQL = `
INSERT INTO step_runs (run_id, step_key, seq, kind, status, output, error, attempt)
SELECT s.run_id, s.step_key, s.seq, s.kind, s.status, s.output, nullif(s.error, ''), s.attempt
FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::int[], $5::text[], $6::text[], $7::bytea[], $8::text[], $9::int[], $10::text[])
     AS s(run_id, fence, step_key, seq, kind, status, output, error, attempt, owner)
JOIN (SELECT id, fence, lease_owner FROM workflow_runs WHERE id = ANY ($1::uuid[]) AND status = 'RUNNING' COLLATE "C"
      ORDER BY id FOR SHARE) r
  ON r.id = s.run_id AND r.fence = s.fence AND r.lease_owner = s.owner
ON CONFLICT (run_id, step_key) DO NOTHING
RETURNING run_id::text, step_key`

// StepsInsert records many step results (of different runs) in one statement. Each
// result is nil, or wraps wire.ErrLeaseLost or ErrStepExists as StepInsert would.
//
// Answers are matched to requests by run, so a batch must not hold two writes of one run
// (a zombie's and its successor's): every write after a run's first is made on its own.
func (s *Store) StepsInsert(ctx context.Context, ps []StepInsertParams) []error {
	if len(ps) == 1 {
		return []error{s.StepInsert(ctx, ps[0])} // batchOfOne
	}
	if extra := laterOfSameRun(len(ps), func(i int) wire.RunID { return ps[i].RunID }); len(extra) > 0 {
		out := make([]error, len(ps))
		first := make([]StepInsertParams, 0, len(ps))
		var at []int
		for i, p := range ps {
			if extra[i] {
				out[i] = s.StepInsert(ctx, p)
				continue
			}
			first, at = append(first, p), append(at, i)
		}
		for j, err := range s.StepsInsert(ctx, first) {
			out[at[j]] = err
		}
		return out
	}
	out := make([]error, len(ps))
	n := len(ps)
	rows, err := s.db.Query(ctx, stepsInsertSQL, stepsInsertArgs(ps)...)
	if err != nil {
		for i := range out {
			out[i] = fmt.Errorf("record %d steps: %w", n, err)
		}
		return out
	}
	type rk struct{ run, key string }
	inserted := make(map[rk]bool, n)
	for rows.Next() {
		var k rk
		if err := rows.Scan(&k.run, &k.key); err != nil {
			rows.Close()
			for i := range out {
				out[i] = fmt.Errorf("record %d steps: %w", n, err)
			}
			return out
		}
		inserted[k] = true
	}
	if err := rows.Err(); err != nil {
		for i := range out {
			out[i] = fmt.Errorf("record %d steps: %w", n, err)
		}
		return out
	}
	for i, p := range ps {
		if !inserted[rk{p.RunID, p.Key}] {
			// Rare: a stale fence or an existing row. The single form tells which (and
			// records the step if the fence holds after all).
			out[i] = s.StepInsert(ctx, p)
		}
	}
	return out
}

// stepsInsertArgs are stepsInsertSQL's column arrays.
func stepsInsertArgs(ps []StepInsertParams) []any {
	n := len(ps)
	ids, fences, keys := make([]string, n), make([]int64, n), make([]string, n)
	seqs, kinds, statuses := make([]int32, n), make([]string, n), make([]string, n)
	outputs, errs, attempts, owners := make([][]byte, n), make([]string, n), make([]int32, n), make([]string, n)
	for i, p := range ps {
		p = p.withDefaults()
		ids[i], fences[i], keys[i] = p.RunID, p.Fence, p.Key
		seqs[i], kinds[i], statuses[i] = int32(p.Seq), string(p.Kind), p.Status
		outputs[i], errs[i], attempts[i], owners[i] = p.Output, p.Error, int32(p.Attempt), p.Owner
	}
	return []any{ids, fences, keys, seqs, kinds, statuses, outputs, errs, attempts, owners}
}

// CompleteRequest is one run's completion.
type CompleteRequest struct {
	FencedParams
	Output []byte
	// Step, when set, is the run's last step result, recorded in the same transaction:
	// a workflow that returns right after its last step needs one commit, not two. Its
	// fence is the completion's.
	Step *StepInsertParams
}

const runsCompleteSQL = `
UPDATE workflow_runs r SET status = 'COMPLETED', output = c.output, error = NULL,
    lease_owner = NULL, lease_expires_at = NULL, finished_at = now(), updated_at = now()
FROM unnest($1::uuid[], $2::bigint[], $3::bytea[], $4::text[]) AS c(id, fence, output, owner),
    (` + lockRunsInOrder + `) l
WHERE r.id = ANY ($1::uuid[]) AND r.id = l.id AND r.id = c.id AND r.fence = c.fence AND r.lease_owner = c.owner
  AND r.status = 'RUNNING' COLLATE "C"
RETURNING r.id::text`

// lockRunsInOrder locks, in id order, the RUNNING runs an UPDATE of held runs is about to
// change, whatever order its plan would visit them in; $1 of the statement is its array
// of run ids. The rows are this transaction's before the UPDATE reaches them, so the
// UPDATE's own order no longer matters. One executor's batches overlap (the lease
// extension names every run it holds, step and completion batches some of them), and
// rows locked in different orders deadlock: each deadlock costs a second
// (deadlock_timeout) and a retry, and under T19's load enough of them cost leases and
// re-ran step bodies. The step insert's FOR SHARE is sorted the same way.
const lockRunsInOrder = `SELECT id FROM workflow_runs WHERE id = ANY ($1::uuid[]) AND status = 'RUNNING' COLLATE "C" ORDER BY id FOR NO KEY UPDATE`

// byPrimaryKey: the statements that name their runs by an array of ids (id = ANY) read
// them by the primary key, whatever the table's statistics say. Their other conditions
// on indexed columns (status, the predicate of the partial indexes; namespace, the first
// column of two more) compare under COLLATE "C", which no index of workflow_runs has, so
// those stay filters: equality is byte equality under any deterministic collation, and
// the answer is the same. Without it, statistics taken while the table was small (a new
// deployment, or before a burst) sent a claim of one run to scan the idempotency index,
// every queued run filtered one by one: 3.8 ms for a claim among 20,000 queued against
// 0.13 ms by the key (TestBatchStatementsReadByPrimaryKey).

// Primary-key lookups: which of these runs are COMPLETED under exactly this fence, with
// exactly this output. A completed run has no lease owner left to compare; the output
// stands in for it: should a claim undone by a crash have handed the same fence to
// another executor, that one's completion is taken for this one's only if it recorded
// the very output this one would announce.
const runsCompletedByFenceSQL = `
SELECT r.id::text FROM workflow_runs r
JOIN unnest($1::uuid[], $2::bigint[], $3::bytea[]) AS c(id, fence, output) ON r.id = c.id AND r.fence = c.fence
WHERE r.status = 'COMPLETED' AND r.output = c.output`

// RunsComplete completes many runs in one statement; each result is nil or wraps
// wire.ErrLeaseLost. As in StepsInsert, a second request for one run is made on its own.
func (s *Store) RunsComplete(ctx context.Context, reqs []CompleteRequest) []error {
	if len(reqs) == 1 {
		return []error{s.completeOne(ctx, reqs[0])} // batchOfOne
	}
	if extra := laterOfSameRun(len(reqs), func(i int) wire.RunID { return reqs[i].RunID }); len(extra) > 0 {
		out := make([]error, len(reqs))
		first := make([]CompleteRequest, 0, len(reqs))
		var at []int
		for i, r := range reqs {
			if extra[i] {
				out[i] = s.RunsComplete(ctx, []CompleteRequest{r})[0]
				continue
			}
			first, at = append(first, r), append(at, i)
		}
		for j, err := range s.RunsComplete(ctx, first) {
			out[at[j]] = err
		}
		return out
	}
	out := make([]error, len(reqs))
	ids, fences, outputs, owners := make([]string, len(reqs)), make([]int64, len(reqs)), make([][]byte, len(reqs)), make([]string, len(reqs))
	var steps []StepInsertParams
	for i, r := range reqs {
		ids[i], fences[i], outputs[i], owners[i] = r.RunID, r.Fence, r.Output, r.Owner
		if r.Step != nil {
			st := *r.Step
			st.FencedParams = r.FencedParams
			steps = append(steps, st)
		}
	}
	var done map[string]bool
	var err error
	if len(steps) == 0 {
		var rows pgx.Rows
		if rows, err = s.db.Query(ctx, runsCompleteSQL, ids, fences, outputs, owners); err == nil {
			done, err = collectIDs(rows)
		}
	} else {
		done, err = s.completeWithSteps(ctx, steps, ids, fences, outputs, owners)
	}
	if err == nil && len(done) < len(reqs) {
		var already map[string]bool
		if already, err = s.completedByFence(ctx, ids, fences, outputs); err == nil {
			for id := range already {
				done[id] = true
			}
		}
	}
	for i, r := range reqs {
		switch {
		case err != nil:
			out[i] = fmt.Errorf("complete %d runs: %w", len(reqs), err)
		case !done[r.RunID]:
			out[i] = fmt.Errorf("complete run %s (fence %d): %w", r.RunID, r.Fence, wire.ErrLeaseLost)
		}
	}
	return out
}

// batchOfOne: a batch of one write, which is what group commit makes of every write on a
// quiet system (each of S2's), runs the single-run statements: primary-key lookups with
// scalar parameters, where the batch forms join arrays. Three alternated runs of the
// store's benchmarks, µs per write, batch forms against these: a step 380–423 against
// 290–311, a completion 367–547 against 286–297, a completion with its last step
// 460–513 against 342–367. S2 went from 9.9–10.7 to 8.3–8.7 one-row commits at the
// median; a claim of one run this way took it to 8.1–8.8 against 8.3–9.0, and a start
// of one run to 8.1–8.4 against 8.3–8.7. The answers are the same: the batch forms fall
// back to the single ones wherever a row was not written, and a batch of one claim has
// no repeat to resolve.

// stepInsertOrKeepSQL is stepInsertSQL keeping a row the same request wrote before (a
// retry after an ambiguous commit), as stepsInsertSQL does, for the last step a
// completion records.
const stepInsertOrKeepSQL = stepInsertSQL + `
ON CONFLICT (run_id, step_key) DO NOTHING`

// completeOne is RunsComplete for one run (batchOfOne): the completion, with its last
// step in the same transaction, and the same re-check of a completion that committed
// though its answer was lost.
func (s *Store) completeOne(ctx context.Context, r CompleteRequest) error {
	var tag pgconn.CommandTag
	var err error
	if r.Step == nil {
		tag, err = s.db.Exec(ctx, runCompleteSQL, r.RunID, r.Fence, r.Output, r.Owner)
	} else {
		st := *r.Step
		st.FencedParams = r.FencedParams
		b := &pgx.Batch{}
		b.Queue(stepInsertOrKeepSQL, stepInsertArgs(st)...)
		b.Queue(runCompleteSQL, r.RunID, r.Fence, r.Output, r.Owner)
		br := s.db.SendBatch(ctx, b)
		if _, err = br.Exec(); err == nil {
			tag, err = br.Exec()
		}
		if cerr := br.Close(); err == nil {
			err = cerr
		}
	}
	done := err == nil && tag.RowsAffected() == 1
	if err == nil && !done {
		var already map[string]bool
		already, err = s.completedByFence(ctx, []string{r.RunID}, []int64{r.Fence}, [][]byte{r.Output})
		done = already[r.RunID]
	}
	switch {
	case err != nil:
		return fmt.Errorf("complete run %s: %w", r.RunID, err)
	case !done:
		return fmt.Errorf("complete run %s (fence %d): %w", r.RunID, r.Fence, wire.ErrLeaseLost)
	}
	return nil
}

// completedByFence finds, of completions that did not take, those a retry after an
// ambiguous commit is looking at: its own, committed already (runsCompletedByFenceSQL).
func (s *Store) completedByFence(ctx context.Context, ids []string, fences []int64, outputs [][]byte) (map[string]bool, error) {
	rows, err := s.db.Query(ctx, runsCompletedByFenceSQL, ids, fences, outputs)
	if err != nil {
		return nil, err
	}
	return collectIDs(rows)
}

// completeWithSteps records the last steps and completes the runs in one implicit
// transaction (a pgx batch is one until its Sync). Both statements hold the same fence
// check, and the step insert locks the run rows FOR SHARE, so no claim comes between
// them: a run completes here only with its step recorded, now or by an earlier attempt
// of this very request (ON CONFLICT DO NOTHING), and a run whose fence moved gets
// neither.
func (s *Store) completeWithSteps(ctx context.Context, steps []StepInsertParams, ids []string, fences []int64, outputs [][]byte, owners []string) (map[string]bool, error) {
	b := &pgx.Batch{}
	b.Queue(stepsInsertSQL, stepsInsertArgs(steps)...)
	b.Queue(runsCompleteSQL, ids, fences, outputs, owners)
	br := s.db.SendBatch(ctx, b)
	defer br.Close()
	if _, err := br.Exec(); err != nil {
		return nil, err
	}
	rows, err := br.Query()
	if err != nil {
		return nil, err
	}
	done, err := collectIDs(rows)
	if err != nil {
		return nil, err
	}
	return done, br.Close()
}

// laterOfSameRun marks the requests whose run already appeared earlier in the batch; nil
// when every run appears once (the common case).
func laterOfSameRun(n int, run func(int) wire.RunID) map[int]bool {
	seen := make(map[wire.RunID]struct{}, n)
	var later map[int]bool
	for i := range n {
		id := run(i)
		if _, dup := seen[id]; dup {
			if later == nil {
				later = map[int]bool{}
			}
			later[i] = true
			continue
		}
		seen[id] = struct{}{}
	}
	return later
}

func collectIDs(rows pgx.Rows) (map[string]bool, error) {
	ids := map[string]bool{}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			rows.Close()
			return nil, err
		}
		ids[id] = true
	}
	return ids, rows.Err()
}

// One multi-row insert for a batch of starts; the idempotency unique index is the arbiter,
// so a key already taken (or repeated within the batch) inserts nothing and is resolved
// by the single form.
const runsInsertSQL = `
INSERT INTO workflow_runs (id, namespace, workflow, version, status, input, idempotency_key, max_attempts)
SELECT id, namespace, workflow, version, 'QUEUED', input, key, max_attempts
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::int[])
     AS t(id, namespace, workflow, version, input, key, max_attempts)
ON CONFLICT (namespace, workflow, idempotency_key) DO NOTHING
RETURNING id::text, dispatch_seq`

// InsertResult answers one RunsInsert request.
type InsertResult struct {
	RunInsertResult
	Err error
}

// RunsInsert creates many runs in one statement, with RunInsert's semantics for each.
func (s *Store) RunsInsert(ctx context.Context, ps []RunInsertParams) []InsertResult {
	if len(ps) == 1 { // batchOfOne
		res, err := s.RunInsert(ctx, ps[0])
		return []InsertResult{{RunInsertResult: res, Err: err}}
	}
	out := make([]InsertResult, len(ps))
	n := len(ps)
	ids, nss, wfs, vers := make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	inputs, keys, maxes := make([][]byte, n), make([]string, n), make([]int32, n)
	for i, p := range ps {
		if p.MaxAttempts <= 0 {
			p.MaxAttempts = 5
		}
		ids[i], nss[i], wfs[i], vers[i] = p.ID, p.Namespace, p.Workflow, p.Version
		inputs[i], keys[i], maxes[i] = p.Input, p.IdempotencyKey, int32(p.MaxAttempts)
	}
	inserted := map[string]int64{}
	rows, err := s.db.Query(ctx, runsInsertSQL, ids, nss, wfs, vers, inputs, keys, maxes)
	if err == nil {
		for rows.Next() {
			var id string
			var seq int64
			if err = rows.Scan(&id, &seq); err != nil {
				rows.Close()
				break
			}
			inserted[id] = seq
		}
		if err == nil {
			err = rows.Err()
		}
	}
	var existing map[runKey]existingRun
	if err != nil {
		// A run id already taken fails the whole statement: fall back to one by one so
		// only the offending start gets the error.
		inserted = map[string]int64{}
	} else if len(inserted) < n {
		// Retried starts all land here: their runs are read in one statement, not two
		// per start. A failed read leaves them to the single form.
		existing, _ = s.runsByIdempotencyKey(ctx, ps, inserted)
	}
	for i, p := range ps {
		if seq, ok := inserted[p.ID]; ok {
			out[i].RunInsertResult = RunInsertResult{Dispatch: Dispatch{RunID: p.ID, Namespace: p.Namespace,
				Workflow: p.Workflow, DispatchSeq: seq}, Status: wire.StatusQueued}
			continue
		}
		if r, ok := existing[runKey{p.Namespace, p.Workflow, p.IdempotencyKey}]; ok {
			out[i].RunInsertResult = RunInsertResult{Dispatch: Dispatch{RunID: r.id, Namespace: p.Namespace,
				Workflow: p.Workflow, DispatchSeq: r.dispatchSeq}, Existing: true, Status: r.status}
			out[i].Err = sameInput(p, r.id, r.input)
			continue
		}
		out[i].RunInsertResult, out[i].Err = s.RunInsert(ctx, p)
	}
	return out
}

type runKey struct{ namespace, workflow, idempotencyKey string }

type existingRun struct {
	id          string
	input       []byte
	status      wire.Status
	dispatchSeq int64
}

// Uses the workflow_runs_idempotency unique index, one lookup per key.
const runsByIdempotencyKeySQL = `
SELECT r.namespace, r.workflow, r.idempotency_key, r.id::text, r.input, r.status, r.dispatch_seq
FROM unnest($1::text[], $2::text[], $3::text[]) AS k(namespace, workflow, key)
JOIN workflow_runs r ON r.namespace = k.namespace AND r.workflow = k.workflow AND r.idempotency_key = k.key`

// runsByIdempotencyKey reads the runs that hold the keys of the starts a batch insert
// did not insert.
func (s *Store) runsByIdempotencyKey(ctx context.Context, ps []RunInsertParams, inserted map[string]int64) (map[runKey]existingRun, error) {
	var nss, wfs, keys []string
	for _, p := range ps {
		if _, ok := inserted[p.ID]; !ok {
			nss, wfs, keys = append(nss, p.Namespace), append(wfs, p.Workflow), append(keys, p.IdempotencyKey)
		}
	}
	rows, err := s.db.Query(ctx, runsByIdempotencyKeySQL, nss, wfs, keys)
	if err != nil {
		return nil, fmt.Errorf("read runs by idempotency key: %w", err)
	}
	defer rows.Close()
	out := make(map[runKey]existingRun, len(keys))
	for rows.Next() {
		var k runKey
		var r existingRun
		if err := rows.Scan(&k.namespace, &k.workflow, &k.idempotencyKey, &r.id, &r.input, &r.status, &r.dispatchSeq); err != nil {
			return nil, fmt.Errorf("read runs by idempotency key: %w", err)
		}
		out[k] = r
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read runs by idempotency key: %w", err)
	}
	return out, nil
}
