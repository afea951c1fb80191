package sdk_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

// Each step is followed by a sleep, so the run is released and replayed from the start
// after every step; each body must still run exactly once.
func TestStepsAreMemoizedAcrossReplays(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var bodies [3]atomic.Int32
	var invocations atomic.Int32
	wf := sdk.Workflow("memo", func(ctx sdk.Context, in int) (int, error) {
		invocations.Add(1)
		sum := in
		for i := range 3 {
			v, err := sdk.Step(ctx, "add", func(context.Context) (int, error) {
				bodies[i].Add(1)
				return i + 1, nil
			})
			if err != nil {
				return 0, err
			}
			sum += v
			if err := ctx.Sleep("pause", time.Millisecond); err != nil {
				return 0, err
			}
		}
		return sum, nil
	})
	// Sleeps park the run (no local waiting), so every sleep is a release and a replay.
	w := e.worker(t, []sdk.Registration{wf}, func(c *sdk.WorkerConfig) { c.LocalSleepMax = -1 })
	run, err := wf.Start(ctxT(t), e.client(), 10)
	if err != nil {
		t.Fatal(err)
	}
	got, err := run.Result(ctxT(t))
	if err != nil || got != 16 {
		t.Fatalf("result = %d, %v; want 16", got, err)
	}
	for i := range bodies {
		if n := bodies[i].Load(); n != 1 {
			t.Errorf("step %d body ran %d times, want 1", i, n)
		}
	}
	if n := invocations.Load(); n != 4 {
		t.Errorf("workflow function invoked %d times, want 4 (first run + a replay after each sleep)", n)
	}
	info, err := run.Describe(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, s := range info.Steps {
		keys = append(keys, s.Key)
	}
	if want := "add pause add#2 pause#2 add#3 pause#3"; strings.Join(keys, " ") != want {
		t.Errorf("recorded keys %q, want %q", strings.Join(keys, " "), want)
	}
	if s := w.Stats(); s.Claimed != 4 || s.Completed != 1 {
		t.Errorf("stats %+v: want 4 claims and 1 completion", s)
	}
}

// Both ways of sleeping: parked (released, woken by the timer, replayed) and local
// (recorded, waited out in process).
func TestSleepWakesNoEarlierThanAsked(t *testing.T) {
	t.Parallel()
	for name, localMax := range map[string]time.Duration{"parked": -1, "local": time.Second} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			testSleep(t, localMax)
		})
	}
}

func testSleep(t *testing.T, localMax time.Duration) {
	e := newEnv(t)
	wf := sdk.Workflow("napper", func(ctx sdk.Context, _ struct{}) (string, error) {
		if err := ctx.Sleep("nap", 300*time.Millisecond); err != nil {
			return "", err
		}
		return "rested", nil
	})
	w := e.worker(t, []sdk.Registration{wf}, func(c *sdk.WorkerConfig) { c.LocalSleepMax = localMax })
	run, err := wf.Start(ctxT(t), e.client(), struct{}{})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := run.Result(ctxT(t)); err != nil || got != "rested" {
		t.Fatalf("result = %q, %v", got, err)
	}
	var early bool
	err = e.pool.QueryRow(ctxT(t), `SELECT r.finished_at < s.wake_at FROM workflow_runs r JOIN step_runs s ON s.run_id = r.id WHERE r.id = $1`, run.ID).Scan(&early)
	if err != nil || early {
		t.Fatalf("finished before the wake time: %v, %v", early, err)
	}
	if claims, want := w.Stats().Claimed, map[bool]int64{true: 1, false: 2}[localMax > 0]; claims != want {
		t.Fatalf("%d claims, want %d", claims, want)
	}
}

