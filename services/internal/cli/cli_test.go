package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/fx/fxtest"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/modules"
	"github.com/kagzi/kagzi/services/internal/platform"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// syncBuffer is written by a command's goroutines and read by the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type result struct {
	code           int
	stdout, stderr string
}

// run runs the kagzi command with only the given environment.
func run(ctx context.Context, vars map[string]string, args ...string) result {
	var out, errOut syncBuffer
	env := Env{
		Lookup: func(k string) (string, bool) { v, ok := vars[k]; return v, ok },
		Stdout: &out,
		Stderr: &errOut,
	}
	code := Kagzi(ctx, "kagzi", args, env)
	return result{code, out.String(), errOut.String()}
}

func TestUsageAndExitCodes(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	for _, tc := range []struct {
		args []string
		vars map[string]string
		code int
		want string
	}{
		{nil, nil, ExitUsage, "Usage:"},
		{[]string{"frobnicate"}, nil, ExitUsage, `unknown command "frobnicate"`},
		{[]string{"help"}, nil, ExitOK, "kagzi dev"},
		{[]string{"version"}, nil, ExitOK, "kagzi dev ("},
		{[]string{"timer", "-h"}, nil, ExitOK, "-stale-after"},
		{[]string{"executor", "--lease", "soon"}, nil, ExitUsage, "invalid value"},
		{[]string{"scheduler"}, map[string]string{"KAGZI_LOG_LEVEL": "chatty", "NATS_URL": "http://x"}, ExitUsage, `log level "chatty"`},
		{[]string{"dev", "--concurrency", "0"}, nil, ExitUsage, "concurrency 0"},
		{[]string{"migrate", "sideways"}, nil, ExitUsage, "unknown migrate action"},
		{[]string{"start"}, nil, ExitUsage, "want 1 argument"},
		{[]string{"start", "greet", "--input", "{nope"}, nil, ExitUsage, "--input is not valid JSON"},
		{[]string{"describe", "not-a-run-id"}, nil, ExitUsage, "is not a run id"},
	} {
		r := run(ctx, tc.vars, tc.args...)
		if r.code != tc.code || !strings.Contains(r.stdout+r.stderr, tc.want) {
			t.Errorf("kagzi %q: exit %d, want %d with %q\nstdout: %s\nstderr: %s",
				tc.args, r.code, tc.code, tc.want, r.stdout, r.stderr)
		}
	}
}

func TestBadConfigStartsNothing(t *testing.T) {
	t.Parallel()
	// A bad value next to an unreachable database: the config error wins at once,
	// nothing dials.
	start := time.Now()
	r := run(t.Context(), map[string]string{
		"DATABASE_URL": "postgres://postgres@127.0.0.1:1/x", "KAGZI_STALE_AFTER": "-1s",
	}, "timer")
	if r.code != ExitUsage || time.Since(start) > 2*time.Second {
		t.Errorf("exit %d after %s: %s", r.code, time.Since(start), r.stderr)
	}
}

