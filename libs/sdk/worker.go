package sdk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/semaphore"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/clock"
	"github.com/kagzi/kagzi/libs/failpoint"
	"github.com/kagzi/kagzi/libs/groupcommit"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// WorkerConfig configures a Worker. Pool and Conn are required; everything else has a
// default.
type WorkerConfig struct {
	Pool *pgxpool.Pool // the executor's PostgreSQL pool
	Conn *nats.Conn    // the executor's NATS connection

	Namespace     string        // default "default"
	Concurrency   int           // runs executed at once; default 1000 (each costs a goroutine while it runs)
	Lease         time.Duration // how long a claim holds a run without renewal; default 30s
	ShutdownGrace time.Duration // Stop waits this long for runs to finish before handing them back; default 25s
	RetryBackoff  time.Duration // first retry delay after a failed attempt, doubling; default 1s
	MaxBackoff    time.Duration // cap of the retry delay; default 5m
	Consumer      bus.ConsumerConfig
	Limits        wire.Limits  // zero fields take wire.DefaultLimits()
	Logger        *slog.Logger // default: discard
	// Codec seals inputs, step outputs, outputs and error messages (see NewAEADCodec).
	// Clients starting these workflows and reading their results need the same codec.
	Codec Codec
	// StepTimeout bounds every step body that sets no StepTimeout of its own; 0: none.
	StepTimeout time.Duration
	// LocalSleepMax: a sleep this short is recorded and then waited out in process, the
	// run still held (its lease renewed, a slot taken), and goes on at once when it ends;
	// a longer one parks the run and frees the executor until the timer wakes it. Either
	// way the sleep is durable: after a crash the run resumes at its recorded wake time.
	// Default min(5s, Lease/3); negative: every sleep parks.
	LocalSleepMax time.Duration
	// ID is the worker's id, stored as the lease owner of the runs it holds. Default:
	// "<Name>/<pid>-<random>" when Name is set, else hostname-pid-random. Ids of the form
	// "<name>/…" belong to the worker named name: set Name rather than such an ID.
	ID string
	// Name is the worker's stable name: the same across restarts of one executor (a
	// StatefulSet pod name, a systemd unit), and never shared by two executors alive at
	// once in a namespace. Optional; 1–255 bytes of [A-Za-z0-9_-]. A named worker holds a
	// PostgreSQL advisory lock on its name for as long as it runs, on one session of its
	// pool (so the pool needs at least 2); holding it proves that every earlier
	// incarnation is dead, so at start it hands back at once the runs they still held, as
	// their leases would a lease later (attempt and lapse counted). If another session holds the name, the worker warns,
	// runs without it and takes it over when it is freed.
	Name string
	// Clock is read for the worker's lease deadlines and sleep timing, which it measures
	// as intervals between its readings; wake times and leases themselves are set by the
	// database's clock. Default: clock.Default().
	Clock clock.Clock
	// SkipSchemaCheck skips the start-up check that the database schema is at least as
	// new as this SDK. Services that migrate at start-up check by migrating.
	SkipSchemaCheck bool
	// IsolateAfterLapses: a run whose last this many attempts in a row ended with their
	// lease lapsing (their executor died, each time, while holding it) is run alone: the
	// executor that claims it finishes or hands back its other runs first and takes no
	// new one until it is done, so that a run which kills its executor (os.Exit, a fatal
	// error in a step) takes no other run down with it, and no innocent run spends its
	// attempts on another's crashes. One lapse is not enough to isolate a run: every run
	// an executor held when it was killed has one. Nor is a run counted again whose
	// attempt recorded a step before it lapsed: it got on, and only stood beside what
	// killed its executor. Default 2, or 1 with Sandboxes; negative: never.
	IsolateAfterLapses int
	// Sandboxes: when above 0, a run that must run alone (IsolateAfterLapses) runs in a
	// sandbox instead, a child process that runs one run at a time, at most this many at
	// once; the executor goes on taking work beside them. A run that kills its process
	// then kills only its sandbox, whose death the executor sees at once: the attempt
	// ends then, not a lease later. Running alone is then cheap, so one lapse is enough.
	// Should a sandbox not start, the run runs alone here as without sandboxes.
	//
	// A sandbox is this program started again (os.Executable) with the same arguments
	// and environment, plus KAGZI_SANDBOX. Its main must reach this worker's Start as it
	// did here, configured alike and without side effects that two processes cannot
	// share (a listening port, say): in a sandbox, Start serves the runs its executor
	// hands it and ends the process when the executor stops or dies, never returning.
	// One worker per namespace and program; another worker's Start in a sandbox returns
	// at once and takes no work. The sandboxes count against Concurrency.
	Sandboxes int
	// SandboxEveryRun runs every run in a sandbox, not only those that must run alone:
	// Concurrency sandboxes, one per slot. A run that kills its process then never takes
	// another run down, not even on its first attempt, before anything is known of it:
	// the prefork model of Celery and Unicorn. It costs a process per slot, with its own
	// database pool, and a pipe round trip per run; suited to tens of slots, not
	// thousands. Sandboxes is ignored.
	SandboxEveryRun bool
}

