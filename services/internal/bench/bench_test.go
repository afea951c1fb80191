package bench_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/services/internal/bench"
)

// kagziBin is the real kagzi binary, built once: the bench runs its services as child
// processes, and a test binary is not one.
var kagziBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kagzi-bench-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins, err := testkit.Build(dir, "github.com/kagzi/kagzi/services/kagzi")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	kagziBin = bins["kagzi"]
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// tinyConfig is every scenario at toy sizes: the tests prove the harness (fresh
// databases, child processes, readiness, kill -9, the figures and both outputs), not
// performance.
func tinyConfig(t *testing.T, scenarios ...string) bench.Config {
	return bench.Config{
		DatabaseURL: testkit.AdminURL(),
		Binary:      kagziBin,
		Scenarios:   scenarios,
		N:           20,
		LatencyRuns: 5,
		SleepRuns:   10,
		SleepFor:    200 * time.Millisecond,
		CrashRuns:   3,
		CrashStep:   3 * time.Second, // long enough to start the second executor meanwhile
		CrashLease:  time.Second,
		Sleepers:    30,
		Idle:        time.Second,
		RefDuration: 100 * time.Millisecond,
		// Lease expiries wait for the timer's next look; at the default (20s) S4 would be
		// most of the test.
		TimerMaxIdle: 500 * time.Millisecond,
		Out:          filepath.Join(t.TempDir(), "bench.json"),
	}
}

// runTiny runs the bench and returns its report and table.
func runTiny(t *testing.T, cfg bench.Config) (bench.Report, string) {
	t.Helper()
	var progress, table bytes.Buffer
	cfg.Progress = &progress
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := bench.Run(ctx, cfg, &table); err != nil {
		t.Fatalf("bench: %v\n%s\n%s", err, progress.String(), table.String())
	}
	t.Logf("\n%s\n%s", progress.String(), table.String())
	data, err := os.ReadFile(cfg.Out)
	if err != nil {
		t.Fatal(err)
	}
	var rep bench.Report
	if err := json.Unmarshal(data, &rep); err != nil {
		t.Fatalf("report is not JSON: %v", err)
	}
	if rep.Reference == nil || rep.Reference.OneClient <= 0 || rep.Reference.EightClients <= 0 {
		t.Errorf("reference: %+v", rep.Reference)
	}
	return rep, table.String()
}

func hasRows(t *testing.T, table string, names ...string) {
	t.Helper()
	for _, name := range append([]string{"reference"}, names...) {
		if !strings.Contains(table, name) {
			t.Errorf("table has no row %q", name)
		}
	}
}

func TestBenchTinyLoad(t *testing.T) {
	t.Parallel()
	cfg := tinyConfig(t, bench.S1Throughput, bench.S2Latency, bench.S3Sleep)
	cfg.ProfileDir, cfg.ProfileFor = t.TempDir(), time.Second
	rep, table := runTiny(t, cfg)
	// Profiled: S2's load went on while every service was profiled.
	for _, service := range []string{"scheduler", "timer", "executor"} {
		if fi, err := os.Stat(filepath.Join(cfg.ProfileDir, "s2-"+service+".pprof")); err != nil || fi.Size() == 0 {
			t.Errorf("profile of %s: %v", service, err)
		}
	}
	if r := rep.S1; r == nil || r.Runs != 20 || r.WorkflowsPerS <= 0 || r.ExecutorPeakRSS <= 0 || r.Latency.Count != 20 {
		t.Errorf("S1: %+v", r)
	}
	if r := rep.S2; r == nil || r.Client.Count != 5 || r.Client.P50 <= 0 || r.Server.Count != 5 ||
		r.CommitMSBeside <= 0 || r.P50InCommitsBeside != r.Client.P50/r.CommitMSBeside {
		t.Errorf("S2: %+v", r)
	} else if st := r.Stages; st == nil || st.CreatedToClaimed <= 0 || st.ClaimedToFirstStep <= 0 || st.StepToStep <= 0 ||
		st.LastStepToFinished != 0 {
		// The last step of bench-noop3 is written in the completion's transaction.
		t.Errorf("S2 stages: %+v; want each positive but the last, which is 0", st)
	}
	// A sleeper that went on before its wake time would break a guarantee, not a target.
	if r := rep.S3; r == nil || r.Defaults.Lateness.Count != 10 || r.Defaults.Early != 0 ||
		r.Parked.Lateness.Count != 10 || r.Parked.Early != 0 {
		t.Errorf("S3: %+v", r)
	}
	if rep.S4 != nil || rep.S5 != nil || rep.S6 != nil {
		t.Error("scenarios that were not selected ran")
	}
	hasRows(t, table, "S1 throughput", "S2 latency", "S3 durable sleep")
}

func TestBenchTinyFaultsAndScale(t *testing.T) {
	t.Parallel()
	rep, table := runTiny(t, tinyConfig(t, bench.S4Crash, bench.S5Sleepers, bench.S6Idle))
	if r := rep.S4; r == nil || r.CompletedRerun != 0 || r.LaterRerun != 0 || r.Interrupted != 3 || r.Recovery <= 0 {
		t.Errorf("S4: %+v", r)
	}
	if r := rep.S5; r == nil || r.PeakAsleep != 30 || !r.AllAsleepAtOnce || r.PGBytesPerRun < 0 || r.Lateness.Count != 30 {
		t.Errorf("S5: %+v", r)
	}
	if r := rep.S6; r == nil || r.Window <= 0 || len(r.CPUPerService) != 3 {
		t.Errorf("S6: %+v", r)
	}
	hasRows(t, table, "S4 crash recovery", "S5 sleeping scale", "S6 idle cost")
}
