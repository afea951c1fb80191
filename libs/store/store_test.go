package store_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

func newStore(t *testing.T, opts ...store.ConnectOption) (*store.Store, *pgxpool.Pool) {
	t.Helper()
	url := testkit.NewDatabase(t)
	pool, err := store.Connect(context.Background(), url, 8, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return store.New(pool), pool
}

func insertRun(t *testing.T, s *store.Store, key string) store.RunInsertResult {
	t.Helper()
	res, err := s.RunInsert(context.Background(), store.RunInsertParams{
		ID: wire.NewRunID(), Namespace: "default", Workflow: "wf", Input: []byte(`{"a":1}`), IdempotencyKey: key,
	})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func claim(t *testing.T, s *store.Store, d store.Dispatch, owner string) (store.ClaimedRun, bool) {
	t.Helper()
	run, ok, err := s.RunClaim(context.Background(), store.RunClaimParams{
		RunID: d.RunID, DispatchSeq: d.DispatchSeq, Namespace: d.Namespace, Workflow: d.Workflow, Owner: owner, Lease: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	return run, ok
}

func TestRunInsertIdempotent(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t)
	ctx := context.Background()
	first := insertRun(t, s, "k1")
	again, err := s.RunInsert(ctx, store.RunInsertParams{ID: wire.NewRunID(), Namespace: "default", Workflow: "wf", Input: []byte(`{"a":1}`), IdempotencyKey: "k1"})
	if err != nil {
		t.Fatal(err)
	}
	if !again.Existing || again.RunID != first.RunID {
		t.Fatalf("second insert = %+v, want existing run %s", again, first.RunID)
	}
	_, err = s.RunInsert(ctx, store.RunInsertParams{ID: wire.NewRunID(), Namespace: "default", Workflow: "wf", Input: []byte(`{"a":2}`), IdempotencyKey: "k1"})
	if !errors.Is(err, wire.ErrIdempotencyConflict) {
		t.Fatalf("different input: err = %v, want ErrIdempotencyConflict", err)
	}
}

func TestClaimFenceAndSteps(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t)
	ctx := context.Background()
	d := insertRun(t, s, "k").Dispatch

	// A stale or forged doorbell claims nothing.
	stale := d
	stale.DispatchSeq = 7
	if _, ok := claim(t, s, stale, "a"); ok {
		t.Fatal("claim with a wrong dispatch_seq succeeded")
	}
	run, ok := claim(t, s, d, "a")
	if !ok || run.Fence != 1 || run.Attempt != 1 || string(run.Input) != `{"a":1}` || run.NotBefore != nil {
		t.Fatalf("claim = %+v ok=%v", run, ok)
	}
	if _, ok := claim(t, s, d, "b"); ok {
		t.Fatal("second claim of the same dispatch succeeded")
	}
	fp := run.Fenced()
	if err := s.StepInsert(ctx, store.StepInsertParams{FencedParams: fp, Key: "s1", Seq: 0, Kind: wire.StepKindStep, Output: []byte(`1`)}); err != nil {
		t.Fatal(err)
	}
	stalefp := store.FencedParams{RunID: run.ID, Fence: run.Fence - 1, Owner: run.Owner}
	if err := s.StepInsert(ctx, store.StepInsertParams{FencedParams: stalefp, Key: "s2", Seq: 1, Kind: wire.StepKindStep}); !errors.Is(err, wire.ErrLeaseLost) {
		t.Fatalf("stale fence step insert err = %v, want ErrLeaseLost", err)
	}
	if err := s.StepInsert(ctx, store.StepInsertParams{FencedParams: fp, Key: "s1", Seq: 1, Kind: wire.StepKindStep}); !errors.Is(err, store.ErrStepExists) {
		t.Fatalf("duplicate step err = %v", err)
	}

	// Sleep, wake with a pinned clock, re-claim: the steps come back with the claim.
	wake, err := s.RunSleep(ctx, store.RunSleepParams{FencedParams: fp, StepKey: "nap", Seq: 1, Duration: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	// The same park sent again (its answer lost) is answered as the first; another sleep
	// under the fence of the parked run is refused.
	if again, err := s.RunSleep(ctx, store.RunSleepParams{FencedParams: fp, StepKey: "nap", Seq: 1, Duration: time.Hour}); err != nil || !again.Equal(wake) {
		t.Fatalf("repeated park = %v, %v; want the first one's %v", again, err, wake)
	}
	if _, err := s.RunSleep(ctx, store.RunSleepParams{FencedParams: fp, StepKey: "nap#2", Seq: 2, Duration: time.Hour}); !errors.Is(err, wire.ErrLeaseLost) {
		t.Fatalf("another sleep of the parked run err = %v, want ErrLeaseLost", err)
	}
	if due, err := s.RunsWakeDue(ctx, store.SweepParams{Limit: 10}); err != nil || len(due) != 0 {
		t.Fatalf("wake before due = %v, %v", due, err)
	}
	// A wake lead wakes the run that long ahead of its wake time, and no further ahead.
	early := wake.Add(-time.Second)
	if due, err := s.RunsWakeDue(ctx, store.SweepParams{Now: &early, Limit: 10, WakeLead: time.Second - time.Millisecond}); err != nil || len(due) != 0 {
		t.Fatalf("wake more than the lead ahead = %v, %v", due, err)
	}
	due, err := s.RunsWakeDue(ctx, store.SweepParams{Now: &early, Limit: 10, WakeLead: time.Second})
	if err != nil || len(due) != 1 || due[0].DispatchSeq != 2 {
		t.Fatalf("wake at due less the lead = %+v, %v", due, err)
	}
	if err := s.RunComplete(ctx, fp, []byte(`"late"`)); !errors.Is(err, wire.ErrLeaseLost) {
		t.Fatalf("complete after sleep err = %v, want ErrLeaseLost", err)
	}
	run2, ok := claim(t, s, due[0], "b")
	if !ok || run2.Fence != 2 || len(run2.Steps) != 2 || run2.Steps[1].Kind != wire.StepKindSleep || !run2.Steps[1].WakeAt.Equal(wake) {
		t.Fatalf("re-claim = %+v ok=%v", run2, ok)
	}
	// Claimed an hour ahead of its wake time: the claim says when it may go on.
	if run2.NotBefore == nil || !run2.NotBefore.Equal(wake) {
		t.Fatalf("re-claim NotBefore = %v, want the wake time %v", run2.NotBefore, wake)
	}
	fp2 := run2.Fenced()
	if err := s.RunComplete(ctx, fp2, []byte(`"done"`)); err != nil {
		t.Fatal(err)
	}
	info, err := s.RunGet(ctx, "default", run.ID)
	if err != nil || info.Status != wire.StatusCompleted || string(info.Output) != `"done"` || len(info.Steps) != 2 {
		t.Fatalf("get = %+v, %v", info, err)
	}
	if _, err := s.RunGet(ctx, "other", run.ID); !errors.Is(err, wire.ErrRunNotFound) {
		t.Fatalf("get from another namespace err = %v", err)
	}
}

func TestLeaseExpiryAndRetries(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t)
	ctx := context.Background()
	d := insertRun(t, s, "k").Dispatch
	for attempt := 1; attempt <= 5; attempt++ {
		run, ok := claim(t, s, d, "a")
		if !ok || run.Attempt != attempt {
			t.Fatalf("attempt %d: claim = %+v ok=%v", attempt, run, ok)
		}
		kept, err := s.RunsExtendLeases(ctx, "a", time.Minute, []store.Held{{RunID: run.ID, Fence: run.Fence}, {RunID: run.ID, Fence: run.Fence - 1}})
		if err != nil || len(kept) != 1 {
			t.Fatalf("extend = %v, %v", kept, err)
		}
		future := time.Now().Add(2 * time.Minute)
		exp, err := s.RunsExpireLeases(ctx, store.SweepParams{Now: &future, Limit: 10})
		if err != nil || len(exp) != 1 {
			t.Fatalf("expire = %+v, %v", exp, err)
		}
		if attempt < 5 {
			if exp[0].Status != wire.StatusQueued {
				t.Fatalf("attempt %d: status %s", attempt, exp[0].Status)
			}
			d = exp[0].Dispatch
		} else if exp[0].Status != wire.StatusFailed {
			t.Fatalf("last attempt: status %s, want FAILED", exp[0].Status)
		}
	}

	d = insertRun(t, s, "k2").Dispatch
	run, _ := claim(t, s, d, "a")
	res, err := s.RunFail(ctx, store.RunFailParams{FencedParams: run.Fenced(), Error: "boom", Retry: true, Backoff: time.Second})
	if err != nil || res.Status != wire.StatusSleeping || res.Attempt != 2 || res.WakeAt == nil {
		t.Fatalf("fail with retry = %+v, %v", res, err)
	}
	next, err := s.RunsNextDue(ctx, time.Minute, time.Minute)
	if err != nil || next.Wake == nil || !next.Wake.Equal(*res.WakeAt) {
		t.Fatalf("next due = %+v, %v", next, err)
	}
}

func TestRedispatchOnlyServedWorkflows(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t)
	ctx := context.Background()
	insertRun(t, s, "k")
	later := time.Now().Add(time.Hour)
	p := store.RedispatchParams{SweepParams: store.SweepParams{Now: &later, Limit: 10}, StaleAfter: time.Minute, LiveWithin: 2 * time.Hour}
	got, err := s.RunsRedispatchStale(ctx, p)
	if err != nil || len(got) != 0 {
		t.Fatalf("redispatch with no worker = %v, %v", got, err)
	}
	if err := s.WorkerHeartbeat(ctx, store.Worker{ID: "w1", Namespace: "default", Workflows: []string{"wf"}}); err != nil {
		t.Fatal(err)
	}
	got, err = s.RunsRedispatchStale(ctx, p)
	if err != nil || len(got) != 1 || got[0].DispatchSeq != 1 || got[0].Resend != 1 {
		t.Fatalf("redispatch = %+v, %v", got, err)
	}
	// A relay, not a new dispatch: the doorbell that was only late still claims the run.
	if _, ok := claim(t, s, store.Dispatch{RunID: got[0].RunID, Namespace: "default", Workflow: "wf", DispatchSeq: 1}, "late"); !ok {
		t.Fatal("the original dispatch no longer claims the run after a relay")
	}
}

// A pool names its sessions unless the URL already does.
func TestApplicationName(t *testing.T) {
	t.Parallel()
	url := testkit.NewDatabase(t)
	for _, c := range []struct{ url, want string }{
		{url, "kagzi-test"},
		{url + map[bool]string{true: "&", false: "?"}[strings.Contains(url, "?")] + "application_name=mine", "mine"},
	} {
		pool, err := store.Connect(context.Background(), c.url, 1, store.ApplicationName("kagzi-test"))
		if err != nil {
			t.Fatal(err)
		}
		var got string
		err = pool.QueryRow(context.Background(), `SHOW application_name`).Scan(&got)
		pool.Close()
		if err != nil || got != c.want {
			t.Errorf("application_name = %q (%v), want %q", got, err, c.want)
		}
	}
}

// Lapses count the attempts in a row that ended with the lease lapsing; an attempt that
// ends any other way (a park, a failure with a retry) starts the count again, and one
// that lapsed after recording a step starts it again at 1.
func TestLapsesInARow(t *testing.T) {
	t.Parallel()
	s, pool := newStore(t)
	ctx := context.Background()
	d := insertRun(t, s, "lapses").Dispatch
	// Enough attempts for every lapse below.
	if _, err := pool.Exec(ctx, `UPDATE workflow_runs SET max_attempts = 20 WHERE id = $1`, d.RunID); err != nil {
		t.Fatal(err)
	}
	far := time.Now().Add(24 * time.Hour)
	expire := func() store.Dispatch {
		t.Helper()
		es, err := s.RunsExpireLeases(ctx, store.SweepParams{Now: &far, Limit: 10})
		if err != nil || len(es) != 1 {
			t.Fatalf("expire = %+v, %v", es, err)
		}
		return es[0].Dispatch
	}
	wakeUp := func() store.Dispatch {
		t.Helper()
		ds, err := s.RunsWakeDue(ctx, store.SweepParams{Now: &far, Limit: 10})
		if err != nil || len(ds) != 1 {
			t.Fatalf("wake = %+v, %v", ds, err)
		}
		return ds[0]
	}
	var got []int
	run, _ := claim(t, s, d, "a")
	got = append(got, run.Lapses)
	run, _ = claim(t, s, expire(), "b")
	got = append(got, run.Lapses)
	run, _ = claim(t, s, expire(), "c")
	got = append(got, run.Lapses)
	if _, err := s.RunSleep(ctx, store.RunSleepParams{FencedParams: run.Fenced(), StepKey: "nap", Duration: time.Second}); err != nil {
		t.Fatal(err)
	}
	run, _ = claim(t, s, wakeUp(), "d")
	got = append(got, run.Lapses)
	run, _ = claim(t, s, expire(), "e")
	got = append(got, run.Lapses)
	if _, err := s.RunFail(ctx, store.RunFailParams{FencedParams: run.Fenced(), Error: "x", Retry: true, Backoff: time.Second}); err != nil {
		t.Fatal(err)
	}
	run, _ = claim(t, s, wakeUp(), "f")
	got = append(got, run.Lapses)
	run, _ = claim(t, s, expire(), "g")
	got = append(got, run.Lapses)
	// This attempt gets on (records a step) before its executor dies: a run that only
	// stood beside a culprit, not one.
	if err := s.StepInsert(ctx, store.StepInsertParams{FencedParams: run.Fenced(),
		Key: "progress", Seq: 1, Kind: wire.StepKindStep, Output: []byte(`1`), Attempt: run.Attempt}); err != nil {
		t.Fatal(err)
	}
	run, _ = claim(t, s, expire(), "h")
	got = append(got, run.Lapses)
	run, _ = claim(t, s, expire(), "i")
	got = append(got, run.Lapses)
	// A sleep waited out in process is progress too: its row names this attempt.
	if _, _, err := s.StepSleepInsert(ctx, store.RunSleepParams{FencedParams: run.Fenced(),
		StepKey: "local-nap", Seq: 2, Duration: time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	run, _ = claim(t, s, expire(), "j")
	got = append(got, run.Lapses)
	if want := []int{0, 1, 2, 0, 1, 0, 1, 1, 2, 1}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("lapses at each claim = %v, want %v", got, want)
	}
}

// A run of a workflow whose doorbells are backlogged in the stream may only be waiting
// its turn: it is relayed after BackloggedStaleAfter, not StaleAfter.
func TestRedispatchWaitsOutABacklog(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t)
	ctx := context.Background()
	insertRun(t, s, "behind-a-backlog")
	if err := s.WorkerHeartbeat(ctx, store.Worker{ID: "w1", Namespace: "default", Workflows: []string{"wf"}}); err != nil {
		t.Fatal(err)
	}
	served, err := s.WorkflowsServed(ctx, time.Hour)
	if err != nil || len(served) != 1 || served[0] != (store.Served{Namespace: "default", Workflow: "wf"}) {
		t.Fatalf("served = %+v, %v", served, err)
	}
	relay := func(after time.Duration, backlogged []string) int {
		t.Helper()
		at := time.Now().Add(after)
		got, err := s.RunsRedispatchStale(ctx, store.RedispatchParams{SweepParams: store.SweepParams{Now: &at, Limit: 10},
			StaleAfter: time.Minute, LiveWithin: 24 * time.Hour, Backlogged: backlogged, BackloggedStaleAfter: 10 * time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		return len(got)
	}
	if n := relay(2*time.Minute, []string{"default/wf"}); n != 0 {
		t.Fatalf("relayed %d runs of a backlogged workflow after 2 min, want 0", n)
	}
	if n := relay(2*time.Minute, []string{"default/other"}); n != 1 {
		t.Fatalf("relayed %d runs when another workflow is backlogged, want 1", n)
	}
	if n := relay(20*time.Minute, []string{"default/wf"}); n != 1 {
		t.Fatalf("relayed %d runs of a backlogged workflow after 20 min, want 1", n)
	}
}

// A run QUEUED before the task stream was made anew lost its doorbell with the old
// stream: LostBefore relays it at once, stale or not, and only it. A run queued after
// the loss is left to the sweep's stale rule, even where that rule would take it.
func TestRedispatchRelaysWhatALostStreamHeld(t *testing.T) {
	t.Parallel()
	s, pool := newStore(t)
	ctx := context.Background()
	if err := s.WorkerHeartbeat(ctx, store.Worker{ID: "w1", Namespace: "default", Workflows: []string{"wf"}}); err != nil {
		t.Fatal(err)
	}
	before := insertRun(t, s, "queued-before-the-loss").Dispatch
	var lostAt time.Time
	if err := pool.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&lostAt); err != nil {
		t.Fatal(err)
	}
	insertRun(t, s, "queued-after-the-loss")
	stale := time.Hour
	relay := func(lostBefore time.Time) []store.Dispatch {
		t.Helper()
		got, err := s.RunsRedispatchStale(ctx, store.RedispatchParams{SweepParams: store.SweepParams{Limit: 10},
			StaleAfter: stale, LiveWithin: time.Hour, LostBefore: lostBefore})
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	if got := relay(time.Time{}); len(got) != 0 {
		t.Fatalf("relayed %d fresh runs with no loss, want 0", len(got))
	}
	// Both runs are now stale and their workflow is not backlogged: the stale rule alone
	// would relay both.
	stale = time.Microsecond
	got := relay(lostAt)
	if len(got) != 1 || got[0].RunID != before.RunID || got[0].DispatchSeq != before.DispatchSeq || got[0].Resend != 1 {
		t.Fatalf("relayed %+v, want only run %s, same dispatch, first relay", got, before.RunID)
	}
	// Its queued_at restarted: a second look at the same loss relays nothing.
	if got := relay(lostAt); len(got) != 0 {
		t.Fatalf("relayed %d runs on a second look at the same loss, want 0", len(got))
	}
}

// A refusal (an ERROR) rolled its transaction back: the caller need not ask whether it
// committed. A connection lost mid-statement, or a backend terminated (a FATAL), leaves
// that unknown.
func TestRejected(t *testing.T) {
	t.Parallel()
	_, pool := newStore(t)
	ctx := context.Background()
	_, err := pool.Exec(ctx, `SELECT 1 / (SELECT count(*) FROM workflow_runs)`)
	if err == nil || !store.Rejected(err) {
		t.Fatalf("division by zero: err = %v, Rejected = false", err)
	}
	if store.Rejected(fmt.Errorf("claim 3 runs: %w", err)) != true {
		t.Fatal("a wrapped refusal is not Rejected")
	}

	conn, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	var pid int
	if err := conn.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := conn.Exec(ctx, `SELECT pg_sleep(30)`)
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	if _, err := pool.Exec(ctx, `SELECT pg_terminate_backend($1)`, pid); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err == nil || store.Rejected(err) {
		t.Fatalf("terminated backend: err = %v, Rejected = true", err)
	}
	if store.Rejected(context.DeadlineExceeded) || store.Rejected(nil) {
		t.Fatal("a timeout or no error is Rejected")
	}
}
