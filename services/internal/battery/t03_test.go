package battery

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// T03 — a zombie executor is fenced. Two executors, lease 1 s; the run's second step
// blocks (on its first attempt only, ignoring its context) on a latch the test holds.
// Whichever executor is inside that body is SIGSTOPped; the run's lease lapses, the other
// executor reclaims it and completes it. Then the zombie is SIGCONTed and the latch
// released: its body returns into a run it no longer owns.
//
// Pass, every repetition: the zombie's step-2 write is refused by the fence (its
// Worker.Stats FencedRejected grows), the run's recorded steps and output are unchanged
// by the zombie and equal what the reclaiming executor recorded, the zombie starts no
// further step body for the run after SIGCONT, and no run leaves a terminal status.
func TestT03ZombieFenced(t *testing.T) {
	reps := pick(10, 100)
	sum := newSummary(t, fmt.Sprintf("%d repetitions, 2 executors (concurrency 1), lease 1 s", reps))
	s := newSystem(t)
	s.scheduler("scheduler")
	// The zombie may have had a pull request open when it stopped; a doorbell delivered
	// into it is relayed by the reconciler after 2 s instead of AckWait.
	s.timer("timer", "KAGZI_STALE_AFTER=2s", "KAGZI_MAX_IDLE=1s")
	// Concurrency 1: an executor inside the latched body has no free slot, hence no pull
	// request open on the server to swallow the doorbell of the reclaim.
	byPID := map[int]*testkit.Process{}
	for _, name := range []string{"exec-a", "exec-b"} {
		p := s.executor(name, "KAGZI_CONCURRENCY=1", "KAGZI_LEASE=1s")
		byPID[p.PID()] = p
	}

	type rep struct {
		runID      string
		zombie     int
		contAt     time.Time
		stepsAfter string // the run's steps once the other executor completed it
	}
	var done []rep
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	for i := range reps {
		id := s.startRuns([]chaoswf.Input{{Seed: 3000 + i, Steps: 3, MinMS: 5, MaxMS: 10, LatchStep: 2}})[0]
		if _, ok := s.oracle.WaitCount(20*time.Second, 1,
			`SELECT count(*) FROM test_effects WHERE run_id = $1 AND step_key = 'step#2'`, id); !ok {
			t.Fatalf("repetition %d: run %s never entered step 2", i, id)
		}
		zpid := s.oracle.Count(`SELECT pid FROM test_effects WHERE run_id = $1 AND step_key = 'step#2'`, id)
		zombie := byPID[zpid]
		if zombie == nil {
			t.Fatalf("repetition %d: step 2 ran in pid %d, not one of the executors", i, zpid)
		}
		before := s.workerStat(zpid, "fenced_rejected")
		s.fault(zombie, "SIGSTOP/SIGCONT (zombie)")
		zombie.Signal(syscall.SIGSTOP)

		if !s.waitCompleted(i+1, 20*time.Second) {
			zombie.Signal(syscall.SIGCONT)
			t.FailNow()
		}
		steps := s.stepsOf(ctx, id)
		contAt := s.dbNow()
		zombie.Signal(syscall.SIGCONT)
		if _, err := s.pool.Exec(ctx, `INSERT INTO test_latches (run_id) VALUES ($1)`, id); err != nil {
			t.Fatal(err)
		}
		// The refused write is the zombie's signal that it stopped; its stats reach the
		// table within 100 ms of it.
		end := time.Now().Add(10 * time.Second)
		for s.workerStat(zpid, "fenced_rejected") <= before {
			if time.Now().After(end) {
				t.Fatalf("repetition %d: %s (pid %d) resumed inside run %s but no write of it was refused (fenced_rejected stayed %d)",
					i, zombie.Name, zpid, id, before)
			}
			time.Sleep(20 * time.Millisecond)
		}
		done = append(done, rep{runID: id, zombie: zpid, contAt: contAt, stepsAfter: steps})
	}
	sum.Faults = fmt.Sprintf("%d × SIGSTOP+SIGCONT of the executor inside step 2", reps)

	// Checked after every repetition has ended, so a zombie that went on after its
	// refused write has had the time of all later repetitions to show it.
	for i, r := range done {
		if got := s.stepsOf(ctx, r.runID); got != r.stepsAfter {
			t.Errorf("repetition %d: run %s steps changed after the zombie resumed:\nbefore %s\nafter  %s", i, r.runID, r.stepsAfter, got)
		}
		if n := s.oracle.Count(`SELECT count(*) FROM test_effects WHERE run_id = $1 AND pid = $2 AND at > $3`,
			r.runID, r.zombie, r.contAt); n != 0 {
			t.Errorf("repetition %d: the zombie (pid %d) started %d step bodies of run %s after SIGCONT", i, r.zombie, n, r.runID)
		}
		// The reclaiming executor recorded steps 2 and 3, on the second attempt.
		if n := s.oracle.Count(`SELECT count(*) FROM step_runs s JOIN test_effects e ON e.run_id = s.run_id
			AND e.step_key = s.step_key AND e.attempt = s.attempt
			WHERE s.run_id = $1 AND s.step_key IN ('step#2', 'step#3') AND e.pid <> $2 AND s.attempt >= 2`, r.runID, r.zombie); n != 2 {
			t.Errorf("repetition %d: %d of steps 2–3 of run %s recorded by the reclaiming executor, want 2", i, n, r.runID)
		}
	}
	tl := s.oracle.Tally(s.faultedPIDs())
	sum.fill(tl, s.oracle.NotCompleted(runIDs(done, func(r rep) string { return r.runID })), 3*reps)
	t.Logf("tally: %+v", tl)
	expectEq(t, "runs COMPLETED", tl.Completed, reps)
	expectEq(t, "step results recorded", tl.StepResults, 3*reps)
	// One repeat per repetition (the zombie's step 2, run again by the reclaimer); more
	// only where an executor was fenced for a slow heartbeat, which attribution covers.
	expectEq(t, "repeated step-2 bodies", s.oracle.Count(`SELECT count(*) FROM (SELECT run_id FROM test_effects
		WHERE step_key = 'step#2' GROUP BY run_id HAVING count(*) >= 2) x`), reps)
	expectZero(t, "repeats no stopped or fenced process explains", tl.Unattributed)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, reps)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	s.checkNoPanics()
}

func runIDs[T any](xs []T, f func(T) string) []string {
	out := make([]string, len(xs))
	for i, x := range xs {
		out[i] = f(x)
	}
	return out
}

// stepsOf renders a run's recorded steps for comparison.
func (s *system) stepsOf(ctx context.Context, runID string) string {
	s.t.Helper()
	var out string
	err := s.pool.QueryRow(ctx, `SELECT coalesce(string_agg(format('%s/%s/%s/%s/%s', step_key, kind, attempt,
		encode(sha256(coalesce(output, '')), 'hex'), created_at), ' ' ORDER BY seq), '') FROM step_runs WHERE run_id = $1`, runID).Scan(&out)
	if err != nil {
		s.t.Fatalf("read steps of %s: %v", runID, err)
	}
	return out
}
