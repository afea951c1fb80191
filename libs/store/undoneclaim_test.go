package store_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// undoClaim puts a claimed run back as PostgreSQL's crash recovery leaves it when the
// claim's commit had not reached disk: QUEUED at the same dispatch, with the fence the
// claim found.
func undoClaim(t *testing.T, ctx context.Context, pool *pgxpool.Pool, run store.ClaimedRun) store.Dispatch {
	t.Helper()
	if _, err := pool.Exec(ctx, `UPDATE workflow_runs SET status = 'QUEUED', fence = fence - 1, lease_owner = NULL,
		lease_expires_at = NULL WHERE id = $1 AND fence = $2`, run.ID, run.Fence); err != nil {
		t.Fatal(err)
	}
	return store.Dispatch{RunID: run.ID, Namespace: run.Namespace, Workflow: run.Workflow, DispatchSeq: 1}
}

// A claim commits without waiting for its flush, so a crash can undo it and the next
// claim hands out the same fence to another executor. Every write of the first claimer
// must then be refused: the owner is checked beside the fence.
func TestUndoneClaimFencesItsExecutor(t *testing.T) {
	t.Parallel()
	s, pool := newStore(t)
	ctx := context.Background()
	lost := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, wire.ErrLeaseLost) {
			t.Fatalf("%s by the executor whose claim was undone: err = %v, want ErrLeaseLost", what, err)
		}
	}

	d := insertRun(t, s, "k").Dispatch
	first, ok := claim(t, s, d, "exec-a/1")
	if !ok {
		t.Fatal("first claim took nothing")
	}
	second, ok := claim(t, s, undoClaim(t, ctx, pool, first), "exec-b/1")
	if !ok || second.Fence != first.Fence {
		t.Fatalf("claim after the undone one = %+v ok=%v, want fence %d again", second, ok, first.Fence)
	}
	a := first.Fenced()

	lost("step", s.StepInsert(ctx, store.StepInsertParams{FencedParams: a, Key: "s1", Seq: 1, Kind: wire.StepKindStep, Output: []byte(`"a"`)}))
	lost("step batch", s.StepsInsert(ctx, []store.StepInsertParams{{FencedParams: a, Key: "s1", Seq: 1, Kind: wire.StepKindStep, Output: []byte(`"a"`)}})[0])
	_, _, err := s.StepSleepInsert(ctx, store.RunSleepParams{FencedParams: a, StepKey: "nap", Seq: 1, Duration: time.Millisecond})
	lost("local sleep", err)
	_, err = s.RunSleep(ctx, store.RunSleepParams{FencedParams: a, StepKey: "nap", Seq: 1, Duration: time.Hour})
	lost("park", err)
	_, err = s.RunFail(ctx, store.RunFailParams{FencedParams: a, Error: "boom", Retry: true, Backoff: time.Second})
	lost("fail", err)
	_, err = s.RunRelease(ctx, a)
	lost("hand-back", err)
	lost("complete", s.RunComplete(ctx, a, []byte(`"a"`)))
	last := &store.StepInsertParams{Key: "s1", Seq: 1, Kind: wire.StepKindStep, Output: []byte(`"a"`)}
	lost("complete with its last step", s.RunsComplete(ctx, []store.CompleteRequest{{FencedParams: a, Output: []byte(`"a"`), Step: last}})[0])
	kept, err := s.RunsExtendLeases(ctx, a.Owner, time.Minute, []store.Held{{RunID: a.RunID, Fence: a.Fence}})
	if err != nil || kept[a.RunID] {
		t.Fatalf("lease extension by the executor whose claim was undone: kept %v, err %v", kept, err)
	}

	// The run is the second claimer's alone, untouched by any of the above.
	b := second.Fenced()
	if err := s.StepInsert(ctx, store.StepInsertParams{FencedParams: b, Key: "s1", Seq: 1, Kind: wire.StepKindStep, Output: []byte(`"b"`)}); err != nil {
		t.Fatal(err)
	}
	if err := s.RunsComplete(ctx, []store.CompleteRequest{{FencedParams: b, Output: []byte(`"b"`)}})[0]; err != nil {
		t.Fatal(err)
	}
	// A retry of the first claimer's completion (its first answer lost) finds the run
	// COMPLETED under its fence, but not with its output: not its own completion.
	lost("complete again", s.RunsComplete(ctx, []store.CompleteRequest{{FencedParams: a, Output: []byte(`"a"`)}})[0])
	if err := s.RunsComplete(ctx, []store.CompleteRequest{{FencedParams: b, Output: []byte(`"b"`)}})[0]; err != nil {
		t.Fatalf("the second claimer's retried completion: %v", err)
	}
	info, err := s.RunGet(ctx, "default", d.RunID)
	if err != nil {
		t.Fatal(err)
	}
	if info.Status != wire.StatusCompleted || string(info.Output) != `"b"` || len(info.Steps) != 1 || string(info.Steps[0].Output) != `"b"` {
		t.Fatalf("run = %s output %s steps %+v, want COMPLETED with the second claimer's output and step", info.Status, info.Output, info.Steps)
	}
}

// The claim's asynchronous commit is its transaction's alone: the connection's next
// transactions wait for their flush again.
func TestClaimLeavesCommitsSynchronous(t *testing.T) {
	t.Parallel()
	_, pool := newStore(t)
	ctx := context.Background()
	conn, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	s := store.New(conn.Conn())
	d := insertRun(t, s, "k").Dispatch
	if r := s.RunsClaim(ctx, d.Namespace, "exec", time.Minute, []store.ClaimRequest{{RunID: d.RunID, DispatchSeq: d.DispatchSeq, Workflow: d.Workflow}}); !r[0].OK {
		t.Fatalf("claim = %+v", r[0])
	}
	if _, ok := claim(t, s, d, "exec"); ok {
		t.Fatal("a second claim of one dispatch took")
	}
	var setting string
	if err := conn.QueryRow(ctx, `SHOW synchronous_commit`).Scan(&setting); err != nil {
		t.Fatal(err)
	}
	if setting != "on" {
		t.Fatalf("synchronous_commit after claims = %q, want on", setting)
	}
}
