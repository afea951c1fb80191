package battery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/kagzi/kagzi/libs/failpoint"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// T09 — ambiguous commits and dropped connections. W 3-step runs (every fourth with a
// parked 200 ms sleep after its first step), each started with an idempotency key by a
// client that sends a failed start again, same key and input, until it is answered.
//
//	(a) Every write that can be answered ambiguously is armed commit_then_error at 10 %:
//	    the scheduler's start insert, and the executors' claim, step record, sleep record
//	    and completion. The write commits; its caller is told it failed.
//	(b) Once a second the test terminates every PostgreSQL backend of the services (their
//	    connections carry application_name kagzi-<service>; the oracle's do not), while
//	    the starts are spread over the window.
//
// Pass, both: W COMPLETED with the output their input predicts; one run per key, and it
// is the run every client was answered with; 3·W step results; no run FAILED; no panic;
// every service process still the one the test started (they reconnect, they do not
// crash). A retried start whose failed call had committed (a) must return the run that
// call made: its id is the failed call's request id, which the test reads off the wire.
// In (a) an ambiguous commit must also cost nothing: no attempt spent (every run ends on
// attempt 1), no step body run twice, no write of an executor refused by its own fence;
// and every armed point fired.
func TestT09AmbiguousCommits(t *testing.T) {
	t.Run("a-commit-then-error", t09CommitThenError)
	t.Run("b-backends-terminated", t09TerminateBackends)
}

// t09ExecPoints are the executor writes (a) arms; the scheduler's is StartAfterInsert.
var t09ExecPoints = []string{
	failpoint.ClaimAfterCommitBeforeAck,
	failpoint.StepAfterCommit,
	failpoint.SleepAfterCommitBeforeRelease,
	failpoint.CompleteAfterCommitBeforeNote,
}

func t09Input(i int) chaoswf.Input {
	in := chaoswf.Input{Seed: 9000 + i, Steps: 3, MinMS: 5, MaxMS: 20}
	if i%4 == 0 {
		// Parked (the executors park every sleep), so the sleep's record is a write of
		// its own, the one sleep.after_commit_before_release follows.
		in.SleepAfter, in.SleepMS = 1, 200
	}
	return in
}

func t09Key(i int) string { return fmt.Sprintf("t09-%05d", i) }

// t09Services is the system under test: scheduler, timer and two executors, each
// connecting to PostgreSQL as application kagzi-<name>.
type t09Services struct {
	procs []*testkit.Process
	pids  []int
}

// t09AppPrefix marks the services' connections in pg_stat_activity.
const t09AppPrefix = "kagzi-"

func startT09Services(s *system, schedEnv, execEnv []string) *t09Services {
	as := func(name string) string { return "DATABASE_URL=" + withAppName(s.t, s.dbURL, t09AppPrefix+name) }
	svc := &t09Services{}
	svc.procs = append(svc.procs,
		s.scheduler("scheduler", append([]string{as("scheduler")}, schedEnv...)...),
		s.timer("timer", as("timer"), "KAGZI_STALE_AFTER=5s", "KAGZI_MAX_IDLE=1s"))
	for _, name := range []string{"exec-a", "exec-b"} {
		env := append([]string{as(name), "KAGZI_CONCURRENCY=16", "KAGZI_LEASE=5s", parkSleeps}, execEnv...)
		svc.procs = append(svc.procs, s.executor(name, env...))
	}
	for _, p := range svc.procs {
		svc.pids = append(svc.pids, p.PID())
	}
	return svc
}

// checkSamePIDs fails the test for every service that exited or was replaced.
func (svc *t09Services) checkSamePIDs(t *testing.T) {
	t.Helper()
	for i, p := range svc.procs {
		if p.Exited() || p.PID() != svc.pids[i] {
			t.Errorf("%s did not ride the faults out (pid %d → %d, exited %v)", p.Name, svc.pids[i], p.PID(), p.Exited())
		}
	}
}

