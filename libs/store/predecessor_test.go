package store_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

// A worker that holds its name's lock ends the attempts of the runs its earlier
// incarnations hold, as a lapsed lease would, and touches no other run.
func TestRunsExpirePredecessorLeases(t *testing.T) {
	t.Parallel()
	s, pool := newStore(t)
	ctx := context.Background()
	running := func(ns, owner string, maxAttempts int) wire.RunID {
		t.Helper()
		res, err := s.RunInsert(ctx, store.RunInsertParams{ID: wire.NewRunID(), Namespace: ns, Workflow: "wf",
			Input: []byte(`{}`), IdempotencyKey: wire.NewRunID(), MaxAttempts: maxAttempts})
		if err != nil {
			t.Fatal(err)
		}
		run, ok := claim(t, s, res.Dispatch, owner)
		if !ok {
			t.Fatalf("claim for %s failed", owner)
		}
		return run.ID
	}
	const self = "ex_c/200-bbbb"
	dead := running("default", "ex_c/100-aaaa", 5)        // an earlier incarnation: re-queued
	deadLast := running("default", "ex_c/101-cccc", 1)    // an earlier incarnation on its last attempt: FAILED
	mine := running("default", self, 5)                   // the caller's own
	sandboxed := running("default", self+"/sandbox-7", 5) // the caller's sandbox's
	likeTwin := running("default", "exxc/100-aaaa", 5)    // LIKE 'ex_c/%' would take it
	longer := running("default", "ex_c-2/100-aaaa", 5)    // another name that starts alike
	unnamed := running("default", "host-100-aaaa", 5)     // an unnamed worker
	otherNS := running("other", "ex_c/100-aaaa", 5)       // the same name in another namespace
	queued := insertRun(t, s, "queued").RunID             // not held at all

	es, err := s.RunsExpirePredecessorLeases(ctx, store.PredecessorLeasesParams{Namespace: "default", Name: "ex_c", Self: self, Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	got := map[wire.RunID]store.LeaseExpiry{}
	for _, e := range es {
		got[e.RunID] = e
	}
	if len(es) != 2 || got[dead].Status != wire.StatusQueued || got[deadLast].Status != wire.StatusFailed {
		t.Fatalf("expired = %+v, want %s QUEUED and %s FAILED", es, dead, deadLast)
	}
	if e := got[dead]; e.DispatchSeq != 2 || e.Lapses != 1 || e.Namespace != "default" || e.Workflow != "wf" {
		t.Fatalf("re-queued run's dispatch = %+v, want dispatch_seq 2, lapses 1", e)
	}

	type row struct {
		status, owner, reason string
		attempt, lapses       int
	}
	read := func(id wire.RunID) row {
		t.Helper()
		var r row
		err := pool.QueryRow(ctx, `SELECT status, coalesce(lease_owner, ''), coalesce(error, ''), attempt, lapses
			FROM workflow_runs WHERE id = $1`, id).Scan(&r.status, &r.owner, &r.reason, &r.attempt, &r.lapses)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	if r := read(dead); r.status != "QUEUED" || r.attempt != 2 || r.lapses != 1 || r.owner != "" {
		t.Fatalf("re-queued run = %+v", r)
	}
	// The reason a lapsed lease gives, word for word.
	if r := read(deadLast); r.status != "FAILED" || r.attempt != 1 || !strings.HasPrefix(r.reason, "lease expired on attempt 1 of 1: ") {
		t.Fatalf("failed run = %+v", r)
	}
	for id, owner := range map[wire.RunID]string{mine: self, sandboxed: self + "/sandbox-7", likeTwin: "exxc/100-aaaa", longer: "ex_c-2/100-aaaa",
		unnamed: "host-100-aaaa", otherNS: "ex_c/100-aaaa"} {
		if r := read(id); r.status != "RUNNING" || r.owner != owner || r.attempt != 1 || r.lapses != 0 {
			t.Errorf("run held by %s = %+v, want untouched", owner, r)
		}
	}
	if r := read(queued); r.status != "QUEUED" || r.attempt != 1 {
		t.Errorf("queued run = %+v, want untouched", r)
	}

	// Batches: Limit bounds each call; the next takes the rest.
	for range 3 {
		running("default", "ex_c/102-dddd", 5)
	}
	for _, want := range []int{2, 1, 0} {
		es, err := s.RunsExpirePredecessorLeases(ctx, store.PredecessorLeasesParams{Namespace: "default", Name: "ex_c", Self: self, Limit: 2})
		if err != nil || len(es) != want {
			t.Fatalf("batch = %d runs, %v; want %d", len(es), err, want)
		}
	}

	if _, err := s.RunsExpirePredecessorLeases(ctx, store.PredecessorLeasesParams{Namespace: "default", Self: self, Limit: 2}); !errors.Is(err, wire.ErrInvalidArgument) {
		t.Fatalf("no name: err = %v, want ErrInvalidArgument", err)
	}
}

// A worker that saw its sandbox process exit ends the attempts of the runs that process
// held, and only those.
func TestRunsExpireOwnerLeases(t *testing.T) {
	t.Parallel()
	s, pool := newStore(t)
	ctx := context.Background()
	running := func(ns, owner string) wire.RunID {
		t.Helper()
		res, err := s.RunInsert(ctx, store.RunInsertParams{ID: wire.NewRunID(), Namespace: ns, Workflow: "wf",
			Input: []byte(`{}`), IdempotencyKey: wire.NewRunID(), MaxAttempts: 5})
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := claim(t, s, res.Dispatch, owner); !ok {
			t.Fatalf("claim for %s failed", owner)
		}
		return res.Dispatch.RunID
	}
	const sandbox = "ex_c/300-eeee"
	dead := []wire.RunID{running("default", sandbox), running("default", sandbox), running("default", sandbox)}
	parent := running("default", "ex_c/200-bbbb")
	otherNS := running("other", sandbox)
	var got []wire.RunID
	for _, want := range []int{2, 1, 0} {
		es, err := s.RunsExpireOwnerLeases(ctx, "default", sandbox, 2)
		if err != nil || len(es) != want {
			t.Fatalf("batch = %d runs, %v; want %d", len(es), err, want)
		}
		for _, e := range es {
			if e.Status != wire.StatusQueued || e.DispatchSeq != 2 || e.Lapses != 1 {
				t.Fatalf("expired %+v, want QUEUED at dispatch 2 with 1 lapse", e)
			}
			got = append(got, e.RunID)
		}
	}
	slices.Sort(got)
	slices.Sort(dead)
	if !slices.Equal(got, dead) {
		t.Fatalf("expired %v, want %v", got, dead)
	}
	for id, owner := range map[wire.RunID]string{parent: "ex_c/200-bbbb", otherNS: sandbox} {
		var status, held string
		if err := pool.QueryRow(ctx, `SELECT status, coalesce(lease_owner, '') FROM workflow_runs WHERE id = $1`, id).Scan(&status, &held); err != nil {
			t.Fatal(err)
		}
		if status != "RUNNING" || held != owner {
			t.Errorf("run held by %s: %s under %q, want untouched", owner, status, held)
		}
	}
	if _, err := s.RunsExpireOwnerLeases(ctx, "default", "", 2); !errors.Is(err, wire.ErrInvalidArgument) {
		t.Fatalf("no owner: err = %v, want ErrInvalidArgument", err)
	}
}

// The name lock is held by one session at a time, per namespace and name, and freed
// when that session ends.
func TestWorkerNameLock(t *testing.T) {
	t.Parallel()
	url := testkit.NewDatabase(t)
	ctx := context.Background()
	connect := func() *pgx.Conn {
		t.Helper()
		c, err := pgx.Connect(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close(context.Background()) })
		return c
	}
	a, b := connect(), connect()
	try := func(c *pgx.Conn, ns, name string) bool {
		t.Helper()
		ok, err := store.New(c).WorkerNameTryLock(ctx, ns, name)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	if !try(a, "default", "exec-1") {
		t.Fatal("first lock refused")
	}
	if try(b, "default", "exec-1") {
		t.Fatal("a second session took a name another holds")
	}
	if !try(b, "default", "exec-2") || !try(b, "other", "exec-1") {
		t.Fatal("another name, or the same name in another namespace, refused")
	}
	// The holder's session ends (its process was killed, say): the name is free once the
	// server has ended the backend, which it does on its own time.
	if err := a.Close(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !try(b, "default", "exec-1") {
		if time.Now().After(deadline) {
			t.Fatal("the name stayed taken after its holder's session ended")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
