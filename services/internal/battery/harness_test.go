package battery

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

var (
	chaos       = flag.Bool("kagzi.chaos", chaosByTag, "run BATTERY.md's bracketed (chaos) sizes instead of the gate sizes")
	summaryFile = flag.String("kagzi.summary", "", "also write the summary table to this file")
	stacks      = flag.Bool("kagzi.stacks", false, "when a test fails, SIGQUIT its live service processes and print their goroutine stacks")

	bins map[string]string
)

func TestMain(m *testing.M) {
	flag.Parse()
	dir, err := os.MkdirTemp("", "kagzi-battery-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Built once, with failpoints compiled in: a test arms them per process through
	// KAGZI_FAILPOINTS, and an unarmed binary behaves like a release build.
	bins, err = testkit.BuildWith(dir, []string{"-tags", "kagzi_failpoints"},
		"github.com/kagzi/kagzi/services/scheduler",
		"github.com/kagzi/kagzi/services/timer",
		"github.com/kagzi/kagzi/services/internal/battery/chaosexec",
		"github.com/nats-io/nats-server/v2")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	printSummary()
	os.RemoveAll(dir)
	os.Exit(code)
}

// pick returns the gate size, or the chaos size under -kagzi.chaos.
func pick[T any](gate, full T) T {
	if *chaos {
		return full
	}
	return gate
}

// summaryRow is one line of the table `make chaos` prints.
type summaryRow struct {
	Test         string
	Size         string
	Faults       string // what was injected, with counts
	Runs         int
	Lost         int // accepted runs not COMPLETED
	DupResults   int // recorded results beyond the expected ones, or COMPLETED entered twice
	DupBodies    int // repeated step-body executions
	Unattributed int // of those, repeats no killed, stopped or fenced process explains
	Stuck        int
	Verdict      string
	Took         time.Duration
}

var (
	summaryMu sync.Mutex
	summary   []*summaryRow
)

// newSummary registers the test's row; its verdict is taken when the test ends.
func newSummary(t *testing.T, size string) *summaryRow {
	t.Logf("size: %s", size)
	r := &summaryRow{Test: t.Name(), Size: size, Verdict: "?"}
	summaryMu.Lock()
	summary = append(summary, r)
	summaryMu.Unlock()
	start := time.Now()
	t.Cleanup(func() {
		r.Took = time.Since(start).Round(100 * time.Millisecond)
		switch {
		case t.Failed():
			r.Verdict = "FAIL"
		case t.Skipped():
			r.Verdict = "SKIP"
		default:
			r.Verdict = "PASS"
		}
	})
	return r
}

// fill copies the oracle's counts into the row.
func (r *summaryRow) fill(tl testkit.Tally, lost, expectedSteps int) {
	r.Runs, r.Lost, r.Stuck = tl.Runs, lost, tl.Active
	r.DupResults = max(tl.StepResults-expectedSteps, 0) + tl.MultiCompleted
	r.DupBodies, r.Unattributed = tl.DupBodies, tl.Unattributed
}

func printSummary() {
	summaryMu.Lock()
	defer summaryMu.Unlock()
	if len(summary) == 0 {
		return
	}
	var b bytes.Buffer
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "test\tsize\tfaults injected\truns\tlost\tdup results\tdup bodies (attributable)\tstuck\tverdict\ttime")
	for _, r := range summary {
		attr := "all attributable"
		if r.Unattributed > 0 {
			attr = fmt.Sprintf("%d NOT attributable", r.Unattributed)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%d (%s)\t%d\t%s\t%s\n", r.Test, r.Size, r.Faults, r.Runs, r.Lost,
			r.DupResults, r.DupBodies, attr, r.Stuck, r.Verdict, r.Took)
	}
	_ = tw.Flush()
	fmt.Print("\nfault battery summary\n" + b.String())
	if *summaryFile != "" {
		if err := os.WriteFile(*summaryFile, b.Bytes(), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "write summary:", err)
		}
	}
}

