package store_test

// T17 — model-based property test of the run state machine.
//
// rapid generates sequences of operations (starts, claims, step records, sleeps,
// completions, failures, crashes, lease expiry, timer and reconcile ticks, duplicate
// doorbells and late writes under old fences) and runs them against the real store on a
// real PostgreSQL database. An in-memory model predicts every result; after every
// operation the whole database is compared with the model and the rows a test-only
// trigger logged for every INSERT and UPDATE of workflow_runs are checked against the
// legal transitions of the SQL. At the end of each sequence every run is driven to a
// terminal state and checked again.
//
// Properties: at most one step_runs row per (run, key) and exactly the steps the model
// recorded (so a completed run has every step it should, and no step row is ever updated
// or deleted); each successful claim returns fence+1; only the transitions the SQL allows
// (QUEUED→RUNNING, QUEUED→QUEUED re-dispatch, RUNNING→RUNNING lease extension,
// RUNNING→SLEEPING/COMPLETED/FAILED/QUEUED, SLEEPING→QUEUED), a terminal run never
// changes and is entered once; dispatch_seq moves by one exactly on transitions into
// QUEUED from another status (a re-dispatch relays the same dispatch) and fence only on
// claims; a write under an old fence (or under the current fence
// of a run that is no longer RUNNING) gets wire.ErrLeaseLost and changes nothing;
// 1 ≤ attempt ≤ max_attempts; every result (claims, sweeps, idempotent starts) is the one
// the model predicts.
//
// Clock: leases, sleeps and backoffs are whole hours and sweeps inject a Now whole hours
// ahead of the database clock, so the seconds a sequence takes never change an outcome.
//
// Sizes: 500 sequences by default (RAPID_CHECKS or -rapid.checks overrides it; the chaos
// size is -rapid.checks=20000), about 30 operations each (-rapid.steps).

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"pgregory.net/rapid"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

const (
	modelNS          = "default"
	modelServedWF    = "wf"   // a live worker serves it: the reconciler re-dispatches it
	modelUnservedWF  = "solo" // nobody serves it: the reconciler leaves it alone
	modelWorkerID    = "model-worker"
	modelStaleAfter  = time.Hour
	modelDefaultSize = 500
)

var modelExecNames = []string{"exec-a", "exec-b", "exec-c"}

// Test-only bookkeeping in the test's own database: every INSERT and UPDATE of a run row
// and every UPDATE or DELETE of a step row is logged, so a transition that an operation
// made and undid within one call is still seen.
const modelSchemaSQL = `
CREATE TABLE test_transitions (
    id             bigserial PRIMARY KEY,
    run_id         text    NOT NULL,
    old_status     text,
    new_status     text    NOT NULL,
    old_fence      bigint,
    new_fence      bigint  NOT NULL,
    old_seq        bigint,
    new_seq        bigint  NOT NULL,
    old_attempt    integer,
    new_attempt    integer NOT NULL,
    output_changed boolean NOT NULL
);
CREATE FUNCTION test_log_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO test_transitions (run_id, new_status, new_fence, new_seq, new_attempt, output_changed)
        VALUES (NEW.id::text, NEW.status, NEW.fence, NEW.dispatch_seq, NEW.attempt, NEW.output IS NOT NULL);
    ELSE
        INSERT INTO test_transitions (run_id, old_status, new_status, old_fence, new_fence, old_seq, new_seq,
                                      old_attempt, new_attempt, output_changed)
        VALUES (NEW.id::text, OLD.status, NEW.status, OLD.fence, NEW.fence, OLD.dispatch_seq, NEW.dispatch_seq,
                OLD.attempt, NEW.attempt, OLD.output IS DISTINCT FROM NEW.output);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_log_run AFTER INSERT OR UPDATE ON workflow_runs
    FOR EACH ROW EXECUTE FUNCTION test_log_run();
CREATE TABLE test_step_mutations (run_id text NOT NULL, step_key text NOT NULL, op text NOT NULL);
CREATE FUNCTION test_log_step() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_step_mutations VALUES (OLD.run_id::text, OLD.step_key, TG_OP);
    RETURN NULL;
END $$;
CREATE TRIGGER test_log_step AFTER UPDATE OR DELETE ON step_runs
    FOR EACH ROW EXECUTE FUNCTION test_log_step();`

// Between sequences: empty every table (DELETE: the tables hold a handful of rows, and
// DELETE is much cheaper than TRUNCATE at that size), then announce the live worker.
const modelResetSQL = `
DELETE FROM step_runs;
DELETE FROM test_step_mutations;
DELETE FROM workflow_runs;
DELETE FROM test_transitions;
DELETE FROM workers;`

// Only the transitions the SQL of the store can make.
var modelLegal = map[[2]wire.Status]bool{
	{wire.StatusQueued, wire.StatusRunning}:    true, // claim
	{wire.StatusQueued, wire.StatusQueued}:     true, // re-dispatch of a stale QUEUED run
	{wire.StatusRunning, wire.StatusRunning}:   true, // lease extension
	{wire.StatusRunning, wire.StatusSleeping}:  true, // sleep, retry
	{wire.StatusRunning, wire.StatusCompleted}: true,
	{wire.StatusRunning, wire.StatusFailed}:    true, // terminal failure, attempts exhausted
	{wire.StatusRunning, wire.StatusQueued}:    true, // lease expiry, release
	{wire.StatusSleeping, wire.StatusQueued}:   true, // wake
}

// ---- the model -------------------------------------------------------------------------

type mStep struct {
	key     string
	kind    wire.StepKind
	output  []byte
	attempt int
	wakeAt  time.Time // sleeps: the recorded wake time, as the database returned it
	wakeH   int       // sleeps: the same, in hours after the sequence began
}

type mRun struct {
	id          wire.RunID
	workflow    string
	key         string
	input       []byte
	maxAttempts int

	status  wire.Status
	fence   int64
	seq     int64 // dispatch_seq
	relays  int64 // reconciler relays ever made
	attempt int
	owner   string // lease owner while RUNNING
	leaseH  int    // lease expiry, hours after the sequence began (while RUNNING)
	wakeH   int    // wake time, hours after the sequence began (while SLEEPING)
	output  []byte
	steps   []mStep // recorded steps; a step's seq is its index, its key "s<seq>"

	fences          []int64 // fences successful claims returned, in order
	terminalEntries int     // transitions into a terminal status seen in the log
}

func (r *mRun) hasStep(key string) bool {
	return slices.ContainsFunc(r.steps, func(s mStep) bool { return s.key == key })
}

func stepKey(pos int) string { return "s" + strconv.Itoa(pos) }

// mHeld is a run as an executor believes it holds it. It stays after the executor lost
// the lease without noticing (a zombie); the executor drops it at its first refused write.
type mHeld struct {
	run     int
	fence   int64
	pos     int // the next step's position
	attempt int
}

type mExec struct {
	name string
	held []*mHeld
}

func (e *mExec) drop(h *mHeld) {
	e.held = slices.DeleteFunc(e.held, func(x *mHeld) bool { return x == h })
}

func (e *mExec) hold(h *mHeld) {
	e.held = slices.DeleteFunc(e.held, func(x *mHeld) bool { return x.run == h.run })
	e.held = append(e.held, h)
}

type model struct {
	ctx  context.Context
	s    *store.Store
	pool *pgxpool.Pool

	runs  []*mRun
	byID  map[string]int
	execs []*mExec
	// Transitions the current operation must have logged, per run: "FROM>TO" ("" for
	// an insert).
	expect    map[int][]string
	lastLogID int64
	nextRunN  int
	stats     map[string]int // outcomes over all sequences, for the log
	// sameRunBatches adds late writes batched with the current holder's write of the
	// same run (TestModelSameRunBatches).
	sameRunBatches bool
}

func (m *model) count(what string) { m.stats[what]++ }