func (c *WorkerConfig) setDefaults() error {
	if c.Pool == nil || c.Conn == nil {
		return wire.Errorf(wire.ErrInvalidArgument, "worker config needs Pool and Conn")
	}
	if c.Namespace == "" {
		c.Namespace = wire.DefaultNamespace
	}
	if err := wire.ValidateName("namespace", c.Namespace); err != nil {
		return err
	}
	if c.Concurrency <= 0 {
		c.Concurrency = 1000
	}
	if c.Lease <= 0 {
		c.Lease = 30 * time.Second
	}
	if c.Lease < 300*time.Millisecond {
		return wire.Errorf(wire.ErrInvalidArgument, "lease %s is shorter than 300ms", c.Lease)
	}
	if c.LocalSleepMax == 0 {
		c.LocalSleepMax = min(5*time.Second, c.Lease/3)
	}
	if c.ShutdownGrace <= 0 {
		c.ShutdownGrace = 25 * time.Second
	}
	if c.RetryBackoff <= 0 {
		c.RetryBackoff = time.Second
	}
	if c.MaxBackoff <= 0 {
		c.MaxBackoff = 5 * time.Minute
	}
	if c.Consumer == (bus.ConsumerConfig{}) {
		c.Consumer = bus.DefaultConsumerConfig()
	}
	c.Limits = c.Limits.OrDefaults()
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Clock == nil {
		c.Clock = clock.Default()
	}
	c.Sandboxes = min(max(c.Sandboxes, 0), c.Concurrency)
	if c.SandboxEveryRun {
		c.Sandboxes = c.Concurrency
	}
	if c.IsolateAfterLapses == 0 {
		c.IsolateAfterLapses = 2
		if c.Sandboxes > 0 {
			c.IsolateAfterLapses = 1
		}
	}
	if c.Name != "" {
		if err := wire.ValidateName("worker", c.Name); err != nil {
			return err
		}
		if c.ID != "" && !strings.HasPrefix(c.ID, c.Name+"/") {
			return wire.Errorf(wire.ErrInvalidArgument, "worker id %q of a worker named %q does not start with %q", c.ID, c.Name, c.Name+"/")
		}
	}
	if c.ID == "" && c.Name != "" {
		c.ID = fmt.Sprintf("%s/%d-%s", c.Name, os.Getpid(), wire.NewRunID()[24:])
	}
	if c.ID == "" {
		host, _ := os.Hostname()
		c.ID = fmt.Sprintf("%s-%d-%s", host, os.Getpid(), wire.NewRunID()[24:])
	}
	return nil
}

// WorkerStats counts what a Worker did since it started.
type WorkerStats struct {
	Claimed        int64 // runs claimed
	ClaimNoops     int64 // doorbells that claimed nothing (stale, duplicate or forged)
	Poison         int64 // task messages that were not tasks, terminated
	StepsRecorded  int64
	Completed      int64
	Failed         int64 // runs that ended FAILED here
	Retried        int64 // attempts that ended in a durable retry
	FencedRejected int64 // writes refused because another executor holds the run
	LeaseLost      int64 // runs dropped because their lease was lost
	Released       int64 // runs handed back: at shutdown, or to make way for a run that runs alone
	RanAlone       int64 // attempts run alone after lapses in a row (IsolateAfterLapses)
	Sandboxed      int64 // attempts run in a sandbox (Sandboxes), counted in Claimed too
	SandboxesLost  int64 // sandboxes that died while they ran a run
	// SandboxesRetired: sandboxes ended after their run because a step body they had
	// abandoned at its timeout still ran (only ending its process stops it).
	SandboxesRetired int64
	StepTimeouts     int64 // step bodies that did not return within their timeout
	// Abandoned: step bodies abandoned at their timeout that have not returned yet. Go
	// cannot stop a goroutine: a body that ignores its context runs on, and holds what
	// it holds, until its process ends. Sandboxes end theirs after the run.
	Abandoned int64
	InFlight  int64
}

type workerMetrics struct {
	claimed, claimNoops, poison, stepsRecorded, completed, failed, retried atomic.Int64
	fencedRejected, leaseLost, released, inFlight, stepTimeouts, ranAlone  atomic.Int64
	sandboxed, sandboxesLost, sandboxesRetired, abandoned                  atomic.Int64
}

// Worker hosts workflows: it pulls doorbells from the shared JetStream consumer of each
// workflow it serves, claims runs with a fenced lease and replays them.
type Worker struct {
	cfg     WorkerConfig
	store   *store.Store
	bus     *bus.Bus
	log     *slog.Logger
	defs    map[string]Registration
	slots   chan struct{}
	metrics workerMetrics
	pl      payloads

	// slotWaiters counts the fetch loops waiting for a free slot. While one waits, a pull
	// for one message waits burstPullWait, not fetchExpiry: a worker with more workflows
	// than slots has its idle workflows take turns on the slots rather than each sit on
	// one for a second while another's run waits.
	slotWaiters atomic.Int32

	// lastLeaseHint is when the last lease notice went to the timers, in nanoseconds since
	// hintEpoch: an interval on the worker's clock, which a step of the wall clock cannot
	// stall.
	lastLeaseHint atomic.Int64
	hintEpoch     time.Time

	// gate admits executions, one unit each; a run that must run alone takes them all.
	// Waiters are served in order, so while such a run waits no other gets ahead of it.
	// isolating is set while such a run waits or runs: this worker then takes no other.
	gate      *semaphore.Weighted
	isolating atomic.Bool

	// sandboxes run the runs that must run alone, or every run with SandboxEveryRun,
	// when cfg.Sandboxes > 0; nil else.
	// sandboxed: this process is itself a sandbox (see serveSandbox).
	sandboxes       *sandboxPool
	sandboxed       bool
	sandboxExtraEnv []string // tests (export_test.go)

	// Group commit of the hot statements across concurrent runs.
	claims    *groupcommit.Batcher[store.ClaimRequest, store.ClaimResult]
	steps     *groupcommit.Batcher[store.StepInsertParams, error]
	completes *groupcommit.Batcher[store.CompleteRequest, error]

	mu              sync.Mutex
	held            map[wire.RunID]*runContext
	started         bool
	stopOnce        sync.Once
	cancelFetch     context.CancelFunc
	cancelHeartbeat context.CancelFunc
	loops           sync.WaitGroup // fetch loops
	heartbeats      sync.WaitGroup // the lease heartbeat, which outlives the fetch loops
	runs            sync.WaitGroup // executing runs
	name            *nameLock      // the lock on cfg.Name; nil when unnamed
}

// NewWorker makes a Worker; call Register, then Start.
func NewWorker(cfg WorkerConfig) (*Worker, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	b, err := bus.New(cfg.Conn, bus.DefaultStreamConfig())
	if err != nil {
		return nil, err
	}
	return &Worker{
		cfg:   cfg,
		store: store.New(cfg.Pool),
		bus:   b,
		log:   cfg.Logger.With("worker_id", cfg.ID, "namespace", cfg.Namespace),
		defs:  map[string]Registration{},
		slots: make(chan struct{}, cfg.Concurrency),
		held:  map[wire.RunID]*runContext{},
		gate:  semaphore.NewWeighted(int64(cfg.Concurrency)),
		pl:    payloads{codec: cfg.Codec},
		// A lease back, so that the first notice is due at once.
		hintEpoch: cfg.Clock.Now().Add(-cfg.Lease),
	}, nil
}

