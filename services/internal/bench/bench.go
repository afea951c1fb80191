// Package bench is `kagzi bench`: it runs the real services (scheduler, timer and
// executors, as child processes of the same kagzi binary) against a fresh database and a
// fresh JetStream per scenario, drives them through the SDK client, and reports what
// issue 4 asks for: throughput, latency, durable-sleep lateness, crash recovery, the
// cost of many sleepers and of idling, each beside PostgreSQL's own commit rate on the
// same machine, so figures compare across machines.
//
// The package takes plain values (no fx) and writes to the writers it is given.
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/store"
)

// Scenario names, in the order they run.
const (
	S1Throughput = "s1"
	S2Latency    = "s2"
	S3Sleep      = "s3"
	S4Crash      = "s4"
	S5Sleepers   = "s5"
	S6Idle       = "s6"
)

// AllScenarios is the default selection, in running order.
var AllScenarios = []string{S1Throughput, S2Latency, S3Sleep, S4Crash, S5Sleepers, S6Idle}

// Config says what to run where. Zero fields take the defaults of issue 4.
type Config struct {
	// DatabaseURL names the PostgreSQL server and credentials; each scenario creates its
	// own database there (kagzi_bench_<scenario>_<random>) and drops it afterwards.
	DatabaseURL string
	// NATS is the broker. An empty URL starts an embedded server (JetStream fsyncing
	// every write) per scenario; a given server must not serve another Kagzi, since each
	// scenario deletes the Kagzi streams on it.
	NATS bus.ConnOptions
	// Binary is the kagzi binary whose services are run; default: this executable.
	Binary string
	// Namespace is where the runs are started (KAGZI_NAMESPACE of the services);
	// default: the services' default.
	Namespace string

	Scenarios []string // default AllScenarios

	N                int           // S1 runs (5000)
	LatencyRuns      int           // S2 sequential runs (300)
	SleepRuns        int           // S3 runs (1000)
	SleepFor         time.Duration // S3 sleep (2s)
	CrashRuns        int           // S4 runs (200)
	CrashStep        time.Duration // S4 duration of step 2 (5s)
	CrashLease       time.Duration // S4 executor lease (2s)
	Sleepers         int           // S5 runs asleep at once (0: 100,000, fewer if they would not fit in S5's budget)
	Idle             time.Duration // S6 idle window (60s)
	RefDuration      time.Duration // each reference commit-rate measurement (3s)
	StartConcurrency int           // client goroutines starting runs at once (64)
	// Concurrency is KAGZI_CONCURRENCY of the executor in S1, S3 and S5; 0 keeps the
	// executor's default. S4 always uses enough for every run to be inside step 2.
	Concurrency int
	// TimerMaxIdle is KAGZI_MAX_IDLE of the timer; 0 keeps the timer's default. Lease
	// expiries are announced by no hint, so it bounds how soon S4 notices the kill.
	TimerMaxIdle time.Duration

	// ScenarioTimeout bounds each scenario but S5, which bounds itself by the rate its
	// probe measured (default 4m). A system that stops making progress fails its
	// scenario with a summary of where its runs are, and the bench goes on.
	ScenarioTimeout time.Duration
	// ServiceLogLevel is KAGZI_LOG_LEVEL of the services (default warn); their logs are
	// kept in a directory the report names when something failed.
	ServiceLogLevel string

	Out  string // JSON report; default bench.json; "-" for none
	Keep bool   // keep the databases (and the service logs)
	// ProfileDir, when set, runs the services with Go's profiler on (KAGZI_PPROF) and,
	// after S2's measurement, keeps its load going for ProfileFor (default 20 s) while
	// it takes a CPU profile of every service, written there as s2-<service>.pprof. The
	// measured figures are taken before, and unaffected.
	ProfileDir string
	ProfileFor time.Duration
	// Progress receives a line per phase while the bench runs; nil discards them.
	Progress io.Writer
}

