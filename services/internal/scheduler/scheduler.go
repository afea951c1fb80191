// Package scheduler accepts workflow starts and answers describe requests.
//
// A start arrives either as a core NATS request on kagzi.start.<namespace>.<workflow>
// (served by the schedulers' queue group and answered only after the run row is
// committed) or as a JetStream publish on kagzi.submit.<namespace>.<workflow> (held by the
// submit stream and acked only after the commit). The namespace is the subject's: NATS
// permissions confine a client identity to its namespace's subjects, and a request whose
// body names another namespace is refused with permission_denied. Either way the run is inserted QUEUED, which makes the row its own
// outbox: the task doorbell is published after the commit, and if that publish is lost
// the timer's reconciler publishes it again.
//
// The package has no fx: it takes plain values and is wired in services/scheduler.
package scheduler

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/groupcommit"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// Config tunes a scheduler. Every zero field takes the default named beside it.
type Config struct {
	// Limits bound what a start may carry; zero fields take wire.DefaultLimits().
	Limits wire.Limits
	// DefaultMaxAttempts applies when a request names none (5). A request's own
	// max_attempts must be within 1..100.
	DefaultMaxAttempts int
	// SubmitConsumer tunes the durable consumer of the submit stream. Zero fields take:
	// AckWait 30s, MaxAckPending 1000, and MaxDeliver unlimited, because a start held by
	// the stream must survive a PostgreSQL outage of any length (poison messages are
	// terminated by the scheduler itself, so they do not need MaxDeliver either).
	SubmitConsumer bus.ConsumerConfig
	// EnsureStreamsEvery is how often streams are re-created if they vanished (30s).
	EnsureStreamsEvery time.Duration
	// RequestQueue bounds the request-reply requests (starts and describes) of one
	// namespace that wait for a request worker (256); the scheduler holds at most
	// 16 × RequestQueue in all, and 64 MiB of their payloads. A request beyond a bound is
	// answered at once with overloaded, which clients retry after a backoff.
	RequestQueue int
	// NamespaceRate bounds the request-reply requests one namespace may bring to this
	// scheduler per second, with a burst of one second's worth (0: no limit). A request
	// over it is answered at once with overloaded, like one beyond RequestQueue. In a
	// deployment shared by tenants it keeps one tenant's flood from slowing the others.
	NamespaceRate int
}

const (
	// requestWorkers bounds concurrent request-reply handlers (starts and describes).
	requestWorkers = 64
	// defaultRequestQueue, queuesPerScheduler and queuedBytes bound the requests waiting
	// for a worker (Config.RequestQueue).
	defaultRequestQueue = 256
	queuesPerScheduler  = 16
	queuedBytes         = 64 << 20
	shedLogEvery        = 10 * time.Second
	// submitInFlight bounds concurrent submit-stream handlers; submitBatch is how many
	// messages one pull asks for.
	submitInFlight = 32
	submitBatch    = 64
	// opTimeout bounds one request's database and publish work.
	opTimeout = 10 * time.Second
	// stopGrace is how long Stop lets in-flight work finish before cancelling it.
	stopGrace          = 10 * time.Second
	maxAttemptsCeiling = 100
)

func (c Config) withDefaults() Config {
	c.Limits = c.Limits.OrDefaults()
	if c.DefaultMaxAttempts <= 0 {
		c.DefaultMaxAttempts = 5
	}
	if c.SubmitConsumer.AckWait <= 0 {
		c.SubmitConsumer.AckWait = 30 * time.Second
	}
	if c.SubmitConsumer.MaxAckPending <= 0 {
		c.SubmitConsumer.MaxAckPending = 1000
	}
	if c.SubmitConsumer.MaxDeliver == 0 {
		c.SubmitConsumer.MaxDeliver = -1
	}
	if c.EnsureStreamsEvery <= 0 {
		c.EnsureStreamsEvery = 30 * time.Second
	}
	if c.RequestQueue <= 0 {
		c.RequestQueue = defaultRequestQueue
	}
	return c
}

// Scheduler serves starts and describes. Start it once, stop it once.
type Scheduler struct {
	cfg Config
	st  *store.Store
	b   *bus.Bus
	log *zap.Logger
	m   *Metrics
	// inserts group-commits concurrent starts: one statement and one commit for all the
	// starts that arrive while the previous batch is being written.
	inserts *groupcommit.Batcher[store.RunInsertParams, store.InsertResult]

	mu      sync.Mutex
	state   int // 0 new, 1 started, 2 stopped
	subs    []*nats.Subscription
	submits jetstream.MessagesContext // the live submit iterator, drained by Stop

	adm    *admission      // request handlers waiting for the worker pool, per namespace
	limit  *rateLimiter    // requests a second per namespace; nil: no limit
	quit   chan struct{}   // closed by Stop: no new work
	runCtx context.Context // cancelled stopGrace after Stop
	cancel context.CancelFunc
	wg     sync.WaitGroup

	shed       atomic.Int64 // requests refused since the last log line about it
	shedLogged atomic.Int64 // when that line was written, unix nanoseconds
}