// batteryDDL adds what the chaos executor needs beside the oracle: latches a step body
// can wait on, and each executor process's Worker.Stats.
const batteryDDL = `
CREATE TABLE test_latches (run_id uuid PRIMARY KEY);
CREATE TABLE test_worker_stats (
    pid             integer PRIMARY KEY,
    executor        text   NOT NULL,
    claimed         bigint NOT NULL,
    claim_noops     bigint NOT NULL,
    poison          bigint NOT NULL,
    steps_recorded  bigint NOT NULL,
    completed       bigint NOT NULL,
    failed          bigint NOT NULL,
    retried         bigint NOT NULL,
    fenced_rejected bigint NOT NULL,
    lease_lost      bigint NOT NULL,
    released        bigint NOT NULL,
    at              timestamptz NOT NULL
)`

// system is one private Kagzi: its own database (with the oracle tables), its own
// nats-server process, and every service process a test starts in it.
type system struct {
	t      *testing.T
	dbURL  string
	nats   *testkit.NATSProcess
	pool   *pgxpool.Pool
	oracle *testkit.Oracle
	nc     *nats.Conn
	js     jetstream.JetStream
	client *sdk.Client

	mu      sync.Mutex
	procs   []*testkit.Process
	faulted map[int]string // pid → what the test did to it
}

func newSystem(t *testing.T) *system {
	t.Helper()
	return newSystemOn(t, testkit.NewDatabase(t))
}