// injected counts how often a point's commit_then_error fired, from the services' logs:
// every caller logs the error it was handed, which names the point.
func (svc *t09Services) injected(point string) int {
	n := 0
	for _, p := range svc.procs {
		n += strings.Count(p.Log(), "injected error at "+point)
	}
	return n
}

func withAppName(t *testing.T, dbURL, name string) string {
	t.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatalf("database url: %v", err)
	}
	q := u.Query()
	q.Set("application_name", name)
	u.RawQuery = q.Encode()
	return u.String()
}

// startWatch hears every request-reply start on the wire, beside the schedulers, and
// keeps the request ids sent for each idempotency key in the order they were sent. The
// request id of a new run becomes its id, so a failed call that committed anyway is
// recognisable by the run carrying its request id.
type startWatch struct {
	mu   sync.Mutex
	reqs map[string][]string
}

func watchStarts(s *system) *startWatch {
	s.t.Helper()
	w := &startWatch{reqs: map[string][]string{}}
	sub, err := s.nc.Subscribe(wire.StartSubject(wire.DefaultNamespace, chaoswf.Name), func(m *nats.Msg) {
		var req wire.StartRequest
		if err := json.Unmarshal(m.Data, &req); err != nil {
			return
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		// A timed-out request is sent again unchanged by the client: one call, one id.
		if !slices.Contains(w.reqs[req.IdempotencyKey], req.RequestID) {
			w.reqs[req.IdempotencyKey] = append(w.reqs[req.IdempotencyKey], req.RequestID)
		}
	})
	if err != nil {
		s.t.Fatalf("watch starts: %v", err)
	}
	s.t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := s.nc.Flush(); err != nil {
		s.t.Fatalf("watch starts: %v", err)
	}
	return w
}

func (w *startWatch) sent(key string) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.reqs[key])
}

// keyedStart is one key's start as the client saw it.
type keyedStart struct {
	key     string
	in      chaoswf.Input
	id      string // the answer of the call that succeeded
	failed  int    // calls that returned an error before it
	lastErr error
}

// startKeyed starts a run the way a careful client does: a call that fails is made again
// with the same key and input until one is answered or ctx ends.
func (s *system) startKeyed(ctx context.Context, key string, in chaoswf.Input) keyedStart {
	ks := keyedStart{key: key, in: in}
	for {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		id, err := s.client.StartByName(cctx, chaoswf.Name, in, sdk.IdempotencyKey(key))
		cancel()
		if err == nil {
			ks.id = id
			return ks
		}
		ks.failed++
		ks.lastErr = err
		if errors.Is(err, sdk.ErrIdempotencyConflict) || errors.Is(err, sdk.ErrInvalidArgument) || ctx.Err() != nil {
			return ks
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
		}
	}
}

// startKeyedAll starts run i at t0 + i·every (all at once for every = 0), at most 16
// calls in flight.
func (s *system) startKeyedAll(w int, every time.Duration) []keyedStart {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute+time.Duration(w)*every)
	defer cancel()
	out := make([]keyedStart, w)
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := range w {
		time.Sleep(time.Until(t0.Add(time.Duration(i) * every))) // the start schedule
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			out[i] = s.startKeyed(ctx, t09Key(i), t09Input(i))
		}()
	}
	wg.Wait()
	return out
}

