// Package benchwf holds the workflows `kagzi bench` runs. The reference executor
// registers them next to the demo workflows, so the benchmark measures the same binary
// and the same executor an operator deploys, not a special build.
//
// Their step bodies do (almost) nothing on purpose: the benchmark measures the engine's
// cost per run and per step, not user code.
package benchwf

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kagzi/kagzi/libs/sdk"
)

// Names of the bench workflows.
const (
	Noop3Name = "bench-noop3"
	SleepName = "bench-sleep"
	CrashName = "bench-crash"
)

// EffectsTable is where bench-crash bodies leave one row per execution when asked to, so
// that the bench can count how often each step body ran, including executions whose
// result was never recorded. The bench creates it in its database; EffectsDDL is its
// definition.
const EffectsTable = "kagzi_bench_effects"

// EffectsDDL creates EffectsTable. clock_timestamp(), not now(): each row must say when
// its body began, even if rows of one transaction were ever batched.
const EffectsDDL = `
CREATE TABLE IF NOT EXISTS kagzi_bench_effects (
    run_id   uuid        NOT NULL,
    step_key text        NOT NULL,
    pid      integer     NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
)`

// StepOutput is the small JSON value every bench step returns.
type StepOutput struct {
	I int `json:"i"`
}

// Noop3 takes three sequential steps that do nothing but return {"i":k}: the cost of a
// run is then the engine's cost of three durable steps.
var Noop3 = sdk.Workflow(Noop3Name, func(ctx sdk.Context, _ struct{}) (StepOutput, error) {
	var out StepOutput
	for i, key := range []string{"one", "two", "three"} {
		k := i + 1
		v, err := sdk.Step(ctx, key, func(context.Context) (StepOutput, error) { return StepOutput{I: k}, nil })
		if err != nil {
			return StepOutput{}, err
		}
		out = v
	}
	return out, nil
})

// SleepInput shapes a bench-sleep run: a durable sleep of MS milliseconds, or until
// Until when it is set (so that many runs can share one wake time).
type SleepInput struct {
	MS    int        `json:"ms,omitempty"`
	Until *time.Time `json:"until,omitempty"`
}

// Sleep sleeps durably, then takes one no-op step. The step's record time minus the
// sleep's recorded wake time is the wake-up lateness the bench reports.
var Sleep = sdk.Workflow(SleepName, func(ctx sdk.Context, in SleepInput) (StepOutput, error) {
	var err error
	if in.Until != nil {
		err = ctx.SleepUntil("nap", *in.Until)
	} else {
		err = ctx.Sleep("nap", time.Duration(in.MS)*time.Millisecond)
	}
	if err != nil {
		return StepOutput{}, err
	}
	return sdk.Step(ctx, "after", func(context.Context) (StepOutput, error) { return StepOutput{I: 1}, nil })
})

// CrashInput shapes a bench-crash run.
type CrashInput struct {
	MS     int  `json:"ms"`     // how long step two takes
	Record bool `json:"record"` // each body first inserts a row into EffectsTable
}

// Crash takes three steps, the second one slow, so an executor can be killed while runs
// are inside it. Distinct keys, so the step keys are exactly "s1", "s2" and "s3".
var Crash = sdk.Workflow(CrashName, func(ctx sdk.Context, in CrashInput) (StepOutput, error) {
	var out StepOutput
	for i, key := range []string{"s1", "s2", "s3"} {
		k := i + 1
		v, err := sdk.Step(ctx, key, func(sctx context.Context) (StepOutput, error) {
			if in.Record {
				if err := recordEffect(sctx, ctx.RunID(), key); err != nil {
					return StepOutput{}, err
				}
			}
			if k == 2 && in.MS > 0 {
				t := time.NewTimer(time.Duration(in.MS) * time.Millisecond)
				defer t.Stop()
				select {
				case <-t.C:
				case <-sctx.Done():
					return StepOutput{}, sctx.Err()
				}
			}
			return StepOutput{I: k}, nil
		})
		if err != nil {
			return StepOutput{}, err
		}
		out = v
	}
	return out, nil
})

// Workflows lists the bench workflows for an executor to register.
func Workflows() []sdk.Registration {
	return []sdk.Registration{Noop3, Sleep, Crash}
}

// The effects pool is opened on first use from DATABASE_URL, the variable the executor
// itself reads: workflows are registered before the executor's own pool exists, and
// only bench-crash with record=true needs one. It is separate from the engine's pool so
// an effect row commits on its own, before the step's result, as a real side effect
// would.
var (
	effectsMu   sync.Mutex
	effectsPool *pgxpool.Pool
)

func effects(ctx context.Context) (*pgxpool.Pool, error) {
	effectsMu.Lock()
	defer effectsMu.Unlock()
	if effectsPool != nil {
		return effectsPool, nil
	}
	url := os.Getenv("DATABASE_URL")
	if url == "" {
		return nil, sdk.Terminal(errors.New("bench-crash with record=true needs DATABASE_URL in the executor's environment"))
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, sdk.Terminal(fmt.Errorf("parse DATABASE_URL for bench effects: %w", err))
	}
	cfg.MaxConns = 8
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open bench effects pool: %w", err)
	}
	effectsPool = pool
	return pool, nil
}

func recordEffect(ctx context.Context, runID, stepKey string) error {
	pool, err := effects(ctx)
	if err != nil {
		return err
	}
	_, err = pool.Exec(ctx, `INSERT INTO kagzi_bench_effects (run_id, step_key, pid) VALUES ($1, $2, $3)`,
		runID, stepKey, os.Getpid())
	if err != nil {
		return fmt.Errorf("record bench effect of %s/%s: %w", runID, stepKey, err)
	}
	return nil
}