// ID is the worker's id, as stored in lease_owner.
func (w *Worker) ID() string { return w.cfg.ID }

// Register adds workflows. Call it before Start.
func (w *Worker) Register(defs ...Registration) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.started {
		return fmt.Errorf("register workflows: worker already started")
	}
	for _, d := range defs {
		if err := wire.ValidateName("workflow", d.Name()); err != nil {
			return err
		}
		if _, dup := w.defs[d.Name()]; dup {
			return wire.Errorf(wire.ErrInvalidArgument, "workflow %q registered twice", d.Name())
		}
		w.defs[d.Name()] = d
	}
	return nil
}

// Stats returns the worker's counters.
func (w *Worker) Stats() WorkerStats {
	m := &w.metrics
	return WorkerStats{Claimed: m.claimed.Load(), ClaimNoops: m.claimNoops.Load(), Poison: m.poison.Load(),
		StepsRecorded: m.stepsRecorded.Load(), Completed: m.completed.Load(), Failed: m.failed.Load(),
		Retried: m.retried.Load(), FencedRejected: m.fencedRejected.Load(), LeaseLost: m.leaseLost.Load(),
		Released: m.released.Load(), RanAlone: m.ranAlone.Load(), Sandboxed: m.sandboxed.Load(),
		SandboxesLost: m.sandboxesLost.Load(), SandboxesRetired: m.sandboxesRetired.Load(),
		StepTimeouts: m.stepTimeouts.Load(), Abandoned: m.abandoned.Load(), InFlight: m.inFlight.Load()}
}

// Start checks the schema, announces the worker and begins pulling work. It returns once
// the consumers exist; ctx bounds only the start-up.
func (w *Worker) Start(ctx context.Context) error {
	w.mu.Lock()
	if w.started {
		w.mu.Unlock()
		return fmt.Errorf("start worker: already started")
	}
	w.started = true
	w.mu.Unlock()
	if len(w.defs) == 0 {
		return wire.Errorf(wire.ErrInvalidArgument, "start worker: no workflows registered")
	}
	if ns, parent, ok := inSandbox(); ok {
		if ns != w.cfg.Namespace || parent == "" {
			return nil // another worker of the program's is the one sandboxed
		}
		w.sandboxed, w.cfg.ID = true, parent
		return w.serveSandbox()
	}
	if !w.cfg.SkipSchemaCheck {
		if err := store.CheckSchema(ctx, w.cfg.Pool); err != nil {
			return fmt.Errorf("start worker: %w", err)
		}
	}
	// NATS may still be starting (or restarting): a worker that cannot create its
	// consumers now starts anyway and keeps trying in its fetch loops.
	consumers := make(map[string]jetstream.Consumer, len(w.defs))
	if err := w.bus.EnsureStreams(ctx); err != nil {
		// Not fatal when the streams exist but could not be brought up to date (an
		// executor may create streams, not change them): the consumers may still work.
		w.log.Warn("jetstream streams not as configured; the worker will keep trying", "error", err)
	}
	for name := range w.defs {
		cons, err := w.bus.EnsureTaskConsumer(ctx, w.cfg.Namespace, name, w.cfg.Consumer)
		if err != nil {
			w.log.Warn("task consumer not ready; the worker will keep trying", "workflow", name, "error", err)
			continue
		}
		consumers[name] = cons
	}
	if err := w.store.WorkerHeartbeat(ctx, w.announcement()); err != nil {
		return fmt.Errorf("start worker: %w", err)
	}
	switch {
	case w.cfg.Name != "" && w.cfg.Pool.Config().MaxConns < 2:
		// The lock keeps one session of the pool for itself: with one, no work would run.
		w.log.Warn("worker name not locked: the pool has fewer than 2 sessions; runs of a dead predecessor wait for their leases",
			"name", w.cfg.Name)
	case w.cfg.Name != "":
		// Before the first fetch: the runs a dead predecessor held are queued again
		// before this worker asks for work.
		w.name = w.startNameLock(ctx)
	}
	for i := 0; i < w.cfg.Concurrency; i++ {
		w.slots <- struct{}{}
	}
	if w.cfg.Sandboxes > 0 {
		w.sandboxes = newSandboxPool(w.cfg.Sandboxes, w.cfg.Namespace, w.cfg.ID, w.sandboxExtraEnv)
	}
	w.startBatchers()
	fetchCtx, cancelFetch := context.WithCancel(context.Background())
	hbCtx, cancelHeartbeat := context.WithCancel(context.Background())
	w.cancelFetch, w.cancelHeartbeat = cancelFetch, cancelHeartbeat
	for name, def := range w.defs {
		w.loops.Add(1)
		go w.consume(fetchCtx, def, consumers[name])
	}
	w.heartbeats.Add(1)
	go w.heartbeat(hbCtx)
	w.log.Info("worker started", "workflows", len(w.defs), "concurrency", w.cfg.Concurrency, "lease", w.cfg.Lease)
	return nil
}

// startBatchers starts the group commit of claims, steps and completions.
func (w *Worker) startBatchers() {
	// A write still unanswered after a lease is worth nothing (the lease is gone), and
	// must not hold up the writes queued behind it.
	bound := groupcommit.FlushTimeout(w.cfg.Lease)
	w.claims = groupcommit.New(2, 256, func(ctx context.Context, reqs []store.ClaimRequest) []store.ClaimResult {
		return w.store.RunsClaim(ctx, w.cfg.Namespace, w.cfg.ID, w.cfg.Lease, reqs)
	}, bound)
	w.steps = groupcommit.New(2, 256, w.store.StepsInsert, bound)
	w.completes = groupcommit.New(2, 256, w.store.RunsComplete, bound)
}

func (w *Worker) announcement() store.Worker {
	names := make([]string, 0, len(w.defs))
	for n := range w.defs {
		names = append(names, n)
	}
	host, _ := os.Hostname()
	return store.Worker{ID: w.cfg.ID, Namespace: w.cfg.Namespace, Workflows: names, Hostname: host, PID: os.Getpid()}
}

