// Package timer moves runs whose time has come back to the queue: sleepers and retries
// at their wake time, runs whose executor's lease expired, and QUEUED runs whose
// dispatch went missing (the relay of the QUEUED-row outbox).
//
// The timer is driven by the next due time, not by a fast scan. It asks PostgreSQL when
// the earliest piece of work falls due (three index probes in one round trip), waits
// until then or until an executor's hint names a sooner wake time, and only then sweeps.
// An idle system therefore costs one small query per MaxIdle, and a hinted sleeper wakes
// milliseconds after its wake time. Every time comparison is made by the database clock;
// the timer's own clock (Config.Clock) only measures how long to wait, as intervals
// between its own readings.
//
// Sweeps are FOR UPDATE SKIP LOCKED batches in the store, so any number of replicas may
// run side by side. The package has no fx: it takes plain values.
package timer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/clock"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// Config tunes a timer. Every zero field takes the default named beside it.
type Config struct {
	// StaleAfter: a run QUEUED and unclaimed this long is re-dispatched (30s).
	StaleAfter time.Duration
	// LiveWithin: a worker that heartbeated this recently serves its workflows, so their
	// stale runs are worth re-dispatching (60s).
	LiveWithin time.Duration
	// MaxIdle is the longest wait between looks when nothing is due (20s). It also bounds
	// how long a lease expiry or a newly stale run can go unnoticed, since no hint
	// announces those.
	MaxIdle time.Duration
	// WakeLead queues sleepers and retries this long before their wake time, so that an
	// executor has fetched and claimed them by then; the executor holds each
	// until its wake time and goes on at once (250ms; negative: none; at most 5s). It
	// hides the dispatch's latency from a burst of wake-ups, at the price of holding an
	// executor slot for up to WakeLead per wake.
	WakeLead time.Duration
	// BatchSize is the most runs one sweep statement moves (500).
	BatchSize int
	// EnsureStreamsEvery is how often streams are re-created if they vanished (30s).
	EnsureStreamsEvery time.Duration
	// WatchTasksEvery is how often the task stream is checked for having been lost and
	// made anew, whereupon the runs whose doorbells it held are relayed at once (1s).
	WatchTasksEvery time.Duration
	// PruneWorkersAfter: workers silent this long are forgotten (10m, never below
	// LiveWithin).
	PruneWorkersAfter time.Duration
	// Clock measures the waits (clock.Default()). Its readings are compared only with
	// each other, never with time.Now.
	Clock clock.Clock
}

func (c Config) withDefaults() Config {
	if c.StaleAfter <= 0 {
		c.StaleAfter = 30 * time.Second
	}
	if c.LiveWithin <= 0 {
		c.LiveWithin = 60 * time.Second
	}
	if c.MaxIdle <= 0 {
		c.MaxIdle = 20 * time.Second
	}
	switch {
	case c.WakeLead == 0:
		c.WakeLead = DefaultWakeLead
	case c.WakeLead < 0:
		c.WakeLead = 0
	}
	c.WakeLead = min(c.WakeLead, MaxWakeLead)
	if c.BatchSize <= 0 {
		c.BatchSize = 500
	}
	if c.EnsureStreamsEvery <= 0 {
		c.EnsureStreamsEvery = 30 * time.Second
	}
	if c.WatchTasksEvery <= 0 {
		c.WatchTasksEvery = time.Second
	}
	if c.PruneWorkersAfter <= 0 {
		c.PruneWorkersAfter = 10 * time.Minute
	}
	c.PruneWorkersAfter = max(c.PruneWorkersAfter, c.LiveWithin)
	if c.Clock == nil {
		c.Clock = clock.Default()
	}
	return c
}

const (
	// DefaultWakeLead is Config.WakeLead's default: past the executor-side part of a
	// parked sleeper's lateness in a burst of 1,000 wake-ups on a 2-core machine (up to
	// 115 ms in `kagzi bench` S3), yet short enough that the held slots do not matter.
	DefaultWakeLead = 250 * time.Millisecond
	// MaxWakeLead bounds Config.WakeLead: a run woken early holds an executor slot.
	MaxWakeLead = 5 * time.Second
)

const (
	// emptySweepPause keeps the loop from spinning when something looks due but the
	// sweep moved nothing: another replica holds those rows locked for a moment.
	emptySweepPause = 50 * time.Millisecond
	// opTimeout bounds one database or publish call of the maintenance loop.
	opTimeout = 30 * time.Second
	// stopGrace lets a sweep that has committed publish its doorbells before Stop
	// cancels it; a cancelled publish is relayed later by another timer.
	stopGrace = 5 * time.Second
)

