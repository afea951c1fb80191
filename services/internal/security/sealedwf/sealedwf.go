// Package sealedwf is the workflow of the payload-encryption test (BATTERY.md S07),
// shared by the executor that hosts it with a codec (sealedexec) and the test that
// predicts its results. Its input, step outputs, output and error all quote a secret,
// so that any place the plaintext reaches shows the secret. Every step body first
// writes one test_effects row (run, step, pid — never the secret) through a separate
// pool, so the test counts body executions even when a result is never recorded.
package sealedwf

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kagzi/kagzi/libs/sdk"
)

// Name is the workflow's name.
const Name = "s07"

// Input shapes one run.
type Input struct {
	Secret string `json:"secret"`
	// NapMS parks the run for that long between steps b and c; the timer wakes it.
	NapMS int `json:"nap_ms,omitempty"`
	// Fail makes step "boom", after b, fail with an error quoting the secret, on every
	// attempt.
	Fail bool `json:"fail,omitempty"`
}

// Expected is the output of a run of in that nothing tampered with.
func Expected(in Input) string {
	a, b := "a:"+in.Secret, "b:"+in.Secret
	return a + "|" + b + "|c:" + a
}

// ErrorPrefix starts the error of a run with Fail set; the secret follows.
const ErrorPrefix = "boom: cannot handle "

// Effects is the pool the bodies record their executions with; the executor sets it
// before starting its worker.
var Effects *pgxpool.Pool

const effectSQL = `
INSERT INTO test_effects (run_id, step_key, idem_key, executor_id, fence, attempt, pid)
SELECT $1, $2, $3, 'sealedexec', (SELECT fence FROM workflow_runs WHERE id = $1), $4, $5`

func effect(ctx sdk.Context, sctx context.Context) error {
	key := sdk.StepKey(sctx)
	// Not the step's context: a body that was cancelled still ran, and must be counted.
	ectx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := Effects.Exec(ectx, effectSQL, ctx.RunID(), strings.TrimPrefix(key, ctx.RunID()+"/"), key,
		ctx.Attempt(), os.Getpid()); err != nil {
		return fmt.Errorf("record effect of %s: %w", key, err)
	}
	return nil
}

func step(ctx sdk.Context, key string, f func() (string, error)) (string, error) {
	return sdk.Step(ctx, key, func(sctx context.Context) (string, error) {
		if err := effect(ctx, sctx); err != nil {
			return "", err
		}
		return f()
	})
}

// Workflow is the sealed workflow. Step c's value derives from step a's recorded
// result, so a run that replayed a's record in b's place would show it in its output.
var Workflow = sdk.Workflow(Name, func(ctx sdk.Context, in Input) (string, error) {
	a, err := step(ctx, "a", func() (string, error) { return "a:" + in.Secret, nil })
	if err != nil {
		return "", err
	}
	b, err := step(ctx, "b", func() (string, error) { return "b:" + in.Secret, nil })
	if err != nil {
		return "", err
	}
	if in.NapMS > 0 {
		if err := ctx.Sleep("nap", time.Duration(in.NapMS)*time.Millisecond); err != nil {
			return "", err
		}
	}
	if in.Fail {
		if _, err := step(ctx, "boom", func() (string, error) { return "", errors.New(ErrorPrefix + in.Secret) }); err != nil {
			return "", err
		}
	}
	c, err := step(ctx, "c", func() (string, error) { return "c:" + a, nil })
	if err != nil {
		return "", err
	}
	return a + "|" + b + "|" + c, nil
})
