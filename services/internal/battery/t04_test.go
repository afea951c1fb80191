package battery

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/failpoint"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// T04 — redelivery and late acks. The task consumer's AckWait is 2 s and both executors'
// handlers stall 3 s (failpoint claim.before_claim) between fetching a doorbell and
// claiming its run, so every doorbell is redelivered while its first handler still holds
// it, and that handler's ack arrives after the redelivery. The engine must not care: the
// claim names the dispatch, so of the two handlers of one doorbell exactly one claims and
// the other claims nothing.
//
// Pass: W runs COMPLETED; W claims (QUEUED → RUNNING transitions, and the executors' own
// count); no-op claims ≥ the redeliveries the consumer reports (every redelivered
// doorbell was answered, harmlessly); every doorbell was redelivered at least once (the
// fault was in force); 3·W step results; no step body ran twice; COMPLETED entered W
// times; the consumer ends with nothing pending or awaiting an ack.
//
// Each executor has a slot for every run (concurrency W), so a redelivery always finds a
// waiting pull instead of queueing behind the stalled handlers until their acks make it
// moot.
func TestT04RedeliveryAndLateAcks(t *testing.T) {
	if !*chaos {
		t.Skip("chaos tier: BATTERY.md runs T04 in make chaos (-args -kagzi.chaos)")
	}
	w := pick(200, 500)
	const (
		ackWait = 2 * time.Second
		stall   = 3 * time.Second
	)
	sum := newSummary(t, fmt.Sprintf("W=%d 3-step, AckWait %s, every handler stalls %s before its claim, 2 executors × %d",
		w, ackWait, stall, w))
	s := newSystem(t)
	s.scheduler("scheduler")
	// No reconciler relays: the only second doorbells are the broker's redeliveries.
	s.timer("timer", "KAGZI_STALE_AFTER=5m")
	for _, name := range []string{"exec-a", "exec-b"} {
		s.executor(name, fmt.Sprintf("KAGZI_CONCURRENCY=%d", w), "KAGZI_LEASE=5s",
			"KAGZI_TASK_ACK_WAIT="+ackWait.String(),
			fmt.Sprintf("KAGZI_FAILPOINTS=%s=sleep(%d)", failpoint.ClaimBeforeClaim, stall.Milliseconds()))
	}
	sum.Faults = fmt.Sprintf("%s stall before every claim, AckWait %s", stall, ackWait)

	ids := s.startRuns(inputs(w, func(i int) chaoswf.Input { return chaoswf.Input{Seed: 4000 + i, Steps: 3, MinMS: 5, MaxMS: 20} }))
	s.waitCompleted(w, 60*time.Second)

	// The last redeliveries' handlers are still stalled when the last run completes.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	info, drained, err := s.waitDrained(30 * time.Second)
	if !drained {
		t.Fatalf("consumer not drained 30 s after the last run completed: %+v (%v)", info, err)
	}
	st, err := s.js.Stream(ctx, wire.TaskStream)
	if err != nil {
		t.Fatalf("task stream: %v", err)
	}
	// Delivered.Consumer counts every delivery, first or not; the stream's last sequence
	// every doorbell published (the test's own server, one workflow).
	published := int(st.CachedInfo().State.LastSeq)
	deliveries := int(info.Delivered.Consumer)
	redelivered := deliveries - published
	t.Logf("%d doorbells published, %d deliveries: %d redeliveries", published, deliveries, redelivered)
	sum.Faults = fmt.Sprintf("%d redeliveries of %d doorbells (%s stall, AckWait %s)", redelivered, published, stall, ackWait)

	// Every delivery reached a handler, which claimed or found nothing to claim.
	handled, ok := s.oracle.WaitCount(10*time.Second, deliveries, `SELECT coalesce(sum(claimed + claim_noops), 0)::int FROM test_worker_stats`)
	if !ok {
		t.Errorf("executors answered %d deliveries, want %d", handled, deliveries)
	}
	noops := s.oracle.Count(`SELECT coalesce(sum(claim_noops), 0)::int FROM test_worker_stats`)
	t.Logf("claim no-ops %d", noops)
	if noops < redelivered {
		t.Errorf("%d no-op claims for %d redeliveries: some redelivered doorbell was not answered by a no-op", noops, redelivered)
	}
	expectEq(t, "doorbells published (one per run)", published, w)
	if redelivered < w {
		t.Errorf("%d redeliveries of %d doorbells: the stall did not outlast AckWait for every one", redelivered, w)
	}

	tl := s.oracle.Tally(s.faultedPIDs())
	sum.fill(tl, s.oracle.NotCompleted(ids), 3*w)
	t.Logf("tally: %+v", tl)
	expectEq(t, "claims (QUEUED → RUNNING)", s.oracle.Count(`SELECT count(*) FROM test_transitions
		WHERE old_status = 'QUEUED' AND new_status = 'RUNNING'`), w)
	expectEq(t, "claims the executors counted", s.oracle.Count(`SELECT coalesce(sum(claimed), 0)::int FROM test_worker_stats`), w)
	expectEq(t, "runs COMPLETED", tl.Completed, w)
	expectEq(t, "step results recorded", tl.StepResults, 3*w)
	expectZero(t, "repeated step bodies", tl.DupBodies)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, w)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	s.checkNoPanics()
}
