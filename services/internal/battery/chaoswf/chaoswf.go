// Package chaoswf is the workflow the fault battery runs, shared by the chaos executor
// (which hosts it) and the tests (which predict its output). Every step body first
// writes one test_effects row through a separate autocommit pool, so the tests count
// body executions even when a result is never recorded.
package chaoswf

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kagzi/kagzi/libs/sdk"
)

// Name is the workflow's name.
const Name = "battery"

// Input shapes one run. Steps are keyed "step", "step#2", …; each body takes a
// pseudo-random MinMS..MaxMS derived from (Seed, step), so a run's timing is
// reproducible from its input.
type Input struct {
	Seed  int `json:"seed"`
	Steps int `json:"steps"`
	MinMS int `json:"min_ms,omitempty"`
	MaxMS int `json:"max_ms,omitempty"`
	// SleepAfter (1-based) makes the run Sleep("nap", SleepMS) after that step.
	SleepAfter int `json:"sleep_after,omitempty"`
	SleepMS    int `json:"sleep_ms,omitempty"`
	// LatchStep (1-based): on the run's first attempt that step's body, after writing its
	// effect, waits until the test inserts the run into test_latches. It ignores its
	// context on purpose: it plays a zombie whose body outlives its lease.
	LatchStep int `json:"latch_step,omitempty"`
	// Poison (one of the Poison* kinds) makes the run misbehave at step 2 on every
	// attempt; step 1 is an ordinary step, so every retry replays it first.
	Poison string `json:"poison,omitempty"`
	// TimeoutMS bounds every step body of the run (sdk.StepTimeout); 0: none.
	TimeoutMS int `json:"timeout_ms,omitempty"`
}

// The poison kinds of BATTERY.md T14, and what each leaves as the run's error.
const (
	// PoisonPanic panics in workflow code, outside any step, before step 2.
	PoisonPanic = "panic"
	// PoisonError makes step 2's body return PoisonErrorText.
	PoisonError = "error"
	// PoisonLoop makes step 2's body loop forever without looking at its context: only
	// the step timeout gets the run out of it.
	PoisonLoop = "loop"
	// PoisonExit makes step 2's body print PoisonExitLine and os.Exit(1) its executor.
	PoisonExit = "exit"

	PoisonPanicText = "chaoswf: poison panic in workflow code"
	PoisonErrorText = "chaoswf: poison step always fails"
	PoisonExitLine  = "chaoswf: poison os.Exit(1)"
)

// Value is step i's result for a seed.
func Value(seed, i int) string {
	h := sha256.Sum256([]byte(fmt.Sprintf("kagzi-battery/%d/%d", seed, i)))
	return hex.EncodeToString(h[:6])
}

// Expected is the output a run with this input must end with, however it was
// interrupted.
func Expected(in Input) string {
	vals := make([]string, in.Steps)
	for i := range vals {
		vals[i] = Value(in.Seed, i+1)
	}
	return strings.Join(vals, "-")
}

func bodyDuration(in Input, i int) time.Duration {
	if in.MaxMS <= in.MinMS {
		return time.Duration(in.MinMS) * time.Millisecond
	}
	h := sha256.Sum256([]byte(fmt.Sprintf("duration/%d/%d", in.Seed, i)))
	span := uint64(in.MaxMS - in.MinMS + 1)
	return time.Duration(in.MinMS+int(binary.BigEndian.Uint64(h[:8])%span)) * time.Millisecond
}

// Effects is the autocommit pool the bodies write test_effects and poll latches with;
// the executor sets it before starting its worker.
var Effects *pgxpool.Pool

// ExecutorName is the executor's name as the tests know it (KAGZI_EXECUTOR_NAME).
var ExecutorName = os.Getenv("KAGZI_EXECUTOR_NAME")

// The fence is read in the same statement: it is the claim this body runs under unless
// the run was already taken from us, which is exactly what a zombie's row should show.
const effectSQL = `
INSERT INTO test_effects (run_id, step_key, idem_key, executor_id, fence, attempt, pid)
SELECT $1, $2, $3, $4, (SELECT fence FROM workflow_runs WHERE id = $1), $5, $6`

func effect(ctx sdk.Context, sctx context.Context) error {
	key := sdk.StepKey(sctx)
	runID := ctx.RunID()
	// Not the step's context: a body that was cancelled still ran, and must be counted.
	ectx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := Effects.Exec(ectx, effectSQL, runID, strings.TrimPrefix(key, runID+"/"), key, ExecutorName,
		ctx.Attempt(), os.Getpid())
	if err != nil {
		return fmt.Errorf("record effect of %s: %w", key, err)
	}
	return nil
}

func waitLatch(runID string) {
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		var open bool
		err := Effects.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM test_latches WHERE run_id = $1)`, runID).Scan(&open)
		cancel()
		if err == nil && open {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// exitOnce lets one poison body per process reach os.Exit: the others block here until
// the process is gone, so every exit leaves exactly one test_effects row behind and the
// tests can equate exits with the executor restarts they made.
var exitOnce sync.Mutex

// poisonBody is step 2 of a poison run, after its effect was recorded.
func poisonBody(kind, runID string, attempt int) error {
	switch kind {
	case PoisonError:
		return errors.New(PoisonErrorText)
	case PoisonLoop:
		// Never returns and never reads its context. It naps instead of spinning: 100
		// abandoned bodies spinning on a two-core machine would measure the machine,
		// while to the engine a body that never returns is the same either way.
		for {
			time.Sleep(20 * time.Millisecond)
		}
	case PoisonExit:
		fmt.Fprintf(os.Stderr, "%s run=%s attempt=%d pid=%d at=%s\n", PoisonExitLine, runID, attempt, os.Getpid(),
			time.Now().UTC().Format(time.RFC3339Nano))
		os.Exit(1)
	}
	return fmt.Errorf("chaoswf: unknown poison kind %q", kind)
}

// Workflow is the battery's workflow.
var Workflow = sdk.Workflow(Name, func(ctx sdk.Context, in Input) (string, error) {
	vals := make([]string, 0, in.Steps)
	var opts []sdk.StepOption
	if in.TimeoutMS > 0 {
		opts = append(opts, sdk.StepTimeout(time.Duration(in.TimeoutMS)*time.Millisecond))
	}
	for i := 1; i <= in.Steps; i++ {
		poisoned := i == 2 && in.Poison != ""
		if poisoned && in.Poison == PoisonPanic {
			panic(PoisonPanicText)
		}
		v, err := sdk.Step(ctx, "step", func(sctx context.Context) (string, error) {
			if poisoned && in.Poison == PoisonExit {
				exitOnce.Lock() // held until the process exits
			}
			if err := effect(ctx, sctx); err != nil {
				return "", err
			}
			if poisoned {
				if err := poisonBody(in.Poison, ctx.RunID(), ctx.Attempt()); err != nil {
					return "", err
				}
			}
			if i == in.LatchStep && ctx.Attempt() == 1 {
				waitLatch(ctx.RunID())
			}
			time.Sleep(bodyDuration(in, i))
			return Value(in.Seed, i), nil
		}, opts...)
		if err != nil {
			return "", err
		}
		vals = append(vals, v)
		if i == in.SleepAfter {
			if err := ctx.Sleep("nap", time.Duration(in.SleepMS)*time.Millisecond); err != nil {
				return "", err
			}
		}
	}
	return strings.Join(vals, "-"), nil
})