// Stop stops taking work, lets running runs finish for up to ShutdownGrace (or until ctx
// ends), then hands the rest back to the queue so another executor resumes them at once
// rather than after their lease. Idempotent.
func (w *Worker) Stop(ctx context.Context) error {
	var err error
	w.stopOnce.Do(func() {
		if w.cancelFetch == nil {
			return
		}
		w.cancelFetch()
		w.loops.Wait()
		if w.sandboxes != nil {
			// Idle sandboxes end now; busy ones finish or hand back their run as this
			// worker does its own, within ShutdownGrace.
			w.sandboxes.stop()
		}
		// Leases keep being renewed while running runs finish within the grace period.
		defer func() { w.cancelHeartbeat(); w.heartbeats.Wait() }()

		done := make(chan struct{})
		go func() { w.runs.Wait(); close(done) }()
		grace := time.NewTimer(w.cfg.ShutdownGrace)
		defer grace.Stop()
		select {
		case <-done:
		case <-grace.C:
			w.handBack()
		case <-ctx.Done():
			w.handBack()
		}
		// Handed-back runs unwind at their next SDK call; a step body that ignores its
		// context is not waited for past a short bound.
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			w.log.Warn("stopping with step bodies still running", "in_flight", w.metrics.inFlight.Load())
		}
		w.claims.Close()
		w.steps.Close()
		w.completes.Close()
		delCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if e := w.store.WorkerDelete(delCtx, w.cfg.ID); e != nil {
			err = e
		}
		// Last: while the name is held no successor hands back what this worker holds.
		w.name.stop()
		w.log.Info("worker stopped", "released", w.metrics.released.Load())
	})
	return err
}

func (w *Worker) handBack() {
	w.mu.Lock()
	held := make([]*runContext, 0, len(w.held))
	for _, rc := range w.held {
		held = append(held, rc)
	}
	w.mu.Unlock()
	for _, rc := range held {
		// Release first, cancel after: the run's own error path (a cancelled step) must
		// find the run already QUEUED, or its retry write would win and park the run.
		w.release(rc, "hand back run at shutdown")
		rc.loseLease()
	}
}

// release puts a held run back in the queue without spending an attempt and announces
// it, for another executor (or this one, later) to take.
func (w *Worker) release(rc *runContext, what string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rc.ending.Store(true)
	d, err := w.store.RunRelease(ctx, rc.fenced())
	if err == nil {
		err = w.bus.PublishTasks(ctx, []bus.Doorbell{{Namespace: d.Namespace, Workflow: d.Workflow,
			Task: wire.Task{RunID: d.RunID, DispatchSeq: d.DispatchSeq, Lapses: d.Lapses}}})
		w.metrics.released.Add(1)
	}
	if err != nil && !errors.Is(err, wire.ErrLeaseLost) {
		rc.log.Warn(what, "error", err)
	}
}

// consume pulls doorbells for one workflow, never more than there are free slots, so a
// message is only taken when it can be run at once. A pull reserves its slots until it
// ends, so only a pull for one message waits long (an idle workflow sits on one slot,
// not on the slots a busy workflow of the same worker needs), and not even that while
// another workflow's loop waits for a slot; a pull for more ends soon; the size doubles
// while pulls fill, from one.
func (w *Worker) consume(ctx context.Context, def Registration, cons jetstream.Consumer) {
	defer w.loops.Done()
	backoff := newBackoff(100*time.Millisecond, 5*time.Second)
	want := 1
	for ctx.Err() == nil {
		if cons == nil {
			c, err := w.recreate(ctx, def.Name())
			if err != nil {
				if ctx.Err() == nil {
					w.log.Warn("create task consumer", "workflow", def.Name(), "error", err)
				}
				backoff.wait(ctx)
				continue
			}
			cons = c
		}
		// While a run waits to run alone, or runs alone, take no new work: a message taken
		// now would be claimed and then wait beside that run, exposed to its crash.
		if err := w.gate.Acquire(ctx, 1); err != nil {
			return
		}
		w.gate.Release(1)
		n := w.acquireSlots(ctx, want)
		if n == 0 {
			return
		}
		// A pull for one message waits for it as long as a pull may; a pull for more
		// waits burstPullWait at most, and gives back the slots it did not fill. A pull
		// that waited a second for many would sit on all their slots, while the
		// workflows beside it, which had work, waited for slots: a new executor's first
		// pulls, one per workflow, asked for every slot, and the first workflow's took
		// them all for a second (kagzi bench S1 did nothing for its first 0.7 s).
		// The pull is not tied to ctx: a stopping worker lets its last pull end and gives
		// back what it yields for immediate redelivery. It ends with the server's word
		// that it expired (FetchMaxWait), which comes after every message the server sent
		// for it: a pull that ended on a timer of its own (FetchContext) dropped the
		// messages still on their way, which came back only after AckWait, and with short
		// pulls that was every few hundred.
		wait := fetchExpiry
		if n > 1 || w.slotWaiters.Load() > 0 {
			wait = burstPullWait
		}
		batch, err := cons.Fetch(n, jetstream.FetchMaxWait(wait))
		if err != nil {
			w.releaseSlots(n)
			if ctx.Err() != nil {
				return
			}
			w.log.Warn("fetch tasks", "workflow", def.Name(), "error", err)
			if consumerGone(err) {
				cons = nil // the broker lost its state: recreate what we rely on
			}
			backoff.wait(ctx)
			continue
		}
		got := 0
		for msg := range batch.Messages() {
			if ctx.Err() != nil {
				_ = msg.Nak() // redelivered at once to a worker that is not stopping
				continue
			}
			got++
			w.runs.Add(1)
			go w.handle(def, msg)
		}
		w.releaseSlots(n - got)
		want = min(max(2*got, 1), w.cfg.Concurrency)
		if err := batch.Error(); err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) && !errors.Is(err, nats.ErrTimeout) {
			w.log.Warn("fetch tasks", "workflow", def.Name(), "error", err)
			if consumerGone(err) {
				cons = nil
			}
			backoff.wait(ctx)
			continue
		}
		backoff.reset()
	}
}

