package battery

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/failpoint"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// T02 — deterministic crash points. For each named failpoint, n runs of a 3-step
// workflow each meet the point armed with `exit` exactly once: the process exits 137
// there, as a kill -9 at that line would, and a fresh, unarmed process carries on.
//
// How each run meets its point once:
//   - executor points: the runs are started with no executor up, so their doorbells
//     wait in the stream in order. Armed executors with concurrency 1 (four at a time)
//     each take the oldest doorbell, run that one run to the point and die there. A
//     doorbell re-published after a crash (lease expiry, wake-up) is queued behind every
//     original one, so no armed process sees a run twice; the unarmed executor starts
//     only after the last armed one died.
//   - timer points: the runs are made due (asleep past their wake time, or QUEUED past
//     the reconcile threshold with their doorbells purged) before the armed timer starts,
//     so its first sweep moves all of them in one committed batch and then dies.
//   - start.after_insert: the armed scheduler dies after its first insert commits; the
//     clients' retries (same request id and idempotency key) reach a fresh scheduler.
//
// Pass: every run COMPLETED with the output its input predicts (the output a fault-free
// run returns; the test also runs n fault-free reference runs and compares); for
// step.after_body_before_commit the interrupted step's body ran exactly twice per run,
// both times with the same idempotency key; for every other point no body ran twice;
// one run per idempotency key; and every armed process logged its failpoint.
func TestT02CrashPoints(t *testing.T) {
	n := 50 // BATTERY.md gives T02 one size
	t.Logf("size: %d runs per failpoint, lease 1 s", n)
	points := []struct {
		name string
		run  func(t *testing.T, n int)
	}{
		{failpoint.StartAfterInsert, crashScheduler},
		{failpoint.ClaimAfterCommitBeforeAck, crashExecutor(failpoint.ClaimAfterCommitBeforeAck, false)},
		{failpoint.StepAfterBodyBeforeCommit, crashExecutor(failpoint.StepAfterBodyBeforeCommit, false)},
		{failpoint.StepAfterCommit, crashExecutor(failpoint.StepAfterCommit, false)},
		{failpoint.SleepAfterCommitBeforeRelease, crashExecutor(failpoint.SleepAfterCommitBeforeRelease, true)},
		{failpoint.CompleteAfterCommitBeforeNote, crashExecutor(failpoint.CompleteAfterCommitBeforeNote, false)},
		{failpoint.TimerAfterCommitBeforePublish, crashTimerWake},
		{failpoint.ReconcileAfterCommitBeforePub, crashReconcile},
	}
	for _, p := range points {
		t.Run(p.name, func(t *testing.T) { p.run(t, n) })
	}
}

// freshLease is the lease of the executor that carries on after a crash. The crashing
// processes hold BATTERY.md's 1 s lease, which is what recovery waits for; the fresh one
// never crashes, and a 1 s lease on a loaded two-core machine can lapse on a slow
// heartbeat and blur the exact body counts this test is about.
const freshLease = "5s"

// parkSleeps makes every Sleep park the run for the timer. By default a sleep shorter
// than a third of the lease is waited out in process, and the crash points
// sleep.after_commit_before_release and timer.after_commit_before_publish lie on the
// parked path only.
const parkSleeps = "KAGZI_LOCAL_SLEEP_MAX=-1s"

func t02Input(sleep bool) func(i int) chaoswf.Input {
	return func(i int) chaoswf.Input {
		in := chaoswf.Input{Seed: 1000 + i, Steps: 3, MinMS: 5, MaxMS: 20}
		if sleep {
			in.SleepAfter, in.SleepMS = 1, 300
		}
		return in
	}
}

// armed is the environment that arms one failpoint to exit every time it is reached.
func armed(point string) string { return "KAGZI_FAILPOINTS=" + point + "=exit" }

// crashLines counts how often p's log says the failpoint fired (the failpoint package
// prints this line right before os.Exit(137)).
func crashLines(p *testkit.Process, point string) int {
	return strings.Count(p.Log(), "failpoint "+point+": exit 137")
}

