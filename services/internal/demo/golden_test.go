package demo_test

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/services/internal/demo"
	"github.com/kagzi/kagzi/services/internal/scheduler"
	"github.com/kagzi/kagzi/services/internal/timer"
)

var update = flag.Bool("update", false, "run the workflows for real and rewrite the golden histories")

const goldenDir = "testdata/golden"

// The recorded histories of 50 real runs of the demo workflows are fixtures: the current
// code must replay every one of them (no step-key mismatch, no body executed). A change
// that breaks them breaks the runs in flight in production; refresh the fixtures with
// -update only for a deliberate, versioned change.
func TestGoldenHistoriesReplay(t *testing.T) {
	if *update {
		recordGolden(t)
	}
	files, err := filepath.Glob(filepath.Join(goldenDir, "*.json"))
	if err != nil || len(files) != 50 {
		t.Fatalf("%d golden histories (%v), want 50: run go test -run TestGoldenHistoriesReplay -update", len(files), err)
	}
	defs := map[string]sdk.Registration{}
	for _, d := range demo.Workflows() {
		defs[d.Name()] = d
	}
	for _, f := range files {
		var h sdk.RunInfo
		data, err := os.ReadFile(f)
		if err == nil {
			err = json.Unmarshal(data, &h)
		}
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if err := sdk.Replay(defs[h.Workflow], &h, nil); err != nil {
			t.Errorf("%s: %v", filepath.Base(f), err)
		}
	}
}

// A reordering of the greet workflow's steps is caught on every golden history.
func TestGoldenHistoriesCatchAReorder(t *testing.T) {
	swapped := sdk.Workflow("greet", func(ctx sdk.Context, in demo.GreetInput) (demo.GreetOutput, error) {
		g, err := sdk.Step(ctx, "compose", func(context.Context) (string, error) { return "", nil })
		if err != nil {
			return demo.GreetOutput{}, err
		}
		_, err = sdk.Step(ctx, "normalise-name", func(context.Context) (string, error) { return "", nil })
		return demo.GreetOutput{Greeting: g}, err
	})
	files, _ := filepath.Glob(filepath.Join(goldenDir, "greet-*.json"))
	caught := 0
	for _, f := range files {
		var h sdk.RunInfo
		data, _ := os.ReadFile(f)
		if json.Unmarshal(data, &h) == nil && errors.Is(sdk.Replay(swapped, &h, nil), sdk.ErrNonDeterminism) {
			caught++
		}
	}
	if len(files) == 0 || caught != len(files) {
		t.Fatalf("reorder caught in %d of %d histories", caught, len(files))
	}
}

// recordGolden runs 50 greet runs through the real scheduler, timer and an SDK worker
// and writes their histories.
func recordGolden(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	pool, err := store.Connect(ctx, testkit.NewDatabase(t), 8)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	nc, err := bus.Connect(bus.ConnOptions{URL: testkit.StartNATS(t).URL()})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	b, err := bus.New(nc, bus.DefaultStreamConfig())
	if err != nil {
		t.Fatal(err)
	}
	st, log := store.New(pool), zap.NewNop()
	sched := scheduler.New(scheduler.Config{}, st, b, log, scheduler.NewMetrics(prometheus.NewRegistry()))
	tmr := timer.New(timer.Config{}, st, b, log, timer.NewMetrics(prometheus.NewRegistry()))
	for _, c := range []interface{ Start(context.Context) error }{sched, tmr} {
		if err := c.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	defer sched.Stop()
	defer tmr.Stop()
	w, err := sdk.NewWorker(sdk.WorkerConfig{Pool: pool, Conn: nc})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Register(demo.Workflows()...); err != nil {
		t.Fatal(err)
	}
	if err := w.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer w.Stop(context.Background()) //nolint:errcheck // test teardown
	client := sdk.NewClient(nc)
	_ = os.RemoveAll(goldenDir)
	if err := os.MkdirAll(goldenDir, 0o755); err != nil {
		t.Fatal(err)
	}
	names := []string{"", "  Ada ", "Grace", "Linus", "Ken", "Barbara", "Edsger", "Donald", "Frances", "Margaret"}
	var runs []*sdk.Run[demo.GreetOutput]
	for i := range 50 {
		name := names[i%len(names)] + strings.Repeat("!", i/len(names))
		run, err := demo.Greet.Start(ctx, client, demo.GreetInput{Name: name})
		if err != nil {
			t.Fatal(err)
		}
		runs = append(runs, run)
	}
	for i, run := range runs {
		if _, err := run.Result(ctx); err != nil {
			t.Fatal(err)
		}
		info, err := run.Describe(ctx)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := json.MarshalIndent(info, "", "  ")
		if err := os.WriteFile(filepath.Join(goldenDir, fmt.Sprintf("greet-%02d.json", i)), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