// A zombie executor whose run was handed to another (its lease seen as lapsed) must have
// its step write refused by the fence, and must start no further step body.
func TestZombieWriteIsRefusedByTheFence(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var step1, step2, step3 atomic.Int32
	latch := make(chan struct{})
	entered := make(chan struct{}, 1)
	wf := sdk.Workflow("zombie", func(ctx sdk.Context, _ struct{}) (string, error) {
		if _, err := sdk.Step(ctx, "one", func(context.Context) (int, error) { step1.Add(1); return 1, nil }); err != nil {
			return "", err
		}
		owner, err := sdk.Step(ctx, "two", func(context.Context) (string, error) {
			if step2.Add(1) == 1 {
				entered <- struct{}{}
				<-latch // the first execution hangs here, like a paused process
				return "zombie", nil
			}
			return "successor", nil
		})
		if err != nil {
			return "", err
		}
		if _, err := sdk.Step(ctx, "three", func(context.Context) (int, error) { step3.Add(1); return 3, nil }); err != nil {
			return "", err
		}
		return owner, nil
	})
	a := e.worker(t, []sdk.Registration{wf}, func(c *sdk.WorkerConfig) { c.Lease = time.Second })
	run, err := wf.Start(ctxT(t), e.client(), struct{}{})
	if err != nil {
		t.Fatal(err)
	}
	<-entered
	// The timer's view of a lapsed lease: fence and dispatch move on, B takes the run.
	future := time.Now().Add(time.Hour)
	if _, err := e.pool.Exec(ctxT(t), `UPDATE workflow_runs SET lease_expires_at = now() - interval '1 second' WHERE id = $1`, run.ID); err != nil {
		t.Fatal(err)
	}
	_ = future
	b := e.worker(t, []sdk.Registration{wf})
	got, err := run.Result(ctxT(t))
	if err != nil || got != "successor" {
		t.Fatalf("result = %q, %v; want the successor's", got, err)
	}
	close(latch)
	waitFor(t, "the zombie's write to be refused", func() bool { return a.Stats().FencedRejected+a.Stats().LeaseLost >= 1 && a.Stats().InFlight == 0 })
	if a.Stats().FencedRejected < 1 {
		t.Errorf("zombie stats %+v: want a fenced rejection", a.Stats())
	}
	var rows int
	if err := e.pool.QueryRow(ctxT(t), `SELECT count(*) FROM step_runs WHERE run_id = $1`, run.ID).Scan(&rows); err != nil || rows != 3 {
		t.Fatalf("step rows = %d, %v; want 3", rows, err)
	}
	if step1.Load() != 1 || step2.Load() != 2 || step3.Load() != 1 {
		t.Errorf("bodies ran %d/%d/%d times, want 1/2/1 (the zombie started no body after its refused write)", step1.Load(), step2.Load(), step3.Load())
	}
	_ = b
}

func TestDuplicateDoorbellsClaimOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var bodies atomic.Int32
	wf := sdk.Workflow("dup", func(ctx sdk.Context, _ struct{}) (int, error) {
		return sdk.Step(ctx, "only", func(context.Context) (int, error) {
			time.Sleep(50 * time.Millisecond)
			return int(bodies.Add(1)), nil
		})
	})
	w1 := e.worker(t, []sdk.Registration{wf})
	w2 := e.worker(t, []sdk.Registration{wf})
	run, err := wf.Start(ctxT(t), e.client(), struct{}{})
	if err != nil {
		t.Fatal(err)
	}
	// Five more copies of the same dispatch, each with its own Nats-Msg-Id so JetStream's
	// de-duplication cannot help: only the database can.
	for i := range 5 {
		data := fmt.Sprintf(`{"run_id":%q,"dispatch_seq":1}`, run.ID)
		if _, err := e.bus.JetStream().Publish(ctxT(t), wire.TaskSubject("default", "dup"), []byte(data), jetstreamMsgID(fmt.Sprint("copy-", i))); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := run.Result(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "all copies handled", func() bool { return w1.Stats().ClaimNoops+w2.Stats().ClaimNoops == 5 })
	if c := w1.Stats().Claimed + w2.Stats().Claimed; c != 1 || bodies.Load() != 1 {
		t.Fatalf("claims = %d, bodies = %d; want 1 and 1", c, bodies.Load())
	}
}

