package sdk

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// Context is what a workflow function receives. It is a context.Context (cancelled when
// the run must stop: lease lost or worker shutting down) plus durable timers.
type Context interface {
	context.Context
	// RunID is the id of the running workflow run.
	RunID() string
	// Workflow is the workflow's name.
	Workflow() string
	// Attempt counts from 1; it grows when the run is retried after an error or after
	// its executor died.
	Attempt() int
	// Logger is a logger with the run's id and workflow on every line.
	Logger() *slog.Logger
	// Sleep pauses the run durably for d. The executor lets go of the run meanwhile; a
	// timer wakes it no earlier than asked, and the workflow continues after Sleep on
	// whichever executor claims it. key names the sleep like a step key.
	Sleep(key string, d time.Duration) error
	// SleepUntil is Sleep to an absolute time.
	SleepUntil(key string, t time.Time) error
}

// Registration is a workflow a Worker can host. Values come from Workflow.
type Registration interface {
	Name() string
	invoke(ctx *runContext, input []byte) ([]byte, error)
}

// WorkflowDef is a typed workflow definition made by Workflow.
type WorkflowDef[I, O any] struct {
	name string
	fn   func(Context, I) (O, error)
}

// Workflow defines a workflow named name (1–255 bytes of [A-Za-z0-9_-]; it becomes a
// NATS subject token). Input and output travel as JSON.
func Workflow[I, O any](name string, fn func(ctx Context, in I) (O, error)) *WorkflowDef[I, O] {
	return &WorkflowDef[I, O]{name: name, fn: fn}
}

// Name is the workflow's name.
func (d *WorkflowDef[I, O]) Name() string { return d.name }

func (d *WorkflowDef[I, O]) invoke(ctx *runContext, input []byte) ([]byte, error) {
	var in I
	if len(input) > 0 {
		if err := json.Unmarshal(input, &in); err != nil {
			return nil, Terminal(wire.Errorf(wire.ErrInvalidArgument, "decode input of workflow %s: %v", d.name, err))
		}
	}
	out, err := d.fn(ctx, in)
	if err != nil {
		return nil, err
	}
	data, err := json.Marshal(out)
	if err != nil {
		return nil, Terminal(fmt.Errorf("encode output of workflow %s: %w", d.name, err))
	}
	return data, nil
}

// Step runs fn once per run and records its result; on every later replay it returns the
// recorded result without calling fn. key names the step; a key used again in the same
// run (a step in a loop) gets an occurrence suffix ("send", "send#2", …), so keys stay
// stable as long as the workflow is deterministic.
//
// An error from fn is returned as is and not recorded: the workflow decides whether to
// handle it or return it (a returned error retries the run; a Terminal one fails it).
// ctx must be the workflow's Context.
func Step[T any](ctx Context, key string, fn func(ctx context.Context) (T, error), opts ...StepOption) (T, error) {
	var zero T
	rc, ok := ctx.(*runContext)
	if !ok {
		return zero, wire.Errorf(wire.ErrInvalidArgument, "sdk.Step called with a context that is not a workflow's")
	}
	var so stepOptions
	for _, o := range opts {
		o(&so)
	}
	rec, err := rc.step(key, wire.StepKindStep, so.timeout, func(stepCtx context.Context) ([]byte, error) {
		out, err := fn(stepCtx)
		if err != nil {
			return nil, err
		}
		data, err := json.Marshal(out)
		if err != nil {
			return nil, Terminal(fmt.Errorf("encode output of step %q: %w", key, err))
		}
		return data, nil
	})
	if err != nil {
		return zero, err
	}
	// Both the first run and every replay return the decoded record, so the workflow
	// sees the same value either way.
	var out T
	if err := json.Unmarshal(rec, &out); err != nil {
		return zero, Terminal(fmt.Errorf("decode recorded output of step %q: %w", key, err))
	}
	return out, nil
}

// StepOption configures one Step.
type StepOption func(*stepOptions)

type stepOptions struct{ timeout time.Duration }

// StepTimeout bounds the step body: its context is cancelled after d, and a body that
// does not return in time is abandoned and the step fails with ErrStepTimeout (the run
// is retried like after any error). Overrides WorkerConfig.StepTimeout.
func StepTimeout(d time.Duration) StepOption { return func(o *stepOptions) { o.timeout = d } }

// StepKey is the idempotency key of the step running in ctx — "<run id>/<step key>" —
// stable across every execution of that step. Pass it to external systems so that a
// repeated body (after a crash) is recognised as a repeat. It is empty outside a step.
func StepKey(ctx context.Context) string {
	if v, ok := ctx.Value(stepKeyCtx{}).(string); ok {
		return v
	}
	return ""
}

type stepKeyCtx struct{}

// parentRunCtx marks a context of a run (its workflow context, or a step body's): a start
// made with it names the run as the new run's parent, so the scheduler can bound the
// tree (wire.Limits.MaxDepth, MaxTreeRuns).
type parentRunCtx struct{}

type parentRun struct{ id, namespace string }

// parentOf is the run that a start made with ctx comes from, if any.
func parentOf(ctx context.Context) (parentRun, bool) {
	p, ok := ctx.Value(parentRunCtx{}).(parentRun)
	return p, ok
}

// occurrence key: the n-th use of a user key within a run.
func occurrenceKey(key string, n int) string {
	if n == 1 {
		return key
	}
	return key + "#" + strconv.Itoa(n)
}

// recordedAt is a replay lookup: the record at a sequence position.
func recordedAt(steps []store.Step, seq int) (store.Step, bool) {
	if seq < len(steps) && steps[seq].Seq == seq {
		return steps[seq], true
	}
	for _, s := range steps {
		if s.Seq == seq {
			return s, true
		}
	}
	return store.Step{}, false
}
