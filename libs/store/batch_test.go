package store_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

func TestBatchClaimStepsComplete(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t)
	ctx := context.Background()
	var reqs []store.ClaimRequest
	for i := range 4 {
		d := insertRun(t, s, "k"+string(rune('a'+i))).Dispatch
		reqs = append(reqs, store.ClaimRequest{RunID: d.RunID, DispatchSeq: d.DispatchSeq, Workflow: d.Workflow})
	}
	// A duplicate doorbell in the same batch, a stale one and a forged one claim nothing.
	reqs = append(reqs, reqs[0],
		store.ClaimRequest{RunID: reqs[1].RunID, DispatchSeq: 9, Workflow: "wf"},
		store.ClaimRequest{RunID: wire.NewRunID(), DispatchSeq: 1, Workflow: "wf"})
	res := s.RunsClaim(ctx, "default", "exec", time.Minute, reqs)
	for i, r := range res {
		if r.Err != nil {
			t.Fatal(r.Err)
		}
		if want := i < 4; r.OK != want {
			t.Fatalf("claim %d ok = %v, want %v", i, r.OK, want)
		}
	}
	run0 := res[0].Run
	if run0.Fence != 1 || string(run0.Input) != `{"a":1}` || run0.Workflow != "wf" {
		t.Fatalf("claimed run = %+v", run0)
	}

	var steps []store.StepInsertParams
	for i := range 4 {
		steps = append(steps, store.StepInsertParams{FencedParams: res[i].Run.Fenced(),
			Key: "s", Seq: 0, Kind: wire.StepKindStep, Output: []byte(`1`)})
	}
	steps[3].Fence = 0 // a zombie's write
	errs := s.StepsInsert(ctx, steps)
	for i := range 3 {
		if errs[i] != nil {
			t.Fatalf("step %d: %v", i, errs[i])
		}
	}
	if !errors.Is(errs[3], wire.ErrLeaseLost) {
		t.Fatalf("stale step err = %v, want ErrLeaseLost", errs[3])
	}
	if errs := s.StepsInsert(ctx, steps[:1]); !errors.Is(errs[0], store.ErrStepExists) {
		t.Fatalf("re-insert err = %v, want ErrStepExists", errs[0])
	}

	var comps []store.CompleteRequest
	for i := range 4 {
		comps = append(comps, store.CompleteRequest{FencedParams: res[i].Run.Fenced(), Output: []byte(`"ok"`)})
	}
	comps[2].Fence = 7
	cerrs := s.RunsComplete(ctx, comps)
	if cerrs[0] != nil || cerrs[1] != nil || cerrs[3] != nil || !errors.Is(cerrs[2], wire.ErrLeaseLost) {
		t.Fatalf("complete errs = %v", cerrs)
	}
	// Completing again under the same fence (a retry after an ambiguous commit) is fine;
	// under another fence it is refused.
	again := s.RunsComplete(ctx, []store.CompleteRequest{comps[0], {FencedParams: store.FencedParams{RunID: comps[1].RunID, Fence: 5, Owner: comps[1].Owner}}})
	if again[0] != nil || !errors.Is(again[1], wire.ErrLeaseLost) {
		t.Fatalf("complete again errs = %v", again)
	}
	// A re-claim after a sleep brings each run's steps along.
	fp := res[2].Run.Fenced()
	if _, err := s.RunSleep(ctx, store.RunSleepParams{FencedParams: fp, StepKey: "nap", Seq: 1}); err != nil {
		t.Fatal(err)
	}
	due, err := s.RunsWakeDue(ctx, store.SweepParams{Limit: 10})
	if err != nil || len(due) != 1 {
		t.Fatalf("wake = %v, %v", due, err)
	}
	reclaim := s.RunsClaim(ctx, "default", "exec", time.Minute, []store.ClaimRequest{{RunID: due[0].RunID, DispatchSeq: due[0].DispatchSeq, Workflow: "wf"}})
	if !reclaim[0].OK || len(reclaim[0].Run.Steps) != 2 || reclaim[0].Run.Fence != 2 {
		t.Fatalf("re-claim = %+v", reclaim[0])
	}
	// A batch of a first dispatch and a later one: only the later run has steps, and
	// gets them (a batch of first dispatches only does not read steps at all). The later
	// one is woken an hour early, and its claim says so.
	fp = reclaim[0].Run.Fenced()
	wake, err := s.RunSleep(ctx, store.RunSleepParams{FencedParams: fp, StepKey: "nap2", Seq: 2, Duration: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if due, err = s.RunsWakeDue(ctx, store.SweepParams{Limit: 10, WakeLead: 2 * time.Hour}); err != nil || len(due) != 1 {
		t.Fatalf("wake = %v, %v", due, err)
	}
	fresh := insertRun(t, s, "fresh")
	mixed := s.RunsClaim(ctx, "default", "exec", time.Minute, []store.ClaimRequest{
		{RunID: fresh.RunID, DispatchSeq: fresh.DispatchSeq, Workflow: "wf"},
		{RunID: due[0].RunID, DispatchSeq: due[0].DispatchSeq, Workflow: "wf"}})
	if !mixed[0].OK || len(mixed[0].Run.Steps) != 0 || !mixed[1].OK || len(mixed[1].Run.Steps) != 3 {
		t.Fatalf("mixed claim = %+v", mixed)
	}
	if nb := mixed[1].Run.NotBefore; mixed[0].Run.NotBefore != nil || nb == nil || !nb.Equal(wake) {
		t.Fatalf("mixed claim NotBefore = %v and %v, want none and %v", mixed[0].Run.NotBefore, nb, wake)
	}
}

func TestRunsInsertBatch(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t)
	ctx := context.Background()
	existing := insertRun(t, s, "taken")
	p := func(key, input string) store.RunInsertParams {
		return store.RunInsertParams{ID: wire.NewRunID(), Namespace: "default", Workflow: "wf", Input: []byte(input), IdempotencyKey: key}
	}
	reqs := []store.RunInsertParams{p("new-1", `1`), p("taken", `{"a":1}`), p("taken", `2`), p("new-2", `2`), p("new-2", `2`)}
	res := s.RunsInsert(ctx, reqs)
	switch {
	case res[0].Err != nil || res[0].Existing || res[0].RunID != reqs[0].ID:
		t.Fatalf("new run: %+v", res[0])
	case res[1].Err != nil || !res[1].Existing || res[1].RunID != existing.RunID || res[1].Status != wire.StatusQueued ||
		res[1].DispatchSeq != existing.DispatchSeq || res[1].Workflow != "wf" || res[1].Namespace != "default":
		t.Fatalf("same key, same input: %+v", res[1])
	case !errors.Is(res[2].Err, wire.ErrIdempotencyConflict):
		t.Fatalf("same key, other input: %+v", res[2])
	case res[3].Err != nil || res[4].Err != nil || res[4].RunID != res[3].RunID || !res[4].Existing:
		t.Fatalf("a key twice in one batch: %+v / %+v", res[3], res[4])
	}
	// A run id already taken fails only its own start.
	dup := p("other", `1`)
	dup.ID = existing.RunID
	res = s.RunsInsert(ctx, []store.RunInsertParams{p("fine", `1`), dup})
	if res[0].Err != nil || !errors.Is(res[1].Err, wire.ErrIdempotencyConflict) {
		t.Fatalf("id collision: %+v / %+v", res[0], res[1])
	}
}