func crashExecutor(point string, sleep bool) func(t *testing.T, n int) {
	return func(t *testing.T, n int) {
		sum := newSummary(t, fmt.Sprintf("%d runs, 3-step%s, executors concurrency 1 armed %s=exit, lease 1 s",
			n, map[bool]string{true: " + 300 ms sleep", false: ""}[sleep], point))
		s := newSystem(t)
		s.scheduler("scheduler")
		// No re-dispatch of runs merely waiting for their armed executor: it would queue
		// fresh doorbells behind the originals and break their order. Crashed runs come
		// back through lease expiry, which is what this test is about.
		s.timer("timer", "KAGZI_STALE_AFTER=10m", "KAGZI_MAX_IDLE=1s")
		ins := inputs(n, t02Input(sleep))
		ids := s.startRuns(ins)

		const parallel = 4
		var alive []*testkit.Process
		launched, crashed := 0, 0
		deadline := time.Now().Add(time.Duration(n)*time.Second + 20*time.Second)
		for launched < n || len(alive) > 0 {
			for len(alive) < parallel && launched < n {
				p := s.executor(fmt.Sprintf("armed-%02d", launched), armed(point), "KAGZI_CONCURRENCY=1", "KAGZI_LEASE=1s", parkSleeps)
				s.fault(p, "armed "+point)
				alive = append(alive, p)
				launched++
			}
			still := alive[:0]
			for _, p := range alive {
				if !p.Exited() {
					still = append(still, p)
					continue
				}
				if crashLines(p, point) != 1 {
					t.Errorf("%s exited without its failpoint firing once", p.Name)
				}
				crashed++
			}
			alive = still
			if time.Now().After(deadline) {
				t.Fatalf("%d armed executors still alive after %d crashes: their runs never reached %s", len(alive), crashed, point)
			}
			time.Sleep(10 * time.Millisecond)
		}
		sum.Faults = fmt.Sprintf("%d × exit 137 at %s", crashed, point)
		fresh := s.executor("fresh", "KAGZI_CONCURRENCY=16", "KAGZI_LEASE="+freshLease, parkSleeps)
		s.waitCompleted(n, 30*time.Second)
		t02Verify(t, s, sum, ids, ins, point)
		if fresh.Exited() {
			t.Errorf("the fresh executor exited")
		}
	}
}

func crashTimerWake(t *testing.T, n int) {
	point := failpoint.TimerAfterCommitBeforePublish
	sum := newSummary(t, fmt.Sprintf("%d runs, 3-step + 300 ms sleep, timer armed %s=exit", n, point))
	s := newSystem(t)
	s.scheduler("scheduler")
	s.executor("fresh", "KAGZI_CONCURRENCY=16", "KAGZI_LEASE="+freshLease, parkSleeps)
	ins := inputs(n, t02Input(true))
	ids := s.startRuns(ins)
	// No timer yet: every run sleeps past its wake time, so the armed timer's first sweep
	// wakes all of them in one batch.
	if got, ok := s.oracle.WaitCount(20*time.Second, n,
		`SELECT count(*) FROM workflow_runs WHERE status = 'SLEEPING' AND wake_at <= now()`); !ok {
		t.Fatalf("%d of %d runs asleep and due", got, n)
	}
	tmr := s.timer("timer-armed", armed(point), "KAGZI_STALE_AFTER=1s", "KAGZI_MAX_IDLE=1s")
	s.fault(tmr, "armed "+point)
	if !waitExit(tmr, 20*time.Second) {
		t.Fatalf("the armed timer did not reach %s", point)
	}
	expectEq(t, "failpoint lines in the armed timer's log", crashLines(tmr, point), 1)
	// Woken and committed, but the doorbells died with the timer.
	expectEq(t, "runs woken without a doorbell", s.oracle.Count(
		`SELECT count(*) FROM workflow_runs WHERE status = 'QUEUED' AND dispatch_seq = 2`), n)
	sum.Faults = "1 × exit 137 at " + point + fmt.Sprintf(" (%d wakes committed unannounced)", n)
	s.timer("timer-fresh", "KAGZI_STALE_AFTER=1s", "KAGZI_MAX_IDLE=1s")
	s.waitCompleted(n, 30*time.Second)
	expectZero(t, "runs woken more than once", s.oracle.Count(`SELECT count(*) FROM (SELECT run_id FROM test_transitions
		WHERE old_status = 'SLEEPING' AND new_status = 'QUEUED' GROUP BY run_id HAVING count(*) <> 1) x`))
	t02Verify(t, s, sum, ids, ins, point)
}

