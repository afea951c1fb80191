package sdk_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// A run whose last two attempts ended with their lease lapsing (their executor died
// each time, maybe of it) runs alone: it waits for the runs in progress to finish, and no
// other run starts beside it until it is done. A run with one lapse (every run a killed
// executor held has one) runs beside the others as usual.
//
// The doorbell of such a run says so (the timer knows the count when it re-queues the
// run): the executor then makes room before claiming it. A doorbell without the hint
// (an older message) leads to the same, the room made after the claim.
func TestRunAfterLapsesRunsAlone(t *testing.T) {
	t.Parallel()
	for _, hinted := range []bool{true, false} {
		t.Run(fmt.Sprintf("hinted=%v", hinted), func(t *testing.T) {
			t.Parallel()
			testRunsAlone(t, hinted)
		})
	}
}

func testRunsAlone(t *testing.T, hinted bool) {
	e := newEnv(t)
	type input struct {
		Kind   string `json:"kind"`
		HoldMS int    `json:"hold_ms"`
	}
	var active atomic.Int32
	var mu sync.Mutex
	beside := map[string]int32{} // kind → bodies running beside it when it started
	var suspectEnd time.Time
	var lateStarts []time.Time
	wf := sdk.Workflow("alone", func(ctx sdk.Context, in input) (int, error) {
		return sdk.Step(ctx, "body", func(context.Context) (int, error) {
			n := active.Add(1)
			defer active.Add(-1)
			start := time.Now()
			time.Sleep(time.Duration(in.HoldMS) * time.Millisecond)
			mu.Lock()
			defer mu.Unlock()
			beside[in.Kind] = n - 1
			switch in.Kind {
			case "suspect":
				suspectEnd = time.Now()
			case "late":
				lateStarts = append(lateStarts, start)
			}
			return 1, nil
		})
	})
	w := e.worker(t, []sdk.Registration{wf}, func(c *sdk.WorkerConfig) { c.Concurrency = 4 })
	c := e.client()
	var runs []string
	for range 3 {
		r, err := wf.Start(ctxT(t), c, input{Kind: "busy", HoldMS: 1500})
		if err != nil {
			t.Fatal(err)
		}
		runs = append(runs, r.ID)
	}
	waitFor(t, "three busy bodies", func() bool { return active.Load() == 3 })

	// As the lease sweep leaves them: re-queued after one and after two lapses in a row.
	queueAfterLapses := func(kind string, lapses int) wire.RunID {
		in, _ := json.Marshal(input{Kind: kind, HoldMS: 100})
		ins, err := e.st.RunInsert(ctxT(t), store.RunInsertParams{ID: wire.NewRunID(), Namespace: wire.DefaultNamespace,
			Workflow: "alone", Input: in, IdempotencyKey: kind, MaxAttempts: 5})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.pool.Exec(ctxT(t), `UPDATE workflow_runs SET attempt = $2 + 1, lapses = $2 WHERE id = $1`, ins.RunID, lapses); err != nil {
			t.Fatal(err)
		}
		task := wire.Task{RunID: ins.RunID, DispatchSeq: ins.DispatchSeq}
		if hinted {
			task.Lapses = lapses
		}
		if err := e.bus.PublishTasks(ctxT(t), []bus.Doorbell{{Namespace: ins.Namespace, Workflow: ins.Workflow, Task: task}}); err != nil {
			t.Fatal(err)
		}
		return ins.RunID
	}
	once := queueAfterLapses("once", 1)
	waitFor(t, "the run with one lapse beside the busy ones", func() bool { return active.Load() == 4 })
	suspect := queueAfterLapses("suspect", 2)
	status := func() (st, owner string) {
		err := e.pool.QueryRow(ctxT(t), `SELECT status, coalesce(lease_owner, '') FROM workflow_runs WHERE id = $1`, suspect).Scan(&st, &owner)
		if err != nil {
			t.Fatal(err)
		}
		return st, owner
	}
	if hinted {
		// Room is made before the claim: the run stays QUEUED, costing nothing should
		// this executor die, until the busy ones are done.
		time.Sleep(300 * time.Millisecond)
		if st, _ := status(); st != "QUEUED" || active.Load() < 3 {
			t.Fatalf("suspect %s while %d bodies run, want QUEUED beside the 3 busy ones", st, active.Load())
		}
	} else {
		waitFor(t, "the suspect claimed by the worker", func() bool { _, owner := status(); return owner == w.ID() })
		if n := active.Load(); n < 3 {
			t.Fatalf("%d bodies active when the suspect was claimed: the test lost its timing", n)
		}
	}
	for range 2 {
		r, err := wf.Start(ctxT(t), c, input{Kind: "late"})
		if err != nil {
			t.Fatal(err)
		}
		runs = append(runs, r.ID)
	}
	for _, id := range append(runs, once, suspect) {
		info, err := c.Wait(ctxT(t), id)
		if err != nil || info.Status != wire.StatusCompleted {
			t.Fatalf("run %s: %+v, %v", id, info, err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if beside["suspect"] != 0 {
		t.Errorf("the suspect's body ran beside %d others, want none", beside["suspect"])
	}
	if beside["once"] != 3 {
		t.Errorf("the run with one lapse ran beside %d others, want the 3 busy ones", beside["once"])
	}
	for _, s := range lateStarts {
		if s.Before(suspectEnd) {
			t.Errorf("a run started %s before the suspect ended", suspectEnd.Sub(s))
		}
	}
	if len(lateStarts) != 2 {
		t.Errorf("%d late runs ran, want 2", len(lateStarts))
	}
	if n := w.Stats().RanAlone; n != 1 {
		t.Errorf("RanAlone = %d, want 1", n)
	}
}