func TestMigrate(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	vars := map[string]string{"DATABASE_URL": testkit.NewDatabase(t)}
	want, _ := regexp.Compile(`schema version (\d+), this binary's (\d+) \(([^)]*)\)`)

	version := func() []string {
		t.Helper()
		r := run(ctx, vars, "migrate", "version")
		m := want.FindStringSubmatch(r.stdout)
		if r.code != ExitOK || m == nil {
			t.Fatalf("migrate version: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
		return m[1:]
	}
	if v := version(); v[0] != v[1] || v[2] != "up to date" {
		t.Errorf("fresh database: %q", v)
	}
	if r := run(ctx, vars, "migrate", "down-all"); r.code != ExitUsage {
		t.Errorf("down-all without --yes: exit %d", r.code)
	}
	if r := run(ctx, vars, "migrate", "down-all", "--yes"); r.code != ExitOK {
		t.Fatalf("down-all: exit %d: %s", r.code, r.stderr)
	}
	if v := version(); v[0] != "0" || !strings.HasPrefix(v[2], "behind") {
		t.Errorf("after down-all: %q", v)
	}
	if r := run(ctx, vars, "migrate"); r.code != ExitOK {
		t.Fatalf("up: exit %d: %s", r.code, r.stderr)
	}
	if v := version(); v[0] != v[1] {
		t.Errorf("after up: %q", v)
	}
}

func TestStartAndDescribe(t *testing.T) {
	t.Parallel()
	nats := testkit.StartNATS(t)
	cfg, err := platform.LoadScheduler(platform.Source{Args: []string{
		"--database-url", testkit.NewDatabase(t), "--nats-url", nats.URL(), "--http-addr", "off",
	}})
	if err != nil {
		t.Fatal(err)
	}
	app := fxtest.New(t, modules.Scheduler(cfg), fx.Replace(zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))))
	app.RequireStart()
	defer app.RequireStop()

	ctx := t.Context()
	vars := map[string]string{"NATS_URL": nats.URL()}
	r := run(ctx, vars, "start", "report", "--input", `{"day":"mon"}`, "--key", "k-1")
	runID := strings.TrimSpace(r.stdout)
	if r.code != ExitOK || !wire.ValidRunID(runID) {
		t.Fatalf("start: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	// Same key, same run.
	if again := run(ctx, vars, "start", "report", "--key", "k-1", "--input", `{"day":"mon"}`); strings.TrimSpace(again.stdout) != runID {
		t.Errorf("second start with the key: %q, want %q (%s)", again.stdout, runID, again.stderr)
	}

	r = run(ctx, vars, "describe", runID)
	var info wire.RunInfo
	if r.code != ExitOK {
		t.Fatalf("describe: exit %d: %s", r.code, r.stderr)
	}
	if err := json.Unmarshal([]byte(r.stdout), &info); err != nil {
		t.Fatalf("describe output is not a run: %v\n%s", err, r.stdout)
	}
	var input map[string]string
	_ = json.Unmarshal(info.Input, &input)
	if info.ID != runID || info.Workflow != "report" || info.Status != wire.StatusQueued || input["day"] != "mon" {
		t.Errorf("describe = %+v", info)
	}

	if r := run(ctx, vars, "describe", wire.NewRunID()); r.code != ExitFailure || !strings.Contains(r.stderr, "not found") {
		t.Errorf("describe of an unknown run: exit %d: %s", r.code, r.stderr)
	}
	if r := run(ctx, map[string]string{"NATS_URL": "nats://127.0.0.1:1"}, "describe", runID, "--timeout", "300ms"); r.code != ExitFailure || !strings.Contains(r.stderr, "no scheduler answered") {
		t.Errorf("describe with no NATS: exit %d: %s", r.code, r.stderr)
	}
}

// TestDev runs `kagzi dev` as a user does: embedded NATS, the database prepared, a demo
// run started with `kagzi start --wait` against the printed NATS_URL, and an interrupt
// that stops everything cleanly.
func TestDev(t *testing.T) {
	t.Parallel()
	ctx, interrupt := context.WithCancel(t.Context())
	defer interrupt()
	vars := map[string]string{"DATABASE_URL": testkit.NewDatabase(t)}
	var out, errOut syncBuffer
	env := Env{Lookup: func(k string) (string, bool) { v, ok := vars[k]; return v, ok }, Stdout: &out, Stderr: &errOut}
	done := make(chan int, 1)
	go func() {
		done <- Kagzi(ctx, "kagzi", []string{"dev", "--data", t.TempDir(), "--http-addr", "127.0.0.1:0"}, env)
	}()

	natsURL := regexp.MustCompile(`NATS_URL=(\S+)`)
	deadline := time.Now().Add(60 * time.Second)
	var url string
	for url == "" {
		select {
		case code := <-done:
			t.Fatalf("kagzi dev exited %d early:\n%s%s", code, out.String(), errOut.String())
		case <-time.After(20 * time.Millisecond):
		}
		if m := natsURL.FindStringSubmatch(out.String()); m != nil {
			url = m[1]
		}
		if time.Now().After(deadline) {
			t.Fatalf("kagzi dev not ready after 60s:\n%s", errOut.String())
		}
	}

	r := run(t.Context(), map[string]string{"NATS_URL": url}, "start", "greet", "--input", `{"name":"Ada"}`, "--wait", "--timeout", "30s")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if r.code != ExitOK || len(lines) != 2 || !strings.Contains(lines[1], "Ada") {
		t.Errorf("start --wait: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}

	interrupt()
	select {
	case code := <-done:
		if code != ExitOK {
			t.Errorf("kagzi dev exited %d after an interrupt:\n%s", code, errOut.String())
		}
	case <-time.After(time.Minute):
		t.Fatal("kagzi dev did not stop within a minute of an interrupt")
	}
}