// newSystemOn is newSystem on a migrated database of the test's choosing, such as one on
// a private server the test crashes (testkit.StartPostgres).
func newSystemOn(t *testing.T, dbURL string) *system {
	t.Helper()
	s := &system{t: t, dbURL: dbURL, nats: testkit.StartNATSProcess(t, bins["nats-server"]),
		faulted: map[int]string{}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := store.Connect(ctx, s.dbURL, 8)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	s.pool = pool
	nc, err := bus.Connect(bus.ConnOptions{URL: s.nats.URL(), Name: "battery-test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	s.nc, s.js = nc, js
	// After the pool and the connection: its dump on failure runs before they close.
	s.oracle = testkit.NewOracle(t, pool)
	if _, err := pool.Exec(ctx, batteryDDL); err != nil {
		t.Fatalf("create battery tables: %v", err)
	}
	s.client = sdk.NewClient(nc, sdk.WithRequestTimeout(2*time.Second))
	s.oracle.OnDump(s.dumpBroker)
	s.oracle.OnDump(s.dumpWorkerStats)
	s.oracle.OnDump(s.dumpFaults)
	return s
}

func (s *system) baseEnv() []string {
	return []string{"DATABASE_URL=" + s.dbURL, "NATS_URL=" + s.nats.URL(), "KAGZI_HTTP_ADDR=off",
		"KAGZI_LOG_FORMAT=console", "KAGZI_LOG_LEVEL=info"}
}

// service starts a binary with the system's environment; later variables win.
func (s *system) service(name, bin string, env ...string) *testkit.Process {
	s.t.Helper()
	p := testkit.StartProcess(s.t, name, bins[bin], append(s.baseEnv(), env...)...)
	// Registered after StartProcess's own cleanup, so it runs first, while p still lives.
	s.t.Cleanup(func() {
		if s.t.Failed() && *stacks {
			dumpStacks(s.t, p)
		}
	})
	s.mu.Lock()
	s.procs = append(s.procs, p)
	s.mu.Unlock()
	return p
}

func (s *system) scheduler(name string, env ...string) *testkit.Process {
	return s.service(name, "scheduler", env...)
}

func (s *system) timer(name string, env ...string) *testkit.Process {
	return s.service(name, "timer", env...)
}

func (s *system) executor(name string, env ...string) *testkit.Process {
	return s.service(name, "chaosexec", append([]string{"KAGZI_EXECUTOR_NAME=" + name}, env...)...)
}

// dumpStacks makes a live Go process print every goroutine (SIGQUIT) and logs that part
// of its output: where a stuck service is stuck.
func dumpStacks(t *testing.T, p *testkit.Process) {
	if p.Exited() {
		return
	}
	before := len(p.Log())
	p.Signal(syscall.SIGQUIT)
	if !waitExit(p, 5*time.Second) {
		t.Logf("%s did not exit on SIGQUIT", p.Name)
	}
	if out := p.Log(); len(out) > before {
		t.Logf("---- goroutines of %s ----\n%s", p.Name, out[before:])
	}
}

// fault records that the test is about to do something to p, so that step bodies p
// ran twice count as attributable.
func (s *system) fault(p *testkit.Process, what string) int {
	pid := p.PID()
	s.mu.Lock()
	s.faulted[pid] = what + " " + p.Name
	s.mu.Unlock()
	return pid
}

func (s *system) kill(p *testkit.Process) int {
	pid := s.fault(p, "SIGKILL")
	p.Kill()
	return pid
}

// faultedPIDs are the processes whose step bodies may legitimately run again elsewhere:
// those the test killed, stopped or armed, and every executor whose own stats show a
// write refused by the fence (its lease lapsed, say on a loaded machine, and another
// executor took the run over). BATTERY.md calls a repeat after any of these attributable.
func (s *system) faultedPIDs() []int {
	s.t.Helper()
	s.mu.Lock()
	out := make([]int, 0, len(s.faulted))
	for pid := range s.faulted {
		out = append(out, pid)
	}
	s.mu.Unlock()
	rows, err := s.pool.Query(context.Background(), `SELECT pid, executor, fenced_rejected FROM test_worker_stats WHERE fenced_rejected > 0`)
	if err != nil {
		s.t.Fatalf("read fenced executors: %v", err)
	}
	defer rows.Close()
	for rows.Next() {
		var pid, fenced int
		var name string
		if err := rows.Scan(&pid, &name, &fenced); err != nil {
			s.t.Fatalf("read fenced executors: %v", err)
		}
		if !slices.Contains(out, pid) {
			s.t.Logf("executor %s (pid %d) had %d writes refused by the fence: its repeats count as attributable", name, pid, fenced)
			out = append(out, pid)
		}
	}
	for _, pid := range s.deadSandboxes(out) {
		if !slices.Contains(out, pid) {
			out = append(out, pid)
		}
	}
	slices.Sort(out)
	return out
}

// sandboxExitedRE matches an executor's log line on a sandbox that died holding a run
// (sdk.WorkerConfig.Sandboxes).
var sandboxExitedRE = regexp.MustCompile(`msg="sandbox exited while it ran a run; its attempt ends now".* sandbox_pid=(\d+)`)

// deadSandboxes are the sandboxes, executors too, that died under their runs: those
// whose executor logged their exit, and those of a dead executor among faulted, which
// the kernel kills with it.
func (s *system) deadSandboxes(faulted []int) []int {
	s.t.Helper()
	out := s.loggedSandboxExits()
	for pid, parent := range s.sandboxes() {
		if slices.Contains(faulted, parent) {
			out = append(out, pid)
		}
	}
	return out
}

// loggedSandboxExits are the sandboxes whose executors saw them die holding a run.
func (s *system) loggedSandboxExits() []int {
	s.mu.Lock()
	procs := slices.Clone(s.procs)
	s.mu.Unlock()
	var out []int
	for _, p := range procs {
		for _, m := range sandboxExitedRE.FindAllStringSubmatch(p.Log(), -1) {
			pid, _ := strconv.Atoi(m[1])
			out = append(out, pid)
		}
	}
	return out
}

// sandboxes maps the pid of every sandbox that held a run to its executor's, read off
// the lease owners: "<executor id>/sandbox-<pid>".
func (s *system) sandboxes() map[int]int {
	s.t.Helper()
	out := map[int]int{}
	for _, owner := range s.lines(`SELECT DISTINCT lease_owner FROM test_transitions WHERE lease_owner LIKE '%/sandbox-%'`) {
		parent, _, _ := strings.Cut(owner, "/sandbox-")
		out[ownerPID(owner)] = ownerPID(parent)
	}
	return out
}

// waitExit polls until p has exited. A process that is meant to crash at a failpoint
// has no other signal to wait on.
func waitExit(p *testkit.Process, timeout time.Duration) bool {
	end := time.Now().Add(timeout)
	for !p.Exited() {
		if time.Now().After(end) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// startRuns starts one run per input, eight at a time, and returns their ids in input
// order. Every start must be accepted: these tests inject no faults into starting.
func (s *system) startRuns(inputs []chaoswf.Input, opts ...sdk.StartOption) []string {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ids := make([]string, len(inputs))
	errs := make([]error, len(inputs))
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	for i, in := range inputs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			ids[i], errs[i] = s.client.StartByName(ctx, chaoswf.Name, in, opts...)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			s.t.Fatalf("start run %d: %v", i, err)
		}
	}
	return ids
}

func inputs(n int, f func(i int) chaoswf.Input) []chaoswf.Input {
	out := make([]chaoswf.Input, n)
	for i := range out {
		out[i] = f(i)
	}
	return out
}

const completedSQL = `SELECT count(*) FROM workflow_runs WHERE status = 'COMPLETED'`

// waitCompleted waits for want COMPLETED runs and fails the test (the oracle dumps the
// rest) if they do not arrive within timeout.
func (s *system) waitCompleted(want int, timeout time.Duration) bool {
	s.t.Helper()
	got, ok := s.oracle.WaitCount(timeout, want, completedSQL)
	if !ok {
		s.t.Errorf("%d of %d runs COMPLETED after %s", got, want, timeout)
	}
	return ok
}

// wrongOutputs counts COMPLETED runs whose output is not what their input predicts,
// which is also what a fault-free run of that input returns.
func (s *system) wrongOutputs() int {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT id::text, input, output FROM workflow_runs WHERE status = 'COMPLETED'`)
	if err != nil {
		s.t.Fatalf("read outputs: %v", err)
	}
	defer rows.Close()
	wrong := 0
	for rows.Next() {
		var id string
		var input, output []byte
		if err := rows.Scan(&id, &input, &output); err != nil {
			s.t.Fatalf("read outputs: %v", err)
		}
		var in chaoswf.Input
		if err := json.Unmarshal(input, &in); err != nil {
			s.t.Fatalf("run %s input %q: %v", id, input, err)
		}
		want, _ := json.Marshal(chaoswf.Expected(in))
		if !bytes.Equal(output, want) {
			wrong++
			if wrong <= 5 {
				s.t.Logf("run %s output %s, want %s", id, output, want)
			}
		}
	}
	if err := rows.Err(); err != nil {
		s.t.Fatalf("read outputs: %v", err)
	}
	return wrong
}

// dbNow is the database clock, which is what every wake time and lease is measured by.
func (s *system) dbNow() time.Time {
	s.t.Helper()
	var now time.Time
	if err := s.pool.QueryRow(context.Background(), `SELECT clock_timestamp()`).Scan(&now); err != nil {
		s.t.Fatalf("read the database clock: %v", err)
	}
	return now
}

// workerStat reads one counter of an executor process (0 before its first report).
func (s *system) workerStat(pid int, column string) int {
	s.t.Helper()
	return s.oracle.Count(`SELECT coalesce((SELECT `+column+` FROM test_worker_stats WHERE pid = $1), 0)`, pid)
}

var panicRE = regexp.MustCompile(`(?m)^(panic: |fatal error: )`)

// checkNoPanics fails the test if any process the test started (killed ones included:
// a SIGKILL leaves no trace, a panic does) crashed with a Go panic.
func (s *system) checkNoPanics() {
	s.t.Helper()
	s.mu.Lock()
	procs := slices.Clone(s.procs)
	s.mu.Unlock()
	for _, p := range procs {
		if loc := panicRE.FindStringIndex(p.Log()); loc != nil {
			s.t.Errorf("%s panicked: %s", p.Name, firstLine(p.Log()[loc[0]:]))
		}
	}
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

func (s *system) taskConsumer(ctx context.Context) (*jetstream.ConsumerInfo, error) {
	c, err := s.js.Consumer(ctx, wire.TaskStream, wire.TaskConsumer(wire.DefaultNamespace, chaoswf.Name))
	if err != nil {
		return nil, fmt.Errorf("task consumer: %w", err)
	}
	return c.Info(ctx)
}

// waitDrained waits until the task consumer has nothing pending and nothing awaiting an
// ack, and returns its last info; drained is false (and err says why, if the broker did
// not answer) when timeout passed first.
func (s *system) waitDrained(timeout time.Duration) (info *jetstream.ConsumerInfo, drained bool, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout+10*time.Second)
	defer cancel()
	for end := time.Now().Add(timeout); ; time.Sleep(50 * time.Millisecond) {
		info, err = s.taskConsumer(ctx)
		if err == nil && info.NumPending == 0 && info.NumAckPending == 0 {
			return info, true, nil
		}
		if time.Now().After(end) {
			return info, false, err
		}
	}
}

// waitStreamMsgs waits until the task stream holds want doorbells and returns it.
func (s *system) waitStreamMsgs(want int, timeout time.Duration) jetstream.Stream {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout+5*time.Second)
	defer cancel()
	st, err := s.js.Stream(ctx, wire.TaskStream)
	if err != nil {
		s.t.Fatalf("task stream: %v", err)
	}
	end := time.Now().Add(timeout)
	for {
		info, err := st.Info(ctx)
		if err != nil {
			s.t.Fatalf("task stream info: %v", err)
		}
		if int(info.State.Msgs) == want {
			return st
		}
		if time.Now().After(end) {
			s.t.Fatalf("task stream holds %d doorbells, want %d", info.State.Msgs, want)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func (s *system) dumpBroker() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := s.js.Stream(ctx, wire.TaskStream)
	if err != nil {
		s.t.Logf("broker: task stream: %v", err)
		return
	}
	info := st.CachedInfo()
	s.t.Logf("broker: stream %s msgs=%d first=%d last=%d deleted=%d", info.Config.Name, info.State.Msgs,
		info.State.FirstSeq, info.State.LastSeq, info.State.NumDeleted)
	lister := st.ListConsumers(ctx)
	for ci := range lister.Info() {
		s.t.Logf("broker: consumer %s pending=%d ack_pending=%d redelivered=%d waiting=%d delivered=%d ack_floor=%d",
			ci.Name, ci.NumPending, ci.NumAckPending, ci.NumRedelivered, ci.NumWaiting, ci.Delivered.Stream, ci.AckFloor.Stream)
	}
	if err := lister.Err(); err != nil {
		s.t.Logf("broker: list consumers: %v", err)
	}
}

func (s *system) dumpWorkerStats() {
	rows, err := s.pool.Query(context.Background(), `SELECT format('pid=%s %s claimed=%s noops=%s steps=%s completed=%s failed=%s retried=%s fenced=%s lease_lost=%s released=%s at=%s',
		pid, executor, claimed, claim_noops, steps_recorded, completed, failed, retried, fenced_rejected, lease_lost, released, at)
		FROM test_worker_stats ORDER BY pid`)
	if err != nil {
		s.t.Logf("worker stats: %v", err)
		return
	}
	defer rows.Close()
	for rows.Next() {
		var line string
		_ = rows.Scan(&line)
		s.t.Logf("worker stats: %s", line)
	}
}

func (s *system) dumpFaults() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, pid := range slices.Sorted(func(yield func(int) bool) {
		for pid := range s.faulted {
			if !yield(pid) {
				return
			}
		}
	}) {
		s.t.Logf("fault: pid %d %s", pid, s.faulted[pid])
	}
}

// freeAddr is a free 127.0.0.1 port for a service's metrics endpoint.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// errMetricAbsent: the service exposes no series of the metric, which for a vector that
// was never incremented means zero.
var errMetricAbsent = errors.New("metric not exposed")

// scrapeMetric sums every series of a metric on a service's /metrics.
// scrapeClient closes its connection after every scrape. A kept-alive connection is a
// goroutine in the scraped process for as long as it idles, and the default transport
// keeps up to two per service, so T20's goroutines "at rest" would count the probe's own
// connections: a timer's floor of 18 early and 16 late (T20, one full chaos run) is
// within that.
var scrapeClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

func scrapeMetric(addr, name string) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := scrapeClient.Do(req)
	if err != nil {
		return 0, fmt.Errorf("scrape %s: %w", addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, fmt.Errorf("scrape %s: %w", addr, err)
	}
	var sum float64
	found := false
	for _, line := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(line, name) || len(line) == len(name) || (line[len(name)] != ' ' && line[len(name)] != '{') {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			return 0, fmt.Errorf("metric line %q: %w", line, err)
		}
		sum += v
		found = true
	}
	if !found {
		return 0, fmt.Errorf("%s by %s: %w", name, addr, errMetricAbsent)
	}
	return sum, nil
}

func expectEq(t *testing.T, what string, got, want int) {
	t.Helper()
	if got != want {
		t.Errorf("%s: %d, want %d", what, got, want)
	}
}

func expectZero(t *testing.T, what string, got int) {
	t.Helper()
	if got != 0 {
		t.Errorf("%s: %d, want 0", what, got)
	}
}
