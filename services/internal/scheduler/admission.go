package scheduler

import (
	"context"
	"sync"
)

// admission is the scheduler's front door for request-reply work (starts and describes).
// A request waits in the FIFO of its namespace, and the workers take from the namespaces
// with waiting requests in turn, so a namespace that floods the scheduler fills only its
// own queue: another namespace's request waits for the next free worker, not behind the
// flood. A request that finds its namespace's queue full, or the scheduler's, is refused
// at once (offer returns false) and answered overloaded by the caller: a client learns
// in a millisecond to back off, instead of timing out behind a buffer it cannot see.
//
// The namespace is the subject's token, read before anything is decoded: refusing costs
// no JSON and no database work. Tokens that are not valid names get queues of their own
// too and are refused by their handler; every queue is dropped once empty, so the map
// holds at most as many namespaces as requests wait.
type admission struct {
	perNS    int // requests one namespace may have waiting
	total    int // requests that may wait in all
	maxBytes int // payload bytes that may wait in all

	mu      sync.Mutex
	queues  map[string]*fifo[job]
	turn    fifo[string] // namespaces with waiting requests, in the order they are served
	waiting int
	bytes   int

	// ready holds one token per waiting request; a worker that receives one takes a
	// request. Its capacity is total, so offering never blocks.
	ready chan struct{}
}

type job struct {
	fn   func(context.Context)
	size int
}

func newAdmission(perNS, total, maxBytes int) *admission {
	return &admission{perNS: perNS, total: total, maxBytes: maxBytes,
		queues: map[string]*fifo[job]{}, ready: make(chan struct{}, total)}
}

// offer queues fn for namespace ns, size bytes of payload; false: refused, a queue is
// full. A request larger than the whole byte budget is still taken when nothing else
// waits, so a lone large request is never refused for its size alone.
func (a *admission) offer(ns string, size int, fn func(context.Context)) bool {
	a.mu.Lock()
	q := a.queues[ns]
	if a.waiting >= a.total || (q != nil && q.len() >= a.perNS) ||
		(a.waiting > 0 && a.bytes+size > a.maxBytes) {
		a.mu.Unlock()
		return false
	}
	if q == nil {
		q = &fifo[job]{}
		a.queues[ns] = q
		a.turn.push(ns)
	}
	q.push(job{fn: fn, size: size})
	a.waiting++
	a.bytes += size
	a.mu.Unlock()
	a.ready <- struct{}{}
	return true
}

// take removes the next request: the head of the namespace whose turn it is, which then
// goes to the back of the line. Call it once per token received from ready.
func (a *admission) take() func(context.Context) {
	a.mu.Lock()
	defer a.mu.Unlock()
	ns := a.turn.pop()
	q := a.queues[ns]
	j := q.pop()
	a.waiting--
	a.bytes -= j.size
	if q.len() == 0 {
		delete(a.queues, ns)
	} else {
		a.turn.push(ns)
	}
	return j.fn
}

// queued is how many requests wait.
func (a *admission) queued() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.waiting
}

// fifo is a queue on a slice that reuses its array once most of it has been served.
type fifo[T any] struct {
	items []T
	head  int
}

func (f *fifo[T]) len() int { return len(f.items) - f.head }

func (f *fifo[T]) push(v T) { f.items = append(f.items, v) }

func (f *fifo[T]) pop() T {
	var zero T
	v := f.items[f.head]
	f.items[f.head] = zero // let what it holds be collected
	f.head++
	switch {
	case f.head == len(f.items):
		f.items, f.head = f.items[:0], 0
	case f.head >= 64 && f.head*2 >= len(f.items):
		n := copy(f.items, f.items[f.head:])
		clear(f.items[n:])
		f.items, f.head = f.items[:n], 0
	}
	return v
}