func crashReconcile(t *testing.T, n int) {
	point := failpoint.ReconcileAfterCommitBeforePub
	sum := newSummary(t, fmt.Sprintf("%d runs, 3-step, doorbells purged, timer armed %s=exit", n, point))
	s := newSystem(t)
	s.scheduler("scheduler")
	ins := inputs(n, t02Input(false))
	ids := s.startRuns(ins)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The scheduler publishes a doorbell after answering the start: purge only once all
	// of them are in, or a late one escapes the purge.
	st := s.waitStreamMsgs(n, 10*time.Second)
	if err := st.Purge(ctx); err != nil {
		t.Fatalf("purge the task stream: %v", err)
	}
	// The executor announces itself (the reconciler serves only workflows someone
	// serves) and finds nothing to do; the runs go stale before the armed timer looks.
	s.executor("fresh", "KAGZI_CONCURRENCY=16", "KAGZI_LEASE="+freshLease, parkSleeps)
	if got, ok := s.oracle.WaitCount(20*time.Second, n, `SELECT count(*) FROM workflow_runs WHERE status = 'QUEUED'
		AND queued_at <= now() - interval '1 second' AND EXISTS (SELECT 1 FROM workers)`); !ok {
		t.Fatalf("%d of %d runs stale", got, n)
	}
	tmr := s.timer("timer-armed", armed(point), "KAGZI_STALE_AFTER=1s", "KAGZI_MAX_IDLE=1s")
	s.fault(tmr, "armed "+point)
	if !waitExit(tmr, 20*time.Second) {
		t.Fatalf("the armed timer did not reach %s", point)
	}
	expectEq(t, "failpoint lines in the armed timer's log", crashLines(tmr, point), 1)
	// A relay keeps the dispatch and counts itself.
	expectEq(t, "runs re-dispatched without a doorbell", s.oracle.Count(
		`SELECT count(*) FROM workflow_runs WHERE status = 'QUEUED' AND dispatch_seq = 1 AND relays = 1`), n)
	sum.Faults = fmt.Sprintf("%d doorbells purged; 1 × exit 137 at %s (%d re-dispatches committed unannounced)", n, point, n)
	s.timer("timer-fresh", "KAGZI_STALE_AFTER=1s", "KAGZI_MAX_IDLE=1s")
	s.waitCompleted(n, 30*time.Second)
	t02Verify(t, s, sum, ids, ins, point)
}

