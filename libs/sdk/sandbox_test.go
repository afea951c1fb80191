package sdk_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

type sandboxInput struct {
	Exit   bool `json:"exit,omitempty"`    // the step os.Exits its process
	Hang   bool `json:"hang,omitempty"`    // a second step never returns nor reads its context
	HoldMS int  `json:"hold_ms,omitempty"` // the step takes this long
}

// sandboxWF answers with the pid of the process that ran its step.
var sandboxWF = sdk.Workflow("sandboxed", func(ctx sdk.Context, in sandboxInput) (int, error) {
	pid, err := sdk.Step(ctx, "body", func(context.Context) (int, error) {
		if in.Exit {
			os.Exit(3)
		}
		time.Sleep(time.Duration(in.HoldMS) * time.Millisecond)
		return os.Getpid(), nil
	})
	if err != nil || !in.Hang {
		return pid, err
	}
	_, err = sdk.Step(ctx, "hang", func(context.Context) (int, error) {
		select {}
	}, sdk.StepTimeout(100*time.Millisecond))
	return pid, err
})

// sandboxWorkerConfig is the worker a sandbox test starts, and its sandboxes again
// (sandboxModeEnv says which). Its lease outlasts the test: only an executor that saw
// its sandbox die ends an attempt in time.
func sandboxWorkerConfig(mode string) sdk.WorkerConfig {
	if mode == "every-run" {
		return sdk.WorkerConfig{Name: "sbe", Concurrency: 2, SandboxEveryRun: true, Lease: time.Minute,
			RetryBackoff: 10 * time.Millisecond, ShutdownGrace: time.Second}
	}
	return sdk.WorkerConfig{Name: "sbx", Concurrency: 4, Sandboxes: 2, Lease: time.Minute,
		RetryBackoff: 10 * time.Millisecond, ShutdownGrace: time.Second}
}

// sandboxModeEnv picks the worker configuration of a test's sandboxes.
const sandboxModeEnv = "KAGZI_SDK_TEST_SANDBOX_MODE"

// sandboxMain is the test binary's main in a sandbox: as an executor's main would, it
// makes the worker again and starts it, and Start serves the sandbox.
func sandboxMain() int {
	ctx := context.Background()
	pool, err := store.Connect(ctx, os.Getenv("KAGZI_SDK_TEST_DB"), 4)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sandbox:", err)
		return 1
	}
	nc, err := bus.Connect(bus.ConnOptions{URL: os.Getenv("KAGZI_SDK_TEST_NATS"), Name: "sandbox"})
	if err != nil {
		fmt.Fprintln(os.Stderr, "sandbox:", err)
		return 1
	}
	cfg := sandboxWorkerConfig(os.Getenv(sandboxModeEnv))
	cfg.Pool, cfg.Conn = pool, nc
	w, err := sdk.NewWorker(cfg)
	if err == nil {
		err = w.Register(sandboxWF)
	}
	if err == nil {
		err = w.Start(ctx) // does not return in a sandbox, but when it cannot begin
	}
	fmt.Fprintln(os.Stderr, "sandbox: start returned:", err)
	return 1
}

// newSandboxWorker gives a test its own database and NATS server, and a worker of the
// sandbox mode (sandboxWorkerConfig) whose sandboxes are this test binary; start starts
// it, and the test's end stops it.
func newSandboxWorker(t *testing.T, mode string) (e *env, w *sdk.Worker, start func()) {
	t.Helper()
	dbURL, natsURL := testkit.NewDatabase(t), testkit.StartNATS(t).URL()
	e, stop, err := setupEnv(dbURL, natsURL, t.Name())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	cfg := sandboxWorkerConfig(mode)
	cfg.Pool, cfg.Conn = e.pool, e.nc
	if testing.Verbose() {
		cfg.Logger = slogToStderr()
	}
	if w, err = sdk.NewWorker(cfg); err != nil {
		t.Fatal(err)
	}
	sdk.SetSandboxEnv(w, "KAGZI_SDK_TEST_DB="+dbURL, "KAGZI_SDK_TEST_NATS="+natsURL, sandboxModeEnv+"="+mode)
	if err := w.Register(sandboxWF); err != nil {
		t.Fatal(err)
	}
	return e, w, func() {
		t.Helper()
		if err := w.Start(ctxT(t)); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = w.Stop(context.Background()) })
	}
}

