// Package groupcommit batches concurrent requests into one call: while a flush is in
// flight the next requests queue up, so under load one statement and one commit serve
// many callers, and an idle system flushes each request at once (no timer, no added
// latency). Each caller waits for its own result, which it gets only after the flush.
//
// Flushes run on the callers' own goroutines (leader-based group commit): a caller that
// finds a flush slot free flushes the queue itself, and a caller that finds none waits,
// and may be handed the lead when a flush ends with requests still queued. An idle
// system's request is thus flushed with no goroutine handoff at all: on a small machine
// each handoff to a parked thread costs tens of microseconds, and a run's every write
// would pay two of them.
package groupcommit

import (
	"context"
	"sync"
	"time"
)

// Batcher runs flush over batches of concurrent requests.
type Batcher[Req, Res any] struct {
	flush    func(ctx context.Context, reqs []Req) []Res // one result per request, same order
	maxBatch int
	flushers int           // flushes in flight at most
	timeout  time.Duration // bounds each flush; 0: unbounded

	mu      sync.Mutex
	queue   []*item[Req, Res]
	leaders int // flushing, or handed the lead and about to
	closed  bool
	idle    *sync.Cond // signalled when leaders drops to 0
}

type item[Req, Res any] struct {
	req    Req
	handed bool              // told to lead; under Batcher.mu
	done   chan outcome[Res] // at most one lead and one result: never blocks a sender
}

type outcome[Res any] struct {
	res  Res
	ok   bool
	lead bool // not a result: flush the queue, then wait on
}

// Option configures a Batcher.
type Option func(*options)

type options struct{ timeout time.Duration }

// FlushTimeout bounds each flush: its context ends after d. Without it a flush stuck on a
// connection that went silent (a partition, a blackholed peer) would hold every later
// request of its flusher for as long as TCP takes to give up.
func FlushTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// New returns a Batcher that runs up to flushers flushes at a time, each of up to
// maxBatch requests. flush returns one result per request, in order.
func New[Req, Res any](flushers, maxBatch int, flush func(context.Context, []Req) []Res, opts ...Option) *Batcher[Req, Res] {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	b := &Batcher[Req, Res]{flush: flush, maxBatch: max(maxBatch, 1), flushers: max(flushers, 1), timeout: o.timeout}
	b.idle = sync.NewCond(&b.mu)
	return b
}

// Do submits one request and waits for its result; ok is false when the batcher was
// closed before the request was flushed.
func (b *Batcher[Req, Res]) Do(req Req) (res Res, ok bool) {
	it := &item[Req, Res]{req: req, done: make(chan outcome[Res], 2)}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return res, false
	}
	b.queue = append(b.queue, it)
	lead := b.leaders < b.flushers
	if lead {
		b.leaders++
	}
	b.mu.Unlock()
	if lead {
		b.lead()
	}
	for {
		o := <-it.done
		if !o.lead {
			return o.res, o.ok
		}
		b.lead()
	}
}

// lead flushes one batch from the head of the queue, on the caller's goroutine, then
// hands the lead to the first request still queued, or gives its slot up. The caller
// holds one of the leaders slots on entry.
func (b *Batcher[Req, Res]) lead() {
	b.mu.Lock()
	if b.closed || len(b.queue) == 0 {
		// Closed, or another leader took this caller's request: nothing to flush.
		b.release()
		b.mu.Unlock()
		return
	}
	n := min(len(b.queue), b.maxBatch)
	batch := make([]*item[Req, Res], n)
	copy(batch, b.queue)
	clear(b.queue[:n]) // the queue's array outlives the batch: let it drop the items
	b.queue = b.queue[n:]
	b.mu.Unlock()

	reqs := make([]Req, n)
	for i, it := range batch {
		reqs[i] = it.req
	}
	res := b.flushOnce(reqs)
	for i, it := range batch {
		it.done <- outcome[Res]{res: res[i], ok: true}
	}

	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.closed {
		for _, next := range b.queue {
			if !next.handed {
				next.handed = true // the slot passes to it
				next.done <- outcome[Res]{lead: true}
				return
			}
		}
	}
	b.release()
}

// release gives a leader's slot up; b.mu is held.
func (b *Batcher[Req, Res]) release() {
	b.leaders--
	if b.leaders == 0 {
		b.idle.Broadcast()
	}
}

func (b *Batcher[Req, Res]) flushOnce(reqs []Req) []Res {
	ctx := context.Background()
	if b.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, b.timeout)
		defer cancel()
	}
	return b.flush(ctx, reqs)
}

// Close stops the batcher: requests not yet being flushed get ok == false at once, and
// Close returns when the flushes in flight have ended (their callers get their results).
// Later calls of Do get ok == false. Idempotent.
func (b *Batcher[Req, Res]) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	for _, it := range b.queue {
		it.done <- outcome[Res]{}
	}
	clear(b.queue)
	b.queue = nil
	for b.leaders > 0 {
		b.idle.Wait()
	}
}