// refused counts a write refused with ErrLeaseLost: by a zombie executor (it held the
// run) or by a late write the test forged.
func (m *model) refused(held *mHeld) {
	if held != nil {
		m.count("refused-zombie-write")
	} else {
		m.count("refused-late-write")
	}
}

func newModel(ctx context.Context, pool *pgxpool.Pool, stats map[string]int) *model {
	m := &model{ctx: ctx, s: store.New(pool), pool: pool, byID: map[string]int{}, expect: map[int][]string{}, stats: stats}
	for _, n := range modelExecNames {
		m.execs = append(m.execs, &mExec{name: n})
	}
	return m
}

// current says whether a write under this fence by this owner holds. The owner counts
// beside the fence: a claim undone by a crash of PostgreSQL hands its fence out again.
func (m *model) current(run int, fence int64, owner string) bool {
	r := m.runs[run]
	return r.status == wire.StatusRunning && r.fence == fence && r.owner == owner
}

// transition moves the model and records the transition the log must show.
func (m *model) transition(run int, to wire.Status) {
	r := m.runs[run]
	m.expect[run] = append(m.expect[run], string(r.status)+">"+string(to))
	r.status = to
	if to != wire.StatusRunning {
		r.owner = ""
	}
}

func (m *model) runDesc(i int) string {
	r := m.runs[i]
	return fmt.Sprintf("run#%d{%s fence=%d seq=%d attempt=%d/%d steps=%d}", i, r.status, r.fence, r.seq, r.attempt, r.maxAttempts, len(r.steps))
}

func hours(h int) time.Duration { return time.Duration(h) * time.Hour }

// nowAt is the injected clock h hours ahead, or nil (the database clock) for 0.
func nowAt(h int) *time.Time {
	if h == 0 {
		return nil
	}
	t := time.Now().Add(hours(h))
	return &t
}

func wantErr(t *rapid.T, what string, got, want error) {
	t.Helper()
	if want == nil {
		if got != nil {
			t.Fatalf("%s: err = %v, want success", what, got)
		}
		return
	}
	if !errors.Is(got, want) {
		t.Fatalf("%s: err = %v, want %v", what, got, want)
	}
}

// ---- operations ------------------------------------------------------------------------

const (
	startNew = iota
	startSameInput
	startOtherInput
)

type startSpec struct {
	mode        int // startNew, or a reused key with the same or another input
	pick        int // which run's key a reused key is (modulo the runs known so far)
	served      bool
	maxAttempts int
}

func (m *model) doStart(t *rapid.T, mode int, pick int, served bool, maxAttempts int) {
	m.doStarts(t, []startSpec{{mode: mode, pick: pick, served: served, maxAttempts: maxAttempts}}, false)
}

// doStarts starts runs with RunInsert, one call per spec, or with one RunsInsert call
// (the scheduler's batched starts) when batch is set. A reused key may name a run made
// earlier in the same batch.
func (m *model) doStarts(t *rapid.T, specs []startSpec, batch bool) {
	ps := make([]store.RunInsertParams, len(specs))
	type outcome struct {
		run      int  // the run the start names
		created  bool // a new run
		conflict bool // wire.ErrIdempotencyConflict
	}
	want := make([]outcome, len(specs))
	for i, sp := range specs {
		if sp.mode != startNew && len(m.runs) > 0 {
			k := sp.pick % len(m.runs)
			r := m.runs[k]
			input := r.input
			if sp.mode == startOtherInput {
				input = append(slices.Clone(r.input), ' ')
			}
			ps[i] = store.RunInsertParams{ID: wire.NewRunID(), Namespace: modelNS, Workflow: r.workflow, Input: input,
				IdempotencyKey: r.key, MaxAttempts: sp.maxAttempts}
			want[i] = outcome{run: k, conflict: sp.mode == startOtherInput}
			continue
		}
		n := m.nextRunN
		m.nextRunN++
		r := &mRun{id: wire.NewRunID(), workflow: modelServedWF, key: "key-" + strconv.Itoa(n),
			input: []byte(`{"n":` + strconv.Itoa(n) + `}`), maxAttempts: sp.maxAttempts,
			status: wire.StatusQueued, seq: 1, attempt: 1}
		if !sp.served {
			r.workflow = modelUnservedWF
		}
		ps[i] = store.RunInsertParams{ID: r.id, Namespace: modelNS, Workflow: r.workflow, Input: r.input,
			IdempotencyKey: r.key, MaxAttempts: sp.maxAttempts}
		m.byID[string(r.id)] = len(m.runs)
		m.runs = append(m.runs, r)
		m.expect[len(m.runs)-1] = append(m.expect[len(m.runs)-1], ">"+string(wire.StatusQueued))
		want[i] = outcome{run: len(m.runs) - 1, created: true}
	}
	got := make([]store.InsertResult, len(specs))
	if batch {
		got = m.s.RunsInsert(m.ctx, ps)
		if len(got) != len(specs) {
			t.Fatalf("RunsInsert returned %d results for %d starts", len(got), len(specs))
		}
	} else {
		for i, p := range ps {
			got[i].RunInsertResult, got[i].Err = m.s.RunInsert(m.ctx, p)
		}
	}
	for i, w := range want {
		r := m.runs[w.run]
		what := fmt.Sprintf("start %d of %d (batch=%v) with the key of %s", i+1, len(specs), batch, m.runDesc(w.run))
		switch {
		case w.conflict:
			wantErr(t, what+" and another input", got[i].Err, wire.ErrIdempotencyConflict)
			m.count("start-conflict")
			continue
		case w.created:
			m.count("start")
		default:
			m.count("start-existing")
		}
		wantErr(t, what, got[i].Err, nil)
		res := got[i].RunInsertResult
		if res.Existing == w.created || res.RunID != r.id || res.Status != r.status || res.DispatchSeq != r.seq ||
			res.Namespace != modelNS || res.Workflow != r.workflow {
			t.Fatalf("%s = %+v, want existing=%v", what, res, !w.created)
		}
	}
}

type claimReq struct {
	run      int
	seq      int64
	workflow string
}

