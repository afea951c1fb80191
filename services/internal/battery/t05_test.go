package battery

import (
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// T05 — duplicate doorbells. A test publisher hears every task message and publishes
// it again five times under distinct Nats-Msg-Ids, so JetStream's de-duplication cannot
// help: only the claim's dispatch_seq check stands between a doorbell and a second run.
//
// Pass: W runs COMPLETED; W successful claims (one per run, counted by the transition
// trigger and by the executors' own stats); every other doorbell a no-op claim; 3·W step
// results; no step body ran twice; and the consumer ends with nothing pending and
// nothing awaiting an ack.
func TestT05DuplicateDoorbells(t *testing.T) {
	w := pick(500, 5000)
	const copies = 5
	sum := newSummary(t, fmt.Sprintf("W=%d 3-step, every doorbell published %d more times with distinct ids, 2 executors × 16", w, copies))
	s := newSystem(t)
	s.scheduler("scheduler")
	s.timer("timer")
	for _, name := range []string{"exec-a", "exec-b"} {
		s.executor(name, "KAGZI_CONCURRENCY=16", "KAGZI_LEASE=5s")
	}

	// Originals are counted rather than assumed to be W: a run that waits in the queue
	// behind the copies past the reconcile threshold is re-dispatched, a legitimate
	// doorbell of its own, which is copied like any other.
	var originals, republished, failed atomic.Int64
	// Its own JetStream context with room for every copy in flight: the default bound
	// (4,000 unacknowledged) would refuse copies at the chaos size.
	copier, err := jetstream.New(s.nc, jetstream.WithPublishAsyncMaxPending(1<<20))
	if err != nil {
		t.Fatal(err)
	}
	sub, err := s.nc.Subscribe(wire.TaskSubjectPrefix+">", func(m *nats.Msg) {
		if m.Header.Get("Battery-Copy") != "" {
			return // our own copy coming back
		}
		originals.Add(1)
		for k := 1; k <= copies; k++ {
			c := nats.NewMsg(m.Subject)
			c.Data = m.Data
			c.Header.Set("Battery-Copy", strconv.Itoa(k))
			if _, err := copier.PublishMsgAsync(c, jetstream.WithMsgID(m.Header.Get(jetstream.MsgIDHeader)+"/copy-"+strconv.Itoa(k))); err != nil {
				failed.Add(1)
				continue
			}
			republished.Add(1)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })

	ids := s.startRuns(inputs(w, func(i int) chaoswf.Input { return chaoswf.Input{Seed: 5000 + i, Steps: 3, MinMS: 5, MaxMS: 20} }))
	s.waitCompleted(w, pick(60*time.Second, 5*time.Minute))
	// The publisher may still be copying doorbells it heard before the last run ended.
	for end := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		msgs, _, _ := sub.Pending()
		if msgs == 0 && republished.Load()+failed.Load() == copies*originals.Load() {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("the test publisher is stuck: %d copies for %d originals", republished.Load(), originals.Load())
		}
	}
	select {
	case <-copier.PublishAsyncComplete():
	case <-time.After(30 * time.Second):
		t.Errorf("copies still unacknowledged by JetStream after 30 s")
	}

	// Copies may still be arriving after the last run completed: wait for the consumer
	// to drain, and for the executors to have reported every doorbell they handled.
	if info, drained, err := s.waitDrained(30 * time.Second); !drained {
		t.Errorf("consumer not drained: %+v (%v)", info, err)
	}
	sum.Faults = fmt.Sprintf("%d duplicate doorbells", republished.Load())
	expectZero(t, "copies JetStream refused", int(failed.Load()))
	expectEq(t, "copies published", int(republished.Load()), copies*int(originals.Load()))
	t.Logf("%d original doorbells (%d re-dispatches), %d copies", originals.Load(), originals.Load()-int64(w), republished.Load())
	doorbells := int(originals.Load() + republished.Load())
	handled, ok := s.oracle.WaitCount(10*time.Second, doorbells, `SELECT coalesce(sum(claimed + claim_noops), 0)::int FROM test_worker_stats`)
	if !ok {
		t.Errorf("executors handled %d doorbells, want %d", handled, doorbells)
	}

	tl := s.oracle.Tally(s.faultedPIDs())
	sum.fill(tl, s.oracle.NotCompleted(ids), 3*w)
	t.Logf("tally: %+v", tl)
	expectEq(t, "claims (QUEUED → RUNNING)", s.oracle.Count(`SELECT count(*) FROM test_transitions
		WHERE old_status = 'QUEUED' AND new_status = 'RUNNING'`), w)
	expectEq(t, "claims the executors counted", s.oracle.Count(`SELECT coalesce(sum(claimed), 0)::int FROM test_worker_stats`), w)
	expectEq(t, "no-op claims the executors counted", s.oracle.Count(`SELECT coalesce(sum(claim_noops), 0)::int FROM test_worker_stats`), doorbells-w)
	expectEq(t, "runs COMPLETED", tl.Completed, w)
	expectEq(t, "step results recorded", tl.StepResults, 3*w)
	expectZero(t, "repeated step bodies", tl.DupBodies)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, w)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	s.checkNoPanics()
}
