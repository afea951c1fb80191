package bench_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/services/internal/bench"
)

// TestBenchTiny runs every scenario of the bench at toy sizes against the test server,
// with the real kagzi binary as the services: it proves the harness (fresh databases,
// child processes, readiness, kill -9, the figures and both outputs), not performance.
func TestBenchTiny(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a dozen processes")
	}
	dir := t.TempDir()
	bins, err := testkit.Build(dir, "github.com/kagzi/kagzi/services/kagzi")
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "bench.json")
	var progress, table bytes.Buffer
	cfg := bench.Config{
		DatabaseURL: testkit.AdminURL(),
		Binary:      bins["kagzi"],
		N:           20,
		LatencyRuns: 5,
		SleepRuns:   10,
		SleepFor:    200 * time.Millisecond,
		CrashRuns:   3,
		CrashStep:   3 * time.Second, // long enough to start the second executor meanwhile
		CrashLease:  time.Second,
		Sleepers:    30,
		Idle:        time.Second,
		// Lease expiries wait for the timer's next look; the default (20s) would make
		// S4 the whole test.
		TimerMaxIdle: 500 * time.Millisecond,
		RefDuration:  100 * time.Millisecond,
		Out:          out,
		Progress:     &progress,
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := bench.Run(ctx, cfg, &table); err != nil {
		t.Fatalf("bench: %v\n%s\n%s", err, progress.String(), table.String())
	}
	t.Logf("\n%s\n%s", progress.String(), table.String())

	data, err := os.ReadFile(out)
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
	if r := rep.S1; r == nil || r.Runs != 20 || r.WorkflowsPerS <= 0 || r.ExecutorPeakRSS <= 0 || r.Latency.Count != 20 {
		t.Errorf("S1: %+v", r)
	}
	if r := rep.S2; r == nil || r.Client.Count != 5 || r.Client.P50 <= 0 || r.Server.Count != 5 {
		t.Errorf("S2: %+v", r)
	}
	// A sleeper that went on before its wake time would break a guarantee, not a target.
	if r := rep.S3; r == nil || r.Lateness.Count != 10 || r.Early != 0 {
		t.Errorf("S3: %+v", r)
	}
	if r := rep.S4; r == nil || r.CompletedRerun != 0 || r.LaterRerun != 0 || r.Interrupted != 3 || r.Recovery <= 0 {
		t.Errorf("S4: %+v", r)
	}
	if r := rep.S5; r == nil || r.PeakAsleep != 30 || !r.AllAsleepAtOnce || r.PGBytesPerRun <= 0 || r.Lateness.Count != 30 {
		t.Errorf("S5: %+v", r)
	}
	if r := rep.S6; r == nil || r.Window <= 0 || len(r.CPUPerService) != 3 {
		t.Errorf("S6: %+v", r)
	}
	for _, name := range []string{"reference", "S1 throughput", "S2 latency", "S3 durable sleep", "S4 crash recovery", "S5 sleeping scale", "S6 idle cost"} {
		if !strings.Contains(table.String(), name) {
			t.Errorf("table has no row %q", name)
		}
	}
}
