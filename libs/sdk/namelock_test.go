package sdk_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// A worker restarted under its stable name hands back at once the runs its killed
// predecessor held, as their lapsed leases would have a lease later; a second live
// worker under the same name takes nothing from the first.
func TestNamedWorkerRecoversPredecessorRuns(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	release := make(chan struct{})
	wf := sdk.Workflow("named", func(ctx sdk.Context, hold bool) (string, error) {
		return sdk.Step(ctx, "body", func(context.Context) (string, error) {
			if hold {
				<-release
			}
			return "done", nil
		})
	})

	// The predecessor, killed: its runs are RUNNING under its id with an hour of lease
	// left, and no session holds the name any more.
	const dead = "exec-a/1-00000000dead"
	predecessor := func(maxAttempts int) wire.RunID {
		t.Helper()
		res, err := e.st.RunInsert(ctxT(t), store.RunInsertParams{ID: wire.NewRunID(), Namespace: wire.DefaultNamespace,
			Workflow: "named", Input: []byte(`false`), IdempotencyKey: wire.NewRunID(), MaxAttempts: maxAttempts})
		if err != nil {
			t.Fatal(err)
		}
		if _, ok, err := e.st.RunClaim(ctxT(t), store.RunClaimParams{RunID: res.RunID, DispatchSeq: res.DispatchSeq,
			Namespace: res.Namespace, Workflow: res.Workflow, Owner: dead, Lease: time.Hour}); err != nil || !ok {
			t.Fatalf("predecessor's claim: ok=%v, %v", ok, err)
		}
		return res.RunID
	}
	orphans := []wire.RunID{predecessor(5), predecessor(5), predecessor(5)}
	spent := predecessor(1)

	started := time.Now()
	a := e.worker(t, []sdk.Registration{wf}, func(c *sdk.WorkerConfig) { c.Name = "exec-a" })
	if !strings.HasPrefix(a.ID(), fmt.Sprintf("exec-a/%d-", os.Getpid())) {
		t.Fatalf("worker id %q, want exec-a/<pid>-<random>", a.ID())
	}
	completed := func(what, id string) {
		t.Helper()
		info, err := e.client().Wait(ctxT(t), id)
		if err != nil || info.Status != wire.StatusCompleted || string(info.Output) != `"done"` {
			t.Fatalf("%s %s: %+v, %v", what, id, info, err)
		}
	}
	for _, id := range orphans {
		completed("orphan", id)
	}
	if took := time.Since(started); took > 10*time.Second {
		t.Fatalf("orphans completed %s after the restart: they waited for their leases", took)
	}
	for _, id := range orphans {
		var attempt, lapses int
		if err := e.pool.QueryRow(ctxT(t), `SELECT attempt, lapses FROM workflow_runs WHERE id = $1`, id).Scan(&attempt, &lapses); err != nil {
			t.Fatal(err)
		}
		if attempt != 2 {
			t.Errorf("orphan %s completed on attempt %d, want 2 (the dead one's attempt counted)", id, attempt)
		}
	}
	info, err := e.st.RunGet(ctxT(t), wire.DefaultNamespace, spent)
	if err != nil || info.Status != wire.StatusFailed || !strings.HasPrefix(info.Error, "lease expired on attempt 1 of 1") {
		t.Fatalf("orphan on its last attempt = %s %q, %v; want FAILED, lease expired", info.Status, info.Error, err)
	}

	// Runs A holds now, in a step that waits.
	held := make([]string, 3)
	for i := range held {
		r, err := wf.Start(ctxT(t), e.client(), true)
		if err != nil {
			t.Fatal(err)
		}
		held[i] = r.ID
	}
	type holding struct {
		owner string
		fence int64
	}
	read := func() map[string]holding {
		t.Helper()
		out := map[string]holding{}
		rows, err := e.pool.Query(ctxT(t), `SELECT id::text, coalesce(lease_owner, ''), fence FROM workflow_runs
			WHERE id = ANY ($1::uuid[]) AND status = 'RUNNING'`, held)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		for rows.Next() {
			var id string
			var h holding
			if err := rows.Scan(&id, &h.owner, &h.fence); err != nil {
				t.Fatal(err)
			}
			out[id] = h
		}
		return out
	}
	waitFor(t, "A to hold three runs", func() bool { return len(read()) == 3 })
	before := read()

	// A second live worker under the same name: it must find the name taken and leave
	// A's runs alone.
	b := e.worker(t, []sdk.Registration{wf}, func(c *sdk.WorkerConfig) { c.Name = "exec-a" })
	if b.ID() == a.ID() {
		t.Fatalf("two workers share id %s", a.ID())
	}
	time.Sleep(300 * time.Millisecond)
	after := read()
	for id, h := range before {
		if after[id] != h || h.owner != a.ID() {
			t.Errorf("run %s held by %+v before the second worker started, %+v after; want A's, untouched", id, h, after[id])
		}
	}
	close(release)
	for _, id := range held {
		completed("held run", id)
	}
	if s := a.Stats(); s.LeaseLost != 0 || s.FencedRejected != 0 {
		t.Errorf("A lost runs to its namesake: %+v", s)
	}
}

func TestWorkerNameValidated(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, c := range []struct{ name, id string }{{"a/b", ""}, {"a b", ""}, {strings.Repeat("x", 256), ""}, {"exec", "other/1-x"}} {
		_, err := sdk.NewWorker(sdk.WorkerConfig{Pool: e.pool, Conn: e.nc, Name: c.name, ID: c.id})
		if !errors.Is(err, wire.ErrInvalidArgument) {
			t.Errorf("name %q id %q: err = %v, want ErrInvalidArgument", c.name, c.id, err)
		}
	}
	w, err := sdk.NewWorker(sdk.WorkerConfig{Pool: e.pool, Conn: e.nc, Name: "exec", ID: "exec/7-x"})
	if err != nil || w.ID() != "exec/7-x" {
		t.Fatalf("name with a matching id: %v", err)
	}
}
