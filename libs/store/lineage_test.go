package store_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

func child(parent, key string, depth, treeRuns int) store.RunInsertChildParams {
	return store.RunInsertChildParams{
		RunInsertParams: store.RunInsertParams{ID: wire.NewRunID(), Namespace: "default", Workflow: "wf",
			Input: []byte(`{"c":1}`), IdempotencyKey: key},
		Parent: parent, MaxDepth: depth, MaxTreeRuns: treeRuns,
	}
}

type lineage struct {
	parent, root *string
	depth        int
}

func lineageOf(t *testing.T, pool *pgxpool.Pool, id string) lineage {
	t.Helper()
	var l lineage
	if err := pool.QueryRow(context.Background(), `SELECT parent_id::text, root_id::text, depth FROM workflow_runs WHERE id = $1`,
		id).Scan(&l.parent, &l.root, &l.depth); err != nil {
		t.Fatalf("read lineage of %s: %v", id, err)
	}
	return l
}

func countRuns(t *testing.T, pool *pgxpool.Pool) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM workflow_runs`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestRunInsertChildDepth(t *testing.T) {
	t.Parallel()
	s, pool := newStore(t)
	ctx := context.Background()
	root := insertRun(t, s, "root").RunID
	c1, err := s.RunInsertChild(ctx, child(root, "c1", 2, 100))
	if err != nil {
		t.Fatal(err)
	}
	c2, err := s.RunInsertChild(ctx, child(c1.RunID, "c2", 2, 100))
	if err != nil {
		t.Fatal(err)
	}
	if l := lineageOf(t, pool, root); l.parent != nil || l.root != nil || l.depth != 0 {
		t.Errorf("root lineage %+v, want none at depth 0", l)
	}
	if l := lineageOf(t, pool, c1.RunID); *l.parent != root || *l.root != root || l.depth != 1 {
		t.Errorf("child lineage parent %s root %s depth %d, want %s %s 1", *l.parent, *l.root, l.depth, root, root)
	}
	if l := lineageOf(t, pool, c2.RunID); *l.parent != c1.RunID || *l.root != root || l.depth != 2 {
		t.Errorf("grandchild lineage parent %s root %s depth %d, want %s %s 2", *l.parent, *l.root, l.depth, c1.RunID, root)
	}
	_, err = s.RunInsertChild(ctx, child(c2.RunID, "c3", 2, 100))
	if !errors.Is(err, wire.ErrLimitExceeded) {
		t.Fatalf("child at depth 3 with max depth 2: err = %v, want ErrLimitExceeded", err)
	}
	if n := countRuns(t, pool); n != 3 {
		t.Fatalf("%d runs after a refused child, want 3", n)
	}
}

func TestRunInsertChildTreeLimit(t *testing.T) {
	t.Parallel()
	s, pool := newStore(t)
	ctx := context.Background()
	root := insertRun(t, s, "root").RunID
	var kids []string
	for i := range 3 {
		r, err := s.RunInsertChild(ctx, child(root, fmt.Sprintf("c%d", i), 10, 3))
		if err != nil {
			t.Fatalf("child %d of 3: %v", i, err)
		}
		kids = append(kids, r.RunID)
	}
	// A grandchild counts against the same tree.
	if _, err := s.RunInsertChild(ctx, child(kids[0], "g", 10, 3)); !errors.Is(err, wire.ErrLimitExceeded) {
		t.Fatalf("fourth unfinished run of a tree limited to 3: err = %v, want ErrLimitExceeded", err)
	}

	// At the limit, a retried start still gets its run; another input still conflicts.
	again, err := s.RunInsertChild(ctx, child(root, "c1", 10, 3))
	if err != nil || !again.Existing || again.RunID != kids[1] {
		t.Fatalf("retried start at the limit = %+v, %v; want existing run %s", again, err, kids[1])
	}
	other := child(root, "c1", 10, 3)
	other.Input = []byte(`{"c":2}`)
	if _, err := s.RunInsertChild(ctx, other); !errors.Is(err, wire.ErrIdempotencyConflict) {
		t.Fatalf("retried start with another input: err = %v, want ErrIdempotencyConflict", err)
	}

	// Only unfinished runs count: a finished child makes room for one more.
	for i, status := range []string{"COMPLETED", "FAILED"} {
		if _, err := pool.Exec(ctx, `UPDATE workflow_runs SET status = $2 WHERE id = $1`, kids[0], status); err != nil {
			t.Fatal(err)
		}
		g, err := s.RunInsertChild(ctx, child(kids[0], "g-"+status, 10, 3))
		if err != nil {
			t.Fatalf("child after one ended %s: %v", status, err)
		}
		if l := lineageOf(t, pool, g.RunID); *l.root != root || l.depth != 2+i {
			t.Errorf("descendant root %s depth %d, want %s %d", *l.root, l.depth, root, 2+i)
		}
		kids[0] = g.RunID
	}
	if n := countRuns(t, pool); n != 6 {
		t.Fatalf("%d runs, want 6 (root, 3 children, a grandchild and its child)", n)
	}
}

func TestRunInsertChildParentElsewhere(t *testing.T) {
	t.Parallel()
	s, pool := newStore(t)
	ctx := context.Background()
	root := insertRun(t, s, "root").RunID
	p := child(root, "c", 10, 100)
	p.Namespace = "other"
	if _, err := s.RunInsertChild(ctx, p); !errors.Is(err, wire.ErrRunNotFound) {
		t.Fatalf("parent in another namespace: err = %v, want ErrRunNotFound", err)
	}
	if _, err := s.RunInsertChild(ctx, child(wire.NewRunID(), "c", 10, 100)); !errors.Is(err, wire.ErrRunNotFound) {
		t.Fatalf("parent that does not exist: err = %v, want ErrRunNotFound", err)
	}
	if n := countRuns(t, pool); n != 1 {
		t.Fatalf("%d runs, want only the root", n)
	}
}

// Concurrent children of one tree must not slip past the count together.
func TestRunInsertChildTreeLimitConcurrent(t *testing.T) {
	t.Parallel()
	s, pool := newStore(t)
	root := insertRun(t, s, "root").RunID
	const limit, tries = 5, 40
	var wg sync.WaitGroup
	errs := make(chan error, tries)
	for i := range tries {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.RunInsertChild(context.Background(), child(root, fmt.Sprintf("c%d", i), 10, limit))
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	var ok, limited int
	for err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, wire.ErrLimitExceeded):
			limited++
		default:
			t.Errorf("concurrent child: %v", err)
		}
	}
	if ok != limit || limited != tries-limit {
		t.Fatalf("%d children inserted, %d refused; want %d and %d", ok, limited, limit, tries-limit)
	}
	if n := countRuns(t, pool); n != 1+limit {
		t.Fatalf("%d runs, want %d", n, 1+limit)
	}
}