// New returns a scheduler. A nil logger logs nothing; nil metrics are not registered.
func New(cfg Config, st *store.Store, b *bus.Bus, log *zap.Logger, m *Metrics) *Scheduler {
	if log == nil {
		log = zap.NewNop()
	}
	if m == nil {
		m = NewMetrics(nil)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	cfg = cfg.withDefaults()
	return &Scheduler{
		cfg:    cfg,
		st:     st,
		b:      b,
		log:    log.Named("scheduler"),
		m:      m,
		adm:    newAdmission(cfg.RequestQueue, queuesPerScheduler*cfg.RequestQueue, queuedBytes),
		limit:  newRateLimiter(cfg.NamespaceRate, time.Now),
		quit:   make(chan struct{}),
		runCtx: runCtx,
		cancel: cancel,
	}
}

// Start ensures the streams, subscribes to starts and describes and starts consuming the
// submit stream. It returns once the subscriptions are registered with the server; ctx
// bounds only that start-up. A stream that cannot be created now is a warning: the
// background loops keep trying.
func (s *Scheduler) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state != 0 {
		return errors.New("scheduler: Start called twice or after Stop")
	}
	s.inserts = groupcommit.New(2, 256, s.st.RunsInsert, groupcommit.FlushTimeout(opTimeout))

	if err := s.b.EnsureStreams(ctx); err != nil {
		s.m.EnsureFailures.Inc()
		s.log.Warn("jetstream streams not ready; retrying in the background", zap.Error(err))
	}

	nc := s.b.Conn()
	startSub, err := nc.QueueSubscribe(wire.StartSubjects, wire.SchedulerQueueGroup, func(msg *nats.Msg) {
		s.enqueue(msg, wire.StartSubjectPrefix, startRefusals, s.m.Starts, func(ctx context.Context) { s.handleStart(ctx, msg) })
	})
	if err != nil {
		return fmt.Errorf("subscribe to starts: %w", err)
	}
	describeSub, err := nc.QueueSubscribe(wire.DescribeSubjects, wire.SchedulerQueueGroup, func(msg *nats.Msg) {
		s.enqueue(msg, wire.APISubjectPrefix, describeRefusals, s.m.Describes, func(ctx context.Context) { s.handleDescribe(ctx, msg) })
	})
	if err != nil {
		_ = startSub.Unsubscribe()
		return fmt.Errorf("subscribe to describes: %w", err)
	}
	s.subs = []*nats.Subscription{startSub, describeSub}
	// The flush makes the server hold the subscriptions before Start returns, so a
	// request sent right after Start is served. A broker that is down is not fatal: the
	// client re-sends subscriptions when it reconnects.
	if err := nc.FlushWithContext(ctx); err != nil {
		s.log.Warn("nats flush after subscribing; subscriptions take effect on reconnect", zap.Error(err))
	}

	s.wg.Add(requestWorkers + 2)
	for range requestWorkers {
		go s.worker()
	}
	go s.consumeSubmits()
	go s.maintain()
	s.state = 1
	s.log.Info("scheduler started",
		zap.String("start_subject", wire.StartSubjects),
		zap.String("queue_group", wire.SchedulerQueueGroup))
	return nil
}

// Stop stops taking work, finishes what was taken (drained subscriptions and submit
// messages already fetched) and waits for every goroutine. Work still running after
// stopGrace is cancelled; its request is retried by its client or redelivered by the
// stream. Idempotent.
func (s *Scheduler) Stop() {
	s.mu.Lock()
	if s.state != 1 {
		s.state = 2
		s.mu.Unlock()
		s.cancel()
		if s.inserts != nil {
			s.inserts.Close() // Start failed after making it
		}
		return
	}
	s.state = 2
	subs, submits := s.subs, s.submits
	s.mu.Unlock()

	drainCtx, cancelDrain := context.WithTimeout(context.Background(), stopGrace)
	for _, sub := range subs {
		drainSub(drainCtx, sub)
	}
	cancelDrain()
	if submits != nil {
		submits.Drain()
	}
	close(s.quit)
	t := time.AfterFunc(stopGrace, s.cancel)
	s.wg.Wait()
	t.Stop()
	s.cancel()
	s.inserts.Close()
	s.log.Info("scheduler stopped")
}