func TestRunClaimRecheck(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t)
	ctx := context.Background()
	d := insertRun(t, s, "recheck").Dispatch
	req := store.ClaimRequest{RunID: d.RunID, DispatchSeq: d.DispatchSeq, Workflow: d.Workflow}
	recheck := func(owner string, r store.ClaimRequest) (store.ClaimedRun, bool) {
		t.Helper()
		run, ok, err := s.RunClaimRecheck(ctx, "default", owner, r)
		if err != nil {
			t.Fatal(err)
		}
		return run, ok
	}
	if _, ok := recheck("exec", req); ok {
		t.Fatalf("a claim that never ran is confirmed")
	}
	claimed := s.RunsClaim(ctx, "default", "exec", time.Minute, []store.ClaimRequest{req})[0]
	if !claimed.OK {
		t.Fatalf("claim = %+v", claimed)
	}
	fp := claimed.Run.Fenced()
	if err := s.StepsInsert(ctx, []store.StepInsertParams{{FencedParams: fp, Key: "s", Kind: wire.StepKindStep, Output: []byte(`1`)}})[0]; err != nil {
		t.Fatal(err)
	}
	run, ok := recheck("exec", req)
	if !ok || run.Fence != claimed.Run.Fence || run.Attempt != 1 || string(run.Input) != `{"a":1}` || len(run.Steps) != 1 ||
		run.Workflow != "wf" || run.Namespace != "default" || !run.LeaseExpiresAt.After(run.DBNow) {
		t.Fatalf("recheck of the owner's claim = %+v, %v", run, ok)
	}
	if _, ok := recheck("other", req); ok {
		t.Fatalf("another owner's claim is confirmed")
	}
	if _, ok := recheck("exec", store.ClaimRequest{RunID: d.RunID, DispatchSeq: d.DispatchSeq + 1, Workflow: d.Workflow}); ok {
		t.Fatalf("a claim of another dispatch is confirmed")
	}
	if err := s.RunsComplete(ctx, []store.CompleteRequest{{FencedParams: fp, Output: []byte(`1`)}})[0]; err != nil {
		t.Fatal(err)
	}
	if _, ok := recheck("exec", req); ok {
		t.Fatalf("a claim of a finished run is confirmed")
	}
}