// consumerGone says whether a failed pull means the consumer must be made again. A pull
// on a consumer that no longer exists can go unanswered ("no responders") rather than
// fail with not-found: the task stream is memory-backed, and after a broker restart
// neither it nor its consumers exist until someone makes them again.
func consumerGone(err error) bool {
	return errors.Is(err, jetstream.ErrConsumerNotFound) || errors.Is(err, jetstream.ErrConsumerDeleted) ||
		errors.Is(err, jetstream.ErrStreamNotFound) || errors.Is(err, nats.ErrNoResponders)
}

func (w *Worker) recreate(ctx context.Context, workflow string) (jetstream.Consumer, error) {
	serr := w.bus.EnsureStreams(ctx)
	cons, err := w.bus.EnsureTaskConsumer(ctx, w.cfg.Namespace, workflow, w.cfg.Consumer)
	if err != nil {
		return nil, errors.Join(serr, err)
	}
	return cons, nil
}

// fetchExpiry bounds one pull request, and so how long Stop waits for the fetch loops.
const fetchExpiry = time.Second

// burstPullWait bounds a pull for more than one message: long enough that doorbells
// coming in a stream (a timer's wake-ups, a client's starts) are taken as they come by
// one pull rather than a pull each, short enough that the slots it did not fill are
// soon back for the worker's other workflows. A pull for no more than what the consumer
// held at once (FetchNoWait) cost each doorbell of such a stream a round trip of its own:
// S3's parked wake-ups were twice as late.
const burstPullWait = 20 * time.Millisecond

// acquireSlots blocks for one free slot, then takes whatever else is free at once, up to
// want; 0 when ctx ended first.
func (w *Worker) acquireSlots(ctx context.Context, want int) int {
	select {
	case <-w.slots:
	default:
		w.slotWaiters.Add(1)
		select {
		case <-w.slots:
			w.slotWaiters.Add(-1)
		case <-ctx.Done():
			w.slotWaiters.Add(-1)
			return 0
		}
	}
	n := 1
	for n < want {
		select {
		case <-w.slots:
			n++
		default:
			return n
		}
	}
	return n
}

func (w *Worker) releaseSlots(n int) {
	for i := 0; i < n; i++ {
		w.slots <- struct{}{}
	}
}

// handle answers one doorbell: claim, ack, run. It owns one slot.
func (w *Worker) handle(def Registration, msg jetstream.Msg) {
	growStack()
	defer w.runs.Done()
	defer w.releaseSlots(1)
	task, err := bus.DecodeTask(msg.Data())
	if err != nil {
		w.metrics.poison.Add(1)
		w.log.Warn("poison task message terminated", "subject", msg.Subject(), "error", err)
		_ = msg.Term()
		return
	}
	// A handler stalled here (a GC pause, a stopped process) outlives the message's
	// AckWait: the doorbell goes to another executor meanwhile, and the later of the two
	// claims must come to nothing.
	if err := failpoint.Inject(failpoint.ClaimBeforeClaim); err != nil {
		_ = msg.NakWithDelay(time.Second)
		return
	}
	// admitted gives back the gate's unit a run takes before its claim; nil: the run
	// runs alone, room made.
	var admitted func()
	if w.sandboxes != nil && (w.cfg.SandboxEveryRun || w.suspect(task.Lapses)) && w.runInSandbox(def, msg, task) {
		return
	}
	if w.suspect(task.Lapses) {
		// Room is made before the claim: while the other runs finish, the run is not
		// held, so should this executor die meanwhile it costs the run no attempt.
		done, ok := w.makeRoom(msg)
		if !ok {
			return
		}
		defer done()
	} else if w.gate.TryAcquire(1) {
		// Admitted before the claim, not after: a run that waits to run alone waits for
		// this one too, instead of the claim finding it there and handing the run back
		// (a write, and a trip to the back of the queue).
		admitted = sync.OnceFunc(func() { w.gate.Release(1) })
		defer admitted()
	} else {
		// A run waits here to run alone, or runs alone: the doorbell goes to another
		// executor rather than wait beside it.
		_ = msg.NakWithDelay(100 * time.Millisecond)
		return
	}
	// A claim held up (a backlog of claims, a slow database) keeps its doorbell in
	// progress, so that the short AckWait that brings a dead executor's doorbells back
	// soon does not also redeliver the doorbells of a live one.
	stopKeeping := keepInProgress(msg, w.cfg.Consumer.AckWait/3)
	run, ok, claimSent, err := w.claimTask(def, task)
	stopKeeping()
	if err != nil {
		// Not claimed, or not known to be: a redelivery claims it, or, had the claim
		// taken after all, the lease sweep brings the run back.
		w.log.Warn("claim run", "run_id", task.RunID, "error", err)
		_ = msg.NakWithDelay(time.Second)
		return
	}
	if !ok {
		w.metrics.claimNoops.Add(1)
		_ = msg.Ack()
		return
	}
	_ = msg.Ack()
	w.metrics.claimed.Add(1)
	w.hintLease(run.LeaseExpiresAt)
	w.execute(def, run, claimSent, admitted)
}

// claimTask claims the run a doorbell names; not ok: the doorbell was stale, a duplicate
// or forged. claimSent is a reading of the worker's clock that, plus the lease, is no
// later than the lease the database holds.
func (w *Worker) claimTask(def Registration, task wire.Task) (run store.ClaimedRun, ok bool, claimSent time.Time, err error) {
	claimSent = w.cfg.Clock.Now()
	req := store.ClaimRequest{RunID: task.RunID, DispatchSeq: task.DispatchSeq, Workflow: def.Name()}
	res, done := w.claims.Do(req)
	run, ok, err = res.Run, res.OK, res.Err
	if !done {
		err = errWorkerStopped
	}
	if err == nil && ok {
		// commit_then_error: the claim committed and its answer is lost.
		err = failpoint.Inject(failpoint.ClaimAfterCommitBeforeAck)
	}
	if err != nil && !errors.Is(err, errWorkerStopped) {
		run, ok, claimSent, err = w.recheckClaim(req, err)
	}
	return run, ok, claimSent, err
}