// drainSub lets a subscription hand over the messages it already holds, then closes it;
// at ctx's end it gives up and drops the rest (their requesters time out and retry).
func drainSub(ctx context.Context, sub *nats.Subscription) {
	closed := sub.StatusChanged(nats.SubscriptionClosed)
	if err := sub.Drain(); err != nil {
		// The connection is gone; the messages it held are gone with it.
		_ = sub.Unsubscribe()
		return
	}
	for {
		select {
		case _, ok := <-closed:
			if !ok {
				return
			}
		case <-ctx.Done():
			_ = sub.Unsubscribe()
			return
		}
	}
}

// Replies to a request refused because its queue was full or its namespace over its
// rate, encoded once: shedding must cost next to nothing, or a flood would take the
// scheduler down by its refusals.
var (
	queueFullError = wire.ToError(wire.Errorf(wire.ErrOverloaded,
		"the scheduler's queue for this namespace is full; nothing was done: retry with the same request id after a backoff"))
	overRateError = wire.ToError(wire.Errorf(wire.ErrOverloaded,
		"this namespace is over its request rate; nothing was done: retry with the same request id after a backoff"))
	startRefusals = refusals{
		queueFull: mustJSON(wire.StartReply{Error: queueFullError}),
		overRate:  mustJSON(wire.StartReply{Error: overRateError}),
	}
	describeRefusals = refusals{
		queueFull: mustJSON(wire.DescribeReply{Error: queueFullError}),
		overRate:  mustJSON(wire.DescribeReply{Error: overRateError}),
	}
)

// refusals are the encoded overloaded replies of one kind of request.
type refusals struct{ queueFull, overRate []byte }

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// enqueue hands a request to the worker pool, queued behind its namespace's earlier
// requests (admission). It runs in the subscription's delivery goroutine and never
// blocks it: a request over its namespace's rate, or whose queue is full, is answered
// overloaded at once and counted in results (kagzi_starts_total or kagzi_describe_total,
// result "rate_limited" or "overloaded").
func (s *Scheduler) enqueue(msg *nats.Msg, prefix string, refused refusals, results *prometheus.CounterVec, fn func(context.Context)) {
	ns, _, _ := strings.Cut(strings.TrimPrefix(msg.Subject, prefix), ".")
	reply, result := refused.overRate, resultRateLimited
	if s.limit.allow(ns) {
		if s.adm.offer(ns, len(msg.Data), fn) {
			s.m.Queued.Inc()
			return
		}
		reply, result = refused.queueFull, resultOverloaded
	}
	results.WithLabelValues(result).Inc()
	s.noteShed(ns)
	if msg.Reply != "" {
		if err := msg.Respond(reply); err != nil {
			s.log.Debug("send overloaded reply", zap.String("subject", msg.Subject), zap.Error(err))
		}
	}
}

// noteShed logs shedding at most once per shedLogEvery, with the count since the last
// line: under a flood a line per refusal would be a second flood.
func (s *Scheduler) noteShed(ns string) {
	n := s.shed.Add(1)
	now := time.Now().UnixNano()
	last := s.shedLogged.Load()
	if now-last < int64(shedLogEvery) || !s.shedLogged.CompareAndSwap(last, now) {
		return
	}
	s.shed.Add(-n)
	s.log.Warn("requests refused as overloaded: a namespace's queue is full or its rate exceeded",
		zap.String("namespace_token", ns), zap.Int64("refused", n), zap.Int("queued", s.adm.queued()))
}

// worker runs queued requests. After Stop it finishes what is still queued (the
// subscriptions were drained into the queue first); runCtx bounds how long that takes.
func (s *Scheduler) worker() {
	defer s.wg.Done()
	run := func() {
		fn := s.adm.take()
		s.m.Queued.Dec()
		ctx, cancel := context.WithTimeout(s.runCtx, opTimeout)
		fn(ctx)
		cancel()
	}
	for {
		select {
		case <-s.adm.ready:
			run()
		case <-s.quit:
			for {
				select {
				case <-s.adm.ready:
					run()
				default:
					return
				}
			}
		}
	}
}

// maintain re-creates the streams periodically, so a broker that lost its store gets
// them back without an operator.
func (s *Scheduler) maintain() {
	defer s.wg.Done()
	tick := time.NewTicker(s.cfg.EnsureStreamsEvery)
	defer tick.Stop()
	for {
		select {
		case <-s.quit:
			return
		case <-tick.C:
			ctx, cancel := context.WithTimeout(s.runCtx, opTimeout)
			if err := s.b.EnsureStreams(ctx); err != nil {
				s.m.EnsureFailures.Inc()
				s.log.Warn("ensure jetstream streams", zap.Error(err))
			}
			cancel()
		}
	}
}

// sleep waits d or until Stop; false means stop.
func (s *Scheduler) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.quit:
		return false
	}
}

// stopRequested reports whether Stop has begun. Stop drains the submit iterator before
// it closes quit, so the consumer loop asks this rather than quit to tell a drain from a
// failure.
func (s *Scheduler) stopRequested() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state == 2
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