// Timer runs the sweeps. Start it once, stop it once.
type Timer struct {
	cfg Config
	st  *store.Store
	b   *bus.Bus
	log *zap.Logger
	m   *Metrics

	mu    sync.Mutex
	state int // 0 new, 1 started, 2 stopped
	sub   *nats.Subscription

	hintMu sync.Mutex
	hint   time.Time     // the soonest hinted wake time not yet taken, by the database clock
	hintCh chan struct{} // signalled when hint is set

	quit   chan struct{} // closed by Stop
	runCtx context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// New returns a timer. A nil logger logs nothing; nil metrics are not registered.
func New(cfg Config, st *store.Store, b *bus.Bus, log *zap.Logger, m *Metrics) *Timer {
	if log == nil {
		log = zap.NewNop()
	}
	if m == nil {
		m = NewMetrics(nil)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	return &Timer{
		cfg:    cfg.withDefaults(),
		st:     st,
		b:      b,
		log:    log.Named("timer"),
		m:      m,
		hintCh: make(chan struct{}, 1),
		quit:   make(chan struct{}),
		runCtx: runCtx,
		cancel: cancel,
	}
}

// Start subscribes to timer hints and starts the loop. It returns once the subscription
// is registered with the server; ctx bounds only that start-up. Streams that cannot be
// created now are a warning: the maintenance loop keeps trying.
func (t *Timer) Start(ctx context.Context) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.state != 0 {
		return errors.New("timer: Start called twice or after Stop")
	}
	if err := t.b.EnsureStreams(ctx); err != nil {
		t.m.EnsureFailures.Inc()
		t.log.Warn("jetstream streams not ready; retrying in the background", zap.Error(err))
	}
	// Every replica hears every hint (no queue group): each keeps its own deadline, and
	// SKIP LOCKED splits the resulting sweep.
	sub, err := t.b.Conn().Subscribe(wire.TimerHintSubject, t.onHint)
	if err != nil {
		return fmt.Errorf("subscribe to timer hints: %w", err)
	}
	t.sub = sub
	if err := t.b.Conn().FlushWithContext(ctx); err != nil {
		t.log.Warn("nats flush after subscribing; hints are heard after reconnect", zap.Error(err))
	}
	t.wg.Add(3)
	go t.run()
	go t.maintain()
	go t.watchTasks()
	t.state = 1
	t.log.Info("timer started",
		zap.Duration("stale_after", t.cfg.StaleAfter), zap.Duration("max_idle", t.cfg.MaxIdle))
	return nil
}

// Stop ends the loops and waits for them. A sweep in progress may finish and publish for
// up to stopGrace. Idempotent.
func (t *Timer) Stop() {
	t.mu.Lock()
	if t.state != 1 {
		t.state = 2
		t.mu.Unlock()
		t.cancel()
		return
	}
	t.state = 2
	sub := t.sub
	t.mu.Unlock()

	if err := sub.Unsubscribe(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) && !errors.Is(err, nats.ErrBadSubscription) {
		t.log.Warn("unsubscribe from timer hints", zap.Error(err))
	}
	close(t.quit)
	cancelLater := time.AfterFunc(stopGrace, t.cancel)
	t.wg.Wait()
	cancelLater.Stop()
	t.cancel()
	t.log.Info("timer stopped")
}

// Tick runs every sweep once, now, whatever the deadline. Tests use it; it is safe
// beside a running loop.
func (t *Timer) Tick(ctx context.Context) error {
	_, err := t.sweep(ctx, nil)
	return err
}

// onHint keeps the soonest hinted wake time and wakes the loop. It never blocks the
// subscription.
func (t *Timer) onHint(msg *nats.Msg) {
	var h wire.TimerHint
	if err := json.Unmarshal(msg.Data, &h); err != nil || h.WakeAt.IsZero() {
		t.log.Debug("ignoring malformed timer hint", zap.ByteString("data", msg.Data))
		return
	}
	t.hintMu.Lock()
	if t.hint.IsZero() || h.WakeAt.Before(t.hint) {
		t.hint = h.WakeAt
	}
	t.hintMu.Unlock()
	select {
	case t.hintCh <- struct{}{}:
	default:
	}
}

func (t *Timer) takeHint() (time.Time, bool) {
	t.hintMu.Lock()
	defer t.hintMu.Unlock()
	h := t.hint
	t.hint = time.Time{}
	return h, !h.IsZero()
}

// run is the loop: look up the next due time, wait for it (or a sooner hint), sweep.
// Each sweep is preceded by a fresh look, so the decision to sweep is always made on
// the database's word and its clock, never on a local estimate.
func (t *Timer) run() {
	defer t.wg.Done()
	var (
		failures  int
		notBefore time.Time // local: no sweep before this, after one that moved nothing
		lastSweep time.Time // local time of the last sweep
		// lastSweepDB is the database time of the look that preceded the last sweep; a
		// QUEUED run already stale by then was passed over by that sweep's reconcile.
		lastSweepDB time.Time
	)
	for {
		if t.quitting() {
			return
		}
		before := t.now()
		n, err := t.st.RunsNextDue(t.runCtx, t.cfg.StaleAfter, t.cfg.LiveWithin)
		t.m.Polls.Inc()
		if err != nil {
			if t.quitting() {
				return
			}
			failures++
			t.m.Errors.WithLabelValues("next_due").Inc()
			t.log.Warn("read next due time", zap.Error(err), zap.Duration("retry_in", backoff(failures)))
			if !t.sleep(backoff(failures)) {
				return
			}
			continue
		}
		failures = 0
		// The local moment that n.DBNow corresponds to, to within half a round trip.
		ref := before.Add(t.now().Sub(before) / 2)
		delay := t.untilDue(n, ref, lastSweep, lastSweepDB)
		if delay > 0 {
			if !t.wait(delay, n, ref) {
				return
			}
			continue
		}
		if pause := notBefore.Sub(t.now()); pause > 0 {
			if !t.sleep(pause) {
				return
			}
			continue
		}
		lastSweep, lastSweepDB = t.now(), n.DBNow
		res, err := t.sweep(t.runCtx, &look{n: n, ref: ref})
		if err != nil {
			if t.quitting() {
				return
			}
			failures++
			t.m.Errors.WithLabelValues("sweep").Inc()
			t.log.Warn("sweep", zap.Error(err), zap.Duration("retry_in", backoff(failures)))
			if !t.sleep(backoff(failures)) {
				return
			}
			continue
		}
		notBefore = time.Time{}
		if res.total() == 0 {
			notBefore = t.now().Add(emptySweepPause)
		}
	}
}

// untilDue says how long from now until the earliest due work, at most MaxIdle; zero or
// less means now. A stale QUEUED run that the last sweep already passed over (another
// replica held it, or its worker's heartbeat lapsed between the look and the sweep)
// would otherwise read as due forever, so it only counts again MaxIdle after that sweep.
func (t *Timer) untilDue(n store.NextDue, ref, lastSweep, lastSweepDB time.Time) time.Duration {
	elapsed := t.now().Sub(ref)
	delay := t.cfg.MaxIdle
	if n.Wake != nil {
		delay = min(delay, n.Wake.Sub(n.DBNow)-t.cfg.WakeLead-elapsed)
	}
	if n.LeaseExpiry != nil {
		delay = min(delay, n.LeaseExpiry.Sub(n.DBNow)-elapsed)
	}
	if n.Stale != nil {
		if !lastSweep.IsZero() && !n.Stale.After(lastSweepDB) {
			delay = min(delay, lastSweep.Add(t.cfg.MaxIdle).Sub(t.now()))
		} else {
			delay = min(delay, n.Stale.Sub(n.DBNow)-elapsed)
		}
	}
	return delay
}

// wait blocks for delay, or less when a hint names a sooner wake time. Hints carry
// database-clock times; n.DBNow and ref translate them to a local deadline. False means
// Stop.
func (t *Timer) wait(delay time.Duration, n store.NextDue, ref time.Time) bool {
	deadline := t.now().Add(delay)
	tm := time.NewTimer(delay)
	defer tm.Stop()
	for {
		select {
		case <-t.quit:
			return false
		case <-tm.C:
			return true
		case <-t.hintCh:
			at, ok := t.takeHint()
			if !ok {
				continue
			}
			if local := ref.Add(at.Sub(n.DBNow) - t.cfg.WakeLead); local.Before(deadline) {
				deadline = local
				tm.Reset(deadline.Sub(t.now()))
			}
		}
	}
}

// now reads the timer's clock. Every local moment the timer keeps is such a reading.
func (t *Timer) now() time.Time { return t.cfg.Clock.Now() }

// sleep waits d or until Stop; false means Stop.
func (t *Timer) sleep(d time.Duration) bool {
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-tm.C:
		return true
	case <-t.quit:
		return false
	}
}