// recheckClaim settles a claim that came back with an error. The claim may have committed
// all the same (the connection lost during the commit, say): then the run is RUNNING
// under this worker's lease with nobody running it, and would wait for the lease to
// lapse and lose an attempt for a fault that was never its own. The database says which:
// it is asked until it answers, while such a lease would still be worth having. A run
// held already goes on here; leaseFrom is a reading of the worker's clock that, plus the
// lease, is no later than the lease the database holds for it.
func (w *Worker) recheckClaim(req store.ClaimRequest, cause error) (run store.ClaimedRun, ok bool, leaseFrom time.Time, err error) {
	if store.Rejected(cause) {
		// Refused (a deadlock, a timeout): the claim rolled back.
		return run, false, w.cfg.Clock.Now(), fmt.Errorf("claim did not take: %w", cause)
	}
	deadline := w.cfg.Clock.Now().Add(w.cfg.Lease / 2)
	b := newBackoff(20*time.Millisecond, time.Second)
	for {
		sent := w.cfg.Clock.Now()
		ctx, cancel := context.WithTimeout(context.Background(), max(deadline.Sub(sent), 100*time.Millisecond))
		run, held, err := w.store.RunClaimRecheck(ctx, w.cfg.Namespace, w.cfg.ID, req)
		cancel()
		switch {
		case err == nil && !held:
			return run, false, sent, fmt.Errorf("claim did not take: %w", cause)
		case err == nil && w.executing(run.ID, run.Fence):
			// A twin doorbell of the same dispatch settled it first and runs it.
			return run, false, sent, nil
		case err == nil:
			w.log.Info("claim confirmed after an ambiguous answer", "run_id", req.RunID, "error", cause)
			return run, true, sent.Add(run.LeaseExpiresAt.Sub(run.DBNow) - w.cfg.Lease), nil
		case !w.cfg.Clock.Now().Before(deadline):
			return run, false, sent, fmt.Errorf("claim unsettled: %w (re-check: %v)", cause, err)
		}
		b.wait(context.Background())
	}
}

// executing says whether this worker runs the run under this fence right now.
func (w *Worker) executing(id wire.RunID, fence int64) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	rc := w.held[id]
	return rc != nil && rc.run.Fence == fence
}

// execute replays a claimed run to its next stopping point. admitted nil: it runs
// alone, room made; else it holds a unit of the gate, which is enough unless the claim
// says it must run alone after all.
func (w *Worker) execute(def Registration, run store.ClaimedRun, claimSent time.Time, admitted func()) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rc := &runContext{
		Context: ctx, w: w, run: run, def: def, cancel: cancel,
		log: w.log.With("run_id", run.ID, "workflow", run.Workflow, "attempt", run.Attempt),
		// claimedAt is read after the claim returned, so it is no earlier than the
		// database's DBNow: time since it never overstates the time since DBNow, and a
		// resumed sleep never ends early. (The lease, conversely, counts from the send.)
		seen: map[string]int{}, stateBytes: len(run.Input), claimedAt: w.cfg.Clock.Now(),
	}
	for _, st := range run.Steps {
		rc.stateBytes += len(st.Output)
	}
	rc.confirmLease(claimSent)
	w.mu.Lock()
	if old := w.held[run.ID]; old != nil {
		if old.run.Fence == run.Fence {
			// One claim settled twice (twin doorbells, both answered ambiguously): it is
			// being run already.
			w.mu.Unlock()
			return
		}
		old.loseLease() // its claim is superseded: stop it at its next SDK call
	}
	w.held[run.ID] = rc
	w.mu.Unlock()
	w.metrics.inFlight.Add(1)
	defer func() {
		w.mu.Lock()
		// A later claim of the same run (after this one's lease lapsed) may have replaced
		// the entry: only this execution's own entry is removed.
		if w.held[run.ID] == rc {
			delete(w.held, run.ID)
		}
		w.mu.Unlock()
		w.metrics.inFlight.Add(-1)
	}()
	switch {
	case admitted == nil:
		w.metrics.ranAlone.Add(1)
		rc.log.Info("running alone: its last attempts ended with their lease lapsing", "lapses", run.Lapses)
	case !w.suspect(run.Lapses):
	case w.sandboxes != nil:
		// Its doorbell did not say it must run alone, its claim does: handed back, it
		// comes again with a doorbell that says so, and goes to a sandbox.
		admitted()
		w.release(rc, "hand back run for a sandbox")
		return
	default:
		// Its doorbell did not say it must run alone, its claim does: the whole gate is
		// taken for it, its own unit first given back.
		admitted()
		done, ok := w.admitAlone(rc)
		if !ok {
			return
		}
		defer done()
	}

	out, u, err := w.invoke(rc)
	switch {
	case u != nil && u.reason == unwindSuspended:
	case u != nil && u.reason == unwindLeaseLost:
		rc.log.Warn("run dropped: lease lost", "error", u.err)
	case u != nil && u.reason == unwindTerminal:
		w.finishFailed(rc, u.err, false)
	case err != nil:
		w.finishFailed(rc, err, !IsTerminal(err))
	default:
		w.finishCompleted(rc, out)
	}
}

// admitAlone lets a claimed run that must run alone execute, and returns what to call
// when it is done. A run whose last IsolateAfterLapses attempts each ended with its
// lease lapsing is likely what brings its executors down. It waits for the runs in
// progress for at most a lease (its own lease renewed meanwhile) and is handed back for
// another executor if they have not finished by then; while it waits or runs, every
// other doorbell this worker fetches is turned away unclaimed. Runs handed back are
// unstarted and spend no attempt. Not ok: the run was handed back, or lost while it
// waited.
func (w *Worker) admitAlone(rc *runContext) (done func(), ok bool) {
	if w.cfg.Concurrency == 1 {
		// TryAcquire fails while a run waits to run alone or runs alone.
		if !w.gate.TryAcquire(1) {
			w.release(rc, "hand back run beside one that runs alone")
			return nil, false
		}
		w.metrics.ranAlone.Add(1) // one slot: it is alone anyway
		return func() { w.gate.Release(1) }, true
	}
	done, err := w.takeAll(rc)
	switch {
	case err == nil:
		w.metrics.ranAlone.Add(1)
		rc.log.Info("running alone: its last attempts ended with their lease lapsing", "lapses", rc.run.Lapses)
		return done, true
	case errors.Is(err, errAnotherAlone):
		w.release(rc, "hand back run: another runs alone here")
	case rc.Err() == nil:
		// The runs here did not finish within a lease: let another executor try, rather
		// than keep this one from working or run beside them.
		w.release(rc, "hand back run that could not run alone")
	}
	return nil, false
}

