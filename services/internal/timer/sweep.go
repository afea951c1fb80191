package timer

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/failpoint"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/telemetry"
)

// look is one answer of RunsNextDue and the local moment it corresponds to.
type look struct {
	n   store.NextDue
	ref time.Time
}

type sweepResult struct {
	woken, requeued, failed, redispatched int
}

func (r sweepResult) total() int { return r.woken + r.requeued + r.failed + r.redispatched }

// sweep runs the three sweeps, each in batches until one comes back short, and announces
// what they changed. Each batch is published as soon as it commits, so a long backlog
// does not hold back the first doorbells. lk is the look that led here (nil from Tick);
// it dates the earliest sleeper for the lateness histogram.
func (t *Timer) sweep(ctx context.Context, lk *look) (sweepResult, error) {
	t.m.Sweeps.Inc()
	var res sweepResult
	params := store.SweepParams{Limit: t.cfg.BatchSize}
	// Only the kinds of work the look found due are swept: a wake-up does not pay for the
	// lease and reconcile queries (Tick, with no look, sweeps everything). lead: the
	// work is due this long before the time the look gave.
	due := func(at func(store.NextDue) *time.Time, lead time.Duration) bool {
		if lk == nil {
			return true
		}
		when := at(lk.n)
		return when != nil && !when.Add(-lead).After(lk.n.DBNow.Add(t.now().Sub(lk.ref)))
	}

	wakeParams := params
	wakeParams.WakeLead = t.cfg.WakeLead
	for due(func(n store.NextDue) *time.Time { return n.Wake }, t.cfg.WakeLead) {
		ds, err := t.st.RunsWakeDue(ctx, wakeParams)
		if err != nil {
			return res, err
		}
		if len(ds) > 0 && res.woken == 0 && lk != nil && lk.n.Wake != nil {
			// The database clock now, estimated from the look: exact to half a round trip.
			dbNow := lk.n.DBNow.Add(t.now().Sub(lk.ref))
			t.m.WakeLateness.Observe(max(dbNow.Sub(lk.n.Wake.Add(-t.cfg.WakeLead)), 0).Seconds())
		}
		res.woken += len(ds)
		t.m.Woken.Add(float64(len(ds)))
		for _, d := range ds {
			t.log.Debug("run woken", telemetry.RunID(d.RunID), telemetry.Workflow(d.Workflow), telemetry.Namespace(d.Namespace))
		}
		t.publish(ctx, failpoint.TimerAfterCommitBeforePublish, ds)
		if len(ds) < t.cfg.BatchSize || t.quitting() {
			break
		}
	}

	for due(func(n store.NextDue) *time.Time { return n.LeaseExpiry }, 0) {
		es, err := t.st.RunsExpireLeases(ctx, params)
		if err != nil {
			return res, err
		}
		ds := make([]store.Dispatch, 0, len(es))
		for _, e := range es {
			fields := []zap.Field{telemetry.RunID(e.RunID), telemetry.Workflow(e.Workflow), telemetry.Namespace(e.Namespace)}
			if e.Status == wire.StatusFailed {
				res.failed++
				t.m.LeasesExpired.WithLabelValues("failed").Inc()
				t.log.Warn("lease expired on the last attempt; run failed", fields...)
				t.b.PublishDone(e.Namespace, e.RunID, wire.StatusFailed, nil)
				continue
			}
			res.requeued++
			t.m.LeasesExpired.WithLabelValues("requeued").Inc()
			t.log.Info("lease expired; run requeued", fields...)
			ds = append(ds, e.Dispatch)
		}
		t.publish(ctx, failpoint.TimerAfterCommitBeforePublish, ds)
		if len(es) < t.cfg.BatchSize || t.quitting() {
			break
		}
	}

	var backlogged []string
	if due(func(n store.NextDue) *time.Time { return n.Stale }, 0) {
		backlogged = t.backlogged(ctx)
	}
	for due(func(n store.NextDue) *time.Time { return n.Stale }, 0) {
		n, err := t.relay(ctx, store.RedispatchParams{
			SweepParams: params, StaleAfter: t.cfg.StaleAfter, LiveWithin: t.cfg.LiveWithin,
			Backlogged: backlogged, BackloggedStaleAfter: backloggedStaleFactor * t.cfg.StaleAfter,
		})
		res.redispatched += n
		if err != nil {
			return res, err
		}
		if n < t.cfg.BatchSize || t.quitting() {
			break
		}
	}
	return res, nil
}

// relay runs one batch of the reconcile sweep and announces what it relayed.
func (t *Timer) relay(ctx context.Context, p store.RedispatchParams) (int, error) {
	ds, err := t.st.RunsRedispatchStale(ctx, p)
	if err != nil {
		return 0, err
	}
	t.m.Redispatched.Add(float64(len(ds)))
	for _, d := range ds {
		t.log.Info("dispatch went unclaimed; run re-dispatched", telemetry.RunID(d.RunID), telemetry.Workflow(d.Workflow),
			telemetry.Namespace(d.Namespace), zap.Int64("dispatch_seq", d.DispatchSeq))
	}
	t.publish(ctx, failpoint.ReconcileAfterCommitBeforePub, ds)
	return len(ds), nil
}

// backloggedStaleFactor: a run of a workflow whose task consumer still has doorbells
// waiting is relayed only after this many times StaleAfter.
const backloggedStaleFactor = 10

// backlogged lists the served workflows ("namespace/workflow") whose task consumers still
// have doorbells waiting to be delivered: their QUEUED runs may be waiting their turn,
// not lost. A consumer that cannot be read counts as drained, so a broker that lost its
// state never stops the relay.
func (t *Timer) backlogged(ctx context.Context) []string {
	served, err := t.st.WorkflowsServed(ctx, t.cfg.LiveWithin)
	if err != nil {
		t.log.Warn("list served workflows; relaying as if no queue were backlogged", zap.Error(err))
		return nil
	}
	var out []string
	for _, sv := range served {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		info, err := t.b.TaskConsumerInfo(cctx, sv.Namespace, sv.Workflow)
		cancel()
		if err == nil && info.NumPending > 0 {
			out = append(out, sv.Namespace+"/"+sv.Workflow)
		}
	}
	return out
}

// publish announces committed dispatches. A failure is logged, not returned: the runs
// are QUEUED in PostgreSQL, and the reconcile sweep relays them after StaleAfter.
func (t *Timer) publish(ctx context.Context, point string, ds []store.Dispatch) {
	if len(ds) == 0 {
		return
	}
	if err := failpoint.Inject(point); err != nil {
		t.log.Warn("doorbells not published (failpoint)", zap.Int("count", len(ds)), zap.Error(err))
		return
	}
	bells := make([]bus.Doorbell, len(ds))
	for i, d := range ds {
		bells[i] = bus.Doorbell{Namespace: d.Namespace, Workflow: d.Workflow,
			Task: wire.Task{RunID: d.RunID, DispatchSeq: d.DispatchSeq, Lapses: d.Lapses}, Resend: d.Resend}
	}
	if err := t.b.PublishTasks(ctx, bells); err != nil {
		t.m.PublishFailures.Inc()
		t.log.Warn("publish task doorbells; the reconciler will relay them",
			zap.Int("count", len(bells)), zap.Error(err))
	}
}
