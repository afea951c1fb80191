package battery

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// T07 — the NATS process crashes mid-load. W 3-step runs are started by request-reply at
// an even pace over 30 s, each with an idempotency key the test records, while
// nats-server is SIGKILLed at t = 5 s and restarted at t = 8 s (same port, same store),
// three times 10 s apart. The services keep their processes and reconnect.
//
// Pass: every start that returned a run id names a run that exists, holds that key and
// COMPLETED (lost accepted starts: 0); every start that returned an error made no run
// (0 rows with its key); the database holds no run the test did not start; the
// scheduler, the timer and both executors have the pids they started with; no run is
// active 60 s after the last restart; one result per step and COMPLETED entered once per
// run.
//
// The services run with their default settings (the reconciler's 30 s threshold
// included): a doorbell whose publish died with the broker is relayed within the 60 s.
func TestT07NATSCrashMidLoad(t *testing.T) {
	if !*chaos {
		t.Skip("chaos tier: BATTERY.md runs T07 in make chaos (-args -kagzi.chaos)")
	}
	w := pick(500, 5000)
	const (
		window     = 30 * time.Second // starts are spread over it
		firstKill  = 5 * time.Second
		down       = 3 * time.Second
		every      = 10 * time.Second
		crashes    = 3
		settle     = 60 * time.Second
		inFlight   = 256              // concurrent starts at most; an outage piles them up
		startLimit = 60 * time.Second // one start's whole budget, its retries included
	)
	sum := newSummary(t, fmt.Sprintf("W=%d 3-step started by request-reply over %s; nats-server SIGKILL at t=5 s, back at t=8 s, ×%d every %s",
		w, window, crashes, every))
	s := newSystem(t)
	procs := []*testkit.Process{
		s.scheduler("scheduler"),
		s.timer("timer"),
		s.executor("exec-a", "KAGZI_CONCURRENCY=32", "KAGZI_LEASE=5s"),
		s.executor("exec-b", "KAGZI_CONCURRENCY=32", "KAGZI_LEASE=5s"),
	}
	pids := make([]int, len(procs))
	for i, p := range procs {
		pids[i] = p.PID()
	}
	// The client's own requests (2 s each) are retried with the same request id for as
	// long as the start's context lasts, so an outage shorter than that is ridden out.
	client := sdk.NewClient(s.nc, sdk.WithRequestTimeout(2*time.Second))

	type start struct {
		key, id    string
		err        error
		began, end time.Time
	}
	starts := make([]start, w)
	var wg sync.WaitGroup
	sem := make(chan struct{}, inFlight)
	launched := make(chan struct{})
	t0 := time.Now()
	go func() {
		defer close(launched)
		for i := range w {
			starts[i].key = fmt.Sprintf("t07-%d", i)
			time.Sleep(time.Until(t0.Add(window * time.Duration(i) / time.Duration(w)))) // the load's pace
			sem <- struct{}{}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				ctx, cancel := context.WithTimeout(context.Background(), startLimit)
				defer cancel()
				in := chaoswf.Input{Seed: 7000 + i, Steps: 3, MinMS: 5, MaxMS: 20}
				starts[i].began = time.Now()
				starts[i].id, starts[i].err = client.StartByName(ctx, chaoswf.Name, in, sdk.IdempotencyKey(starts[i].key))
				starts[i].end = time.Now()
			}()
		}
	}()

	var lastRestart time.Time
	var outages [][2]time.Time
	activeAtKills := 0
	for c := range crashes {
		time.Sleep(time.Until(t0.Add(firstKill + time.Duration(c)*every))) // the fault schedule
		active := s.oracle.Count(testkit.ActiveSQL)
		killed := time.Now()
		s.nats.Kill()
		time.Sleep(time.Until(killed.Add(down)))
		s.nats.Start()
		s.nats.WaitReady(t)
		lastRestart = time.Now()
		outages = append(outages, [2]time.Time{killed, lastRestart})
		activeAtKills += active
		t.Logf("crash %d: nats-server down from t=%.1fs to t=%.1fs, %d runs active at the kill", c+1,
			killed.Sub(t0).Seconds(), lastRestart.Sub(t0).Seconds(), active)
	}
	sum.Faults = fmt.Sprintf("%d × SIGKILL nats-server for %s", crashes, down)
	<-launched
	wg.Wait()

	var ok, okKeys, failed []string
	for _, st := range starts {
		if st.err != nil {
			if len(failed) < 5 {
				t.Logf("start %s: %v", st.key, st.err)
			}
			failed = append(failed, st.key)
			continue
		}
		ok, okKeys = append(ok, st.id), append(okKeys, st.key)
	}
	// The crashes must have hit work in flight: starts waiting on a reply and runs
	// between their start and their end.
	spanning := 0
	var slowest time.Duration
	for _, st := range starts {
		slowest = max(slowest, st.end.Sub(st.began))
		for _, o := range outages {
			if st.began.Before(o[1]) && st.end.After(o[0]) {
				spanning++
				break
			}
		}
	}
	t.Logf("starts: %d returned a run id, %d an error; %d were in flight during an outage; slowest %s", len(ok), len(failed),
		spanning, slowest.Round(time.Millisecond))
	if spanning == 0 || activeAtKills == 0 {
		t.Errorf("the crashes hit %d starts and %d runs in flight: the load missed them", spanning, activeAtKills)
	}

	if _, done := s.oracle.WaitCount(time.Until(lastRestart.Add(settle)), 0, testkit.ActiveSQL); !done {
		t.Errorf("runs still active %s after the last restart", settle)
	}
	for i, p := range procs {
		if p.Exited() || p.PID() != pids[i] {
			t.Errorf("%s did not ride out the broker crashes (pid %d → %d, exited %v)", p.Name, pids[i], p.PID(), p.Exited())
		}
	}
	expectZero(t, "runs made by starts that returned an error", s.oracle.Count(
		`SELECT count(*) FROM workflow_runs WHERE idempotency_key = ANY($1::text[])`, failed))
	// Each returned id is the run that holds its start's key: no start was answered with
	// another start's run.
	expectZero(t, "returned run ids that are not the run of their start's key", s.oracle.Count(`SELECT count(*)
		FROM unnest($1::text[], $2::uuid[]) AS s(key, id)
		WHERE NOT EXISTS (SELECT 1 FROM workflow_runs r WHERE r.id = s.id AND r.idempotency_key = s.key)`,
		okKeys, ok))
	expectEq(t, "runs in the database (one per start that returned a run id)", s.oracle.Count(`SELECT count(*) FROM workflow_runs`), len(ok))
	if len(ok) == 0 {
		t.Fatal("no start returned a run id")
	}

	tl := s.oracle.Tally(s.faultedPIDs())
	lost := s.oracle.NotCompleted(ok)
	sum.fill(tl, lost+len(failed), 3*len(ok))
	t.Logf("tally: %+v", tl)
	expectZero(t, "accepted starts whose run is missing or not COMPLETED", lost)
	expectEq(t, "step results recorded", tl.StepResults, 3*len(ok))
	// The broker holds no lease: only an executor fenced on a starved machine may repeat
	// a body, and then the result still counts once.
	expectZero(t, "repeated step bodies no fenced executor explains", tl.Unattributed)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, len(ok))
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	s.checkNoPanics()
}