// errAnotherAlone: a run already waits here to run alone, or runs alone.
var errAnotherAlone = errors.New("another run waits to run alone here")

// takeAll takes every unit of the gate for a run that must run alone, waiting at most a
// lease (or until ctx ends) for the runs in progress; while it waits or holds them, the
// worker takes no new work. done gives the gate back.
func (w *Worker) takeAll(ctx context.Context) (done func(), err error) {
	if !w.isolating.CompareAndSwap(false, true) {
		return nil, errAnotherAlone
	}
	ctx, cancel := context.WithTimeout(ctx, w.cfg.Lease)
	defer cancel()
	all := int64(w.cfg.Concurrency)
	if err := w.gate.Acquire(ctx, all); err != nil {
		w.isolating.Store(false)
		return nil, err
	}
	return func() { w.gate.Release(all); w.isolating.Store(false) }, nil
}

// suspect says whether a run with this many lapses in a row runs alone.
func (w *Worker) suspect(lapses int) bool {
	// In a sandbox every run runs alone already.
	return !w.sandboxed && w.cfg.IsolateAfterLapses > 0 && lapses >= w.cfg.IsolateAfterLapses
}

// makeRoom waits, before claiming a doorbell whose run must run alone, until this worker
// runs nothing else, and takes no new work meanwhile; done gives the room back. It waits
// at most a lease, keeping the message in progress; not ok: another run already waits
// here to run alone, or the others did not finish in time, and the doorbell went back
// for another executor.
func (w *Worker) makeRoom(msg jetstream.Msg) (done func(), ok bool) {
	if w.cfg.Concurrency == 1 {
		return func() {}, true // its slot is the only one
	}
	// Kept in progress while it waits, so AckWait does not hand it to another executor.
	stopKeeping := keepInProgress(msg, w.cfg.Consumer.AckWait/3)
	done, err := w.takeAll(context.Background())
	stopKeeping()
	switch {
	case errors.Is(err, errAnotherAlone):
		_ = msg.NakWithDelay(100 * time.Millisecond)
		return nil, false
	case err != nil:
		_ = msg.Nak()
		return nil, false
	}
	return done, true
}

// keepInProgress tells the broker every period that msg is still being handled, until
// stop is called: the message's AckWait then only runs out for an executor that died or
// stalled. Nothing is sent when stop comes within the first period, as it does for
// nearly every message; a timer, not a goroutine, waits for it.
func keepInProgress(msg jetstream.Msg, period time.Duration) (stop func()) {
	period = max(period, 100*time.Millisecond)
	var (
		mu      sync.Mutex
		stopped bool
		t       *time.Timer
	)
	mu.Lock()
	defer mu.Unlock()
	t = time.AfterFunc(period, func() {
		mu.Lock()
		defer mu.Unlock()
		if stopped {
			return
		}
		_ = msg.InProgress()
		t.Reset(period)
	})
	return func() {
		mu.Lock()
		defer mu.Unlock()
		stopped = true
		t.Stop()
	}
}

// invoke runs the workflow function, recovering the SDK's unwinding and user panics.
func (w *Worker) invoke(rc *runContext) (out []byte, u *unwind, err error) {
	defer func() {
		if r := recover(); r != nil {
			if uw, ok := r.(unwind); ok {
				u = &uw
				return
			}
			err = fmt.Errorf("workflow panicked: %v\n%s", r, debug.Stack())
		}
	}()
	if nb := rc.run.NotBefore; nb != nil {
		// The timer woke the run ahead of its wake time so that its dispatch and claim
		// are done by then; it goes on at that time, not before (a sleep's or a retry's).
		rc.waitLocally(nb.Sub(rc.run.DBNow) - w.cfg.Clock.Now().Sub(rc.claimedAt))
	}
	input, err := w.pl.open(rc.run.Input, adInput(rc.run.ID))
	if err != nil {
		return nil, nil, Terminal(fmt.Errorf("decode input: %w", err))
	}
	out, err = rc.def.invoke(rc, input)
	if err != nil {
		return nil, nil, err
	}
	if len(out) > w.cfg.Limits.MaxStepOutputBytes {
		return nil, nil, Terminal(wire.Errorf(wire.ErrPayloadTooLarge, "workflow output is %d bytes, over the limit of %d",
			len(out), w.cfg.Limits.MaxStepOutputBytes))
	}
	out, err = w.pl.seal(out, adOutput(rc.run.ID))
	return out, nil, err
}

// finishCompleted completes the run, with its pending last step in the same commit.
func (w *Worker) finishCompleted(rc *runContext, out []byte) {
	last := rc.pending
	rc.pending = nil
	rc.ending.Store(true)
	err := w.retryWrite(rc, func(context.Context) error {
		if last != nil {
			if err := failpoint.Inject(failpoint.StepAfterBodyBeforeCommit); err != nil {
				return err
			}
		}
		err, ok := w.completes.Do(store.CompleteRequest{FencedParams: rc.fenced(), Output: out, Step: last})
		if !ok {
			return errWorkerStopped
		}
		if err == nil && last != nil {
			err = failpoint.Inject(failpoint.StepAfterCommit)
		}
		if err == nil {
			err = failpoint.Inject(failpoint.CompleteAfterCommitBeforeNote)
		}
		return err
	})
	if err != nil {
		w.noteWriteError(rc, "complete run", err)
		return
	}
	if last != nil {
		w.metrics.stepsRecorded.Add(1)
	}
	w.metrics.completed.Add(1)
	w.bus.PublishDone(rc.run.Namespace, rc.run.ID, wire.StatusCompleted, &wire.RunResult{Attempt: rc.run.Attempt, Output: out})
	rc.log.Debug("run completed")
}