// A completion that carries the run's last step records both in one transaction, or
// neither: a zombie's (stale fence) gets ErrLeaseLost and writes no step, and a retry of
// a completion that committed (an ambiguous answer) succeeds without a second row.
func TestCompleteWithLastStep(t *testing.T) {
	t.Parallel()
	s, pool := newStore(t)
	ctx := context.Background()
	var reqs []store.ClaimRequest
	for _, k := range []string{"last-a", "last-b", "last-c"} {
		d := insertRun(t, s, k).Dispatch
		reqs = append(reqs, store.ClaimRequest{RunID: d.RunID, DispatchSeq: d.DispatchSeq, Workflow: d.Workflow})
	}
	res := s.RunsClaim(ctx, "default", "exec", time.Minute, reqs)
	comps := make([]store.CompleteRequest, len(res))
	for i, r := range res {
		if !r.OK {
			t.Fatalf("claim %d: %+v", i, r)
		}
		comps[i] = store.CompleteRequest{FencedParams: r.Run.Fenced(), Output: []byte(`"done"`),
			Step: &store.StepInsertParams{Key: "last", Seq: 0, Kind: wire.StepKindStep, Output: []byte(`3`)}}
	}
	comps[1].Fence = 9 // a zombie's
	comps[2].Step = nil
	errs := s.RunsComplete(ctx, comps)
	if errs[0] != nil || !errors.Is(errs[1], wire.ErrLeaseLost) || errs[2] != nil {
		t.Fatalf("complete errs = %v", errs)
	}
	if again := s.RunsComplete(ctx, comps[:1]); again[0] != nil {
		t.Fatalf("retried completion: %v", again[0])
	}
	for i, want := range []struct {
		status string
		steps  int
	}{{"COMPLETED", 1}, {"RUNNING", 0}, {"COMPLETED", 0}} {
		var status string
		var steps int
		err := pool.QueryRow(ctx, `SELECT status, (SELECT count(*) FROM step_runs WHERE run_id = $1) FROM workflow_runs WHERE id = $1`,
			res[i].Run.ID).Scan(&status, &steps)
		if err != nil || status != want.status || steps != want.steps {
			t.Errorf("run %d: %s with %d steps (%v), want %s with %d", i, status, steps, err, want.status, want.steps)
		}
	}
	var out []byte
	if err := pool.QueryRow(ctx, `SELECT output FROM step_runs WHERE run_id = $1 AND step_key = 'last'`, res[0].Run.ID).Scan(&out); err != nil || string(out) != `3` {
		t.Fatalf("last step output = %q, %v", out, err)
	}
}