// doClaim claims with RunsClaim (or RunClaim when single and there is one request).
func (m *model) doClaim(t *rapid.T, e *mExec, reqs []claimReq, single bool, leaseH int) {
	// Only the first request naming a given dispatch (run and seq) is tried; it claims
	// when that dispatch is the run's current one. A stale doorbell beside it in the batch
	// neither claims nor blocks the current one.
	want := make([]bool, len(reqs))
	type dispatch struct {
		run int
		seq int64
	}
	seen := map[dispatch]bool{}
	for i, q := range reqs {
		r := m.runs[q.run]
		d := dispatch{q.run, q.seq}
		want[i] = !seen[d] && r.status == wire.StatusQueued && q.seq == r.seq && q.workflow == r.workflow
		seen[d] = true
	}
	got := make([]store.ClaimResult, len(reqs))
	if single && len(reqs) == 1 {
		q := reqs[0]
		run, ok, err := m.s.RunClaim(m.ctx, store.RunClaimParams{RunID: m.runs[q.run].id, DispatchSeq: q.seq,
			Namespace: modelNS, Workflow: q.workflow, Owner: e.name, Lease: hours(leaseH)})
		got[0] = store.ClaimResult{Run: run, OK: ok, Err: err}
	} else {
		creqs := make([]store.ClaimRequest, len(reqs))
		for i, q := range reqs {
			creqs[i] = store.ClaimRequest{RunID: m.runs[q.run].id, DispatchSeq: q.seq, Workflow: q.workflow}
		}
		got = m.s.RunsClaim(m.ctx, modelNS, e.name, hours(leaseH), creqs)
		if len(got) != len(reqs) {
			t.Fatalf("RunsClaim returned %d results for %d requests", len(got), len(reqs))
		}
	}
	for i, q := range reqs {
		g := got[i]
		wantErr(t, "claim", g.Err, nil)
		if g.OK != want[i] {
			t.Fatalf("claim %d of %s with seq %d workflow %s by %s: ok = %v, want %v", i, m.runDesc(q.run), q.seq, q.workflow, e.name, g.OK, want[i])
		}
		if !g.OK {
			m.count("claim-noop")
			continue
		}
		m.count("claim")
		r := m.runs[q.run]
		c := g.Run
		if c.ID != r.id || c.Namespace != modelNS || c.Workflow != r.workflow || string(c.Input) != string(r.input) {
			t.Fatalf("claimed run %+v, want %s", c, m.runDesc(q.run))
		}
		if c.Fence != r.fence+1 {
			t.Fatalf("claim of %s returned fence %d, want %d", m.runDesc(q.run), c.Fence, r.fence+1)
		}
		if n := len(r.fences); n > 0 && c.Fence <= r.fences[n-1] {
			t.Fatalf("claim fence %d of %s does not exceed the previous claim's %d", c.Fence, m.runDesc(q.run), r.fences[n-1])
		}
		if c.Attempt != r.attempt || c.MaxAttempts != r.maxAttempts {
			t.Fatalf("claim of %s returned attempt %d/%d", m.runDesc(q.run), c.Attempt, c.MaxAttempts)
		}
		if c.Attempt > c.MaxAttempts {
			t.Fatalf("claim of %s: attempt %d exceeds max_attempts %d", m.runDesc(q.run), c.Attempt, c.MaxAttempts)
		}
		// The lease runs from the claim's transaction start; DBNow is read as the row is
		// written, a little later: the lease left at DBNow is the lease, less that gap.
		if d := c.LeaseExpiresAt.Sub(c.DBNow); d > hours(leaseH) || d < hours(leaseH)-time.Second {
			t.Fatalf("claim of %s: lease left %v at the claim, want %v or a little less", m.runDesc(q.run), d, hours(leaseH))
		}
		if diff := diffSteps(c.Steps, r.steps); diff != "" {
			t.Fatalf("claim of %s loaded steps that differ from the model: %s", m.runDesc(q.run), diff)
		}
		m.transition(q.run, wire.StatusRunning)
		r.fence = c.Fence
		r.fences = append(r.fences, c.Fence)
		r.owner, r.leaseH = e.name, leaseH
		e.hold(&mHeld{run: q.run, fence: c.Fence, pos: len(c.Steps), attempt: c.Attempt})
	}
}

type stepReq struct {
	run     int
	fence   int64
	pos     int // the key is stepKey(pos) and the seq is pos
	attempt int
	exec    *mExec // nil for a late write by nobody the model tracks
	held    *mHeld
	owner   string // the lease owner the write names (exec's name when exec is set)
}

func stepOutput(key string, fence int64) []byte {
	return []byte(`"` + key + "@" + strconv.FormatInt(fence, 10) + `"`)
}

// doSteps records steps with StepsInsert, or one StepInsert call per request.
func (m *model) doSteps(t *rapid.T, reqs []stepReq, single bool) {
	type rk struct {
		run int
		key string
	}
	want := make([]error, len(reqs))
	batch := map[rk]bool{}
	for i, q := range reqs {
		key := stepKey(q.pos)
		switch {
		case !m.current(q.run, q.fence, q.owner):
			want[i] = wire.ErrLeaseLost
		case m.runs[q.run].hasStep(key) || batch[rk{q.run, key}]:
			want[i] = store.ErrStepExists
		default:
			batch[rk{q.run, key}] = true
		}
	}
	ps := make([]store.StepInsertParams, len(reqs))
	for i, q := range reqs {
		key := stepKey(q.pos)
		ps[i] = store.StepInsertParams{FencedParams: store.FencedParams{RunID: m.runs[q.run].id, Fence: q.fence, Owner: q.owner},
			Key: key, Seq: q.pos, Kind: wire.StepKindStep, Output: stepOutput(key, q.fence), Attempt: q.attempt}
	}
	var got []error
	if single {
		for _, p := range ps {
			got = append(got, m.s.StepInsert(m.ctx, p))
		}
	} else {
		got = m.s.StepsInsert(m.ctx, ps)
	}
	for i, q := range reqs {
		wantErr(t, fmt.Sprintf("step %s of %s with fence %d (request %d of %d, single=%v)",
			stepKey(q.pos), m.runDesc(q.run), q.fence, i+1, len(reqs), single), got[i], want[i])
	}
	for i, q := range reqs {
		r := m.runs[q.run]
		switch want[i] {
		case store.ErrStepExists:
			m.count("step-exists")
		case nil:
			m.count("step")
			if q.pos != len(r.steps) {
				t.Fatalf("model: step %d recorded after %d steps of %s", q.pos, len(r.steps), m.runDesc(q.run))
			}
			r.steps = append(r.steps, mStep{key: stepKey(q.pos), kind: wire.StepKindStep, output: stepOutput(stepKey(q.pos), q.fence), attempt: q.attempt})
			if q.held != nil {
				q.held.pos++
			}
		case wire.ErrLeaseLost:
			m.refused(q.held)
			if q.held != nil {
				q.exec.drop(q.held)
			}
		}
	}
}

// doSleep parks the run with RunSleep at hours from now, by Duration or by Until.
// doSleep parks the run with RunSleep h hours from now, by Duration or by Until. A pos
// below the recorded steps names a recorded sleep: a re-sleep on replay (the run was woken
// early by a clock ahead of its wake time), which passes the recorded wake time when
// recorded is set and keeps the recorded row either way.
func (m *model) doSleep(t *rapid.T, run int, fence int64, owner string, pos int, h int, until, recorded bool, e *mExec, held *mHeld) {
	r := m.runs[run]
	ok := m.current(run, fence, owner)
	resleep := pos < len(r.steps)
	p := store.RunSleepParams{FencedParams: store.FencedParams{RunID: r.id, Fence: fence, Owner: owner}, StepKey: stepKey(pos), Seq: pos}
	before := time.Now()
	switch {
	case resleep && recorded:
		u := r.steps[pos].wakeAt
		p.Until, h = &u, r.steps[pos].wakeH
	case until:
		u := before.Add(hours(h))
		p.Until = &u
	default:
		p.Duration = hours(h)
	}
	wakeAt, err := m.s.RunSleep(m.ctx, p)
	after := time.Now()
	what := fmt.Sprintf("sleep %s of %s with fence %d (re-sleep=%v)", stepKey(pos), m.runDesc(run), fence, resleep)
	if !ok {
		wantErr(t, what, err, wire.ErrLeaseLost)
		m.refused(held)
		if held != nil {
			e.drop(held)
		}
		return
	}
	wantErr(t, what, err, nil)
	switch {
	case resleep && recorded:
		if !wakeAt.Equal(r.steps[pos].wakeAt) {
			t.Fatalf("%s: wake at %v, want the recorded %v", what, wakeAt, r.steps[pos].wakeAt)
		}
	case wakeAt.Before(before.Add(hours(h)-time.Minute)) || wakeAt.After(after.Add(hours(h)+time.Minute)):
		t.Fatalf("%s: wake at %v, want about %v", what, wakeAt, before.Add(hours(h)))
	}
	switch {
	case resleep:
		if r.steps[pos].kind != wire.StepKindSleep {
			t.Fatalf("model: re-sleep on %s, a %s", stepKey(pos), r.steps[pos].kind)
		}
		m.count("re-sleep")
	case pos == len(r.steps):
		r.steps = append(r.steps, mStep{key: stepKey(pos), kind: wire.StepKindSleep, attempt: r.attempt, wakeAt: wakeAt, wakeH: h})
		m.count("sleep")
	default:
		t.Fatalf("model: sleep %d recorded after %d steps of %s", pos, len(r.steps), m.runDesc(run))
	}
	m.transition(run, wire.StatusSleeping)
	r.wakeH = h
	if held != nil {
		e.drop(held) // the function unwinds: the executor lets the run go
	}
}

