// Command testexecutor is the executor the end-to-end and fault tests run as a real
// process (so SIGKILL and SIGSTOP are real). Its workflows write one row per step-body
// execution into the test-only table test_effects, through a separate autocommit pool and
// before doing anything else, so a test can count bodies even when their results were
// never recorded.
//
//	DATABASE_URL, NATS_URL, KAGZI_LEASE (default 2s), KAGZI_CONCURRENCY (default 16)
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
)

// StepsInput shapes a run of the "e2e-steps" workflow.
type StepsInput struct {
	Steps      int    `json:"steps"`       // number of steps, each keyed "step" (step, step#2, …)
	StepMS     int    `json:"step_ms"`     // how long each body takes
	SlowStep   int    `json:"slow_step"`   // 1-based step that takes SlowMS instead
	SlowMS     int    `json:"slow_ms"`     //
	SlowOn     string `json:"slow_on"`     // only this executor (KAGZI_EXECUTOR_NAME) is slow; "" all
	SleepAfter int    `json:"sleep_after"` // 1-based step after which the run sleeps SleepMS
	SleepMS    int    `json:"sleep_ms"`    //
}

var effects *pgxpool.Pool

func effect(ctx context.Context, runID string) error {
	key := sdk.StepKey(ctx)
	_, err := effects.Exec(context.Background(),
		`INSERT INTO test_effects (run_id, step_key, idem_key, executor_id, pid) VALUES ($1, $2, $3, $4, $5)`,
		runID, key[len(runID)+1:], key, os.Getenv("KAGZI_EXECUTOR_NAME"), os.Getpid())
	return err
}

var stepsWorkflow = sdk.Workflow("e2e-steps", func(ctx sdk.Context, in StepsInput) (int, error) {
	total := 0
	for i := 1; i <= in.Steps; i++ {
		v, err := sdk.Step(ctx, "step", func(sctx context.Context) (int, error) {
			if err := effect(sctx, ctx.RunID()); err != nil {
				return 0, err
			}
			d := in.StepMS
			if i == in.SlowStep && (in.SlowOn == "" || in.SlowOn == os.Getenv("KAGZI_EXECUTOR_NAME")) {
				d = in.SlowMS
			}
			time.Sleep(time.Duration(d) * time.Millisecond)
			return i, nil
		})
		if err != nil {
			return 0, err
		}
		total += v
		if i == in.SleepAfter {
			if err := ctx.Sleep("nap", time.Duration(in.SleepMS)*time.Millisecond); err != nil {
				return 0, err
			}
		}
	}
	return total, nil
})

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "testexecutor:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	lease, err := time.ParseDuration(envOr("KAGZI_LEASE", "2s"))
	if err != nil {
		return err
	}
	conc, err := strconv.Atoi(envOr("KAGZI_CONCURRENCY", "16"))
	if err != nil {
		return err
	}
	pool, err := store.Connect(ctx, os.Getenv("DATABASE_URL"), 8)
	if err != nil {
		return err
	}
	defer pool.Close()
	effects, err = store.Connect(ctx, os.Getenv("DATABASE_URL"), 8)
	if err != nil {
		return err
	}
	defer effects.Close()
	nc, err := bus.Connect(bus.ConnOptions{URL: os.Getenv("NATS_URL"), Name: "testexecutor"})
	if err != nil {
		return err
	}
	defer nc.Close()
	w, err := sdk.NewWorker(sdk.WorkerConfig{Pool: pool, Conn: nc, Lease: lease, Concurrency: conc,
		RetryBackoff: 100 * time.Millisecond, ShutdownGrace: 2 * time.Second,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	if err != nil {
		return err
	}
	if err := w.Register(stepsWorkflow); err != nil {
		return err
	}
	if err := w.Start(ctx); err != nil {
		return err
	}
	fmt.Fprintln(os.Stderr, "testexecutor ready")
	<-ctx.Done()
	return w.Stop(context.Background())
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
