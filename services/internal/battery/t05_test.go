package battery

import (
	"context"
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

	var republished, failed atomic.Int64
	sub, err := s.nc.Subscribe(wire.TaskSubjectPrefix+">", func(m *nats.Msg) {
		if m.Header.Get("Battery-Copy") != "" {
			return // our own copy coming back
		}
		for k := 1; k <= copies; k++ {
			c := nats.NewMsg(m.Subject)
			c.Data = m.Data
			c.Header.Set("Battery-Copy", strconv.Itoa(k))
			if _, err := s.js.PublishMsgAsync(c, jetstream.WithMsgID(m.Header.Get(jetstream.MsgIDHeader)+"/copy-"+strconv.Itoa(k))); err != nil {
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
	s.waitCompleted(w, 60*time.Second)
	select {
	case <-s.js.PublishAsyncComplete():
	case <-time.After(30 * time.Second):
		t.Errorf("copies still unacknowledged by JetStream after 30 s")
	}
	sum.Faults = fmt.Sprintf("%d duplicate doorbells", republished.Load())
	expectZero(t, "copies JetStream refused", int(failed.Load()))
	expectEq(t, "copies published", int(republished.Load()), copies*w)

	// Copies may still be arriving after the last run completed: wait for the consumer
	// to drain, and for the executors to have reported every doorbell they handled.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	end := time.Now().Add(30 * time.Second)
	var info *jetstream.ConsumerInfo
	for {
		info, err = s.taskConsumer(ctx)
		if err == nil && info.NumPending == 0 && info.NumAckPending == 0 {
			break
		}
		if time.Now().After(end) {
			t.Errorf("consumer not drained: %+v (%v)", info, err)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	handled, ok := s.oracle.WaitCount(10*time.Second, (copies+1)*w, `SELECT coalesce(sum(claimed + claim_noops), 0)::int FROM test_worker_stats`)
	if !ok {
		t.Errorf("executors handled %d doorbells, want %d", handled, (copies+1)*w)
	}

	tl := s.oracle.Tally(s.faultedPIDs())
	sum.fill(tl, s.oracle.NotCompleted(ids), 3*w)
	t.Logf("tally: %+v", tl)
	expectEq(t, "claims (QUEUED → RUNNING)", s.oracle.Count(`SELECT count(*) FROM test_transitions
		WHERE old_status = 'QUEUED' AND new_status = 'RUNNING'`), w)
	expectEq(t, "claims the executors counted", s.oracle.Count(`SELECT coalesce(sum(claimed), 0)::int FROM test_worker_stats`), w)
	expectEq(t, "no-op claims the executors counted", s.oracle.Count(`SELECT coalesce(sum(claim_noops), 0)::int FROM test_worker_stats`), copies*w)
	expectEq(t, "runs COMPLETED", tl.Completed, w)
	expectEq(t, "step results recorded", tl.StepResults, 3*w)
	expectZero(t, "repeated step bodies", tl.DupBodies)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, w)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	s.checkNoPanics()
}