func TestRetriesAreBoundedThenFailed(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var calls atomic.Int32
	wf := sdk.Workflow("flaky", func(ctx sdk.Context, _ struct{}) (int, error) {
		calls.Add(1)
		return 0, errors.New("downstream unavailable")
	})
	e.worker(t, []sdk.Registration{wf})
	run, err := wf.Start(ctxT(t), e.client(), struct{}{}, sdk.MaxAttempts(3))
	if err != nil {
		t.Fatal(err)
	}
	_, err = run.Result(ctxT(t))
	var failed *sdk.RunFailedError
	if !errors.As(err, &failed) || failed.Attempt != 3 || failed.Status != wire.StatusFailed || !strings.Contains(failed.Message, "downstream unavailable") {
		t.Fatalf("result err = %v; want FAILED after 3 attempts with the last error", err)
	}
	if calls.Load() != 3 {
		t.Fatalf("workflow ran %d times, want 3", calls.Load())
	}
}

// The timer wakes a retry ahead of its backoff's end (harnessWakeLead); the attempt
// starts no sooner than the backoff asked.
func TestRetryWaitsOutItsBackoff(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const backoff = 400 * time.Millisecond
	var (
		mu    sync.Mutex
		calls []time.Time
	)
	wf := sdk.Workflow("flaky-once", func(ctx sdk.Context, _ struct{}) (int, error) {
		return sdk.Step(ctx, "call", func(context.Context) (int, error) {
			mu.Lock()
			defer mu.Unlock()
			if calls = append(calls, time.Now()); len(calls) == 1 {
				return 0, errors.New("downstream unavailable")
			}
			return len(calls), nil
		})
	})
	e.worker(t, []sdk.Registration{wf}, func(c *sdk.WorkerConfig) { c.RetryBackoff = backoff })
	run, err := wf.Start(ctxT(t), e.client(), struct{}{})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := run.Result(ctxT(t)); err != nil || got != 2 {
		t.Fatalf("result = %d, %v; want 2", got, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if gap := calls[1].Sub(calls[0]); gap < backoff {
		t.Fatalf("second attempt began %v after the first, want at least the %v backoff", gap, backoff)
	}
}

func TestTerminalErrorsAndPanics(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	terminal := sdk.Workflow("terminal", func(ctx sdk.Context, _ struct{}) (int, error) {
		return 0, sdk.Terminal(errors.New("card declined"))
	})
	var panics atomic.Int32
	panicky := sdk.Workflow("panicky", func(ctx sdk.Context, _ struct{}) (int, error) {
		panics.Add(1)
		panic(errors.New("boom"))
	})
	big := sdk.Workflow("big", func(ctx sdk.Context, _ struct{}) (string, error) {
		return sdk.Step(ctx, "huge", func(context.Context) (string, error) { return strings.Repeat("x", 2048), nil })
	})
	e.worker(t, []sdk.Registration{terminal, panicky, big}, func(c *sdk.WorkerConfig) {
		c.Limits = wire.DefaultLimits()
		c.Limits.MaxStepOutputBytes = 1024
	})
	c := e.client()
	check := func(id string, wantAttempt int, wantMsg string) {
		t.Helper()
		info, err := c.Wait(ctxT(t), id)
		if err != nil {
			t.Fatal(err)
		}
		if info.Status != wire.StatusFailed || info.Attempt != wantAttempt || !strings.Contains(info.Error, wantMsg) {
			t.Errorf("run %s: status %s attempt %d error %q; want FAILED, %d, %q", info.Workflow, info.Status, info.Attempt, info.Error, wantAttempt, wantMsg)
		}
	}
	r1, err := terminal.Start(ctxT(t), c, struct{}{})
	if err != nil {
		t.Fatal(err)
	}
	r2, err := panicky.Start(ctxT(t), c, struct{}{}, sdk.MaxAttempts(2))
	if err != nil {
		t.Fatal(err)
	}
	r3, err := big.Start(ctxT(t), c, struct{}{})
	if err != nil {
		t.Fatal(err)
	}
	check(r1.ID, 1, "card declined")
	check(r2.ID, 2, "panicked")
	check(r3.ID, 1, "payload too large")
}

func TestReorderedStepsAreNonDeterminism(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var reordered atomic.Bool
	var bodies atomic.Int32
	wf := sdk.Workflow("reorder", func(ctx sdk.Context, _ struct{}) (int, error) {
		first, second := "a", "b"
		if reordered.Load() {
			first, second = "b", "a"
		}
		if _, err := sdk.Step(ctx, first, func(context.Context) (int, error) { bodies.Add(1); return 1, nil }); err != nil {
			return 0, err
		}
		if !reordered.Load() {
			reordered.Store(true) // the code is "redeployed" while the run sleeps
		}
		if err := ctx.Sleep("wait", 10*time.Millisecond); err != nil {
			return 0, err
		}
		return sdk.Step(ctx, second, func(context.Context) (int, error) { bodies.Add(1); return 2, nil })
	})
	e.worker(t, []sdk.Registration{wf}, func(c *sdk.WorkerConfig) { c.LocalSleepMax = -1 })
	run, err := wf.Start(ctxT(t), e.client(), struct{}{})
	if err != nil {
		t.Fatal(err)
	}
	info, err := e.client().Wait(ctxT(t), run.ID)
	if err != nil {
		t.Fatal(err)
	}
	if info.Status != wire.StatusFailed || info.Attempt != 1 || !strings.Contains(info.Error, "nondeterminism") {
		t.Fatalf("status %s attempt %d error %q; want FAILED on attempt 1 with nondeterminism", info.Status, info.Attempt, info.Error)
	}
	if bodies.Load() != 1 {
		t.Fatalf("bodies ran %d times after the divergence, want 1 in all", bodies.Load())
	}
}

func TestPoisonDoorbellsAreTerminated(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	wf := sdk.Workflow("target", func(ctx sdk.Context, _ struct{}) (int, error) { return 1, nil })
	w := e.worker(t, []sdk.Registration{wf})
	subject := wire.TaskSubject("default", "target")
	hostile := []string{`not json`, `{"run_id":"x"}`, `{"run_id":"0190a3f0-0000-7000-8000-000000000000","dispatch_seq":1}`, `[]`}
	for _, h := range hostile {
		if _, err := e.bus.JetStream().Publish(ctxT(t), subject, []byte(h)); err != nil {
			t.Fatal(err)
		}
	}
	run, err := wf.Start(ctxT(t), e.client(), struct{}{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := run.Result(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "hostile messages handled", func() bool { s := w.Stats(); return s.Poison == 3 && s.ClaimNoops == 1 })
	cons, err := e.bus.JetStream().Consumer(ctxT(t), wire.TaskStream, wire.TaskConsumer("default", "target"))
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "consumer drained", func() bool {
		ci, err := cons.Info(ctxT(t))
		return err == nil && ci.NumAckPending == 0 && ci.NumPending == 0 && ci.NumRedelivered == 0
	})
}

// A worker that stops while a run is in a long step hands the run back; another worker
// finishes it without waiting for the lease to lapse.
func TestStopHandsRunsBack(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	started := make(chan struct{}, 1)
	var entries atomic.Int32
	var mu sync.Mutex
	var finishedBy []string
	wf := sdk.Workflow("long", func(ctx sdk.Context, _ struct{}) (string, error) {
		return sdk.Step(ctx, "slow", func(ctx context.Context) (string, error) {
			if entries.Add(1) == 1 {
				started <- struct{}{}
				<-ctx.Done() // the first executor is asked to stop mid-step
				return "", ctx.Err()
			}
			mu.Lock()
			finishedBy = append(finishedBy, "second")
			mu.Unlock()
			return "done", nil
		})
	})
	a := e.worker(t, []sdk.Registration{wf}, func(c *sdk.WorkerConfig) { c.Lease = time.Minute; c.ShutdownGrace = 100 * time.Millisecond })
	run, err := wf.Start(ctxT(t), e.client(), struct{}{})
	if err != nil {
		t.Fatal(err)
	}
	<-started
	if err := a.Stop(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if a.Stats().Released != 1 {
		t.Fatalf("released %d runs, want 1", a.Stats().Released)
	}
	e.worker(t, []sdk.Registration{wf}, func(c *sdk.WorkerConfig) { c.Lease = time.Minute })
	if got, err := run.Result(ctxT(t)); err != nil || got != "done" {
		t.Fatalf("result = %q, %v", got, err)
	}
}

func TestIdempotentStart(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	wf := sdk.Workflow("once", func(ctx sdk.Context, in string) (string, error) { return in, nil })
	c := e.client()
	r1, err := wf.Start(ctxT(t), c, "a", sdk.IdempotencyKey("order-42"))
	if err != nil {
		t.Fatal(err)
	}
	r2, err := wf.Start(ctxT(t), c, "a", sdk.IdempotencyKey("order-42"))
	if err != nil || r2.ID != r1.ID {
		t.Fatalf("second start = %v, %v; want run %s", r2, err, r1.ID)
	}
	// The second start listened for a run that was never made: its Result waits for
	// the existing run instead.
	e.worker(t, []sdk.Registration{wf})
	if out, err := r2.Result(ctxT(t)); err != nil || out != "a" {
		t.Fatalf("result of the second start = %q, %v; want the first run's a", out, err)
	}
	if _, err := wf.Start(ctxT(t), c, "b", sdk.IdempotencyKey("order-42")); !errors.Is(err, sdk.ErrIdempotencyConflict) {
		t.Fatalf("start with another input: err = %v, want ErrIdempotencyConflict", err)
	}
}

func TestReplayDetectsAReorderedHistory(t *testing.T) {
	t.Parallel()
	var bodies atomic.Int32
	body := func(context.Context) (int, error) { bodies.Add(1); return 1, nil }
	original := sdk.Workflow("replayed", func(ctx sdk.Context, _ struct{}) (int, error) {
		a, _ := sdk.Step(ctx, "a", body)
		if err := ctx.Sleep("nap", time.Hour); err != nil {
			return 0, err
		}
		b, _ := sdk.Step(ctx, "b", body)
		return a + b, nil
	})
	reordered := sdk.Workflow("replayed", func(ctx sdk.Context, _ struct{}) (int, error) {
		b, _ := sdk.Step(ctx, "b", body)
		a, _ := sdk.Step(ctx, "a", body)
		return a + b, nil
	})
	wake := time.Now()
	history := &sdk.RunInfo{ID: wire.NewRunID(), Workflow: "replayed", Status: wire.StatusCompleted, Input: []byte(`{}`),
		Steps: []wire.StepInfo{{Key: "a", Seq: 0, Kind: wire.StepKindStep, Status: "COMPLETED", Output: []byte(`1`)},
			{Key: "nap", Seq: 1, Kind: wire.StepKindSleep, Status: "COMPLETED", WakeAt: &wake},
			{Key: "b", Seq: 2, Kind: wire.StepKindStep, Status: "COMPLETED", Output: []byte(`1`)}}}
	if err := sdk.Replay(original, history, nil); err != nil {
		t.Fatalf("replay of the same code: %v", err)
	}
	inFlight := *history
	inFlight.Steps = history.Steps[:1]
	if err := sdk.Replay(original, &inFlight, nil); err != nil {
		t.Fatalf("replay of an in-flight history: %v", err)
	}
	if err := sdk.Replay(reordered, history, nil); !errors.Is(err, sdk.ErrNonDeterminism) {
		t.Fatalf("replay of reordered code: err = %v, want ErrNonDeterminism", err)
	}
	if bodies.Load() != 0 {
		t.Fatalf("replay ran %d step bodies, want 0", bodies.Load())
	}
}

// A step's record is written at the run's next durable act. A workflow that returns
// right after its last step records it in the completion's own transaction (one commit
// per run fewer); one that fails right after a step still keeps that step, so the retry
// does not run its body again.
func TestLastStepCommitsWithTheCompletion(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var bodies, flakyBodies atomic.Int32
	three := sdk.Workflow("three", func(ctx sdk.Context, _ struct{}) (int, error) {
		sum := 0
		for i := range 3 {
			v, err := sdk.Step(ctx, "s", func(context.Context) (int, error) { bodies.Add(1); return i + 1, nil })
			if err != nil {
				return 0, err
			}
			sum += v
		}
		return sum, nil
	})
	failsAfterStep := sdk.Workflow("fails-after-step", func(ctx sdk.Context, _ struct{}) (int, error) {
		v, err := sdk.Step(ctx, "once", func(context.Context) (int, error) { flakyBodies.Add(1); return 7, nil })
		if err != nil {
			return 0, err
		}
		if ctx.Attempt() < 2 {
			return 0, errors.New("fails once after its step")
		}
		return v, nil
	})
	e.worker(t, []sdk.Registration{three, failsAfterStep}, func(c *sdk.WorkerConfig) { c.RetryBackoff = time.Millisecond })
	run, err := three.Start(ctxT(t), e.client(), struct{}{})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := run.Result(ctxT(t)); err != nil || got != 6 || bodies.Load() != 3 {
		t.Fatalf("result = %d, %v after %d bodies; want 6 after 3", got, err, bodies.Load())
	}
	// xmin names the transaction that wrote a row version.
	var sameTx, earlierSteps int
	err = e.pool.QueryRow(ctxT(t), `SELECT
	    count(*) FILTER (WHERE s.xmin = r.xmin), count(*) FILTER (WHERE s.xmin <> r.xmin)
	  FROM step_runs s JOIN workflow_runs r ON r.id = s.run_id WHERE r.id = $1`, run.ID).Scan(&sameTx, &earlierSteps)
	if err != nil || sameTx != 1 || earlierSteps != 2 {
		t.Fatalf("steps committed with the completion: %d, before it: %d (%v); want 1 and 2", sameTx, earlierSteps, err)
	}

	frun, err := failsAfterStep.Start(ctxT(t), e.client(), struct{}{})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := frun.Result(ctxT(t)); err != nil || got != 7 {
		t.Fatalf("result = %d, %v; want 7 on the second attempt", got, err)
	}
	if n := flakyBodies.Load(); n != 1 {
		t.Fatalf("the step before the failure ran %d times, want 1", n)
	}
}

// Result takes a finished run's outcome from its done notice, whether the run completed
// or failed. On the Run that Start returned it reads nothing: Start listened for the
// notice before the run existed. A later Result (the notice taken) reads the run once,
// in case it finished already, as Wait does.
func TestResultTakesTheOutcomeFromTheDoneNotice(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	release := make(chan struct{})
	slow := sdk.Workflow("slow-echo", func(ctx sdk.Context, in string) (string, error) {
		return sdk.Step(ctx, "echo", func(context.Context) (string, error) { <-release; return in + "!", nil })
	})
	doomed := sdk.Workflow("doomed", func(ctx sdk.Context, _ struct{}) (int, error) {
		_, err := sdk.Step(ctx, "wait", func(context.Context) (int, error) { <-release; return 0, nil })
		if err != nil {
			return 0, err
		}
		return 0, sdk.Terminal(errors.New("no way forward"))
	})
	e.worker(t, []sdk.Registration{slow, doomed})
	run, err := slow.Start(ctxT(t), e.client(), "hi")
	if err != nil {
		t.Fatal(err)
	}
	frun, err := doomed.Start(ctxT(t), e.client(), struct{}{})
	if err != nil {
		t.Fatal(err)
	}
	// Both wait before their runs can finish, and only listen.
	time.AfterFunc(300*time.Millisecond, func() { close(release) })
	type res struct {
		out string
		err error
	}
	done := make(chan res, 2)
	go func() { out, err := run.Result(ctxT(t)); done <- res{out, err} }()
	go func() { _, err := frun.Result(ctxT(t)); done <- res{"", err} }()
	var failed *sdk.RunFailedError
	for range 2 {
		r := <-done
		switch {
		case r.err == nil && r.out != "hi!":
			t.Errorf("result = %q, want hi!", r.out)
		case r.err != nil && (!errors.As(r.err, &failed) || failed.Status != wire.StatusFailed || !strings.Contains(failed.Message, "no way forward")):
			t.Errorf("failed run: %v", r.err)
		}
	}
	if n := e.describes.Load(); n != 0 {
		t.Errorf("%d describe requests for two results of runs just started, want 0: the outcome comes with the notice", n)
	}
	if out, err := run.Result(ctxT(t)); err != nil || out != "hi!" || e.describes.Load() != 1 {
		t.Errorf("a second result = %q, %v after %d describes; want hi! after 1", out, err, e.describes.Load())
	}
}

// The task stream is memory-backed, so a broker restart takes it and the worker's
// consumer with it; pulls on the lost consumer then go unanswered rather than fail with
// not-found. A running worker makes its consumer again and goes on taking work.
func TestWorkerOutlivesABrokerRestart(t *testing.T) {
	t.Parallel()
	srv := testkit.StartNATS(t)
	e, stop, err := setupEnv(testkit.NewDatabase(t), srv.URL(), t.Name())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	wf := sdk.Workflow("outlives-restart", func(ctx sdk.Context, in int) (int, error) {
		return sdk.Step(ctx, "double", func(context.Context) (int, error) { return 2 * in, nil })
	})
	e.worker(t, []sdk.Registration{wf})
	for i, restart := range []bool{false, true} {
		if restart {
			srv.Restart()
			// What the scheduler and timer do for the streams; the consumer is the worker's.
			waitFor(t, "streams made again", func() bool { return e.bus.EnsureStreams(ctxT(t)) == nil })
		}
		run, err := wf.Start(ctxT(t), e.client(), 10+i)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := run.Result(ctxT(t)); err != nil || got != 2*(10+i) {
			t.Fatalf("run %d (after restart: %v): result %v, %v", i, restart, got, err)
		}
	}
}

// A claim held up past its doorbell's AckWait (the run's row locked by another
// transaction, as a slow database would) keeps the doorbell in progress: the broker does
// not deliver it again, to be claimed a second time.
func TestHeldUpClaimKeepsItsDoorbell(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	wf := sdk.Workflow("held-up", func(sdk.Context, struct{}) (string, error) { return "done", nil })
	const ackWait = 500 * time.Millisecond
	w := e.worker(t, []sdk.Registration{wf}, func(c *sdk.WorkerConfig) {
		c.Consumer = bus.ConsumerConfig{AckWait: ackWait, MaxDeliver: -1, MaxAckPending: 100}
	})
	res, err := e.st.RunInsert(ctxT(t), store.RunInsertParams{ID: wire.NewRunID(), Namespace: wire.DefaultNamespace,
		Workflow: "held-up", Input: []byte(`{}`), IdempotencyKey: wire.NewRunID()})
	if err != nil {
		t.Fatal(err)
	}
	tx, err := e.pool.Begin(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	if _, err := tx.Exec(ctxT(t), `SELECT 1 FROM workflow_runs WHERE id = $1 FOR UPDATE`, res.RunID); err != nil {
		t.Fatal(err)
	}
	e.publish(res.Dispatch)
	// Three AckWaits, and less than the worker's 2 s lease, past which the claim would
	// give up on its own.
	time.Sleep(3 * ackWait)
	if err := tx.Rollback(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if info, err := e.client().Wait(ctxT(t), res.RunID); err != nil || info.Status != wire.StatusCompleted {
		t.Fatalf("run = %+v, %v; want COMPLETED", info, err)
	}
	cons, err := e.bus.JetStream().Consumer(ctxT(t), wire.TaskStream, wire.TaskConsumer(wire.DefaultNamespace, "held-up"))
	if err != nil {
		t.Fatal(err)
	}
	ci, err := cons.Info(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if s := w.Stats(); ci.Delivered.Consumer != 1 || s.Claimed != 1 || s.ClaimNoops != 0 {
		t.Fatalf("doorbell delivered %d times, %d claims and %d no-op claims; want it delivered and claimed once",
			ci.Delivered.Consumer, s.Claimed, s.ClaimNoops)
	}
}
