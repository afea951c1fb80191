package battery

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// T01 — executor kill -9 storm. Three executors (concurrency 8) work through W 5-step
// runs while a random one is SIGKILLed every 2 s and restarted 0.5 s later. Every run
// must complete with exactly its five results recorded; a step body may run twice only
// if the process that ran it first was killed.
//
// Step bodies take 80–320 ms [100–400 ms] instead of BATTERY.md's 5–20 ms: at 5–20 ms the
// whole workload drains in about a second and the storm would kill idle processes. The
// storm lasts as long as the work, so every kill lands on runs in flight.
func TestT01ExecutorKillStorm(t *testing.T) {
	w := pick(300, 2000)
	storm := pick(20*time.Second, 120*time.Second)
	lease := pick("2s", "5s")
	minMS, maxMS := pick(80, 100), pick(320, 400)
	settle := pick(30*time.Second, 60*time.Second)
	sum := newSummary(t, fmt.Sprintf("W=%d 5-step (%d–%d ms bodies), 3 executors × 8, lease %s, kill every 2 s for %s",
		w, minMS, maxMS, lease, storm))

	s := newSystem(t)
	s.scheduler("scheduler")
	// A doorbell fetched by an executor that dies before its claim commits comes back
	// after AckWait (5 s) or the reconciler's threshold, whichever is first: 5 s keeps
	// the reconciler within the settle time, as an operator running short leases would
	// configure it.
	s.timer("timer", "KAGZI_STALE_AFTER=5s", "KAGZI_MAX_IDLE=1s")
	execs := make([]*testkit.Process, 3)
	for i := range execs {
		execs[i] = s.executor(fmt.Sprintf("exec-%d", i+1), "KAGZI_CONCURRENCY=8", "KAGZI_LEASE="+lease)
	}

	// Many kills can land on one run; the attempt budget is not what T01 measures.
	ids := s.startRuns(inputs(w, func(i int) chaoswf.Input {
		return chaoswf.Input{Seed: i, Steps: 5, MinMS: minMS, MaxMS: maxMS}
	}), sdk.MaxAttempts(50))

	seed := time.Now().UnixNano()
	t.Logf("storm seed %d", seed)
	rng := rand.New(rand.NewPCG(uint64(seed), 0))
	kills := 0
	next := time.Now().Add(2 * time.Second)
	for end := time.Now().Add(storm); next.Before(end) || next.Equal(end); next = next.Add(2 * time.Second) {
		time.Sleep(time.Until(next)) // the storm's own schedule, not a wait for anything
		victim := execs[rng.IntN(len(execs))]
		pid := s.kill(victim)
		kills++
		t.Logf("kill %d: %s pid %d", kills, victim.Name, pid)
		time.Sleep(500 * time.Millisecond)
		victim.Start()
	}
	lastKill := time.Now()
	sum.Faults = fmt.Sprintf("%d × SIGKILL executor", kills)

	s.waitCompleted(w, settle)
	t.Logf("all runs settled %.1fs after the last kill", time.Since(lastKill).Seconds())
	tl := s.oracle.Tally(s.faultedPIDs())
	lost := s.oracle.NotCompleted(ids)
	sum.fill(tl, lost, 5*w)
	t.Logf("tally: %+v", tl)

	expectZero(t, "accepted runs not COMPLETED", lost)
	expectZero(t, "runs still active", tl.Active)
	expectEq(t, "step results recorded", tl.StepResults, 5*w)
	expectZero(t, "step bodies repeated without a killed process to explain it", tl.Unattributed)
	if tl.DupBodies > kills*8 {
		t.Errorf("%d repeated step bodies after %d kills of 8-slot executors: more than %d", tl.DupBodies, kills, kills*8)
	}
	expectZero(t, "repeats with a different idempotency key", tl.IdemMismatch)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, w)
	expectZero(t, "runs that entered COMPLETED twice", tl.MultiCompleted)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	if tl.DupBodies == 0 {
		t.Errorf("%d kills interrupted no step body: the storm missed the work", kills)
	}
	s.checkNoPanics()
}