type fencedReq struct {
	run   int
	fence int64
	exec  *mExec
	held  *mHeld
	owner string // as in stepReq
}

func completeOutput(run int, fence int64, owner string) []byte {
	return []byte(fmt.Sprintf(`"out-%d@%d-%s"`, run, fence, owner))
}

// doComplete completes with RunsComplete, or with RunComplete when single.
func (m *model) doComplete(t *rapid.T, reqs []fencedReq, single bool) {
	want := make([]error, len(reqs))
	for i, q := range reqs {
		if !m.current(q.run, q.fence, q.owner) {
			want[i] = wire.ErrLeaseLost
		}
	}
	var got []error
	if single {
		for _, q := range reqs {
			got = append(got, m.s.RunComplete(m.ctx, store.FencedParams{RunID: m.runs[q.run].id, Fence: q.fence, Owner: q.owner}, completeOutput(q.run, q.fence, q.owner)))
		}
	} else {
		creqs := make([]store.CompleteRequest, len(reqs))
		for i, q := range reqs {
			creqs[i] = store.CompleteRequest{FencedParams: store.FencedParams{RunID: m.runs[q.run].id, Fence: q.fence, Owner: q.owner},
				Output: completeOutput(q.run, q.fence, q.owner)}
		}
		got = m.s.RunsComplete(m.ctx, creqs)
	}
	// Apply, then decide the idempotent answers: RunsComplete answers success to a
	// request whose run is COMPLETED under exactly its fence with exactly its output (a
	// retry after an ambiguous commit).
	applied := make([]bool, len(reqs))
	for i, q := range reqs {
		if want[i] == nil {
			r := m.runs[q.run]
			m.transition(q.run, wire.StatusCompleted)
			r.output = completeOutput(q.run, q.fence, q.owner)
			applied[i] = true
			m.count("complete")
		}
	}
	for i, q := range reqs {
		r := m.runs[q.run]
		if !single && want[i] != nil && r.status == wire.StatusCompleted && r.fence == q.fence &&
			bytes.Equal(r.output, completeOutput(q.run, q.fence, q.owner)) {
			want[i] = nil
			m.count("complete-idempotent")
		}
		wantErr(t, fmt.Sprintf("complete %s with fence %d (request %d of %d, single=%v)", m.runDesc(q.run), q.fence, i+1, len(reqs), single), got[i], want[i])
		if want[i] != nil {
			m.refused(q.held)
		}
		if q.held != nil {
			q.exec.drop(q.held)
		}
	}
}

func (m *model) doFail(t *rapid.T, q fencedReq, retry bool, backoffH int) {
	r := m.runs[q.run]
	ok := m.current(q.run, q.fence, q.owner)
	what := fmt.Sprintf("fail %s with fence %d retry=%v", m.runDesc(q.run), q.fence, retry)
	res, err := m.s.RunFail(m.ctx, store.RunFailParams{FencedParams: store.FencedParams{RunID: r.id, Fence: q.fence, Owner: q.owner},
		Error: "boom", Retry: retry, Backoff: hours(backoffH)})
	if q.held != nil {
		q.exec.drop(q.held)
	}
	if !ok {
		wantErr(t, what, err, wire.ErrLeaseLost)
		m.refused(q.held)
		return
	}
	wantErr(t, what, err, nil)
	if retry && r.attempt < r.maxAttempts {
		m.count("fail-retry")
		r.attempt++
		r.wakeH = backoffH
		m.transition(q.run, wire.StatusSleeping)
	} else {
		m.count("fail-terminal")
		m.transition(q.run, wire.StatusFailed)
	}
	if res.Status != r.status || res.Attempt != r.attempt || (res.WakeAt != nil) != (r.status == wire.StatusSleeping) {
		t.Fatalf("%s = %+v, want status %s attempt %d", what, res, r.status, r.attempt)
	}
}

func (m *model) doRelease(t *rapid.T, q fencedReq) {
	r := m.runs[q.run]
	ok := m.current(q.run, q.fence, q.owner)
	what := fmt.Sprintf("release %s with fence %d", m.runDesc(q.run), q.fence)
	d, err := m.s.RunRelease(m.ctx, store.FencedParams{RunID: r.id, Fence: q.fence, Owner: q.owner})
	if q.held != nil {
		q.exec.drop(q.held)
	}
	if !ok {
		wantErr(t, what, err, wire.ErrLeaseLost)
		m.refused(q.held)
		return
	}
	wantErr(t, what, err, nil)
	m.count("release")
	r.seq++
	m.transition(q.run, wire.StatusQueued)
	if d.RunID != r.id || d.DispatchSeq != r.seq || d.Workflow != r.workflow {
		t.Fatalf("%s = %+v, want seq %d", what, d, r.seq)
	}
}

// doExtend renews leases with RunsExtendLeases for owner.
func (m *model) doExtend(t *rapid.T, owner string, reqs []fencedReq, leaseH int) {
	held := make([]store.Held, len(reqs))
	want := map[string]bool{}
	for i, q := range reqs {
		r := m.runs[q.run]
		held[i] = store.Held{RunID: r.id, Fence: q.fence}
		if m.current(q.run, q.fence, owner) {
			want[string(r.id)] = true
		}
	}
	kept, err := m.s.RunsExtendLeases(m.ctx, owner, hours(leaseH), held)
	wantErr(t, "extend leases", err, nil)
	for id := range kept {
		if !want[id] {
			t.Fatalf("extend leases of %s kept run#%d, which it does not hold", owner, m.byID[id])
		}
	}
	for _, q := range reqs {
		r := m.runs[q.run]
		if want[string(r.id)] && !kept[r.id] {
			t.Fatalf("extend leases of %s lost %s, which it holds with fence %d", owner, m.runDesc(q.run), q.fence)
		}
	}
	done := map[int]bool{}
	for _, q := range reqs {
		r := m.runs[q.run]
		if !want[string(r.id)] {
			m.count("extend-lost")
		}
		if want[string(r.id)] && !done[q.run] {
			m.count("extend-kept")
			done[q.run] = true
			r.leaseH = leaseH
			m.transition(q.run, wire.StatusRunning)
		}
		if q.held != nil && !want[string(r.id)] {
			q.exec.drop(q.held) // the heartbeat says the lease is gone
		}
	}
}

// sweepResult checks a sweep's answer against the runs due and returns their indices.
func (m *model) sweepResult(t *rapid.T, what string, ids []string, due []int, limit int) []int {
	if want := min(limit, len(due)); len(ids) != want {
		t.Fatalf("%s (limit %d) returned %d runs, want %d of the due %v", what, limit, len(ids), want, due)
	}
	var out []int
	for _, id := range ids {
		i, ok := m.byID[id]
		if !ok {
			t.Fatalf("%s returned unknown run %s", what, id)
		}
		if !slices.Contains(due, i) {
			t.Fatalf("%s returned %s, which is not due", what, m.runDesc(i))
		}
		if slices.Contains(out, i) {
			t.Fatalf("%s returned %s twice", what, m.runDesc(i))
		}
		out = append(out, i)
	}
	return out
}

func (m *model) doExpire(t *rapid.T, offH int, limit int) {
	var due []int
	for i, r := range m.runs {
		if r.status == wire.StatusRunning && offH > 0 && r.leaseH <= offH {
			due = append(due, i)
		}
	}
	res, err := m.s.RunsExpireLeases(m.ctx, store.SweepParams{Now: nowAt(offH), Limit: limit})
	wantErr(t, "expire leases", err, nil)
	ids := make([]string, len(res))
	for i, e := range res {
		ids[i] = string(e.RunID)
	}
	got := m.sweepResult(t, fmt.Sprintf("expire leases at +%dh", offH), ids, due, limit)
	for k, i := range got {
		r := m.runs[i]
		if r.attempt < r.maxAttempts {
			m.count("lease-expired-requeued")
			r.attempt++
			r.seq++
			m.transition(i, wire.StatusQueued)
		} else {
			m.count("lease-expired-failed")
			m.transition(i, wire.StatusFailed)
		}
		if res[k].Status != r.status || res[k].DispatchSeq != r.seq || res[k].Workflow != r.workflow {
			t.Fatalf("expire leases: %+v, want %s", res[k], m.runDesc(i))
		}
	}
}

