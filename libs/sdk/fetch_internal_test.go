package sdk

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// An idle workflow's pull sits on one slot, whatever the worker did before: right after
// its start, when each workflow's first pull asked for every slot and the first one's
// held them all for a second while the other workflows' backlog waited, and after a
// burst, when a pull sized by the burst held as many.
func TestIdlePullsHoldOneSlotEach(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const concurrency, workflows = 64, 10
	w := startWorkflows(t, concurrency, workflows, 8)

	// Watched for longer than an idle pull waits, so that a pull sitting on more than
	// its slot is seen whenever it began; after a settling time, in which a pull for
	// more than one message (burstPullWait) has ended.
	watch := func(when string) {
		t.Helper()
		time.Sleep(250 * time.Millisecond)
		least := concurrency
		for end := time.Now().Add(fetchExpiry * 3 / 2); time.Now().Before(end); time.Sleep(time.Millisecond) {
			least = min(least, len(w.slots))
		}
		if least < concurrency-workflows {
			t.Fatalf("%s, with nothing to run: %d of %d slots free at the least; want %d, one held by each workflow's pull",
				when, least, concurrency, concurrency-workflows)
		}
	}
	watch("after the start")

	const burst = 200
	bells := make([]bus.Doorbell, burst)
	for i := range bells {
		bells[i] = queueRun(t, w, "wf-0")
	}
	if err := w.bus.PublishTasks(ctx, bells); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); w.Stats().Completed < burst; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("burst not run: %+v", w.Stats())
		}
	}
	watch("after a burst")
}

// A worker with more workflows than slots serves them all promptly: an idle workflow's
// pull gives its slot back soon while another workflow's loop waits for one, instead of
// sitting on it for a whole pull (a second) while a run of the other workflow waited.
func TestMoreWorkflowsThanSlotsTakeTurns(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	const concurrency, workflows = 2, 6
	w := startWorkflows(t, concurrency, workflows, 4)
	// The first pulls may have begun before any loop waited, and wait their second out.
	time.Sleep(fetchExpiry + 250*time.Millisecond)

	var slowest time.Duration
	for round := range 3 {
		for i := range workflows {
			wf := fmt.Sprintf("wf-%d", (i+round)%workflows)
			bell := queueRun(t, w, wf)
			want := w.Stats().Completed + 1
			began := time.Now()
			if err := w.bus.PublishTasks(ctx, []bus.Doorbell{bell}); err != nil {
				t.Fatal(err)
			}
			for w.Stats().Completed < want {
				if time.Since(began) > 10*time.Second {
					t.Fatalf("run of %s not completed: %+v", wf, w.Stats())
				}
				time.Sleep(time.Millisecond)
			}
			slowest = max(slowest, time.Since(began))
		}
	}
	// Taking turns, a loop waits for the pulls of the others, burstPullWait each, a few
	// rounds of them at most; sitting on its slot, a pull kept a run waiting up to a
	// second (two, with the turn of the slot).
	if limit := fetchExpiry / 2; slowest > limit {
		t.Fatalf("slowest run of %d workflows on %d slots took %s from its doorbell to its end; want under %s",
			workflows, concurrency, slowest, limit)
	}
	t.Logf("slowest of %d runs: %s", 3*workflows, slowest)
}

// startWorkflows starts a worker with this many slots and workflows wf-0, wf-1, …, each
// returning its number, on a pool of poolSize connections.
func startWorkflows(t *testing.T, concurrency, workflows int, poolSize int32) *Worker {
	t.Helper()
	w := newTestWorker(t, WorkerConfig{Concurrency: concurrency, Lease: 10 * time.Second}, poolSize)
	for i := range workflows {
		if err := w.Register(Workflow(fmt.Sprintf("wf-%d", i), func(Context, struct{}) (int, error) { return i, nil })); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Stop(context.Background()) })
	return w
}

// queueRun inserts a QUEUED run of the workflow and returns its doorbell, unpublished.
func queueRun(t *testing.T, w *Worker, workflow string) bus.Doorbell {
	t.Helper()
	res, err := w.store.RunInsert(t.Context(), store.RunInsertParams{ID: wire.NewRunID(), Namespace: wire.DefaultNamespace,
		Workflow: workflow, Input: []byte(`{}`), IdempotencyKey: wire.NewRunID()})
	if err != nil {
		t.Fatal(err)
	}
	return bus.Doorbell{Namespace: wire.DefaultNamespace, Workflow: workflow,
		Task: wire.Task{RunID: res.RunID, DispatchSeq: res.Dispatch.DispatchSeq}}
}