func (c *Config) setDefaults() error {
	if c.DatabaseURL == "" {
		return errors.New("bench: a database url is required")
	}
	if c.Binary == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("bench: find the kagzi binary: %w", err)
		}
		c.Binary = exe
	}
	if len(c.Scenarios) == 0 {
		c.Scenarios = AllScenarios
	}
	for _, s := range c.Scenarios {
		if !slices.Contains(AllScenarios, s) {
			return fmt.Errorf("bench: unknown scenario %q (known: %s)", s, strings.Join(AllScenarios, ","))
		}
	}
	setInt := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	setDur := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	setInt(&c.N, 5000)
	setInt(&c.LatencyRuns, 300)
	setDur(&c.ProfileFor, 20*time.Second)
	setInt(&c.SleepRuns, 1000)
	setDur(&c.SleepFor, 2*time.Second)
	setInt(&c.CrashRuns, 200)
	setDur(&c.CrashStep, 5*time.Second)
	setDur(&c.CrashLease, 2*time.Second)
	setDur(&c.Idle, 60*time.Second)
	setDur(&c.RefDuration, 3*time.Second)
	setDur(&c.ScenarioTimeout, 4*time.Minute)
	setInt(&c.StartConcurrency, 64)
	if c.Out == "" {
		c.Out = "bench.json"
	}
	if c.ServiceLogLevel == "" {
		c.ServiceLogLevel = "warn"
	}
	if c.Progress == nil {
		c.Progress = io.Discard
	}
	return nil
}

// Report is the JSON file: every figure of the table, and the settings that made it.
type Report struct {
	StartedAt time.Time         `json:"started_at"`
	Duration  Seconds           `json:"duration_s"`
	Machine   Machine           `json:"machine"`
	Settings  Settings          `json:"settings"`
	Reference *Reference        `json:"reference,omitempty"`
	S1        *Throughput       `json:"s1_throughput,omitempty"`
	S2        *Latency          `json:"s2_latency,omitempty"`
	S3        *SleepLateness    `json:"s3_durable_sleep,omitempty"`
	S4        *CrashRecovery    `json:"s4_crash_recovery,omitempty"`
	S5        *SleepingScale    `json:"s5_sleeping_scale,omitempty"`
	S6        *IdleCost         `json:"s6_idle_cost,omitempty"`
	Errors    map[string]string `json:"errors,omitempty"`
}

// Machine is where the figures were taken.
type Machine struct {
	CPUs      int    `json:"cpus"`
	OS        string `json:"os"`
	GoVersion string `json:"go_version"`
	Postgres  string `json:"postgres"`
	NATS      string `json:"nats"`
	// The load average before and after: other work on the machine skews every figure,
	// and this is how a reader of the report can tell.
	LoadBefore string `json:"loadavg_before"`
	LoadAfter  string `json:"loadavg_after"`
}

// Settings are the sizes the run used.
type Settings struct {
	Scenarios        []string `json:"scenarios"`
	N                int      `json:"s1_runs"`
	LatencyRuns      int      `json:"s2_runs"`
	SleepRuns        int      `json:"s3_runs"`
	SleepFor         Seconds  `json:"s3_sleep_s"`
	CrashRuns        int      `json:"s4_runs"`
	CrashStep        Seconds  `json:"s4_step2_s"`
	CrashLease       Seconds  `json:"s4_lease_s"`
	Sleepers         int      `json:"s5_sleepers"`
	Idle             Seconds  `json:"s6_idle_s"`
	StartConcurrency int      `json:"start_concurrency"`
	Concurrency      int      `json:"executor_concurrency,omitempty"`
	TimerMaxIdle     Seconds  `json:"timer_max_idle_s,omitempty"`
}

// Seconds marshals a duration as seconds, the unit of every duration in the report.
type Seconds float64

func secs(d time.Duration) Seconds { return Seconds(d.Seconds()) }

// String prints the value as a Go duration ("200ms", "5s").
func (s Seconds) String() string { return time.Duration(float64(s) * float64(time.Second)).String() }

// bencher is one run of the bench.
type bencher struct {
	cfg    Config
	logDir string
	rep    *Report
}

func (b *bencher) progress(format string, args ...any) {
	fmt.Fprintf(b.cfg.Progress, "bench: "+format+"\n", args...)
}