func (m *model) doWake(t *rapid.T, offH int, limit int) {
	var due []int
	for i, r := range m.runs {
		if r.status == wire.StatusSleeping && offH > 0 && r.wakeH <= offH {
			due = append(due, i)
		}
	}
	res, err := m.s.RunsWakeDue(m.ctx, store.SweepParams{Now: nowAt(offH), Limit: limit})
	wantErr(t, "wake due runs", err, nil)
	m.applyDispatches(t, fmt.Sprintf("wake due runs at +%dh", offH), res, due, limit, true)
	m.stats["woken"] += len(res)
}

func (m *model) doReconcile(t *rapid.T, offH int, liveH int, limit int) {
	var due []int
	// Stale after 1 h; the worker heartbeated when the sequence began, so it is live at
	// +offH only if liveH > offH.
	live := liveH > offH
	for i, r := range m.runs {
		if r.status == wire.StatusQueued && r.workflow == modelServedWF && offH >= 2 && live {
			due = append(due, i)
		}
	}
	res, err := m.s.RunsRedispatchStale(m.ctx, store.RedispatchParams{SweepParams: store.SweepParams{Now: nowAt(offH), Limit: limit},
		StaleAfter: modelStaleAfter, LiveWithin: hours(liveH)})
	wantErr(t, "redispatch stale runs", err, nil)
	m.applyDispatches(t, fmt.Sprintf("redispatch at +%dh live within %dh", offH, liveH), res, due, limit, false)
	m.stats["redispatched"] += len(res)
}

// applyDispatches checks a sweep's dispatches; newDispatch says whether they are new
// dispatches (wakes) or relays of the current one (reconcile).
func (m *model) applyDispatches(t *rapid.T, what string, res []store.Dispatch, due []int, limit int, newDispatch bool) {
	ids := make([]string, len(res))
	for i, d := range res {
		ids[i] = string(d.RunID)
	}
	got := m.sweepResult(t, what, ids, due, limit)
	for k, i := range got {
		r := m.runs[i]
		wantResend := int64(0)
		if newDispatch {
			r.seq++
		} else {
			// Each relay has its own mark, or JetStream would de-duplicate it away.
			r.relays++
			wantResend = r.relays
		}
		m.transition(i, wire.StatusQueued)
		if res[k].DispatchSeq != r.seq || res[k].Resend != wantResend || res[k].Namespace != modelNS || res[k].Workflow != r.workflow {
			t.Fatalf("%s: %+v, want %s", what, res[k], m.runDesc(i))
		}
	}
}

// ---- invariants ------------------------------------------------------------------------

func diffSteps(got []store.Step, want []mStep) string {
	if len(got) != len(want) {
		keys := make([]string, len(got))
		for i, s := range got {
			keys[i] = s.Key
		}
		return fmt.Sprintf("%d steps %v, want %d", len(got), keys, len(want))
	}
	for i, g := range got {
		w := want[i]
		if g.Key != w.key || g.Seq != i || g.Kind != w.kind || g.Status != "COMPLETED" || string(g.Output) != string(w.output) ||
			g.Attempt != w.attempt || (g.WakeAt != nil) != (w.kind == wire.StepKindSleep) || (g.WakeAt != nil && !g.WakeAt.Equal(w.wakeAt)) {
			return fmt.Sprintf("step %d = {key %s seq %d kind %s status %s output %s attempt %d}, want {key %s kind %s output %s attempt %d}",
				i, g.Key, g.Seq, g.Kind, g.Status, g.Output, g.Attempt, w.key, w.kind, w.output, w.attempt)
		}
	}
	return ""
}

type dbRun struct {
	id, workflow, key   string
	input, output       []byte
	status              wire.Status
	fence, seq          int64
	attempt, maxAttempt int
	owner               *string
	hasLease, hasWake   bool
}

type dbTransition struct {
	id            int64
	run           string
	oldStatus     *string
	newStatus     string
	oldFence      *int64
	newFence      int64
	oldSeq        *int64
	newSeq        int64
	oldAttempt    *int
	newAttempt    int
	outputChanged bool
}

