package sdk

import (
	"context"
	"sync"
)

// batcher is group commit: concurrent callers hand it one item each, and while a flush
// is in flight the next items queue up, so under load one statement and one commit serve
// many runs, and an idle system flushes each item at once (no timer, no added latency).
// Each caller waits for its own item's result, which it gets only after the commit.
type batcher[Req, Res any] struct {
	flush    func(ctx context.Context, reqs []Req) []Res // one result per request, same order
	maxBatch int
	in       chan batchItem[Req, Res]
	stop     chan struct{}
	wg       sync.WaitGroup
}

type batchItem[Req, Res any] struct {
	req  Req
	done chan Res
}

func newBatcher[Req, Res any](flushers, maxBatch int, flush func(context.Context, []Req) []Res) *batcher[Req, Res] {
	b := &batcher[Req, Res]{flush: flush, maxBatch: maxBatch, in: make(chan batchItem[Req, Res], maxBatch*flushers), stop: make(chan struct{})}
	for range flushers {
		b.wg.Add(1)
		go b.loop()
	}
	return b
}

// do submits one request and waits for its result; ok is false when the batcher was
// closed first (a step body that outlived its worker's Stop).
func (b *batcher[Req, Res]) do(req Req) (res Res, ok bool) {
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

func (b *batcher[Req, Res]) loop() {
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
		res := b.flush(context.Background(), reqs)
		for i, it := range items {
			it.done <- res[i]
		}
	}
}

// close stops the flushers once callers are gone; pending items must have been served.
func (b *batcher[Req, Res]) close() {
	close(b.stop)
	b.wg.Wait()
}
