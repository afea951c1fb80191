package store_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// An executor's lease extension and its step and completion batches name the same held
// runs at once. Each must lock them in id order whatever its plan: here every session
// plans without index scans, so an UPDATE visits rows in heap order, and the runs were
// inserted in descending id order, so heap order is the reverse of id order. Before the
// extension and the completion locked explicitly, this deadlocked within a second (T19 saw
// it under load, and the leases it cost re-ran step bodies).
func TestHeldRunsLockInIDOrder(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, _ := newStore(t, func(c *pgxpool.Config) {
		c.ConnConfig.RuntimeParams["enable_indexscan"] = "off"
		c.ConnConfig.RuntimeParams["enable_indexonlyscan"] = "off"
	})

	const n = 32
	ids := make([]wire.RunID, n)
	for i := range ids {
		ids[i] = wire.NewRunID()
	}
	slices.Sort(ids)
	slices.Reverse(ids)
	held := make([]store.Held, 0, n)
	for _, id := range ids {
		res, err := s.RunInsert(ctx, store.RunInsertParams{ID: id, Namespace: "default", Workflow: "wf", Input: []byte(`{}`), IdempotencyKey: string(id)})
		if err != nil {
			t.Fatal(err)
		}
		run, ok, err := s.RunClaim(ctx, store.RunClaimParams{RunID: id, DispatchSeq: res.DispatchSeq, Namespace: "default",
			Workflow: "wf", Owner: "a", Lease: time.Minute})
		if err != nil || !ok {
			t.Fatalf("claim %s: %v, %v", id, ok, err)
		}
		held = append(held, store.Held{RunID: id, Fence: run.Fence})
	}

	var (
		mu       sync.Mutex
		failures []error
		wg       sync.WaitGroup
	)
	fail := func(err error) {
		mu.Lock()
		failures = append(failures, err)
		mu.Unlock()
	}
	deadline := time.Now().Add(2 * time.Second)
	wg.Add(3)
	go func() { // the heartbeat
		defer wg.Done()
		for time.Now().Before(deadline) {
			if kept, err := s.RunsExtendLeases(ctx, "a", time.Minute, held); err != nil {
				fail(err)
			} else if len(kept) != n {
				fail(fmt.Errorf("extension kept %d of %d leases", len(kept), n))
			}
		}
	}()
	go func() { // step batches over every run
		defer wg.Done()
		for seq := 1; time.Now().Before(deadline); seq++ {
			ps := make([]store.StepInsertParams, n)
			for i, h := range held {
				ps[i] = store.StepInsertParams{FencedParams: store.FencedParams{RunID: h.RunID, Fence: h.Fence, Owner: "a"},
					Key: fmt.Sprintf("s%d", seq), Seq: seq, Kind: wire.StepKindStep, Status: "COMPLETED", Output: []byte(`1`), Attempt: 1}
			}
			for _, err := range s.StepsInsert(ctx, ps) {
				if err != nil {
					fail(err)
					break
				}
			}
		}
	}()
	go func() { // completions that can never take (wrong fence), yet lock what they name
		defer wg.Done()
		reqs := make([]store.CompleteRequest, n)
		for i, h := range held {
			reqs[i] = store.CompleteRequest{FencedParams: store.FencedParams{RunID: h.RunID, Fence: h.Fence + 1, Owner: "a"}, Output: []byte(`1`)}
		}
		for time.Now().Before(deadline) {
			for _, err := range s.RunsComplete(ctx, reqs) {
				if err != nil && !errors.Is(err, wire.ErrLeaseLost) {
					fail(err)
					break
				}
			}
		}
	}()
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d batches failed, first: %v", len(failures), failures[0])
	}
}