// check compares the whole database with the model and the logged transitions with the
// operation's expectations and with the rules of the state machine.
func (m *model) check(t *rapid.T) {
	t.Helper()
	b := &pgx.Batch{}
	b.Queue(`SELECT id::text, workflow, idempotency_key, input, output, status, fence, dispatch_seq, attempt, max_attempts,
	    lease_owner, lease_expires_at IS NOT NULL, wake_at IS NOT NULL FROM workflow_runs`)
	b.Queue(`SELECT run_id::text, step_key, seq, kind, status, output, coalesce(error, ''), attempt, wake_at, created_at
	    FROM step_runs ORDER BY run_id, seq`)
	b.Queue(`SELECT id, run_id, old_status, new_status, old_fence, new_fence, old_seq, new_seq, old_attempt, new_attempt, output_changed
	    FROM test_transitions WHERE id > $1 ORDER BY id`, m.lastLogID)
	b.Queue(`SELECT count(*) FROM test_step_mutations`)
	br := m.pool.SendBatch(m.ctx, b)
	defer br.Close()

	rows, _ := br.Query()
	dbRuns, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (dbRun, error) {
		var d dbRun
		err := row.Scan(&d.id, &d.workflow, &d.key, &d.input, &d.output, &d.status, &d.fence, &d.seq, &d.attempt, &d.maxAttempt,
			&d.owner, &d.hasLease, &d.hasWake)
		return d, err
	})
	if err != nil {
		t.Fatalf("read runs: %v", err)
	}
	rows, _ = br.Query()
	type dbStep struct {
		run string
		store.Step
	}
	dbSteps, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (dbStep, error) {
		var s dbStep
		err := row.Scan(&s.run, &s.Key, &s.Seq, &s.Kind, &s.Status, &s.Output, &s.Error, &s.Attempt, &s.WakeAt, &s.CreatedAt)
		return s, err
	})
	if err != nil {
		t.Fatalf("read steps: %v", err)
	}
	rows, _ = br.Query()
	log, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (dbTransition, error) {
		var d dbTransition
		err := row.Scan(&d.id, &d.run, &d.oldStatus, &d.newStatus, &d.oldFence, &d.newFence, &d.oldSeq, &d.newSeq,
			&d.oldAttempt, &d.newAttempt, &d.outputChanged)
		return d, err
	})
	if err != nil {
		t.Fatalf("read transitions: %v", err)
	}
	var mutations int
	if err := br.QueryRow().Scan(&mutations); err != nil {
		t.Fatalf("read step mutations: %v", err)
	}
	if err := br.Close(); err != nil {
		t.Fatalf("check: %v", err)
	}

	// Runs: exactly the model's, field by field.
	if len(dbRuns) != len(m.runs) {
		t.Fatalf("database holds %d runs, model %d", len(dbRuns), len(m.runs))
	}
	for _, d := range dbRuns {
		i, ok := m.byID[d.id]
		if !ok {
			t.Fatalf("database holds unknown run %s", d.id)
		}
		r := m.runs[i]
		owner := ""
		if d.owner != nil {
			owner = *d.owner
		}
		if d.attempt < 1 || d.attempt > d.maxAttempt {
			t.Fatalf("run#%d: attempt %d outside 1..max_attempts %d", i, d.attempt, d.maxAttempt)
		}
		if d.workflow != r.workflow || d.key != r.key || string(d.input) != string(r.input) || d.status != r.status ||
			d.fence != r.fence || d.seq != r.seq || d.attempt != r.attempt || d.maxAttempt != r.maxAttempts || owner != r.owner {
			t.Fatalf("run#%d in the database {%s fence=%d seq=%d attempt=%d/%d owner=%q}, model %s owner=%q",
				i, d.status, d.fence, d.seq, d.attempt, d.maxAttempt, owner, m.runDesc(i), r.owner)
		}
		if d.hasLease != (r.status == wire.StatusRunning) || (r.status == wire.StatusSleeping && !d.hasWake) {
			t.Fatalf("run#%d %s: lease set=%v wake set=%v", i, d.status, d.hasLease, d.hasWake)
		}
		if r.status == wire.StatusCompleted && string(d.output) != string(r.output) {
			t.Fatalf("run#%d COMPLETED with output %s, want %s", i, d.output, r.output)
		}
	}

	// Steps: at most one row per (run, key), and exactly the steps the model recorded.
	perRun := map[string][]store.Step{}
	keys := map[[2]string]int{}
	for _, s := range dbSteps {
		keys[[2]string{s.run, s.Key}]++
		if keys[[2]string{s.run, s.Key}] > 1 {
			t.Fatalf("%d step_runs rows for run %s key %s", keys[[2]string{s.run, s.Key}], s.run, s.Key)
		}
		if _, ok := m.byID[s.run]; !ok {
			t.Fatalf("step %s of unknown run %s", s.Key, s.run)
		}
		perRun[s.run] = append(perRun[s.run], s.Step)
	}
	for i, r := range m.runs {
		if diff := diffSteps(perRun[string(r.id)], r.steps); diff != "" {
			t.Fatalf("%s: database steps differ from the model: %s", m.runDesc(i), diff)
		}
	}
	if mutations != 0 {
		t.Fatalf("%d step_runs rows were updated or deleted", mutations)
	}

	// Transitions: legal, fenced and numbered by the rules, and exactly those the model
	// expected of this operation.
	gotPerRun := map[int][]string{}
	for _, d := range log {
		m.lastLogID = d.id
		i, ok := m.byID[d.run]
		if !ok {
			t.Fatalf("transition of unknown run %s", d.run)
		}
		to := wire.Status(d.newStatus)
		if d.oldStatus == nil {
			if to != wire.StatusQueued || d.newFence != 0 || d.newSeq != 1 || d.newAttempt != 1 || d.outputChanged {
				t.Fatalf("run#%d inserted as %s fence %d seq %d attempt %d", i, to, d.newFence, d.newSeq, d.newAttempt)
			}
			gotPerRun[i] = append(gotPerRun[i], ">"+d.newStatus)
			continue
		}
		from := wire.Status(*d.oldStatus)
		if from.Terminal() {
			t.Fatalf("run#%d: terminal %s changed (to %s)", i, from, to)
		}
		if !modelLegal[[2]wire.Status{from, to}] {
			t.Fatalf("run#%d: illegal transition %s → %s", i, from, to)
		}
		wantFence := *d.oldFence
		if from == wire.StatusQueued && to == wire.StatusRunning {
			wantFence++
		}
		if d.newFence != wantFence {
			t.Fatalf("run#%d %s → %s: fence %d → %d", i, from, to, *d.oldFence, d.newFence)
		}
		wantSeq := *d.oldSeq
		if to == wire.StatusQueued && from != wire.StatusQueued {
			wantSeq++
		}
		if d.newSeq != wantSeq {
			t.Fatalf("run#%d %s → %s: dispatch_seq %d → %d (it moves exactly on transitions into QUEUED from elsewhere)", i, from, to, *d.oldSeq, d.newSeq)
		}
		if d.newAttempt < *d.oldAttempt || d.newAttempt > *d.oldAttempt+1 {
			t.Fatalf("run#%d %s → %s: attempt %d → %d", i, from, to, *d.oldAttempt, d.newAttempt)
		}
		if d.outputChanged && to != wire.StatusCompleted {
			t.Fatalf("run#%d %s → %s changed the output", i, from, to)
		}
		if to.Terminal() {
			m.runs[i].terminalEntries++
			if m.runs[i].terminalEntries > 1 {
				t.Fatalf("run#%d entered a terminal status %d times", i, m.runs[i].terminalEntries)
			}
		}
		gotPerRun[i] = append(gotPerRun[i], string(from)+">"+string(to))
	}
	for i := range m.runs {
		if !slices.Equal(gotPerRun[i], m.expect[i]) {
			t.Fatalf("run#%d: the operation made transitions %v, the model expected %v", i, gotPerRun[i], m.expect[i])
		}
	}
	clear(m.expect)
}

// ---- the end of a sequence -------------------------------------------------------------

// drain drives every run to a terminal state the way the services would: executors
// finish what they still hold, leases expire, sleepers wake, and a fresh executor claims
// each queued run, records one more step and completes it.
func (m *model) drain(t *rapid.T) {
	drainer := &mExec{name: "drainer"}
	for round := 0; ; round++ {
		open := 0
		for _, r := range m.runs {
			if !r.status.Terminal() {
				open++
			}
		}
		if open == 0 {
			break
		}
		if round == 5 {
			t.Fatalf("%d runs not terminal after %d drain rounds", open, round)
		}
		for _, e := range m.execs {
			var reqs []fencedReq
			for _, h := range e.held {
				if m.current(h.run, h.fence, e.name) {
					reqs = append(reqs, fencedReq{run: h.run, fence: h.fence, exec: e, held: h, owner: e.name})
				}
			}
			if len(reqs) > 0 {
				m.doComplete(t, reqs, false)
				m.check(t)
			}
		}
		m.doExpire(t, 1000, 1000)
		m.check(t)
		m.doWake(t, 1000, 1000)
		m.check(t)
		var claims []claimReq
		for i, r := range m.runs {
			if r.status == wire.StatusQueued {
				claims = append(claims, claimReq{run: i, seq: r.seq, workflow: r.workflow})
			}
		}
		if len(claims) == 0 {
			continue
		}
		m.doClaim(t, drainer, claims, false, 1)
		m.check(t)
		var steps []stepReq
		var done []fencedReq
		for _, h := range slices.Clone(drainer.held) {
			steps = append(steps, stepReq{run: h.run, fence: h.fence, pos: h.pos, attempt: h.attempt, exec: drainer, held: h, owner: drainer.name})
			done = append(done, fencedReq{run: h.run, fence: h.fence, exec: drainer, held: h, owner: drainer.name})
		}
		m.doSteps(t, steps, false)
		m.check(t)
		m.doComplete(t, done, false)
		m.check(t)
	}
	for i, r := range m.runs {
		if r.terminalEntries != 1 {
			t.Fatalf("%s entered a terminal status %d times, want 1", m.runDesc(i), r.terminalEntries)
		}
		if r.status != wire.StatusCompleted {
			continue
		}
		for k, s := range r.steps {
			if s.key != stepKey(k) {
				t.Fatalf("completed %s: step %d has key %s", m.runDesc(i), k, s.key)
			}
		}
	}
}

// ---- generation ------------------------------------------------------------------------

type heldRef struct {
	e *mExec
	h *mHeld
}

// fenced is the write of the executor that holds the run.
func (hr heldRef) fenced() fencedReq {
	return fencedReq{run: hr.h.run, fence: hr.h.fence, exec: hr.e, held: hr.h, owner: hr.e.name}
}

func (m *model) allHeld() []heldRef {
	var out []heldRef
	for _, e := range m.execs {
		for _, h := range e.held {
			out = append(out, heldRef{e, h})
		}
	}
	return out
}

func (m *model) drawHeld(t *rapid.T) heldRef {
	all := m.allHeld()
	if len(all) == 0 {
		t.Skip("no executor holds a run")
	}
	return all[rapid.IntRange(0, len(all)-1).Draw(t, "held")]
}

