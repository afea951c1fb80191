package sdk

import (
	"context"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// A renewal that misses a run whose ending write (here its completion) committed just
// before it looked, while its execution has not yet let go of it, has not found a lost
// lease: the run is not cancelled and leases_lost does not count it. A run with no such
// write is lost, so the same miss still counts for it.
func TestRenewalMissingAnEndingRunIsNoLostLease(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	w := newTestWorker(t, WorkerConfig{Lease: 10 * time.Second}, 4)
	st := w.store

	// held claims a run for w, completes it in the database and puts it among w's held
	// runs, as an execution between its completion's commit and its return would be.
	held := func(ending bool) *runContext {
		id := wire.NewRunID()
		if _, err := st.RunInsert(ctx, store.RunInsertParams{ID: id, Namespace: wire.DefaultNamespace, Workflow: "wf",
			Input: []byte(`{}`), IdempotencyKey: id}); err != nil {
			t.Fatal(err)
		}
		res := st.RunsClaim(ctx, wire.DefaultNamespace, w.ID(), 10*time.Second,
			[]store.ClaimRequest{{RunID: id, DispatchSeq: 1, Workflow: "wf"}})
		if res[0].Err != nil || !res[0].OK {
			t.Fatalf("claim: %+v", res[0])
		}
		if err := st.RunComplete(ctx, res[0].Run.Fenced(), []byte(`1`)); err != nil {
			t.Fatal(err)
		}
		rctx, cancel := context.WithCancel(ctx)
		t.Cleanup(cancel)
		rc := &runContext{Context: rctx, cancel: cancel, w: w, run: res[0].Run, log: w.log}
		rc.ending.Store(ending)
		w.mu.Lock()
		w.held[id] = rc
		w.mu.Unlock()
		return rc
	}

	completing := held(true)
	w.extendLeases(ctx)
	if n := w.Stats().LeaseLost; n != 0 || completing.Err() != nil {
		t.Fatalf("a completed run counted as a lost lease: leases lost %d, run context %v", n, completing.Err())
	}

	running := held(false)
	w.extendLeases(ctx)
	if n := w.Stats().LeaseLost; n != 1 || running.Err() == nil {
		t.Fatalf("a run missing from the renewal without an ending write: leases lost %d, run context %v; want 1 and cancelled", n, running.Err())
	}
}
