package scheduler

import (
	"context"
	"slices"
	"testing"
)

// take runs the next admitted request the way a worker does: one token, one request.
func (a *admission) next(t *testing.T) {
	t.Helper()
	select {
	case <-a.ready:
	default:
		t.Fatal("no request is ready")
	}
	a.take()(context.Background())
}

func TestAdmissionServesNamespacesInTurn(t *testing.T) {
	a := newAdmission(100, 1000, 1<<20)
	var order []string
	offer := func(ns string, n int) {
		for i := range n {
			name := ns + string(rune('0'+i))
			if !a.offer(ns, 1, func(context.Context) { order = append(order, name) }) {
				t.Fatalf("%s refused", name)
			}
		}
	}
	// A flood from a, then b and c each with a little.
	offer("a", 5)
	offer("b", 2)
	offer("c", 1)
	for range 8 {
		a.next(t)
	}
	want := []string{"a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"}
	if !slices.Equal(order, want) {
		t.Fatalf("served %v, want %v", order, want)
	}
	if a.queued() != 0 || len(a.queues) != 0 || a.turn.len() != 0 || a.bytes != 0 {
		t.Fatalf("after serving everything: queued %d, %d queues, %d turns, %d bytes", a.queued(), len(a.queues), a.turn.len(), a.bytes)
	}
}

func TestAdmissionBounds(t *testing.T) {
	nop := func(context.Context) {}
	t.Run("per namespace", func(t *testing.T) {
		a := newAdmission(3, 100, 1<<20)
		for i := range 3 {
			if !a.offer("a", 1, nop) {
				t.Fatalf("request %d refused under the bound", i)
			}
		}
		if a.offer("a", 1, nop) {
			t.Fatal("a fourth request of a namespace bounded at 3 was queued")
		}
		if !a.offer("b", 1, nop) {
			t.Fatal("another namespace was refused because the first is full")
		}
		a.next(t) // serves a
		if !a.offer("a", 1, nop) {
			t.Fatal("a refused after one of its requests was served")
		}
	})
	t.Run("in all", func(t *testing.T) {
		a := newAdmission(3, 4, 1<<20)
		for _, ns := range []string{"a", "a", "b", "b"} {
			if !a.offer(ns, 1, nop) {
				t.Fatalf("request of %s refused under the bounds", ns)
			}
		}
		if a.offer("c", 1, nop) {
			t.Fatal("a request beyond the scheduler's bound was queued")
		}
	})
	t.Run("bytes", func(t *testing.T) {
		a := newAdmission(10, 10, 100)
		if !a.offer("a", 150, nop) {
			t.Fatal("a lone request over the byte budget was refused")
		}
		if a.offer("b", 1, nop) {
			t.Fatal("a request beyond the byte budget was queued")
		}
		a.next(t)
		if !a.offer("b", 60, nop) || !a.offer("b", 40, nop) || a.offer("c", 1, nop) {
			t.Fatal("the byte budget is not exactly 100")
		}
	})
}

func TestFIFOReusesItsArray(t *testing.T) {
	var f fifo[int]
	want := 0
	for i := range 1000 {
		f.push(i)
		if i%3 == 2 {
			if got := f.pop(); got != want {
				t.Fatalf("popped %d, want %d", got, want)
			}
			want++
		}
	}
	for f.len() > 0 {
		if got := f.pop(); got != want {
			t.Fatalf("popped %d, want %d", got, want)
		}
		want++
	}
	if want != 1000 || cap(f.items) > 2048 {
		t.Fatalf("ended at %d with capacity %d", want, cap(f.items))
	}
}