func t09CommitThenError(t *testing.T) {
	w := pick(500, 5000)
	arm := func(points ...string) string {
		specs := make([]string, len(points))
		for i, p := range points {
			specs[i] = p + "=commit_then_error%10"
		}
		return "KAGZI_FAILPOINTS=" + strings.Join(specs, ",")
	}
	sum := newSummary(t, fmt.Sprintf("W=%d 3-step (¼ with a parked 200 ms sleep), keyed starts; commit_then_error at 10 %% on start insert, claim, step, sleep and complete; 2 executors × 16, lease 5 s", w))
	s := newSystem(t)
	watch := watchStarts(s)
	svc := startT09Services(s, []string{arm(failpoint.StartAfterInsert)}, []string{arm(t09ExecPoints...)})

	starts := s.startKeyedAll(w, 0)
	s.waitCompleted(w, pick(60*time.Second, 5*time.Minute))

	fired := map[string]int{failpoint.StartAfterInsert: svc.injected(failpoint.StartAfterInsert)}
	for _, p := range t09ExecPoints {
		fired[p] = svc.injected(p)
	}
	var faults []string
	for _, p := range append([]string{failpoint.StartAfterInsert}, t09ExecPoints...) {
		faults = append(faults, fmt.Sprintf("%s×%d", p, fired[p]))
		if fired[p] == 0 {
			t.Errorf("%s=commit_then_error never fired: the fault missed that write", p)
		}
	}
	sum.Faults = "ambiguous commits: " + strings.Join(faults, " ")
	t.Logf("fault: %s", sum.Faults)

	tl := t09Verify(t, s, sum, svc, watch, starts)
	// Every failed call of (a) is an injected ambiguous commit, and the first call for a
	// key always inserts: a key whose first call failed has the run that call made.
	firstFailed, madeByFirst := 0, 0
	for _, ks := range starts {
		if ks.failed == 0 {
			continue
		}
		firstFailed++
		if sent := watch.sent(ks.key); len(sent) > 0 && ks.id == sent[0] {
			madeByFirst++
		}
	}
	t.Logf("%d keys whose first start failed after its commit; %d retries answered with the run that call made", firstFailed, madeByFirst)
	expectEq(t, "retried keys answered with the run their failed first call committed", madeByFirst, firstFailed)
	if firstFailed == 0 {
		t.Errorf("no start was answered ambiguously: the start fault missed")
	}
	// Nothing an ambiguous answer hid may be redone or charged.
	expectZero(t, "repeated step bodies", tl.DupBodies)
	expectZero(t, "runs that spent more than one attempt", s.oracle.Count(`SELECT count(*) FROM workflow_runs WHERE attempt <> 1`))
	expectZero(t, "executor writes refused by their own fence", s.oracle.Count(`SELECT coalesce(sum(fenced_rejected), 0)::int FROM test_worker_stats`))
}