func (m *model) drawRun(t *rapid.T) int {
	if len(m.runs) == 0 {
		t.Skip("no runs")
	}
	return rapid.IntRange(0, len(m.runs)-1).Draw(t, "run")
}

func (m *model) drawExec(t *rapid.T) *mExec {
	return m.execs[rapid.IntRange(0, len(m.execs)-1).Draw(t, "exec")]
}

// drawClaimReq draws a doorbell for a run: mostly its current dispatch, sometimes a
// stale, future or mis-addressed one.
func (m *model) drawClaimReq(t *rapid.T) claimReq {
	var run int
	var queued []int
	for i, r := range m.runs {
		if r.status == wire.StatusQueued {
			queued = append(queued, i)
		}
	}
	if len(queued) > 0 && rapid.IntRange(0, 3).Draw(t, "prefer-queued") > 0 {
		run = queued[rapid.IntRange(0, len(queued)-1).Draw(t, "queued-run")]
	} else {
		run = m.drawRun(t)
	}
	r := m.runs[run]
	q := claimReq{run: run, seq: r.seq, workflow: r.workflow}
	switch rapid.SampledFrom([]string{"current", "current", "current", "current", "older", "newer", "wrong-workflow"}).Draw(t, "dispatch") {
	case "older":
		q.seq--
	case "newer":
		q.seq++
	case "wrong-workflow":
		q.workflow = modelServedWF + modelUnservedWF
	}
	return q
}

// currentHolder is the executor holding run i under its current fence, if any.
func (m *model) currentHolder(i int) (heldRef, bool) {
	for _, hr := range m.allHeld() {
		if hr.h.run == i && m.current(i, hr.h.fence, hr.e.name) {
			return hr, true
		}
	}
	return heldRef{}, false
}

func (m *model) actions() map[string]func(*rapid.T) {
	return map[string]func(*rapid.T){
		"start": func(t *rapid.T) {
			mode := startNew
			if len(m.runs) > 0 {
				mode = rapid.SampledFrom([]int{startNew, startNew, startSameInput, startOtherInput}).Draw(t, "start-mode")
			}
			pick := rapid.IntRange(0, 100).Draw(t, "pick")
			served := rapid.IntRange(0, 5).Draw(t, "served") > 0
			m.doStart(t, mode, pick, served, rapid.IntRange(1, 3).Draw(t, "max-attempts"))
		},
		"start-batch": func(t *rapid.T) {
			// The scheduler's batched starts: new keys, keys of existing runs and keys
			// repeated within the batch.
			n := rapid.IntRange(1, 4).Draw(t, "n")
			specs := make([]startSpec, n)
			for i := range specs {
				specs[i] = startSpec{mode: startNew, served: true, maxAttempts: rapid.IntRange(1, 3).Draw(t, "max-attempts")}
				if len(m.runs) > 0 || i > 0 {
					specs[i].mode = rapid.SampledFrom([]int{startNew, startNew, startSameInput, startOtherInput}).Draw(t, "start-mode")
				}
				specs[i].pick = rapid.IntRange(0, 100).Draw(t, "pick")
				specs[i].served = rapid.IntRange(0, 5).Draw(t, "served") > 0
			}
			m.doStarts(t, specs, true)
		},
		"claim": func(t *rapid.T) {
			q := m.drawClaimReq(t)
			m.doClaim(t, m.drawExec(t), []claimReq{q}, rapid.Bool().Draw(t, "single"), rapid.SampledFrom([]int{1, 3}).Draw(t, "lease-h"))
		},
		"claim-batch": func(t *rapid.T) {
			e := m.drawExec(t)
			n := rapid.IntRange(2, 4).Draw(t, "n")
			var reqs []claimReq
			for range n {
				reqs = append(reqs, m.drawClaimReq(t))
			}
			m.doClaim(t, e, reqs, false, rapid.SampledFrom([]int{1, 3}).Draw(t, "lease-h"))
		},
		"duplicate-doorbell": func(t *rapid.T) {
			var queued []int
			for i, r := range m.runs {
				if r.status == wire.StatusQueued {
					queued = append(queued, i)
				}
			}
			if len(queued) == 0 {
				t.Skip("no QUEUED run")
			}
			i := queued[rapid.IntRange(0, len(queued)-1).Draw(t, "queued-run")]
			q := claimReq{run: i, seq: m.runs[i].seq, workflow: m.runs[i].workflow}
			leaseH := rapid.SampledFrom([]int{1, 3}).Draw(t, "lease-h")
			switch rapid.SampledFrom([]string{"same-batch", "sequential", "sequential-single"}).Draw(t, "how") {
			case "same-batch":
				m.doClaim(t, m.drawExec(t), []claimReq{q, q}, false, leaseH)
			case "sequential":
				m.doClaim(t, m.drawExec(t), []claimReq{q}, false, leaseH)
				m.doClaim(t, m.drawExec(t), []claimReq{q}, false, leaseH)
			case "sequential-single":
				m.doClaim(t, m.drawExec(t), []claimReq{q}, true, leaseH)
				m.doClaim(t, m.drawExec(t), []claimReq{q}, true, leaseH)
			}
		},
		"step": func(t *rapid.T) {
			hr := m.drawHeld(t)
			h := hr.h
			m.doSteps(t, []stepReq{{run: h.run, fence: h.fence, pos: h.pos, attempt: h.attempt, exec: hr.e, held: h, owner: hr.e.name}}, rapid.Bool().Draw(t, "single"))
		},
		"step-batch": func(t *rapid.T) {
			// One executor's group commit: the next step of every run it holds.
			e := m.drawExec(t)
			if len(e.held) == 0 {
				t.Skip("executor holds nothing")
			}
			var reqs []stepReq
			for _, h := range e.held {
				reqs = append(reqs, stepReq{run: h.run, fence: h.fence, pos: h.pos, attempt: h.attempt, exec: e, held: h, owner: e.name})
			}
			m.doSteps(t, reqs, false)
		},
		"dup-step": func(t *rapid.T) {
			// The holder records a key it recorded already (a bug in a caller): refused.
			hr := m.drawHeld(t)
			h := hr.h
			if h.pos == 0 {
				t.Skip("no step recorded yet")
			}
			pos := rapid.IntRange(0, h.pos-1).Draw(t, "pos")
			m.doSteps(t, []stepReq{{run: h.run, fence: h.fence, pos: pos, attempt: h.attempt, exec: hr.e, held: h, owner: hr.e.name}}, rapid.Bool().Draw(t, "single"))
		},
		"sleep": func(t *rapid.T) {
			hr := m.drawHeld(t)
			h := hr.h
			m.doSleep(t, h.run, h.fence, hr.e.name, h.pos, rapid.SampledFrom([]int{1, 3}).Draw(t, "sleep-h"), rapid.Bool().Draw(t, "until"), false, hr.e, h)
		},
		"re-sleep": func(t *rapid.T) {
			// Replay reaches a recorded sleep before its wake time and sleeps again.
			hr := m.drawHeld(t)
			h := hr.h
			var sleeps []int
			for k, st := range m.runs[h.run].steps {
				if st.kind == wire.StepKindSleep {
					sleeps = append(sleeps, k)
				}
			}
			if len(sleeps) == 0 {
				t.Skip("no recorded sleep")
			}
			pos := sleeps[rapid.IntRange(0, len(sleeps)-1).Draw(t, "sleep")]
			m.doSleep(t, h.run, h.fence, hr.e.name, pos, rapid.SampledFrom([]int{1, 3}).Draw(t, "sleep-h"), true,
				rapid.IntRange(0, 3).Draw(t, "recorded-wake") > 0, hr.e, h)
		},
		"complete": func(t *rapid.T) {
			hr := m.drawHeld(t)
			m.doComplete(t, []fencedReq{hr.fenced()}, rapid.Bool().Draw(t, "single"))
		},
		"fail": func(t *rapid.T) {
			hr := m.drawHeld(t)
			m.doFail(t, hr.fenced(),
				rapid.Bool().Draw(t, "retry"), rapid.SampledFrom([]int{1, 3}).Draw(t, "backoff-h"))
		},
		"release": func(t *rapid.T) {
			hr := m.drawHeld(t)
			m.doRelease(t, hr.fenced())
		},
		"extend": func(t *rapid.T) {
			e := m.drawExec(t)
			if len(e.held) == 0 {
				t.Skip("executor holds nothing")
			}
			var reqs []fencedReq
			for _, h := range e.held {
				reqs = append(reqs, fencedReq{run: h.run, fence: h.fence, exec: e, held: h, owner: e.name})
			}
			m.doExtend(t, e.name, reqs, rapid.SampledFrom([]int{1, 3}).Draw(t, "lease-h"))
		},
		"crash": func(t *rapid.T) {
			// The executor forgets the run; nothing is written.
			hr := m.drawHeld(t)
			hr.e.drop(hr.h)
		},
		"expire-lease": func(t *rapid.T) {
			m.doExpire(t, rapid.SampledFrom([]int{0, 2, 10}).Draw(t, "now+h"), rapid.IntRange(1, 4).Draw(t, "limit"))
		},
		"timer-tick": func(t *rapid.T) {
			m.doWake(t, rapid.SampledFrom([]int{0, 2, 10}).Draw(t, "now+h"), rapid.IntRange(1, 4).Draw(t, "limit"))
		},
		"reconcile-tick": func(t *rapid.T) {
			m.doReconcile(t, rapid.SampledFrom([]int{0, 2}).Draw(t, "now+h"), rapid.SampledFrom([]int{1, 24}).Draw(t, "live-within-h"),
				rapid.IntRange(1, 4).Draw(t, "limit"))
		},
		"late-write": m.lateWrite,
	}
}

