package groupcommit_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/groupcommit"
)

// Concurrent callers are served in fewer flushes than calls, each gets its own result,
// and a closed batcher answers ok == false instead of hanging.
func TestBatchesConcurrentCallers(t *testing.T) {
	var flushes atomic.Int32
	release := make(chan struct{})
	b := groupcommit.New(1, 64, func(_ context.Context, reqs []int) []int {
		if flushes.Add(1) == 1 {
			<-release // hold the first flush so the others queue up behind it
		}
		out := make([]int, len(reqs))
		for i, r := range reqs {
			out[i] = r * 2
		}
		return out
	})
	var wg sync.WaitGroup
	var wrong atomic.Int32
	first := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		close(first)
		if v, ok := b.Do(-1); !ok || v != -2 {
			wrong.Add(1)
		}
	}()
	<-first
	var entered atomic.Int32
	for i := range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			entered.Add(1)
			if v, ok := b.Do(i); !ok || v != 2*i {
				wrong.Add(1)
			}
		}()
	}
	for flushes.Load() == 0 || entered.Load() < 100 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(10 * time.Millisecond) // from Do's entry to the queue
	close(release)
	wg.Wait()
	if wrong.Load() != 0 {
		t.Fatalf("%d callers got a wrong result", wrong.Load())
	}
	if n := flushes.Load(); n >= 101 || n < 2 {
		t.Fatalf("%d flushes for 101 calls: no batching", n)
	}
	b.Close()
	if _, ok := b.Do(1); ok {
		t.Fatal("Do on a closed batcher succeeded")
	}
}

// A flush that hangs is cut off at its timeout: its callers get the flush's answer to a
// cancelled context, and the next request is flushed instead of queuing behind it.
func TestFlushTimeout(t *testing.T) {
	b := groupcommit.New(1, 8, func(ctx context.Context, reqs []int) []error {
		out := make([]error, len(reqs))
		for i, r := range reqs {
			if r == 0 {
				<-ctx.Done() // a peer gone silent
				out[i] = ctx.Err()
			}
		}
		return out
	}, groupcommit.FlushTimeout(50*time.Millisecond))
	defer b.Close()
	if err, ok := b.Do(0); !ok || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("hung flush: %v, %v; want the deadline", err, ok)
	}
	if err, ok := b.Do(1); !ok || err != nil {
		t.Fatalf("next flush: %v, %v", err, ok)
	}
}

// Close answers ok == false to a request still queued at once, lets the flush in flight
// end, and returns only then, its caller getting the flush's own result.
func TestCloseLetsTheFlushInFlightEnd(t *testing.T) {
	started, release := make(chan struct{}), make(chan struct{})
	b := groupcommit.New(1, 8, func(_ context.Context, reqs []int) []int {
		if reqs[0] == 1 {
			close(started)
			<-release
		}
		return reqs
	})
	type answer struct{ v, ok int }
	inFlight, queued := make(chan answer, 1), make(chan answer, 1)
	do := func(req int, to chan answer) {
		v, ok := b.Do(req)
		a := answer{v: v}
		if ok {
			a.ok = 1
		}
		to <- a
	}
	go do(1, inFlight)
	<-started
	go do(2, queued)
	closed := make(chan struct{})
	go func() {
		// Close only once the second request is queued behind the flush.
		time.Sleep(20 * time.Millisecond)
		b.Close()
		close(closed)
	}()
	if a := <-queued; a.ok != 0 {
		t.Fatalf("queued request answered %+v after Close, want ok == false", a)
	}
	select {
	case <-closed:
		t.Fatal("Close returned while a flush was in flight")
	case <-time.After(20 * time.Millisecond):
	}
	close(release)
	if a := <-inFlight; a != (answer{1, 1}) {
		t.Fatalf("request in flight answered %+v, want its own result", a)
	}
	<-closed
}