func t09TerminateBackends(t *testing.T) {
	w := pick(500, 5000)
	window := pick(20*time.Second, 5*time.Minute)
	sum := newSummary(t, fmt.Sprintf("W=%d 3-step (¼ with a parked 200 ms sleep), keyed starts spread over %s; every service backend terminated once a second for %s; 2 executors × 16, lease 5 s",
		w, window*4/5, window))
	s := newSystem(t)
	watch := watchStarts(s)
	svc := startT09Services(s, nil, nil)

	var rounds, terminated atomic.Int64
	stop := make(chan struct{})
	killerDone := make(chan struct{})
	go func() {
		defer close(killerDone)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for end := time.Now().Add(window); time.Now().Before(end); {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			var n int64
			err := s.pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
				WHERE datname = current_database() AND application_name LIKE $1 AND pid <> pg_backend_pid()`, t09AppPrefix+"%").Scan(&n)
			cancel()
			if err != nil {
				t.Errorf("terminate the services' backends: %v", err)
				return
			}
			rounds.Add(1)
			terminated.Add(n)
		}
	}()
	t.Cleanup(func() {
		select {
		case <-killerDone:
		default:
			close(stop)
			<-killerDone
		}
	})

	// The starts end a fifth of the window before the terminations do, so the last runs
	// still meet some.
	starts := s.startKeyedAll(w, window*4/5/time.Duration(w))
	<-killerDone
	t.Logf("%d backends terminated in %d rounds", terminated.Load(), rounds.Load())
	sum.Faults = fmt.Sprintf("%d service backends terminated in %d rounds", terminated.Load(), rounds.Load())
	if terminated.Load() == 0 {
		t.Errorf("no backend terminated: the services held no connection the test could see")
	}
	s.waitCompleted(w, pick(60*time.Second, 5*time.Minute))

	// The services met the terminations in their own statements, not only in idle
	// connections they never used again.
	met := 0
	for _, p := range svc.procs {
		met += strings.Count(p.Log(), "SQLSTATE 57P01")
	}
	t.Logf("service log lines with an error from a terminated connection (57P01): %d", met)
	if met == 0 {
		t.Errorf("no service logged a statement on a terminated connection: the fault missed the work")
	}
	tl := t09Verify(t, s, sum, svc, watch, starts)
	t.Logf("repeated step bodies %d; runs on attempt > 1: %d; executor writes refused by the fence: %d", tl.DupBodies,
		s.oracle.Count(`SELECT count(*) FROM workflow_runs WHERE attempt <> 1`),
		s.oracle.Count(`SELECT coalesce(sum(fenced_rejected), 0)::int FROM test_worker_stats`))
}

// t09Verify checks what both faults must leave behind and returns the oracle's tally.
func t09Verify(t *testing.T, s *system, sum *summaryRow, svc *t09Services, watch *startWatch, starts []keyedStart) testkit.Tally {
	t.Helper()
	w := len(starts)
	ids := make([]string, 0, w)
	retried, ambiguous := 0, 0
	for _, ks := range starts {
		if ks.id == "" {
			t.Errorf("start of key %s never answered after %d failed calls: %v", ks.key, ks.failed, ks.lastErr)
			continue
		}
		ids = append(ids, ks.id)
		if ks.failed > 0 {
			retried++
			if sent := watch.sent(ks.key); len(sent) > 1 && slices.Index(sent, ks.id) < len(sent)-1 {
				ambiguous++ // answered with the run of an earlier call that had failed
			}
		}
	}
	t.Logf("%d of %d keys needed a retried start; %d of those were answered with the run a failed call had committed", retried, w, ambiguous)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT idempotency_key, id::text FROM workflow_runs`)
	if err != nil {
		t.Fatalf("read runs: %v", err)
	}
	byKey := map[string][]string{}
	for rows.Next() {
		var key, id string
		if err := rows.Scan(&key, &id); err != nil {
			t.Fatalf("read runs: %v", err)
		}
		byKey[key] = append(byKey[key], id)
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("read runs: %v", err)
	}
	wrongID, notSent := 0, 0
	for _, ks := range starts {
		got := byKey[ks.key]
		if len(got) != 1 || got[0] != ks.id {
			wrongID++
			if wrongID <= 5 {
				t.Logf("key %s: client was answered %q after %d failed calls, the database has %v", ks.key, ks.id, ks.failed, got)
			}
			continue
		}
		if !slices.Contains(watch.sent(ks.key), got[0]) {
			notSent++
		}
	}
	expectEq(t, "runs", len(byKey), w)
	expectZero(t, "keys whose runs are not exactly the one run the client was answered with", wrongID)
	expectZero(t, "runs whose id is no request id the client sent", notSent)

	tl := s.oracle.Tally(s.faultedPIDs())
	sum.fill(tl, s.oracle.NotCompleted(ids), 3*w)
	t.Logf("tally: %+v", tl)
	expectEq(t, "runs COMPLETED", tl.Completed, w)
	expectZero(t, "runs FAILED", tl.Failed)
	expectEq(t, "step results recorded", tl.StepResults, 3*w)
	expectEq(t, "sleeps recorded", s.oracle.Count(`SELECT count(*) FROM step_runs WHERE kind = 'sleep'`), (w+3)/4)
	expectZero(t, "repeated step bodies no fenced executor explains", tl.Unattributed)
	expectZero(t, "repeats with a different idempotency key", tl.IdemMismatch)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, w)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	svc.checkSamePIDs(t)
	s.checkNoPanics()
	return tl
}
