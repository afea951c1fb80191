package battery

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// T08 — PostgreSQL chaos monkey. Every service runs against a private PostgreSQL server
// (BATTERY.md H1), which the test crashes (pg_ctl stop -m immediate: no checkpoint, every
// backend killed) again and again for the whole chaos window: up 5–15 s, down 0–2 s. All
// the while W 5-step runs and 100 runs that sleep 2–20 s between two steps are started
// at an even pace, each by a client that repeats a failed start with the same
// idempotency key, as the scheduler's ErrUnavailable asks it to.
//
// Pass: every start is eventually answered with a run id, and that run exists, holds the
// start's key and COMPLETED (no run FAILED, none stuck 60 s after the last restart or
// the last start, whichever is later); one result per step (no duplicate step result);
// COMPLETED entered once per run; no sleeper went on before its wake time (by the
// database clock: neither its SLEEPING → QUEUED transition nor its second step's body);
// every run's output is a fault-free run's; the scheduler, the timer and both executors
// keep the pids they started with.
//
// A crash may cut a step between its body and its record, so bodies may run again:
// every executor is marked as faulted, and repeats are reported, not failed, as long as
// they carry their first execution's idempotency key.
func TestT08PostgresChaosMonkey(t *testing.T) {
	if !*chaos {
		t.Skip("chaos tier: BATTERY.md runs T08 in make chaos (-args -kagzi.chaos)")
	}
	w := pick(300, 5000)
	const sleepers = 100
	rate := pick(10, 20) // starts per second
	window := pick(30*time.Second, 10*time.Minute)
	const settle = 60 * time.Second
	total := w + sleepers
	sum := newSummary(t, fmt.Sprintf("W=%d 5-step + %d sleepers (2–20 s), started at %d/s; private PG crashed (stop -m immediate) for %s: up 5–15 s, down 0–2 s",
		w, sleepers, rate, window))

	pg := testkit.StartPostgres(t)
	s := newSystemOn(t, pg.URL())
	procs := []*testkit.Process{
		s.scheduler("scheduler"),
		s.timer("timer"),
		s.executor("exec-a", "KAGZI_CONCURRENCY=16", "KAGZI_LEASE=2s"),
		s.executor("exec-b", "KAGZI_CONCURRENCY=16", "KAGZI_LEASE=2s"),
	}
	pids := make([]int, len(procs))
	for i, p := range procs {
		pids[i] = p.PID()
	}
	for _, p := range procs[2:] {
		s.fault(p, "PostgreSQL crashed under") // a crash between a body and its record repeats the body
	}

	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(uint64(seed), 8))
	every := total / sleepers
	ins := inputs(total, func(i int) chaoswf.Input {
		if i%every == every-1 {
			return chaoswf.Input{Seed: 8000 + i, Steps: 2, MinMS: 5, MaxMS: 20, SleepAfter: 1, SleepMS: 2000 + rng.IntN(18_001)}
		}
		return chaoswf.Input{Seed: 8000 + i, Steps: 5, MinMS: 5, MaxMS: 20}
	})

	// The starts, at their pace, beside the chaos.
	starts := make([]keyedStart, total)
	var startsDone time.Time
	launched := make(chan struct{})
	t0 := time.Now()
	go func() {
		defer close(launched)
		ctx, cancel := context.WithTimeout(context.Background(), window+time.Duration(total/rate)*time.Second+2*time.Minute)
		defer cancel()
		sem := make(chan struct{}, 64)
		var wg sync.WaitGroup
		for i := range total {
			time.Sleep(time.Until(t0.Add(time.Duration(i) * time.Second / time.Duration(rate)))) // the start schedule
			sem <- struct{}{}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				starts[i] = s.startKeyed(ctx, fmt.Sprintf("t08-%d", i), ins[i])
			}()
		}
		wg.Wait()
		startsDone = time.Now()
	}()

	crashes := 0
	var downFor time.Duration
	lastRestart := t0
	for end := t0.Add(window); ; {
		up := 5*time.Second + time.Duration(rng.Int64N(int64(10*time.Second)))
		if time.Now().Add(up).After(end) {
			break
		}
		time.Sleep(up) // the chaos schedule
		crashedAt := time.Now()
		pg.Crash()
		crashes++
		time.Sleep(time.Duration(rng.Int64N(int64(2 * time.Second)))) // down
		pg.Start()
		lastRestart = time.Now()
		downFor += lastRestart.Sub(crashedAt)
		t.Logf("crash %d at t=%.1fs, accepting connections again at t=%.1fs", crashes, crashedAt.Sub(t0).Seconds(), lastRestart.Sub(t0).Seconds())
	}
	sum.Faults = fmt.Sprintf("%d × PG crash (stop -m immediate), down %.1fs in all", crashes, downFor.Seconds())
	if crashes == 0 {
		t.Fatal("the chaos window held no crash")
	}
	<-launched
	// The test's own connections died with every crash; the services' are theirs to mend.
	s.pool.Reset()

	var ids, keys []string
	never, retried := 0, 0
	for _, st := range starts {
		retried += st.failed
		if st.id == "" {
			never++
			if never <= 5 {
				t.Logf("start %s never accepted: %v", st.key, st.lastErr)
			}
			continue
		}
		ids, keys = append(ids, st.id), append(keys, st.key)
	}
	t.Logf("starts: %d accepted, %d never; %d calls failed and were repeated; the last start returned at t=%.1fs",
		len(ids), never, retried, startsDone.Sub(t0).Seconds())
	expectZero(t, "starts never accepted", never)

	deadline := lastRestart
	if startsDone.After(deadline) {
		deadline = startsDone
	}
	deadline = deadline.Add(settle)
	if active, done := s.oracle.WaitCount(time.Until(deadline), 0, testkit.ActiveSQL); !done {
		t.Errorf("%d runs still active %s after the last restart or start", active, settle)
	}
	t.Logf("quiescent %.1fs after the last restart", time.Since(lastRestart).Seconds())
	for i, p := range procs {
		if p.Exited() || p.PID() != pids[i] {
			t.Errorf("%s did not ride out the crashes (pid %d → %d, exited %v)", p.Name, pids[i], p.PID(), p.Exited())
		}
	}
	expectZero(t, "accepted run ids that are not their key's run", s.oracle.Count(`SELECT count(*)
		FROM unnest($1::text[], $2::uuid[]) AS s(key, id)
		WHERE NOT EXISTS (SELECT 1 FROM workflow_runs r WHERE r.id = s.id AND r.idempotency_key = s.key)`, keys, ids))
	expectEq(t, "runs in the database", s.oracle.Count(`SELECT count(*) FROM workflow_runs`), total)

	s.expectNoEarlyWakes()
	s.expectNoEarlyQueueing()
	expectEq(t, "sleeps recorded", s.oracle.Count(`SELECT count(*) FROM step_runs WHERE kind = 'sleep'`), sleepers)

	tl := s.oracle.Tally(s.faultedPIDs())
	lost := s.oracle.NotCompleted(ids) + never
	steps := 5*w + 2*sleepers
	sum.fill(tl, lost, steps)
	t.Logf("tally: %+v", tl)
	t.Logf("attempts: %s", s.attemptHistogram())
	expectZero(t, "accepted runs missing or not COMPLETED", lost)
	expectZero(t, "runs FAILED", tl.Failed)
	expectEq(t, "step results recorded", tl.StepResults, steps)
	expectZero(t, "repeated step bodies with another idempotency key", tl.IdemMismatch)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, total)
	expectZero(t, "runs that entered COMPLETED twice", tl.MultiCompleted)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	s.checkNoPanics()
}

// attemptHistogram says how many runs ended on each attempt: what the faults cost.
func (s *system) attemptHistogram() string {
	s.t.Helper()
	var out string
	if err := s.pool.QueryRow(context.Background(), `SELECT coalesce(string_agg(format('%s: %s', attempt, n), ', ' ORDER BY attempt), '')
		FROM (SELECT attempt, count(*) AS n FROM workflow_runs GROUP BY attempt) a`).Scan(&out); err != nil {
		s.t.Fatalf("attempts: %v", err)
	}
	return out
}
