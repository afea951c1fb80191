package modules_test

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/fx"
	"go.uber.org/fx/fxtest"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/demo"
	"github.com/kagzi/kagzi/services/internal/modules"
	"github.com/kagzi/kagzi/services/internal/platform"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// loadDev gives every service's config from one place, as `kagzi dev` does, pointed at
// the given database and NATS server.
func loadDev(t *testing.T, dbURL, natsURL string) platform.DevConfig {
	t.Helper()
	cfg, err := platform.LoadDev(platform.Source{Args: []string{
		"--database-url", dbURL,
		"--nats-url", natsURL,
		"--http-addr", "127.0.0.1:0",
		"--max-idle", "200ms",
	}})
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestValidateApps checks each process's graph without running a constructor.
func TestValidateApps(t *testing.T) {
	t.Parallel()
	cfg := loadDev(t, platform.DefaultDatabaseURL, platform.DefaultNATSURL)
	for name, opt := range map[string]fx.Option{
		"scheduler": modules.Scheduler(cfg.Scheduler()),
		"timer":     modules.Timer(cfg.Timer()),
		"executor":  modules.Executor(cfg.Executor(), demo.Workflows()),
		"dev":       modules.Dev(cfg, demo.Workflows()),
	} {
		if err := fx.ValidateApp(opt); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestModulesNeedTheirConfig shows a process that forgets a service's config fails
// validation rather than running with zero values.
func TestModulesNeedTheirConfig(t *testing.T) {
	t.Parallel()
	cfg := loadDev(t, platform.DefaultDatabaseURL, platform.DefaultNATSURL)
	err := fx.ValidateApp(modules.AppOptions(), fx.Supply(cfg.Config), modules.PlatformModule, modules.TimerModule)
	if err == nil || !strings.Contains(err.Error(), "platform.TimerConfig") {
		t.Errorf("err = %v, want a missing platform.TimerConfig", err)
	}
}

type booted struct {
	http *platform.HTTPServer
	nc   *nats.Conn
}

// boot starts an app over a fresh database and a private NATS server, with the test's
// logger, and stops it when the test ends.
func boot(t *testing.T, opt func(platform.DevConfig) fx.Option) booted {
	t.Helper()
	cfg := loadDev(t, testkit.NewDatabase(t), testkit.StartNATS(t).URL())
	var b booted
	app := fxtest.New(t, opt(cfg),
		fx.Replace(zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))),
		fx.Populate(&b.http, &b.nc))
	app.RequireStart()
	t.Cleanup(app.RequireStop)
	return b
}

func httpGet(t *testing.T, s *platform.HTTPServer, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + s.Addr() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func checkServing(t *testing.T, b booted, metric string) {
	t.Helper()
	if code, body := httpGet(t, b.http, "/readyz"); code != http.StatusOK {
		t.Errorf("readyz = %d %s", code, body)
	}
	if code, body := httpGet(t, b.http, "/metrics"); code != http.StatusOK || !strings.Contains(body, metric) {
		t.Errorf("metrics = %d, no %s series", code, metric)
	}
}

func TestSchedulerBoots(t *testing.T) {
	t.Parallel()
	b := boot(t, func(c platform.DevConfig) fx.Option { return modules.Scheduler(c.Scheduler()) })
	checkServing(t, b, "kagzi_scheduler_")

	// The scheduler answers a start once the run is committed; no executor is needed.
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	client := sdk.NewClient(b.nc)
	id, err := client.StartByName(ctx, "boot-test", map[string]int{"n": 1})
	if err != nil {
		t.Fatal(err)
	}
	info, err := client.Describe(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if info.Status != wire.StatusQueued || info.Workflow != "boot-test" {
		t.Errorf("run = %+v", info)
	}
}

func TestTimerBoots(t *testing.T) {
	t.Parallel()
	b := boot(t, func(c platform.DevConfig) fx.Option { return modules.Timer(c.Timer()) })
	checkServing(t, b, "kagzi_timer_")
}

// TestDevRunsDemo runs a demo workflow through scheduler, executor and timer (its
// durable sleep is woken by the timer) in one app, as `kagzi dev` does.
func TestDevRunsDemo(t *testing.T) {
	t.Parallel()
	b := boot(t, func(c platform.DevConfig) fx.Option { return modules.Dev(c, demo.Workflows()) })
	checkServing(t, b, "kagzi_executor_runs_claimed_total")
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	client := sdk.NewClient(b.nc)
	run, err := demo.Greet.Start(ctx, client, demo.GreetInput{Name: "Ada"})
	if err != nil {
		t.Fatal(err)
	}
	out, err := run.Result(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.Greeting, "Ada") {
		t.Errorf("output = %+v", out)
	}
	info, err := client.Describe(ctx, run.ID)
	if err != nil {
		t.Fatal(err)
	}
	if info.Status != wire.StatusCompleted {
		t.Errorf("run %s ended %s: %s", run.ID, info.Status, info.Error)
	}
}
