package sdk_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/wire"
)

func testCodec(t *testing.T) sdk.Codec {
	t.Helper()
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	c, err := sdk.NewAEADCodec(key)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestCodecRoundTripAndAssociatedData(t *testing.T) {
	t.Parallel()
	c := testCodec(t)
	big := bytes.Repeat([]byte("compressible "), 1000)
	for _, plain := range [][]byte{[]byte(`{"a":1}`), big} {
		sealed, err := c.Encode(plain, []byte("run/step/a"))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(sealed, []byte("compressible")) || bytes.Contains(sealed, []byte(`"a"`)) {
			t.Fatal("sealed payload shows its plaintext")
		}
		got, err := c.Decode(sealed, []byte("run/step/a"))
		if err != nil || !bytes.Equal(got, plain) {
			t.Fatalf("round trip: %v", err)
		}
		if _, err := c.Decode(sealed, []byte("run/step/b")); !errors.Is(err, sdk.ErrCodec) {
			t.Fatalf("decode under other associated data: err = %v, want ErrCodec", err)
		}
	}
}

// With a codec, nothing the workflow handles is readable in PostgreSQL; a step record
// moved to another step fails the replay closed and no body runs in its place.
func TestCodecKeepsPayloadsOpaqueAndFailsClosed(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	codec := testCodec(t)
	secret := "KAGZI-SECRET-" + wire.NewRunID()
	var bodies atomic.Int32
	wf := sdk.Workflow("sealed", func(ctx sdk.Context, in string) (string, error) {
		a, err := sdk.Step(ctx, "a", func(context.Context) (string, error) { bodies.Add(1); return "a:" + in, nil })
		if err != nil {
			return "", err
		}
		b, err := sdk.Step(ctx, "b", func(context.Context) (string, error) { bodies.Add(1); return "b:" + in, nil })
		if err != nil {
			return "", err
		}
		if err := ctx.Sleep("nap", 300*time.Millisecond); err != nil {
			return "", err
		}
		if strings.HasPrefix(a, "b:") {
			return "", sdk.Terminal(errors.New("replayed a swapped record"))
		}
		return a + "|" + b, nil
	})
	e.worker(t, []sdk.Registration{wf}, func(c *sdk.WorkerConfig) { c.Codec = codec; c.LocalSleepMax = -1 })
	client := sdk.NewClient(e.nc, sdk.WithCodec(codec))

	run, err := wf.Start(ctxT(t), client, secret)
	if err != nil {
		t.Fatal(err)
	}
	got, err := run.Result(ctxT(t))
	if err != nil || got != "a:"+secret+"|b:"+secret {
		t.Fatalf("result = %q, %v", got, err)
	}
	var leaks int
	err = e.pool.QueryRow(ctxT(t), `
SELECT (SELECT count(*) FROM workflow_runs WHERE position($1::bytea IN input) > 0 OR position($1::bytea IN coalesce(output, '')) > 0 OR error LIKE '%' || $2 || '%')
     + (SELECT count(*) FROM step_runs WHERE position($1::bytea IN coalesce(output, '')) > 0)`, []byte(secret), secret).Scan(&leaks)
	if err != nil || leaks != 0 {
		t.Fatalf("secret found in %d rows (%v)", leaks, err)
	}

	// A second run: swap its two step records while it sleeps.
	before := bodies.Load()
	run2, err := wf.Start(ctxT(t), client, secret)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "run asleep", func() bool {
		var n int
		_ = e.pool.QueryRow(ctxT(t), `SELECT count(*) FROM workflow_runs WHERE id = $1 AND status = 'SLEEPING'`, run2.ID).Scan(&n)
		return n == 1
	})
	bodiesAtSwap := bodies.Load()
	_, err = e.pool.Exec(ctxT(t), `
UPDATE step_runs s SET output = o.output FROM step_runs o
WHERE s.run_id = $1 AND o.run_id = $1 AND s.step_key <> o.step_key AND s.kind = 'step' AND o.kind = 'step'`, run2.ID)
	if err != nil {
		t.Fatal(err)
	}
	info, err := client.Wait(ctxT(t), run2.ID)
	if err != nil {
		t.Fatal(err)
	}
	if info.Status != wire.StatusFailed || !strings.Contains(info.Error, "payload failed to decode") {
		t.Fatalf("swapped run: status %s error %q; want FAILED with a decode error", info.Status, info.Error)
	}
	if bodies.Load() != bodiesAtSwap || bodiesAtSwap != before+2 {
		t.Fatalf("bodies ran %d times after the swap, want 0", bodies.Load()-bodiesAtSwap)
	}
}

func TestStepTimeoutAbandonsAStuckBody(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	stuck := sdk.Workflow("stuck", func(ctx sdk.Context, _ struct{}) (int, error) {
		return sdk.Step(ctx, "spin", func(context.Context) (int, error) {
			select {} // ignores its context, like an infinite loop
		}, sdk.StepTimeout(100*time.Millisecond))
	})
	w := e.worker(t, []sdk.Registration{stuck})
	run, err := stuck.Start(ctxT(t), e.client(), struct{}{}, sdk.MaxAttempts(2))
	if err != nil {
		t.Fatal(err)
	}
	_, err = run.Result(ctxT(t))
	var failed *sdk.RunFailedError
	if !errors.As(err, &failed) || failed.Attempt != 2 || !strings.Contains(failed.Message, "step timed out") {
		t.Fatalf("err = %v; want FAILED after 2 attempts with a step timeout", err)
	}
	_ = w
}