// A run whose last attempt lapsed runs in a sandbox, a child process: one whose step
// os.Exits kills only its sandbox, each attempt ending at once with the reason a lapsed
// lease gives, until its attempts are spent; one that does not completes there; and a
// fresh run runs in the executor's own process.
func TestSandboxes(t *testing.T) {
	t.Parallel()
	e, w, start := newSandboxWorker(t, "")
	ctx := ctxT(t)

	// Two runs a dead incarnation of the worker's name held: the worker hands them back
	// at its start, each with one lapse.
	held := func(in sandboxInput, maxAttempts int) wire.RunID {
		data, _ := json.Marshal(in)
		ins, err := e.st.RunInsert(ctx, store.RunInsertParams{ID: wire.NewRunID(), Namespace: wire.DefaultNamespace,
			Workflow: "sandboxed", Input: data, IdempotencyKey: wire.NewRunID(), MaxAttempts: maxAttempts})
		if err != nil {
			t.Fatal(err)
		}
		res := e.st.RunsClaim(ctx, wire.DefaultNamespace, "sbx/1-dead", time.Minute,
			[]store.ClaimRequest{{RunID: ins.RunID, DispatchSeq: ins.DispatchSeq, Workflow: "sandboxed"}})
		if res[0].Err != nil || !res[0].OK {
			t.Fatalf("claim as the dead incarnation: %+v", res[0])
		}
		return ins.RunID
	}
	good := held(sandboxInput{}, 3)
	exiter := held(sandboxInput{Exit: true}, 3)

	start()
	fresh, err := sandboxWF.Start(ctx, e.client(), sandboxInput{})
	if err != nil {
		t.Fatal(err)
	}

	c := e.client()
	pidOf := func(id string) int {
		t.Helper()
		info, err := c.Wait(ctx, id)
		if err != nil || info.Status != wire.StatusCompleted {
			t.Fatalf("run %s: %+v, %v", id, info, err)
		}
		var pid int
		if err := json.Unmarshal(info.Output, &pid); err != nil {
			t.Fatal(err)
		}
		return pid
	}
	if pid := pidOf(fresh.ID); pid != os.Getpid() {
		t.Errorf("fresh run ran in pid %d, want the executor's own %d", pid, os.Getpid())
	}
	if pid := pidOf(good); pid == os.Getpid() || pid == 0 {
		t.Errorf("the run with a lapse ran in pid %d, want a sandbox's (the executor is %d)", pid, os.Getpid())
	}
	info, err := c.Wait(ctx, exiter)
	if err != nil {
		t.Fatal(err)
	}
	if info.Status != wire.StatusFailed || info.Attempt != 3 || !strings.HasPrefix(info.Error, "lease expired on attempt 3 of 3") {
		t.Fatalf("the run that exits: %s on attempt %d (%q), want FAILED on attempt 3 by its lapsed lease", info.Status, info.Attempt, info.Error)
	}
	// Attempt 1 died with the dead incarnation; 2 and 3 each killed a sandbox, which the
	// executor saw at once (a lease would have outlasted the test).
	st := w.Stats()
	if st.Sandboxed != 3 || st.SandboxesLost != 2 {
		t.Errorf("stats: %d attempts sandboxed, %d sandboxes lost; want 3 and 2", st.Sandboxed, st.SandboxesLost)
	}

	// Stopped, the worker ends its idle sandbox.
	sandboxPID := pidOf(good)
	if err := w.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the idle sandbox to exit", func() bool { return syscall.Kill(sandboxPID, 0) != nil })
}

// With SandboxEveryRun, every run runs in a sandbox, a fresh one too: a run whose step
// os.Exits on its first attempt takes no other run down, and a sandbox that abandoned
// a step body at its timeout ends itself after the run, the body with it.
func TestSandboxEveryRun(t *testing.T) {
	t.Parallel()
	e, w, start := newSandboxWorker(t, "every-run")
	ctx := ctxT(t)
	start()

	c := e.client()
	// The good run holds its sandbox while the other dies beside it, on its first attempt.
	good, err := sandboxWF.Start(ctx, c, sandboxInput{HoldMS: 500})
	if err != nil {
		t.Fatal(err)
	}
	exiter, err := sandboxWF.Start(ctx, c, sandboxInput{Exit: true}, sdk.MaxAttempts(2))
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.Wait(ctx, good.ID)
	if err != nil || info.Status != wire.StatusCompleted || info.Attempt != 1 {
		t.Fatalf("the good run: %+v, %v; want COMPLETED on its first attempt", info, err)
	}
	var pid int
	if err := json.Unmarshal(info.Output, &pid); err != nil {
		t.Fatal(err)
	}
	if pid == os.Getpid() || pid == 0 {
		t.Errorf("a fresh run ran in pid %d, want a sandbox's (the executor is %d)", pid, os.Getpid())
	}
	info, err = c.Wait(ctx, exiter.ID)
	if err != nil || info.Status != wire.StatusFailed || info.Attempt != 2 || !strings.HasPrefix(info.Error, "lease expired on attempt 2 of 2") {
		t.Fatalf("the run that exits: %+v, %v; want FAILED on attempt 2 by its lapsed lease", info, err)
	}

	hung, err := sandboxWF.Start(ctx, c, sandboxInput{Hang: true}, sdk.MaxAttempts(1))
	if err != nil {
		t.Fatal(err)
	}
	info, err = c.Wait(ctx, hung.ID)
	if err != nil || info.Status != wire.StatusFailed || !strings.Contains(info.Error, sdk.ErrStepTimeout.Error()) {
		t.Fatalf("the run that hangs: %+v, %v; want FAILED by its step timeout", info, err)
	}
	var out []byte
	if err := e.pool.QueryRow(ctx, `SELECT output FROM step_runs WHERE run_id = $1 AND step_key = 'body'`, hung.ID).Scan(&out); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(out, &pid); err != nil {
		t.Fatal(err)
	}
	// Its sandbox, the abandoned body in it, is gone: ended, not killed by its executor.
	waitFor(t, "the sandbox with the abandoned body to exit", func() bool { return syscall.Kill(pid, 0) != nil })
	st := w.Stats()
	if st.Sandboxed != 4 || st.SandboxesLost != 2 || st.SandboxesRetired != 1 || st.Abandoned != 0 {
		t.Errorf("stats: %d attempts sandboxed, %d sandboxes lost, %d retired, %d bodies abandoned here; want 4, 2, 1 and 0",
			st.Sandboxed, st.SandboxesLost, st.SandboxesRetired, st.Abandoned)
	}
}
