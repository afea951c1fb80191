package timer

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/kagzi/kagzi/libs/store"
)

// streamMark is what the timer last saw of the task stream: enough to tell a stream
// that was lost and made anew from one that only moved on.
type streamMark struct {
	seen    bool
	created time.Time
	lastSeq uint64
}

// lostBefore compares info with the mark and moves the mark on. It returns the broker
// time before which every doorbell may have been lost, or the zero time. A stream seen
// for the first time counts as new: a timer that starts beside a broker that just lost
// its memory must relay too, and where the stream is old no QUEUED run predates it.
func (m *streamMark) lostBefore(info *jetstream.StreamInfo) time.Time {
	var before time.Time
	switch {
	case !m.seen || !info.Created.Equal(m.created):
		before = info.Created
	case info.State.LastSeq < m.lastSeq:
		// Same stream, fewer messages ever: a cluster that restarted every replica of a
		// memory stream keeps its assignment (and Created) but not its messages.
		before = info.TimeStamp
	}
	*m = streamMark{seen: true, created: info.Created, lastSeq: info.State.LastSeq}
	return before
}

// watchTasks relays, as soon as it is noticed, every QUEUED run whose doorbell went with
// a lost task stream. The stream is memory-backed, so a broker restart loses every
// doorbell in it; the stale sweep would relay them too, but only after StaleAfter.
func (t *Timer) watchTasks() {
	defer t.wg.Done()
	tick := time.NewTicker(t.cfg.WatchTasksEvery)
	defer tick.Stop()
	var (
		mark    streamMark
		pending time.Time // a relay owed and not yet done
	)
	for {
		select {
		case <-t.quit:
			return
		case <-tick.C:
		}
		ctx, cancel := context.WithTimeout(t.runCtx, opTimeout)
		info, err := t.b.TaskStreamInfo(ctx)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			// Nobody has made it again yet: the executors do on their next fetch, and so
			// does this.
			if err = t.b.EnsureStreams(ctx); err == nil {
				info, err = t.b.TaskStreamInfo(ctx)
			}
		}
		if err != nil {
			t.log.Debug("read the task stream", zap.Error(err))
		} else if before := mark.lostBefore(info); before.After(pending) {
			pending = before
		}
		if !pending.IsZero() {
			if err := t.relayLost(ctx, pending); err != nil {
				t.m.Errors.WithLabelValues("relay_lost").Inc()
				t.log.Warn("relay the runs of a lost task stream; retrying", zap.Error(err))
			} else {
				pending = time.Time{}
			}
		}
		cancel()
	}
}

// relayLost relays every served run QUEUED before the given time, in batches.
func (t *Timer) relayLost(ctx context.Context, before time.Time) error {
	total := 0
	for {
		n, err := t.relay(ctx, store.RedispatchParams{
			SweepParams: store.SweepParams{Limit: t.cfg.BatchSize},
			StaleAfter:  t.cfg.StaleAfter, LiveWithin: t.cfg.LiveWithin, LostBefore: before,
		})
		total += n
		if err != nil {
			return err
		}
		if n < t.cfg.BatchSize || t.quitting() {
			break
		}
	}
	if total > 0 {
		t.log.Info("task stream was made anew; relayed the runs queued before it",
			zap.Time("stream_created", before), zap.Int("runs", total))
	}
	return nil
}
