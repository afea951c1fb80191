// Package groupcommit batches concurrent requests into one call: while a flush is in
// flight the next requests queue up, so under load one statement and one commit serve
// many callers, and an idle system flushes each request at once (no timer, no added
// latency). Each caller waits for its own result, which it gets only after the flush.
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
	timeout  time.Duration // bounds each flush; 0: unbounded
	in       chan batchItem[Req, Res]
	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup
}

type batchItem[Req, Res any] struct {
	req  Req
	done chan Res
}

// Option configures a Batcher.
type Option func(*options)

type options struct{ timeout time.Duration }

// FlushTimeout bounds each flush: its context ends after d. Without it a flush stuck on a
// connection that went silent (a partition, a blackholed peer) would hold every later
// request of its flusher for as long as TCP takes to give up.
func FlushTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// New starts flushers goroutines, each flushing up to maxBatch requests at a time. flush
// returns one result per request, in order.
func New[Req, Res any](flushers, maxBatch int, flush func(context.Context, []Req) []Res, opts ...Option) *Batcher[Req, Res] {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	b := &Batcher[Req, Res]{flush: flush, maxBatch: maxBatch, timeout: o.timeout,
		in: make(chan batchItem[Req, Res], maxBatch*flushers), stop: make(chan struct{})}
	for range flushers {
		b.wg.Add(1)
		go b.loop()
	}
	return b
}

// Do submits one request and waits for its result; ok is false when the batcher was
// closed first.
func (b *Batcher[Req, Res]) Do(req Req) (res Res, ok bool) {
	item := batchItem[Req, Res]{req: req, done: make(chan Res, 1)}
	select {
	case b.in <- item:
	case <-b.stop:
		return res, false
	}
	select {
	case res = <-item.done:
		return res, true
	case <-b.stop:
		return res, false
	}
}

func (b *Batcher[Req, Res]) loop() {
	defer b.wg.Done()
	items := make([]batchItem[Req, Res], 0, b.maxBatch)
	reqs := make([]Req, 0, b.maxBatch)
	for {
		items, reqs = items[:0], reqs[:0]
		select {
		case it := <-b.in:
			items = append(items, it)
		case <-b.stop:
			return
		}
	drain:
		for len(items) < b.maxBatch {
			select {
			case it := <-b.in:
				items = append(items, it)
			default:
				break drain
			}
		}
		for _, it := range items {
			reqs = append(reqs, it.req)
		}
		res := b.flushOnce(reqs)
		for i, it := range items {
			it.done <- res[i]
		}
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

// Close stops the flushers; callers still waiting get ok == false. Idempotent.
func (b *Batcher[Req, Res]) Close() {
	b.stopOnce.Do(func() { close(b.stop) })
	b.wg.Wait()
}