// lateWrite writes with a fence older than the run's current one (or with the current
// fence of a run that is no longer RUNNING, or with the current fence under another
// owner, as after a claim that a crash of PostgreSQL undid): every such write is refused
// and changes nothing. The batched kinds put it in one statement with the current holder's write of
// the same run, as one executor's group commit does when a zombie goroutine of an old
// claim and the goroutine of a new claim write at the same time.
func (m *model) lateWrite(t *rapid.T) {
	i := m.drawRun(t)
	r := m.runs[i]
	f := int64(rapid.IntRange(0, int(r.fence)).Draw(t, "old-fence"))
	owner := rapid.SampledFrom(modelExecNames).Draw(t, "owner")
	if r.status == wire.StatusRunning && f == r.fence && owner == r.owner {
		f-- // the holder's own write is not late
	}
	pos := len(r.steps)
	kinds := []string{"step", "step-existing", "step-batch", "sleep", "complete", "complete-batch", "fail", "release", "extend"}
	if m.sameRunBatches {
		kinds = append(kinds, "step-batch-with-current", "complete-batch-with-current")
	}
	kind := rapid.SampledFrom(kinds).Draw(t, "write")
	late := fencedReq{run: i, fence: f, owner: owner}
	switch kind {
	case "step", "step-batch":
		m.doSteps(t, []stepReq{{run: i, fence: f, pos: pos, attempt: 1, owner: owner}}, kind == "step")
	case "step-existing":
		if pos > 0 {
			pos = rapid.IntRange(0, pos-1).Draw(t, "pos")
		}
		m.doSteps(t, []stepReq{{run: i, fence: f, pos: pos, attempt: 1, owner: owner}}, rapid.Bool().Draw(t, "single"))
	case "sleep":
		m.doSleep(t, i, f, owner, pos, 1, false, false, nil, nil)
	case "complete", "complete-batch":
		m.doComplete(t, []fencedReq{late}, kind == "complete")
	case "fail":
		m.doFail(t, late, rapid.Bool().Draw(t, "retry"), 1)
	case "release":
		m.doRelease(t, late)
	case "extend":
		m.doExtend(t, owner, []fencedReq{late}, 3)
	case "step-batch-with-current", "complete-batch-with-current":
		hr, ok := m.currentHolder(i)
		first := rapid.Bool().Draw(t, "late-first")
		if kind == "step-batch-with-current" {
			reqs := []stepReq{{run: i, fence: f, pos: pos, attempt: 1, owner: owner}}
			if ok {
				cur := stepReq{run: i, fence: hr.h.fence, pos: hr.h.pos, attempt: hr.h.attempt, exec: hr.e, held: hr.h, owner: hr.e.name}
				reqs = append(reqs, cur)
				if !first {
					reqs[0], reqs[1] = reqs[1], reqs[0]
				}
			}
			m.doSteps(t, reqs, false)
		} else {
			reqs := []fencedReq{late}
			if ok {
				reqs = append(reqs, hr.fenced())
				if !first {
					reqs[0], reqs[1] = reqs[1], reqs[0]
				}
			}
			m.doComplete(t, reqs, false)
		}
	}
}

// ---- the test --------------------------------------------------------------------------

// defaultRapidChecks makes n the number of sequences unless -rapid.checks or RAPID_CHECKS
// says otherwise.
func defaultRapidChecks(t *testing.T, n int) {
	if os.Getenv("RAPID_CHECKS") != "" {
		return
	}
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "rapid.checks" })
	f := flag.Lookup("rapid.checks")
	if set || f == nil {
		return
	}
	old := f.Value.String()
	if err := flag.Set("rapid.checks", strconv.Itoa(n)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = flag.Set("rapid.checks", old) })
}

func TestModel(t *testing.T) {
	runModel(t, false)
}

// TestModelSameRunBatches adds late writes that share a batch (one StepsInsert or
// RunsComplete call) with the current holder's write of the same run: one executor's group
// commit when the goroutine of an old claim that lost its lease and the goroutine of a
// new claim of the same run write at the same time. Such a late write must be refused
// like any other (the store makes every write of a run after its first in a batch on
// its own, so answers matched by run cannot be confused).
func TestModelSameRunBatches(t *testing.T) {
	runModel(t, true)
}

func runModel(t *testing.T, sameRunBatches bool) {
	defaultRapidChecks(t, modelDefaultSize)
	ctx := context.Background()
	url := testkit.NewDatabase(t)
	pool, err := store.Connect(ctx, url, 4)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if _, err := pool.Exec(ctx, modelSchemaSQL); err != nil {
		t.Fatalf("install transition log: %v", err)
	}
	s := store.New(pool)
	sequences := 0
	stats := map[string]int{}
	start := time.Now()
	rapid.Check(t, func(t *rapid.T) {
		sequences++
		ctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		if _, err := pool.Exec(ctx, modelResetSQL); err != nil {
			t.Fatalf("reset: %v", err)
		}
		if err := s.WorkerHeartbeat(ctx, store.Worker{ID: modelWorkerID, Namespace: modelNS, Workflows: []string{modelServedWF}}); err != nil {
			t.Fatalf("worker: %v", err)
		}
		m := newModel(ctx, pool, stats)
		m.sameRunBatches = sameRunBatches
		for range rapid.IntRange(1, 3).Draw(t, "initial-runs") {
			m.doStart(t, startNew, 0, rapid.IntRange(0, 5).Draw(t, "served") > 0, rapid.IntRange(1, 3).Draw(t, "max-attempts"))
		}
		actions := m.actions()
		actions[""] = m.check
		t.Repeat(actions)
		m.drain(t)
		m.check(t)
	})
	names := make([]string, 0, len(stats))
	for k := range stats {
		names = append(names, k)
	}
	slices.Sort(names)
	var b strings.Builder
	for _, k := range names {
		fmt.Fprintf(&b, " %s=%d", k, stats[k])
	}
	t.Logf("T17: %d sequences in %v; outcomes:%s", sequences, time.Since(start).Round(time.Millisecond), b.String())
}
