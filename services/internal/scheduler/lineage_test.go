package scheduler_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/scheduler"
)

// nestInput asks a nest run to start a child from a step until Left reaches 0.
type nestInput struct{ Left int }

// TestChildStartsRecordLineage runs a workflow whose step starts the next generation
// through the client, as users do: the SDK names the run as the parent, the scheduler
// records parent, root and depth, and refuses the generation beyond MaxDepth, which
// fails its would-be parent at once with the limit error.
func TestChildStartsRecordLineage(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.startScheduler(t, scheduler.Config{Limits: wire.Limits{MaxDepth: 2}})
	client := sdk.NewClient(e.nc, sdk.WithRequestTimeout(5*time.Second))
	var nest *sdk.WorkflowDef[nestInput, string]
	nest = sdk.Workflow("nest", func(ctx sdk.Context, in nestInput) (string, error) {
		if in.Left == 0 {
			return "", nil
		}
		return sdk.Step(ctx, "child", func(sctx context.Context) (string, error) {
			run, err := nest.Start(sctx, client, nestInput{Left: in.Left - 1}, sdk.IdempotencyKey(sdk.StepKey(sctx)))
			if err != nil {
				return "", err
			}
			return run.ID, nil
		})
	})
	w, err := sdk.NewWorker(sdk.WorkerConfig{Pool: e.pool, Conn: e.nc, Concurrency: 4, Lease: 2 * time.Second,
		RetryBackoff: 10 * time.Millisecond, ShutdownGrace: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Register(nest); err != nil {
		t.Fatal(err)
	}
	if err := w.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Stop(context.Background()) })

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	root, err := nest.Start(ctx, client, nestInput{Left: 3})
	if err != nil {
		t.Fatal(err)
	}
	// Depth 0 and 1 start their children; depth 2 is refused the child at depth 3.
	deadline := time.Now().Add(20 * time.Second)
	for e.countRuns(t) < 3 || unfinished(t, e) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("runs not all finished within 20 s (%d made)", e.countRuns(t))
		}
		time.Sleep(20 * time.Millisecond)
	}
	rows, err := e.pool.Query(ctx, `SELECT id::text, coalesce(parent_id::text, ''), coalesce(root_id::text, ''), depth,
		status, attempt, coalesce(error, '') FROM workflow_runs ORDER BY depth`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	type run struct {
		id, parent, root string
		depth            int
		status           string
		attempt          int
		err              string
	}
	var runs []run
	for rows.Next() {
		var r run
		if err := rows.Scan(&r.id, &r.parent, &r.root, &r.depth, &r.status, &r.attempt, &r.err); err != nil {
			t.Fatal(err)
		}
		runs = append(runs, r)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if len(runs) != 3 {
		t.Fatalf("%d runs, want 3 (depths 0, 1, 2): %+v", len(runs), runs)
	}
	if r := runs[0]; r.id != root.ID || r.parent != "" || r.root != "" || r.depth != 0 || r.status != "COMPLETED" {
		t.Errorf("root %+v, want run %s COMPLETED with no lineage", r, root.ID)
	}
	for i, r := range runs[1:] {
		if r.parent != runs[i].id || r.root != root.ID || r.depth != i+1 {
			t.Errorf("run at depth %d: %+v, want parent %s, root %s", i+1, r, runs[i].id, root.ID)
		}
	}
	if r := runs[1]; r.status != "COMPLETED" {
		t.Errorf("run at depth 1 ended %s %q, want COMPLETED", r.status, r.err)
	}
	if r := runs[2]; r.status != "FAILED" || r.attempt != 1 || !strings.Contains(r.err, wire.ErrLimitExceeded.Error()) ||
		!strings.Contains(r.err, "depth 3") {
		t.Errorf("run at depth 2 ended %s on attempt %d with %q, want FAILED on attempt 1 with the depth limit", r.status, r.attempt, r.err)
	}
}

func unfinished(t *testing.T, e *env) int {
	t.Helper()
	var n int
	if err := e.pool.QueryRow(context.Background(), `SELECT count(*) FROM workflow_runs
		WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}