func (w *Worker) finishFailed(rc *runContext, cause error, retry bool) {
	backoff := w.cfg.RetryBackoff << min(rc.run.Attempt-1, 20)
	if backoff > w.cfg.MaxBackoff || backoff <= 0 {
		backoff = w.cfg.MaxBackoff
	}
	msg := cause.Error()
	if len(msg) > 8<<10 {
		msg = msg[:8<<10] + "…"
	}
	// The step before the failure ran: its record must not be lost with the attempt.
	if err := rc.writePending(); err != nil {
		w.noteWriteError(rc, "record step before failing run", err)
		return
	}
	stored := w.pl.sealText(msg, adError(rc.run.ID))
	if w.pl.enabled() {
		msg = "(sealed by the codec)" // error texts may hold payload data: keep them out of logs
	}
	var res store.RunFailResult
	rc.ending.Store(true)
	err := w.retryWrite(rc, func(ctx context.Context) error {
		var err error
		res, err = w.store.RunFail(ctx, store.RunFailParams{FencedParams: rc.fenced(), Error: stored, Retry: retry, Backoff: backoff})
		return err
	})
	if err != nil {
		w.noteWriteError(rc, "fail run", err)
		return
	}
	if res.Status == wire.StatusFailed {
		w.metrics.failed.Add(1)
		w.bus.PublishDone(rc.run.Namespace, rc.run.ID, wire.StatusFailed, &wire.RunResult{Attempt: rc.run.Attempt, Error: stored})
		rc.log.Warn("run failed", "error", msg)
		return
	}
	w.metrics.retried.Add(1)
	if res.WakeAt != nil {
		w.bus.PublishTimerHint(*res.WakeAt)
	}
	rc.log.Info("attempt failed; retry scheduled", "error", msg, "retry_at", res.WakeAt)
}

func (w *Worker) noteWriteError(rc *runContext, what string, err error) {
	if errors.Is(err, wire.ErrLeaseLost) {
		w.metrics.fencedRejected.Add(1)
	}
	rc.loseLease()
	rc.log.Warn(what+": write refused or impossible; the run is left to its current owner or the lease sweep", "error", err)
}

var errWorkerStopped = errors.New("worker stopped")

// hintLease tells the timers when a lease taken now would lapse, so that a timer which
// last looked while no run was held still wakes in time to re-queue the run of an
// executor that dies. Leases are renewed every third of their length, so one notice per
// half lease is enough however many runs are claimed.
func (w *Worker) hintLease(expiresAt time.Time) {
	now := int64(w.cfg.Clock.Now().Sub(w.hintEpoch))
	last := w.lastLeaseHint.Load()
	if now-last < int64(w.cfg.Lease/2) || !w.lastLeaseHint.CompareAndSwap(last, now) {
		return
	}
	w.bus.PublishTimerHint(expiresAt)
}

// retryWrite makes a fenced write, retrying transient errors while the lease is still
// ours. A refusal by the fence (ErrLeaseLost) is final at once.
func (w *Worker) retryWrite(rc *runContext, write func(ctx context.Context) error) error {
	b := newBackoff(20*time.Millisecond, time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := write(ctx)
		cancel()
		if err == nil || errors.Is(err, wire.ErrLeaseLost) || errors.Is(err, errWorkerStopped) {
			return err
		}
		if !rc.leaseValid() {
			return fmt.Errorf("gave up while the lease lapsed: %w", err)
		}
		rc.log.Warn("write failed; retrying", "error", err)
		b.wait(context.Background())
	}
}

// heartbeat renews the leases of every held run in one statement per tick, and the
// worker's own row less often.
func (w *Worker) heartbeat(ctx context.Context) {
	defer w.heartbeats.Done()
	tick := time.NewTicker(w.cfg.Lease / 3)
	defer tick.Stop()
	lastAnnounce := w.cfg.Clock.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		w.extendLeases(ctx)
		// A sandbox is not a worker of its own: its executor announces the workflows.
		if !w.sandboxed && w.cfg.Clock.Now().Sub(lastAnnounce) >= 15*time.Second {
			if err := w.store.WorkerHeartbeat(ctx, w.announcement()); err != nil && ctx.Err() == nil {
				w.log.Warn("worker heartbeat", "error", err)
			}
			lastAnnounce = w.cfg.Clock.Now()
		}
	}
}

func (w *Worker) extendLeases(ctx context.Context) {
	w.mu.Lock()
	held := make([]*runContext, 0, len(w.held))
	for _, rc := range w.held {
		held = append(held, rc)
	}
	w.mu.Unlock()
	if len(held) == 0 {
		return
	}
	params := make([]store.Held, len(held))
	for i, rc := range held {
		params[i] = store.Held{RunID: rc.run.ID, Fence: rc.run.Fence}
	}
	sent := w.cfg.Clock.Now()
	// Half a lease: a slow database must not cost healthy runs their leases (a renewal
	// that comes too late is caught by each run's own deadline anyway).
	qctx, cancel := context.WithTimeout(ctx, w.cfg.Lease/2)
	kept, err := w.store.RunsExtendLeases(qctx, w.cfg.ID, w.cfg.Lease, params)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			w.log.Warn("extend leases", "runs", len(held), "error", err)
		}
		return // unconfirmed leases run out by themselves: runs self-fence
	}
	for _, rc := range held {
		if kept[rc.run.ID] {
			rc.confirmLease(sent)
			continue
		}
		// Missing from the answer: lost, unless the run finished, parked or was released
		// meanwhile (its ending write may have committed before this renewal looked,
		// while its execution has not yet let go of it here).
		w.mu.Lock()
		still := w.held[rc.run.ID] == rc
		w.mu.Unlock()
		if still && !rc.ending.Load() {
			rc.log.Warn("lease lost: another executor holds the run")
			rc.loseLease()
		}
	}
}

type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(minD, maxD time.Duration) *backoff { return &backoff{min: minD, max: maxD, cur: minD} }

func (b *backoff) reset() { b.cur = b.min }

func (b *backoff) wait(ctx context.Context) {
	t := time.NewTimer(b.cur)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
	b.cur = min(b.cur*2, b.max)
}
