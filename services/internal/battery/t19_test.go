package battery

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// startClass is what a client can conclude from one start's outcome, as in Jepsen's
// queue workload: ok (it has the run's id), failed (a definite error: the start cannot
// have made a run) or unknown (it may or may not have).
type startClass int

const (
	startOK startClass = iota
	startFailed
	startUnknown
)

func (c startClass) String() string { return [...]string{"ok", "failed", "unknown"}[c] }

// classifyStart sorts a Start's error by the wire codes. Definite are the codes a
// scheduler answers before it writes anything (invalid_argument, payload_too_large,
// unknown_workflow) or after its insert found the key taken by another input
// (idempotency_conflict): no run was made for the request. Everything else is unknown:
// unavailable is the scheduler's answer to an insert that failed, which may have
// committed all the same (an ambiguous commit); internal says nothing; and a timeout or
// a lost connection says nothing either.
func classifyStart(err error) startClass {
	switch {
	case err == nil:
		return startOK
	case errors.Is(err, wire.ErrInvalidArgument), errors.Is(err, wire.ErrPayloadTooLarge),
		errors.Is(err, wire.ErrUnknownWorkflow), errors.Is(err, wire.ErrIdempotencyConflict):
		return startFailed
	default:
		return startUnknown
	}
}

// T19 — Jepsen-style start classification. 5,000 starts at 50/s by request-reply
// (Client.Start through the scheduler process), each with its own idempotency key and a
// deadline of 2 s (the client re-sends a request that goes unanswered for 500 ms, with
// the same request id): short enough that a start caught by an outage times out, so the
// unknown class has members too. One start in 50 asks for max_attempts 101, which the scheduler must
// refuse before writing: those give the failed class members to check. Meanwhile a
// nemesis SIGKILLs the scheduler or nats-server, at random, every 3–8 s and restarts it
// 0.5–3 s later: the longer outages outlast a start's deadline. Two executors and a timer (reconciler after 2 s) run the runs.
//
// Pass, per idempotency key, once no run is active: ok ⇒ exactly one run, with the id
// the client was given, COMPLETED; failed ⇒ no run; unknown ⇒ 0 or 1 run; never more
// than one run per key. A valid start is never failed and an invalid one never ok. The
// executors and the timer, never killed, never exit. The oracle: every run COMPLETED
// once, 3 step results each, repeated bodies all attributable.
func TestT19StartClassification(t *testing.T) {
	if !*chaos {
		t.Skip("chaos tier: BATTERY.md runs T19 in make chaos (-args -kagzi.chaos)")
	}
	const (
		starts       = 5000
		rate         = 50 // starts per second
		invalidEvery = 50
		deadline     = 2 * time.Second
	)
	sum := newSummary(t, fmt.Sprintf("%d keyed starts at %d/s by request-reply (1 in %d invalid), deadline %s; nemesis SIGKILLs scheduler or nats-server every 3–8 s",
		starts, rate, invalidEvery, deadline))
	s := newSystem(t)
	sched := s.scheduler("scheduler")
	tmr := s.timer("timer", "KAGZI_STALE_AFTER=2s", "KAGZI_MAX_IDLE=1s")
	execs := []*testkit.Process{
		s.executor("exec-1", "KAGZI_CONCURRENCY=16"),
		s.executor("exec-2", "KAGZI_CONCURRENCY=16"),
	}
	survivors := append([]*testkit.Process{tmr}, execs...)
	pids := make([]int, len(survivors))
	for i, p := range survivors {
		pids[i] = p.PID()
	}
	client := sdk.NewClient(s.nc, sdk.WithRequestTimeout(500*time.Millisecond))

	key := func(i int) string { return fmt.Sprintf("t19-%04d", i) }
	invalid := func(i int) bool { return i%invalidEvery == invalidEvery-1 }
	type outcome struct {
		class startClass
		runID string
		err   error
	}
	outcomes := make([]outcome, starts)
	startsDone := make(chan struct{})
	go func() {
		defer close(startsDone)
		var wg sync.WaitGroup
		tick := time.NewTicker(time.Second / rate)
		defer tick.Stop()
		for i := range starts {
			<-tick.C
			wg.Add(1)
			go func() {
				defer wg.Done()
				opts := []sdk.StartOption{sdk.IdempotencyKey(key(i))}
				if invalid(i) {
					opts = append(opts, sdk.MaxAttempts(101))
				}
				ctx, cancel := context.WithTimeout(context.Background(), deadline)
				defer cancel()
				id, err := client.StartByName(ctx, chaoswf.Name, chaoswf.Input{Seed: 19_000 + i, Steps: 3, MinMS: 5, MaxMS: 20}, opts...)
				outcomes[i] = outcome{class: classifyStart(err), runID: id, err: err}
			}()
		}
		wg.Wait()
	}()

	// The nemesis runs on the test's goroutine: restarting a process may fail the test.
	rng := rand.New(rand.NewPCG(19, uint64(time.Now().UnixNano())))
	kills := map[string]int{}
	lastFault := time.Now()
	for running := true; running; {
		select {
		case <-startsDone:
			running = false
			continue
		case <-time.After(time.Duration(3000+rng.IntN(5001)) * time.Millisecond):
		}
		down := time.Duration(500+rng.IntN(2501)) * time.Millisecond
		if rng.IntN(2) == 0 {
			s.kill(sched)
			time.Sleep(down)
			sched.Start()
			kills["scheduler"]++
		} else {
			s.kill(s.nats.Process)
			time.Sleep(down)
			s.nats.Start()
			s.nats.WaitReady(t)
			kills["nats-server"]++
		}
		lastFault = time.Now()
	}
	t.Logf("nemesis: %d scheduler and %d nats-server SIGKILLs; starts done %s after the last",
		kills["scheduler"], kills["nats-server"], time.Since(lastFault).Round(time.Millisecond))

	stuck := s.oracle.WaitQuiescent(90 * time.Second)
	expectZero(t, "runs still active 90 s after the starts", stuck)

	type keyRuns struct {
		n         int
		id        string
		completed bool
	}
	byKey := map[string]keyRuns{}
	rows, err := s.pool.Query(context.Background(), `SELECT idempotency_key, count(*), min(id::text), bool_and(status = 'COMPLETED')
		FROM workflow_runs GROUP BY idempotency_key`)
	if err != nil {
		t.Fatalf("read runs by key: %v", err)
	}
	for rows.Next() {
		var k string
		var r keyRuns
		if err := rows.Scan(&k, &r.n, &r.id, &r.completed); err != nil {
			t.Fatalf("read runs by key: %v", err)
		}
		byKey[k] = r
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("read runs by key: %v", err)
	}

	var count [3]int
	var okViolations, failedViolations, unknownViolations, unknownWithRun, multi, validFailed, invalidOK int
	var okIDs []string
	report := func(what string, i int, o outcome, r keyRuns) {
		t.Errorf("%s: start %d (%s) %s id=%q err=%v; runs under the key: %d (id %s, completed %v)",
			what, i, key(i), o.class, o.runID, o.err, r.n, r.id, r.completed)
	}
	for i, o := range outcomes {
		count[o.class]++
		r := byKey[key(i)]
		if r.n > 1 {
			multi++
			report("more than one run per key", i, o, r)
		}
		switch o.class {
		case startOK:
			okIDs = append(okIDs, o.runID)
			if r.n != 1 || r.id != o.runID || !r.completed {
				okViolations++
				report("ok start without its COMPLETED run", i, o, r)
			}
			if invalid(i) {
				invalidOK++
				report("invalid start accepted", i, o, r)
			}
		case startFailed:
			if r.n != 0 {
				failedViolations++
				report("failed start made a run", i, o, r)
			}
			if !invalid(i) {
				validFailed++
				report("valid start failed definitely", i, o, r)
			}
		case startUnknown:
			if r.n > 1 {
				unknownViolations++
			}
			if r.n == 1 {
				unknownWithRun++
			}
		}
	}
	t.Logf("outcomes: ok %d, failed %d, unknown %d (%d of them made a run)", count[startOK], count[startFailed],
		count[startUnknown], unknownWithRun)
	shown := 0
	for i, o := range outcomes {
		if o.class == startUnknown && shown < 5 {
			shown++
			t.Logf("unknown start %d: %v", i, o.err)
		}
	}
	sum.Faults = fmt.Sprintf("%d scheduler + %d nats-server SIGKILLs; ok %d, failed %d, unknown %d (%d made a run)",
		kills["scheduler"], kills["nats-server"], count[startOK], count[startFailed], count[startUnknown], unknownWithRun)
	expectZero(t, "ok starts without their COMPLETED run", okViolations)
	expectZero(t, "failed starts that made a run", failedViolations)
	expectZero(t, "unknown starts with more than one run", unknownViolations)
	expectZero(t, "keys with more than one run", multi)
	expectZero(t, "valid starts that failed definitely", validFailed)
	expectZero(t, "invalid starts accepted", invalidOK)
	if count[startFailed] == 0 {
		t.Errorf("no start failed definitely: the %d invalid starts were never refused, so the failed class went unchecked", starts/invalidEvery)
	}
	expectEq(t, "runs made", len(byKey), count[startOK]+unknownWithRun)

	for i, p := range survivors {
		if p.Exited() || p.PID() != pids[i] {
			t.Errorf("%s exited or restarted (pid %d → %d): it should reconnect, not crash", p.Name, pids[i], p.PID())
		}
	}
	tl := s.oracle.Tally(s.faultedPIDs())
	sum.fill(tl, s.oracle.NotCompleted(okIDs), 3*tl.Runs)
	t.Logf("tally: %+v", tl)
	expectEq(t, "runs COMPLETED", tl.Completed, tl.Runs)
	expectEq(t, "step results recorded", tl.StepResults, 3*tl.Runs)
	expectZero(t, "repeats no killed or fenced process explains", tl.Unattributed)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, tl.Runs)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	s.checkNoPanics()
}