func (t *Timer) quitting() bool {
	select {
	case <-t.quit:
		return true
	default:
		return false
	}
}

// maintain re-creates the streams periodically and forgets long-dead workers.
func (t *Timer) maintain() {
	defer t.wg.Done()
	ensure := time.NewTicker(t.cfg.EnsureStreamsEvery)
	defer ensure.Stop()
	prune := time.NewTicker(max(t.cfg.PruneWorkersAfter/2, time.Second))
	defer prune.Stop()
	for {
		select {
		case <-t.quit:
			return
		case <-ensure.C:
			ctx, cancel := context.WithTimeout(t.runCtx, opTimeout)
			if err := t.b.EnsureStreams(ctx); err != nil {
				t.m.EnsureFailures.Inc()
				t.log.Warn("ensure jetstream streams", zap.Error(err))
			}
			cancel()
		case <-prune.C:
			ctx, cancel := context.WithTimeout(t.runCtx, opTimeout)
			n, err := t.st.WorkersPrune(ctx, t.cfg.PruneWorkersAfter)
			cancel()
			if err != nil {
				t.m.Errors.WithLabelValues("prune").Inc()
				t.log.Warn("prune dead workers", zap.Error(err))
			} else if n > 0 {
				t.log.Info("pruned dead workers", zap.Int64("count", n))
			}
		}
	}
}

// backoff is the wait before retry n (1-based): 100ms doubling to 5s.
func backoff(n int) time.Duration {
	d := 100 * time.Millisecond
	for i := 1; i < n && d < 5*time.Second; i++ {
		d *= 2
	}
	return min(d, 5*time.Second)
}

// Log fields shared by every line about a run.