func crashScheduler(t *testing.T, n int) {
	point := failpoint.StartAfterInsert
	sum := newSummary(t, fmt.Sprintf("%d concurrent starts with idempotency keys, scheduler armed %s=exit, client retries", n, point))
	s := newSystem(t)
	armedSched := s.scheduler("scheduler-armed", armed(point))
	s.fault(armedSched, "armed "+point)
	s.timer("timer", "KAGZI_STALE_AFTER=2s", "KAGZI_MAX_IDLE=1s")
	s.executor("fresh", "KAGZI_CONCURRENCY=16", "KAGZI_LEASE="+freshLease, parkSleeps)

	// A short request timeout: a start sent to the dying scheduler is retried soon.
	client := sdk.NewClient(s.nc, sdk.WithRequestTimeout(time.Second))
	ins := inputs(n, t02Input(false))
	ids := make([]string, n)
	errs := make([]error, n)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	for i := range ins {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ids[i], errs[i] = client.StartByName(ctx, chaoswf.Name, ins[i], sdk.IdempotencyKey(fmt.Sprintf("t02-start-%d", i)))
		}()
	}
	if !waitExit(armedSched, 20*time.Second) {
		t.Fatalf("the armed scheduler did not reach %s", point)
	}
	expectEq(t, "failpoint lines in the armed scheduler's log", crashLines(armedSched, point), 1)
	committed := s.oracle.Count(`SELECT count(*) FROM workflow_runs`)
	t.Logf("%d runs committed by the scheduler that crashed", committed)
	if committed == 0 {
		t.Errorf("the armed scheduler died without committing a run")
	}
	sum.Faults = fmt.Sprintf("1 × exit 137 at %s (%d inserts committed unanswered)", point, committed)
	s.scheduler("scheduler-fresh")
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("start %d: %v", i, err)
		}
	}
	expectEq(t, "runs", s.oracle.Count(`SELECT count(*) FROM workflow_runs`), n)
	mismatch := 0
	for i, id := range ids {
		var got string
		if err := s.pool.QueryRow(ctx, `SELECT id::text FROM workflow_runs WHERE idempotency_key = $1`,
			fmt.Sprintf("t02-start-%d", i)).Scan(&got); err != nil || got != id {
			mismatch++
			t.Logf("key t02-start-%d: client got %s, database has %s (%v)", i, id, got, err)
		}
	}
	expectZero(t, "keys whose run differs from the id the client was given", mismatch)
	s.waitCompleted(n, 30*time.Second)
	t02Verify(t, s, sum, ids, ins, point)
}

// t02Verify checks the runs of one crash point, then runs n fault-free reference runs
// with the same inputs and checks their outputs agree.
func t02Verify(t *testing.T, s *system, sum *summaryRow, ids []string, ins []chaoswf.Input, point string) {
	t.Helper()
	n := len(ins)
	tl := s.oracle.Tally(s.faultedPIDs())
	lost := s.oracle.NotCompleted(ids)
	sum.fill(tl, lost, 3*n)
	t.Logf("tally: %+v", tl)
	expectZero(t, "accepted runs not COMPLETED", lost)
	expectZero(t, "runs FAILED", tl.Failed)
	expectEq(t, "step results recorded", tl.StepResults, 3*n)
	expectZero(t, "repeats with a different idempotency key", tl.IdemMismatch)
	expectZero(t, "repeated bodies not explained by the crashed process", tl.Unattributed)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, n)
	expectZero(t, "runs per idempotency key above 1", s.oracle.Count(`SELECT count(*) FROM (SELECT 1 FROM workflow_runs
		GROUP BY namespace, workflow, idempotency_key HAVING count(*) > 1) x`))
	if point == failpoint.StepAfterBodyBeforeCommit {
		// The body that was interrupted before its commit ran twice, and only that one.
		expectEq(t, "steps whose body ran exactly twice", s.oracle.Count(`SELECT count(*) FROM (SELECT 1 FROM test_effects
			GROUP BY run_id, step_key HAVING count(*) = 2 AND count(DISTINCT idem_key) = 1) x`), n)
		expectEq(t, "step bodies executed", tl.Effects, 4*n)
		expectEq(t, "repeated bodies", tl.DupBodies, n)
	} else {
		expectEq(t, "step bodies executed", tl.Effects, 3*n)
		expectZero(t, "repeated bodies", tl.DupBodies)
	}

	refIDs := s.startRuns(ins)
	s.waitCompleted(2*n, 30*time.Second)
	differs := s.oracle.Count(`SELECT count(*) FROM workflow_runs f JOIN workflow_runs r
		ON r.input = f.input AND r.id <> f.id AND r.id = ANY ($2::uuid[])
		WHERE f.id = ANY ($1::uuid[]) AND r.output IS DISTINCT FROM f.output`, ids, refIDs)
	expectZero(t, "faulted runs whose output differs from the fault-free reference run's", differs)
	expectZero(t, "runs whose output differs from what their input predicts", s.wrongOutputs())
	s.checkNoPanics()
}
