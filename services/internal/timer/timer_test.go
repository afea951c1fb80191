package timer_test

import (
	"context"
	"encoding/json"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/timer"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// env is one test's private PostgreSQL database and NATS server.
type env struct {
	dbURL string
	pool  *pgxpool.Pool
	st    *store.Store
	nc    *nats.Conn
	b     *bus.Bus
	reg   *prometheus.Registry
	m     *timer.Metrics
}

func newEnv(t *testing.T) *env {
	t.Helper()
	dbURL := testkit.NewDatabase(t)
	srv := testkit.StartNATS(t)
	pool, err := store.Connect(context.Background(), dbURL, 8)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	nc, err := bus.Connect(bus.ConnOptions{URL: srv.URL(), Name: t.Name()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	b, err := bus.New(nc, bus.DefaultStreamConfig())
	if err != nil {
		t.Fatal(err)
	}
	if err := b.EnsureStreams(context.Background()); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	return &env{dbURL: dbURL, pool: pool, st: store.New(pool), nc: nc, b: b, reg: reg, m: timer.NewMetrics(reg)}
}

func (e *env) newTimer(t *testing.T, cfg timer.Config) *timer.Timer {
	t.Helper()
	tm := timer.New(cfg, e.st, e.b, zaptest.NewLogger(t), e.m)
	t.Cleanup(tm.Stop)
	return tm
}

func (e *env) startTimer(t *testing.T, cfg timer.Config) *timer.Timer {
	t.Helper()
	tm := e.newTimer(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := tm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return tm
}

func (e *env) insertRun(t *testing.T, workflow string, maxAttempts int) store.Dispatch {
	t.Helper()
	id := wire.NewRunID()
	res, err := e.st.RunInsert(context.Background(), store.RunInsertParams{
		ID: id, Namespace: wire.DefaultNamespace, Workflow: workflow, Input: []byte(`{}`),
		IdempotencyKey: "run:" + id, MaxAttempts: maxAttempts,
	})
	if err != nil {
		t.Fatal(err)
	}
	return res.Dispatch
}

func (e *env) claim(t *testing.T, d store.Dispatch, lease time.Duration) store.ClaimedRun {
	t.Helper()
	run, ok, err := e.st.RunClaim(context.Background(), store.RunClaimParams{
		RunID: d.RunID, DispatchSeq: d.DispatchSeq, Namespace: d.Namespace, Workflow: d.Workflow,
		Owner: "test-worker", Lease: lease,
	})
	if err != nil || !ok {
		t.Fatalf("claim %s: ok=%v err=%v", d.RunID, ok, err)
	}
	return run
}

func (e *env) heartbeat(t *testing.T, workflows ...string) {
	t.Helper()
	err := e.st.WorkerHeartbeat(context.Background(), store.Worker{
		ID: "worker-" + strings.Join(workflows, "-"), Namespace: wire.DefaultNamespace, Workflows: workflows,
	})
	if err != nil {
		t.Fatal(err)
	}
}

// taskConsumer is the executors' shared consumer of one workflow's doorbells.
func (e *env) taskConsumer(t *testing.T, workflow string) jetstream.Consumer {
	t.Helper()
	cons, err := e.b.EnsureTaskConsumer(context.Background(), wire.DefaultNamespace, workflow, bus.DefaultConsumerConfig())
	if err != nil {
		t.Fatal(err)
	}
	return cons
}

// nextTask waits for the next doorbell and returns it with the moment it arrived.
func nextTask(t *testing.T, cons jetstream.Consumer, within time.Duration) (wire.Task, time.Time) {
	t.Helper()
	msg, err := cons.Next(jetstream.FetchMaxWait(within))
	if err != nil {
		t.Fatalf("no task doorbell within %v: %v", within, err)
	}
	arrived := time.Now()
	task, err := bus.DecodeTask(msg.Data())
	if err != nil {
		t.Fatal(err)
	}
	if err := msg.Ack(); err != nil {
		t.Fatal(err)
	}
	return task, arrived
}

func (e *env) histogramCount(t *testing.T, name string) uint64 {
	t.Helper()
	families, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == name {
			return f.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	return 0
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestHintedSleeperWakesOnTime(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	cons := e.taskConsumer(t, "nap")
	// MaxIdle is far longer than the sleep: only the hint can wake the run on time.
	const lead = 150 * time.Millisecond
	e.startTimer(t, timer.Config{MaxIdle: 20 * time.Second, WakeLead: lead})

	d := e.insertRun(t, "nap", 5)
	run := e.claim(t, d, time.Minute)
	wakeAt, err := e.st.RunSleep(ctx, store.RunSleepParams{
		FencedParams: run.Fenced(), StepKey: "nap", Seq: 1,
		Duration: 300 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	e.b.PublishTimerHint(wakeAt)

	task, arrived := nextTask(t, cons, 10*time.Second)
	if task.RunID != d.RunID || task.DispatchSeq != 2 {
		t.Fatalf("doorbell = %+v, want run %s dispatch 2", task, d.RunID)
	}
	// The database and this test share the machine's clock. The run is due its wake
	// lead before its wake time (its executor holds it until then), not sooner.
	late := arrived.Sub(wakeAt.Add(-lead))
	if late < 0 {
		t.Fatalf("woke %v before its wake time less the lead", -late)
	}
	// Only the hint could wake it this soon (MaxIdle is 20 s); the bound leaves a loaded
	// machine room, as TestSkewedClockWakesOnTimeAndKeepsLeases does. How late a wake
	// may be is S3's and T11's to measure.
	if late > 3*time.Second {
		t.Fatalf("doorbell arrived %v after the wake time, want within 3s", late)
	}
	info, err := e.st.RunGet(ctx, wire.DefaultNamespace, d.RunID)
	if err != nil {
		t.Fatal(err)
	}
	if info.Status != wire.StatusQueued {
		t.Fatalf("status = %s, want QUEUED", info.Status)
	}
	if got := testutil.ToFloat64(e.m.Woken); got != 1 {
		t.Fatalf("kagzi_runs_woken_total = %v, want 1", got)
	}
	if got := e.histogramCount(t, "kagzi_wake_lateness_seconds"); got != 1 {
		t.Fatalf("wake lateness samples = %d, want 1", got)
	}
	t.Logf("woke %v after wake_at", late)
}

func TestExpiredLeaseRequeued(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	cons := e.taskConsumer(t, "crashy")
	d := e.insertRun(t, "crashy", 5)
	e.claim(t, d, 200*time.Millisecond) // and never renewed: the executor died
	e.startTimer(t, timer.Config{})

	// The doorbell says the attempt before it lapsed: executors isolate repeat offenders.
	task, _ := nextTask(t, cons, 10*time.Second)
	if task.RunID != d.RunID || task.DispatchSeq != 2 || task.Lapses != 1 {
		t.Fatalf("doorbell = %+v, want run %s dispatch 2 after 1 lapse", task, d.RunID)
	}
	info, err := e.st.RunGet(ctx, wire.DefaultNamespace, d.RunID)
	if err != nil {
		t.Fatal(err)
	}
	if info.Status != wire.StatusQueued || info.Attempt != 2 {
		t.Fatalf("run = %s attempt %d, want QUEUED attempt 2", info.Status, info.Attempt)
	}
	if got := testutil.ToFloat64(e.m.LeasesExpired.WithLabelValues("requeued")); got != 1 {
		t.Fatalf("kagzi_lease_expired_total{outcome=requeued} = %v, want 1", got)
	}
}

func TestExpiredLeaseOnLastAttemptFails(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	d := e.insertRun(t, "crashy", 1)
	done, err := e.nc.SubscribeSync(wire.DoneSubject(d.Namespace, d.RunID))
	if err != nil {
		t.Fatal(err)
	}
	e.claim(t, d, 200*time.Millisecond)
	e.startTimer(t, timer.Config{})

	msg, err := done.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("no completion notice: %v", err)
	}
	var rd wire.RunDone
	if err := json.Unmarshal(msg.Data, &rd); err != nil {
		t.Fatal(err)
	}
	if rd.RunID != d.RunID || rd.Status != wire.StatusFailed {
		t.Fatalf("notice = %+v, want run %s FAILED", rd, d.RunID)
	}
	info, err := e.st.RunGet(ctx, wire.DefaultNamespace, d.RunID)
	if err != nil {
		t.Fatal(err)
	}
	if info.Status != wire.StatusFailed || !strings.Contains(info.Error, "lease expired") {
		t.Fatalf("run = %s %q, want FAILED with a lease error", info.Status, info.Error)
	}
}

func TestLostDispatchRedispatchedOnlyWhenServed(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	served := e.taskConsumer(t, "served")
	e.heartbeat(t, "served")
	// Inserted without a doorbell: as if the scheduler died between commit and publish.
	s := e.insertRun(t, "served", 5)
	o := e.insertRun(t, "orphan", 5) // no worker serves this workflow
	tm := e.startTimer(t, timer.Config{StaleAfter: 200 * time.Millisecond})

	// The relay announces the dispatch that went missing; it does not make a new one.
	task, _ := nextTask(t, served, 10*time.Second)
	if task.RunID != s.RunID || task.DispatchSeq != 1 {
		t.Fatalf("doorbell = %+v, want run %s dispatch 1", task, s.RunID)
	}

	// The served run is claimed, so only the orphan stays QUEUED. Once it is stale by the
	// database clock, a sweep still leaves it alone.
	if r := e.st.RunsClaim(ctx, wire.DefaultNamespace, "test", time.Minute, []store.ClaimRequest{{RunID: s.RunID, DispatchSeq: 1, Workflow: "served"}}); !r[0].OK {
		t.Fatalf("claim served run: %+v", r[0])
	}
	eventually(t, 10*time.Second, "orphan stale", func() bool {
		var stale bool
		err := e.pool.QueryRow(ctx, `SELECT queued_at < now() - interval '200 milliseconds' FROM workflow_runs WHERE id = $1`, o.RunID).Scan(&stale)
		return err == nil && stale
	})
	if err := tm.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(e.m.Redispatched); got != 1 {
		t.Fatalf("kagzi_reconcile_redispatch_total = %v, want 1: nobody serves the orphan", got)
	}
	st, err := e.b.JetStream().Stream(ctx, wire.TaskStream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(wire.TaskSubject(wire.DefaultNamespace, "orphan")))
	if err != nil {
		t.Fatal(err)
	}
	if n := info.State.Subjects[wire.TaskSubject(wire.DefaultNamespace, "orphan")]; n != 0 {
		t.Fatalf("%d doorbells for a workflow nobody serves, want 0", n)
	}

	// A worker for it appears: the next sweep dispatches it.
	orphan := e.taskConsumer(t, "orphan")
	e.heartbeat(t, "orphan")
	if err := tm.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	task, _ = nextTask(t, orphan, 10*time.Second)
	if task.RunID != o.RunID || task.DispatchSeq != 1 {
		t.Fatalf("doorbell = %+v, want run %s dispatch 1", task, o.RunID)
	}
	if got := testutil.ToFloat64(e.m.Redispatched); got != 2 {
		t.Fatalf("kagzi_reconcile_redispatch_total = %v, want 2", got)
	}
}

func TestIdleTimerDoesNotSpin(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.startTimer(t, timer.Config{MaxIdle: 20 * time.Second})
	// Measuring an absence: there is no signal to wait for.
	time.Sleep(time.Second)
	if polls, sweeps := testutil.ToFloat64(e.m.Polls), testutil.ToFloat64(e.m.Sweeps); polls > 2 || sweeps > 2 {
		t.Fatalf("idle for 1s: %v polls and %v sweeps, want at most 2 of each", polls, sweeps)
	}
}

func TestUnservedQueuedRunDoesNotSpin(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.insertRun(t, "orphan", 5)
	e.startTimer(t, timer.Config{StaleAfter: 100 * time.Millisecond, MaxIdle: 20 * time.Second})
	// No live worker serves the run, so it never reads as due and the timer must not
	// keep asking. Measuring an absence: there is no signal to wait for.
	time.Sleep(time.Second)
	if polls, sweeps := testutil.ToFloat64(e.m.Polls), testutil.ToFloat64(e.m.Sweeps); polls > 2 || sweeps > 1 {
		t.Fatalf("with one unserved run: %v polls and %v sweeps in ~1s, want a handful", polls, sweeps)
	} else {
		t.Logf("%v polls, %v sweeps", polls, sweeps)
	}
}

func TestTickWakesDueSleepers(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	cons := e.taskConsumer(t, "nap")
	tm := e.newTimer(t, timer.Config{BatchSize: 2}) // not started: Tick alone
	var ids []wire.RunID
	for range 5 {
		d := e.insertRun(t, "nap", 5)
		run := e.claim(t, d, time.Minute)
		past := time.Now().Add(-time.Second)
		if _, err := e.st.RunSleep(ctx, store.RunSleepParams{
			FencedParams: run.Fenced(), StepKey: "nap", Seq: 1, Until: &past,
		}); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, d.RunID)
	}
	// Five due runs in batches of two: one Tick takes all of them.
	if err := tm.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	got := map[wire.RunID]bool{}
	for range 5 {
		task, _ := nextTask(t, cons, 10*time.Second)
		got[task.RunID] = true
	}
	for _, id := range ids {
		if !got[id] {
			t.Fatalf("run %s got no doorbell", id)
		}
	}
}

func TestRecoversFromDatabaseOutage(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	cons := e.taskConsumer(t, "nap")
	e.startTimer(t, timer.Config{MaxIdle: 100 * time.Millisecond})
	eventually(t, 10*time.Second, "a first poll", func() bool { return testutil.ToFloat64(e.m.Polls) >= 1 })

	u, err := url.Parse(e.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	name := strings.TrimPrefix(u.Path, "/")
	admin, err := pgx.Connect(ctx, testkit.AdminURL())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	setAllow := func(allow bool) {
		t.Helper()
		if _, err := admin.Exec(ctx, `ALTER DATABASE `+pgx.Identifier{name}.Sanitize()+` WITH ALLOW_CONNECTIONS `+map[bool]string{true: "true", false: "false"}[allow]); err != nil {
			t.Fatal(err)
		}
	}
	setAllow(false)
	defer setAllow(true)
	if _, err := admin.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1`, name); err != nil {
		t.Fatal(err)
	}
	errs := e.m.Errors.WithLabelValues("next_due")
	eventually(t, 10*time.Second, "the timer to see the outage", func() bool { return testutil.ToFloat64(errs) >= 2 })
	setAllow(true)

	// PostgreSQL is back: the timer carries on and wakes a sleeper.
	var d store.Dispatch
	eventually(t, 10*time.Second, "database reachable again", func() bool {
		id := wire.NewRunID()
		res, err := e.st.RunInsert(ctx, store.RunInsertParams{
			ID: id, Namespace: wire.DefaultNamespace, Workflow: "nap", Input: []byte(`{}`), IdempotencyKey: "run:" + id,
		})
		d = res.Dispatch
		return err == nil
	})
	run := e.claim(t, d, time.Minute)
	wakeAt, err := e.st.RunSleep(ctx, store.RunSleepParams{
		FencedParams: run.Fenced(), StepKey: "nap", Seq: 1,
		Duration: 50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	e.b.PublishTimerHint(wakeAt)
	task, _ := nextTask(t, cons, 15*time.Second)
	if task.RunID != d.RunID {
		t.Fatalf("doorbell for %s, want %s", task.RunID, d.RunID)
	}
}

func TestStartStopContract(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	never := e.newTimer(t, timer.Config{})
	never.Stop()
	never.Stop()
	if err := never.Start(context.Background()); err == nil {
		t.Fatal("Start after Stop succeeded")
	}
	tm := e.startTimer(t, timer.Config{})
	if err := tm.Start(context.Background()); err == nil {
		t.Fatal("second Start succeeded")
	}
	tm.Stop()
	tm.Stop()
}

// While a workflow's consumer still has doorbells waiting, its stale runs may be waiting
// their turn behind them: the relay holds off (up to ten times the stale threshold)
// instead of burying the queue under copies, and relays once the queue has drained.
func TestRelayWaitsOutABackloggedQueue(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	cons := e.taskConsumer(t, "busy")
	e.heartbeat(t, "busy")
	queued := e.insertRun(t, "busy", 5)
	if err := e.b.PublishTasks(ctx, []bus.Doorbell{{Namespace: queued.Namespace, Workflow: queued.Workflow,
		Task: wire.Task{RunID: queued.RunID, DispatchSeq: queued.DispatchSeq}}}); err != nil {
		t.Fatal(err)
	}
	e.insertRun(t, "busy", 5) // its doorbell never published
	tm := e.startTimer(t, timer.Config{StaleAfter: 200 * time.Millisecond})
	eventually(t, 10*time.Second, "runs stale", func() bool {
		var n int
		err := e.pool.QueryRow(ctx, `SELECT count(*) FROM workflow_runs WHERE queued_at < now() - interval '300 milliseconds'`).Scan(&n)
		return err == nil && n == 2
	})
	if err := tm.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(e.m.Redispatched); got != 0 {
		t.Fatalf("relayed %v runs while a doorbell waits in the queue, want 0", got)
	}
	if task, _ := nextTask(t, cons, 10*time.Second); task.RunID != queued.RunID {
		t.Fatalf("first doorbell = %+v, want run %s", task, queued.RunID)
	}
	// Drained: both runs are relayed (the one just delivered is still QUEUED, as nobody
	// claimed it; its copy will be a no-op claim).
	if err := tm.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(e.m.Redispatched); got != 2 {
		t.Fatalf("relayed %v runs once the queue drained, want 2", got)
	}
}

// The task stream is memory-backed, so a broker restart loses every doorbell in it. The
// timer notices the stream made anew and relays every run queued before it at once, long
// before StaleAfter; a run queued into the new stream is left alone.
func TestLostTaskStreamRelayedAtOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	e.taskConsumer(t, "w")
	e.heartbeat(t, "w")
	var lost []store.Dispatch
	for range 3 {
		d := e.insertRun(t, "w", 5)
		if err := e.b.PublishTasks(ctx, []bus.Doorbell{{Namespace: d.Namespace, Workflow: d.Workflow,
			Task: wire.Task{RunID: d.RunID, DispatchSeq: d.DispatchSeq}}}); err != nil {
			t.Fatal(err)
		}
		lost = append(lost, d)
	}
	e.startTimer(t, timer.Config{StaleAfter: time.Hour, WatchTasksEvery: 50 * time.Millisecond})
	time.Sleep(300 * time.Millisecond) // the timer has seen the stream: it is not new to it
	if got := testutil.ToFloat64(e.m.Redispatched); got != 0 {
		t.Fatalf("relayed %v runs of a stream that lost nothing, want 0", got)
	}

	// The broker loses the stream, doorbells, consumer and all.
	if err := e.b.JetStream().DeleteStream(ctx, wire.TaskStream); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the task stream made anew", func() bool {
		_, err := e.b.TaskStreamInfo(ctx)
		return err == nil
	})
	cons := e.taskConsumer(t, "w") // as an executor's next fetch would
	later := e.insertRun(t, "w", 5)
	if err := e.b.PublishTasks(ctx, []bus.Doorbell{{Namespace: later.Namespace, Workflow: later.Workflow,
		Task: wire.Task{RunID: later.RunID, DispatchSeq: later.DispatchSeq}}}); err != nil {
		t.Fatal(err)
	}
	want := map[wire.RunID]bool{later.RunID: true}
	for _, d := range lost {
		want[d.RunID] = true
	}
	for range len(want) {
		task, _ := nextTask(t, cons, 5*time.Second)
		if !want[task.RunID] || task.DispatchSeq != 1 {
			t.Fatalf("doorbell %+v: not one of the runs, or not their first dispatch", task)
		}
		delete(want, task.RunID)
	}
	if got := testutil.ToFloat64(e.m.Redispatched); got != float64(len(lost)) {
		t.Fatalf("kagzi_reconcile_redispatch_total = %v, want %d: the runs queued before the loss only", got, len(lost))
	}
	if msg, err := cons.Next(jetstream.FetchMaxWait(300 * time.Millisecond)); err == nil {
		t.Fatalf("an extra doorbell %s", msg.Data())
	}
}
