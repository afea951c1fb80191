// Package e2e runs Kagzi's real service binaries (scheduler, timer and an executor) as
// child processes against a private database and NATS server, and checks the durable
// core end to end: memoized steps, sleeps across a full restart, kill -9 of an executor
// mid-step, and lost dispatches. Nothing is mocked; every process can be killed for real.
package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

var bins map[string]string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kagzi-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins, err = testkit.Build(dir,
		"github.com/kagzi/kagzi/services/scheduler",
		"github.com/kagzi/kagzi/services/timer",
		"github.com/kagzi/kagzi/services/internal/e2e/testexecutor",
		"github.com/kagzi/kagzi/services/executor",
		"github.com/nats-io/nats-server/v2")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// system is one private Kagzi: its own database, its own NATS server, and the processes
// a test starts.
type system struct {
	t      *testing.T
	dbURL  string
	nats   *testkit.NATSProcess
	pool   *pgxpool.Pool
	nc     *nats.Conn
	client *sdk.Client
}

const effectsDDL = `
CREATE TABLE test_effects (
    run_id      uuid NOT NULL,
    step_key    text NOT NULL,
    idem_key    text NOT NULL,
    executor_id text NOT NULL,
    pid         integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
)`

func newSystem(t *testing.T) *system {
	t.Helper()
	// nats-server runs as its own process (not in the test binary): it can be killed for
	// real, and the race detector watches Kagzi, not the broker.
	s := &system{t: t, dbURL: testkit.NewDatabase(t), nats: testkit.StartNATSProcess(t, bins["nats-server"])}
	ctx := context.Background()
	pool, err := store.Connect(ctx, s.dbURL, 4)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if _, err := pool.Exec(ctx, effectsDDL); err != nil {
		t.Fatal(err)
	}
	nc, err := bus.Connect(bus.ConnOptions{URL: s.nats.URL(), Name: "e2e-client"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	s.pool, s.nc, s.client = pool, nc, sdk.NewClient(nc, sdk.WithRequestTimeout(5*time.Second))
	return s
}

func (s *system) env(extra ...string) []string {
	return append([]string{"DATABASE_URL=" + s.dbURL, "NATS_URL=" + s.nats.URL(), "KAGZI_HTTP_ADDR=off",
		"KAGZI_LOG_FORMAT=console", "KAGZI_LOG_LEVEL=info"}, extra...)
}

func (s *system) scheduler() *testkit.Process {
	return testkit.StartProcess(s.t, "scheduler", bins["scheduler"], s.env()...)
}

func (s *system) timer(extra ...string) *testkit.Process {
	return testkit.StartProcess(s.t, "timer", bins["timer"], s.env(append([]string{"KAGZI_STALE_AFTER=2s"}, extra...)...)...)
}

func (s *system) executor(name string, extra ...string) *testkit.Process {
	return testkit.StartProcess(s.t, name, bins["testexecutor"], s.env(append([]string{"KAGZI_EXECUTOR_NAME=" + name}, extra...)...)...)
}

func (s *system) start(in map[string]any, n int) []string {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ids := make([]string, n)
	for i := range ids {
		id, err := s.client.StartByName(ctx, "e2e-steps", in)
		if err != nil {
			s.t.Fatalf("start run %d: %v", i, err)
		}
		ids[i] = id
	}
	return ids
}

func (s *system) count(sql string, args ...any) int {
	s.t.Helper()
	var n int
	if err := s.pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		s.t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// waitUntil polls a count until it reaches want or the deadline passes, then dumps the
// runs that are not finished.
func (s *system) waitUntil(what string, deadline time.Duration, want int, sql string, args ...any) {
	s.t.Helper()
	end := time.Now().Add(deadline)
	for {
		got := s.count(sql, args...)
		if got == want {
			return
		}
		if time.Now().After(end) {
			s.dump()
			s.t.Fatalf("timed out waiting for %s: have %d, want %d", what, got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// dump prints what a failing test needs to be diagnosed without a rerun.
func (s *system) dump() {
	rows, err := s.pool.Query(context.Background(), `
SELECT r.id, r.status, r.attempt, r.fence, r.dispatch_seq, coalesce(r.error, ''),
       (SELECT string_agg(step_key, ',' ORDER BY seq) FROM step_runs WHERE run_id = r.id),
       (SELECT string_agg(step_key || '@' || pid, ',' ORDER BY at) FROM test_effects WHERE run_id = r.id)
FROM workflow_runs r WHERE r.status NOT IN ('COMPLETED') ORDER BY r.id LIMIT 20`)
	if err != nil {
		s.t.Logf("dump: %v", err)
		return
	}
	defer rows.Close()
	for rows.Next() {
		var id, status, errText string
		var attempt int
		var fence, seq int64
		var steps, effects *string
		_ = rows.Scan(&id, &status, &attempt, &fence, &seq, &errText, &steps, &effects)
		s.t.Logf("run %s %s attempt=%d fence=%d dispatch=%d error=%q steps=%v effects=%v", id, status, attempt, fence, seq, errText, deref(steps), deref(effects))
	}
}

func deref(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

const completedSQL = `SELECT count(*) FROM workflow_runs WHERE status = 'COMPLETED'`

// A run sleeps; every process (services and NATS) is killed while it sleeps and started
// again; the run wakes no earlier than asked and no recorded step runs again.
func TestSleepSurvivesAFullRestart(t *testing.T) {
	t.Parallel()
	s := newSystem(t)
	sched, tmr, exec := s.scheduler(), s.timer(), s.executor("exec-a")
	const n = 20
	s.start(map[string]any{"steps": 2, "sleep_after": 1, "sleep_ms": 2000}, n)
	s.waitUntil("every run asleep", 20*time.Second, n, `SELECT count(*) FROM workflow_runs WHERE status = 'SLEEPING'`)

	for _, p := range []*testkit.Process{sched, tmr, exec} {
		p.Kill()
	}
	s.nats.Kill()
	time.Sleep(500 * time.Millisecond) // the system stays down for a while
	s.nats.Start()
	s.nats.WaitReady(t)
	for _, p := range []*testkit.Process{sched, tmr, exec} {
		p.Start()
	}

	s.waitUntil("every run completed", 30*time.Second, n, completedSQL)
	if got := s.count(`SELECT count(*) FROM test_effects WHERE step_key = 'step'`); got != n {
		t.Errorf("first step bodies ran %d times for %d runs: a recorded step ran again", got, n)
	}
	if got := s.count(`SELECT count(*) FROM (SELECT run_id, step_key FROM test_effects GROUP BY 1, 2 HAVING count(*) > 1) d`); got != 0 {
		t.Errorf("%d steps ran more than once", got)
	}
	early := s.count(`SELECT count(*) FROM test_effects e JOIN step_runs s ON s.run_id = e.run_id AND s.kind = 'sleep'
	                  WHERE e.step_key = 'step#2' AND e.at < s.wake_at`)
	if early != 0 {
		t.Errorf("%d runs went on before their wake time", early)
	}
}

// kill -9 of the executor while every run is inside its slow second step: a second
// executor finishes them all; the recorded first step never runs again, the interrupted
// second step runs again (at-least-once body) and every result is recorded once.
func TestExecutorKilledMidStep(t *testing.T) {
	t.Parallel()
	s := newSystem(t)
	s.scheduler()
	s.timer()
	a := s.executor("exec-a", "KAGZI_LEASE=1s")
	const n = 10
	s.start(map[string]any{"steps": 3, "step_ms": 5, "slow_step": 2, "slow_ms": 60000, "slow_on": "exec-a"}, n)
	s.waitUntil("every run inside step 2", 20*time.Second, n, `SELECT count(*) FROM test_effects WHERE step_key = 'step#2'`)
	killedPID := a.PID()
	a.Kill()
	s.executor("exec-b", "KAGZI_LEASE=1s")
	s.waitUntil("every run completed after the kill", 30*time.Second, n, completedSQL)

	if got := s.count(`SELECT count(*) FROM test_effects WHERE step_key = 'step'`); got != n {
		t.Errorf("step 1 ran %d times for %d runs; a recorded step ran again", got, n)
	}
	if got := s.count(`SELECT count(*) FROM test_effects WHERE step_key = 'step#2'`); got != 2*n {
		t.Errorf("step 2 ran %d times, want %d (interrupted once each)", got, 2*n)
	}
	if got := s.count(`SELECT count(*) FROM test_effects WHERE step_key = 'step#2' AND pid = $1`, killedPID); got != n {
		t.Errorf("%d of step 2's first executions were by the killed executor, want %d", got, n)
	}
	if got := s.count(`SELECT count(*) FROM step_runs`); got != 3*n {
		t.Errorf("%d step results recorded, want %d", got, 3*n)
	}
}

// A run committed without its doorbell (the scheduler died between commit and publish)
// is dispatched by the timer's reconciler.
func TestLostDispatchIsRelayedByTheTimer(t *testing.T) {
	t.Parallel()
	s := newSystem(t)
	s.timer("KAGZI_MAX_IDLE=1s") // nothing tells the timer of a run nobody dispatched
	s.executor("exec-a")
	st := store.New(s.pool)
	s.waitUntil("the executor announced itself", 20*time.Second, 1, `SELECT count(*) FROM workers`)
	const n = 5
	for range n {
		_, err := st.RunInsert(context.Background(), store.RunInsertParams{ID: wire.NewRunID(), Namespace: "default",
			Workflow: "e2e-steps", Input: []byte(`{"steps":2}`), IdempotencyKey: wire.NewRunID()})
		if err != nil {
			t.Fatal(err)
		}
	}
	s.waitUntil("every undispatched run completed", 30*time.Second, n, completedSQL)
	// The relay announced the dispatch the scheduler never did; it made no new one.
	if got := s.count(`SELECT count(*) FROM workflow_runs WHERE dispatch_seq = 1 AND relays >= 1 AND fence = 1`); got != n {
		t.Errorf("%d runs were relayed and then claimed once through their first dispatch, want %d", got, n)
	}
}

// A start submitted through JetStream while no scheduler runs is held by the submit
// stream and committed once a scheduler starts.
func TestSubmitWhileNoSchedulerIsUp(t *testing.T) {
	t.Parallel()
	s := newSystem(t)
	s.timer()
	s.executor("exec-a")
	// The streams exist once the executor has started.
	s.waitUntil("the executor announced itself", 20*time.Second, 1, `SELECT count(*) FROM workers`)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	id, err := s.client.SubmitByName(ctx, "e2e-steps", map[string]any{"steps": 2})
	if err != nil {
		t.Fatal(err)
	}
	if n := s.count(`SELECT count(*) FROM workflow_runs`); n != 0 {
		t.Fatalf("%d runs before any scheduler ran", n)
	}
	// Waited for before any scheduler can answer, and while its start is in the stream.
	waited := make(chan error, 1)
	go func() {
		info, err := s.client.Wait(ctx, id)
		if err == nil && info.Status != wire.StatusCompleted {
			err = fmt.Errorf("status %s", info.Status)
		}
		waited <- err
	}()
	time.Sleep(200 * time.Millisecond)
	s.scheduler()
	if err := <-waited; err != nil {
		t.Fatalf("wait for the submitted run: %v", err)
	}
}

// A run just submitted is waited for, not "not found", while its start waits for a
// scheduler; a submit that made no run (its idempotency key names a run of another
// input) ends the wait with ErrRunNotFound once a scheduler has refused it. A submit
// made before any service has made the submit stream waits for it.
func TestWaitForASubmittedRun(t *testing.T) {
	t.Parallel()
	s := newSystem(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	early := make(chan error, 1)
	go func() {
		id, err := s.client.SubmitByName(ctx, "e2e-steps", map[string]any{"steps": 1})
		if err == nil {
			var info *sdk.RunInfo
			if info, err = s.client.Wait(ctx, id); err == nil && info.Status != wire.StatusCompleted {
				err = fmt.Errorf("status %s", info.Status)
			}
		}
		early <- err
	}()
	// Longer than nats.go retries a publish that nobody answers (2 × 250 ms).
	time.Sleep(time.Second)
	s.timer()
	s.executor("exec-a")
	s.scheduler()
	if err := <-early; err != nil {
		t.Fatalf("submit before any service ran: %v", err)
	}
	for i := range 20 {
		id, err := s.client.SubmitByName(ctx, "e2e-steps", map[string]any{"steps": 1})
		if err != nil {
			t.Fatal(err)
		}
		if info, err := s.client.Wait(ctx, id); err != nil || info.Status != wire.StatusCompleted {
			t.Fatalf("submit %d: wait: %+v, %v", i, info, err)
		}
	}

	if _, err := s.client.StartByName(ctx, "e2e-steps", map[string]any{"steps": 1}, sdk.IdempotencyKey("k")); err != nil {
		t.Fatal(err)
	}
	id, err := s.client.SubmitByName(ctx, "e2e-steps", map[string]any{"steps": 2}, sdk.IdempotencyKey("k"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.Wait(ctx, id); !errors.Is(err, wire.ErrRunNotFound) {
		t.Fatalf("wait for a submit that made no run: %v, want ErrRunNotFound", err)
	}
}

// The reference executor with KAGZI_SANDBOX_EVERY_RUN runs every run in a sandbox, the
// executor binary started again: a sandbox serves no HTTP (its executor's port is
// taken, and a sandbox that tried to listen would not start) and does not migrate, and
// the executor's metrics count the runs its sandboxes ran.
func TestReferenceExecutorSandboxes(t *testing.T) {
	t.Parallel()
	s := newSystem(t)
	s.scheduler()
	s.timer()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	exec := testkit.StartProcess(t, "executor", bins["executor"], s.env("KAGZI_HTTP_ADDR="+addr, "KAGZI_AUTO_MIGRATE=true",
		"KAGZI_CONCURRENCY=2", "KAGZI_SANDBOX_EVERY_RUN=true", "KAGZI_EXECUTOR_NAME=ref")...)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const n = 3
	for i := range n {
		id, err := s.client.StartByName(ctx, "greet", map[string]any{"name": fmt.Sprintf("Ada %d", i)})
		if err != nil {
			t.Fatal(err)
		}
		info, err := s.client.Wait(ctx, id)
		if err != nil || info.Status != wire.StatusCompleted || !strings.Contains(string(info.Output), fmt.Sprintf("Hello, Ada %d!", i)) {
			s.dump()
			t.Fatalf("greet %d: %+v, %v", i, info, err)
		}
	}
	if got := metric(t, "http://"+addr+"/metrics", "kagzi_executor_runs_sandboxed_total"); got < n {
		t.Errorf("kagzi_executor_runs_sandboxed_total = %v, want at least %d", got, n)
	}
	log := exec.Log()
	if !strings.Contains(log, "sandbox ready") || strings.Contains(log, "no sandbox") {
		t.Errorf("the executor's log does not show its sandboxes serving every run")
	}
}

// metric reads one unlabelled sample from a Prometheus text endpoint.
func metric(t *testing.T, url, name string) float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			return f
		}
	}
	t.Fatalf("%s not served at %s", name, url)
	return 0
}