// Run runs the selected scenarios one after the other, prints the table on stdout and
// writes the JSON report. A failed scenario is reported in both and does not stop the
// others; Run then returns an error naming it.
func Run(ctx context.Context, cfg Config, stdout io.Writer) error {
	if err := cfg.setDefaults(); err != nil {
		return err
	}
	logDir, err := os.MkdirTemp("", "kagzi-bench-logs-")
	if err != nil {
		return fmt.Errorf("bench: create log directory: %w", err)
	}
	b := &bencher{cfg: cfg, logDir: logDir, rep: &Report{StartedAt: time.Now().UTC(), Errors: map[string]string{}}}
	b.rep.Machine = Machine{CPUs: runtime.NumCPU(), OS: runtime.GOOS + "/" + runtime.GOARCH, GoVersion: runtime.Version(),
		Postgres: b.postgresVersion(ctx), NATS: "embedded nats-server, JetStream fsync on every write", LoadBefore: loadAvg()}
	if cfg.NATS.URL != "" {
		b.rep.Machine.NATS = cfg.NATS.URL
	}
	b.rep.Settings = Settings{Scenarios: cfg.Scenarios, N: cfg.N, LatencyRuns: cfg.LatencyRuns, SleepRuns: cfg.SleepRuns,
		SleepFor: secs(cfg.SleepFor), CrashRuns: cfg.CrashRuns, CrashStep: secs(cfg.CrashStep), CrashLease: secs(cfg.CrashLease),
		Sleepers: cfg.Sleepers, Idle: secs(cfg.Idle), StartConcurrency: cfg.StartConcurrency, Concurrency: cfg.Concurrency, TimerMaxIdle: secs(cfg.TimerMaxIdle)}

	began := time.Now()
	b.progress("service logs in %s", logDir)
	b.progress("reference: PostgreSQL commit rate of a one-row INSERT at 1 and 8 clients")
	ref, err := b.reference(ctx)
	if err != nil {
		b.rep.Errors["reference"] = err.Error()
		b.progress("reference failed: %v", err)
	}
	b.rep.Reference = ref
	steps := map[string]func(context.Context) error{
		S1Throughput: b.runS1, S2Latency: b.runS2, S3Sleep: b.runS3,
		S4Crash: b.runS4, S5Sleepers: b.runS5, S6Idle: b.runS6,
	}
	for _, name := range AllScenarios {
		if !slices.Contains(cfg.Scenarios, name) {
			continue
		}
		if ctx.Err() != nil {
			b.rep.Errors[name] = "not run: " + ctx.Err().Error()
			continue
		}
		began := time.Now()
		sctx, cancel := ctx, context.CancelFunc(func() {})
		if name != S5Sleepers {
			sctx, cancel = context.WithTimeout(ctx, cfg.ScenarioTimeout)
		}
		err := steps[name](sctx)
		cancel()
		if err != nil {
			b.rep.Errors[name] = err.Error()
			b.progress("%s failed after %.1fs: %v", name, time.Since(began).Seconds(), err)
			continue
		}
		b.progress("%s done in %.1fs", name, time.Since(began).Seconds())
	}
	b.rep.Duration = secs(time.Since(began))
	b.rep.Machine.LoadAfter = loadAvg()

	writeTable(stdout, b.rep)
	if cfg.Out != "-" {
		if err := writeJSON(cfg.Out, b.rep); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "\nJSON report: %s\n", cfg.Out)
	}
	if len(b.rep.Errors) > 0 || cfg.Keep {
		fmt.Fprintf(stdout, "Service logs: %s\n", logDir)
	} else {
		_ = os.RemoveAll(logDir)
	}
	if len(b.rep.Errors) > 0 {
		names := make([]string, 0, len(b.rep.Errors))
		for n := range b.rep.Errors {
			names = append(names, n)
		}
		slices.Sort(names)
		return fmt.Errorf("bench: %s failed", strings.Join(names, ", "))
	}
	return nil
}

func (b *bencher) postgresVersion(ctx context.Context) string {
	conn, err := adminConn(ctx, b.cfg.DatabaseURL)
	if err != nil {
		return "unknown: " + err.Error()
	}
	defer conn.Close(ctx)
	var v string
	if err := conn.QueryRow(ctx, `SHOW server_version`).Scan(&v); err != nil {
		return "unknown: " + err.Error()
	}
	return "PostgreSQL " + v + " at " + store.RedactURL(b.cfg.DatabaseURL)
}

// loadAvg is the 1, 5 and 15 minute load averages, or "" where /proc has none.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

func writeJSON(path string, rep *Report) error {
	data, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return fmt.Errorf("bench: encode report: %w", err)
	}
	if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("bench: write report: %w", err)
	}
	return nil
}

// withSystem runs fn with a fresh scenario system, on a settled machine, and always tears
// the system down.
func (b *bencher) withSystem(ctx context.Context, scenario string, fn func(*system) error) error {
	b.settle(ctx)
	s, err := b.newSystem(ctx, scenario)
	if err != nil {
		return err
	}
	defer s.close()
	return fn(s)
}

// dbNow is the database clock, which stamps every row the figures are read from.
func dbNow(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) (time.Time, error) {
	var t time.Time
	if err := q.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&t); err != nil {
		return t, fmt.Errorf("read database clock: %w", err)
	}
	return t, nil
}
