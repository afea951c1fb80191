package platform

import (
	"errors"
	"flag"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/kagzi/kagzi/libs/wire"
)

func env(kv ...string) LookupEnv {
	m := map[string]string{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) (string, bool) {
		v, ok := m[k]
		return v, ok
	}
}

func TestDefaults(t *testing.T) {
	t.Parallel()
	cfg, err := LoadExecutor(Source{Program: "executor"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Postgres.URL != DefaultDatabaseURL || cfg.Postgres.MigrationURL != DefaultDatabaseURL {
		t.Errorf("database urls = %q, %q", cfg.Postgres.URL, cfg.Postgres.MigrationURL)
	}
	if !cfg.Postgres.AutoMigrate || cfg.Postgres.MaxConns != 0 {
		t.Errorf("postgres = %+v", cfg.Postgres)
	}
	if cfg.NATS.URL != DefaultNATSURL || cfg.NATS.Name != "kagzi-executor" {
		t.Errorf("nats = %+v", cfg.NATS)
	}
	if cfg.Namespace != "default" || cfg.HTTPAddr != DefaultExecutorHTTPAddr {
		t.Errorf("namespace %q http %q", cfg.Namespace, cfg.HTTPAddr)
	}
	if cfg.Log.Level != zapcore.InfoLevel || cfg.Log.Format != "json" {
		t.Errorf("log = %+v", cfg.Log)
	}
	if cfg.Concurrency != 1000 || cfg.Lease != 30*time.Second || cfg.ShutdownGrace != 25*time.Second || cfg.Name != "" {
		t.Errorf("executor = %d %s %s", cfg.Concurrency, cfg.Lease, cfg.ShutdownGrace)
	}
	if d := wire.DefaultLimits(); cfg.Limits.MaxSteps != d.MaxSteps || cfg.Limits.MaxStepOutputBytes != d.MaxStepOutputBytes ||
		cfg.Limits.MaxRunStateBytes != d.MaxRunStateBytes {
		t.Errorf("executor limits = %+v", cfg.Limits)
	}

	tc, err := LoadTimer(Source{})
	if err != nil {
		t.Fatal(err)
	}
	if tc.StaleAfter != 30*time.Second || tc.MaxIdle != 20*time.Second || tc.WakeLead != 250*time.Millisecond || tc.HTTPAddr != DefaultTimerHTTPAddr {
		t.Errorf("timer = %+v", tc)
	}
	sc, err := LoadScheduler(Source{})
	if err != nil {
		t.Fatal(err)
	}
	if sc.HTTPAddr != DefaultSchedulerHTTPAddr || sc.Service != "scheduler" {
		t.Errorf("scheduler = %+v", sc)
	}
	dc, err := LoadDev(Source{})
	if err != nil {
		t.Fatal(err)
	}
	if !dc.EmbedNATS || dc.DataDir != ".kagzi" || dc.HTTPAddr != DefaultDevHTTPAddr || dc.Log.Format != "console" {
		t.Errorf("dev = %+v", dc)
	}
}

func TestFlagsOverEnvironment(t *testing.T) {
	t.Parallel()
	e := env(
		"DATABASE_URL", "postgres://env@db:5432/envdb",
		"NATS_URL", "nats://env:4222",
		"KAGZI_CONCURRENCY", "8",
		"KAGZI_LEASE", "45s",
		"KAGZI_LOG_LEVEL", "debug",
		"KAGZI_AUTO_MIGRATE", "false",
		"KAGZI_NAMESPACE", "from-env",
		"KAGZI_EXECUTOR_NAME", "executor-0",
		"KAGZI_SANDBOXES", "3",
	)
	cfg, err := LoadExecutor(Source{Env: e, Args: []string{
		"--nats-url", "nats://flag:4222", "--concurrency=2", "--auto-migrate=true", "--sandbox-every-run",
	}})
	if err != nil {
		t.Fatal(err)
	}
	// Flags win where given...
	if cfg.NATS.URL != "nats://flag:4222" || cfg.Concurrency != 2 || !cfg.Postgres.AutoMigrate {
		t.Errorf("flags lost: %+v", cfg)
	}
	// ...and the environment everywhere else.
	if cfg.Postgres.URL != "postgres://env@db:5432/envdb" || cfg.Postgres.MigrationURL != cfg.Postgres.URL {
		t.Errorf("postgres = %+v", cfg.Postgres)
	}
	if cfg.Lease != 45*time.Second || cfg.Log.Level != zapcore.DebugLevel || cfg.Namespace != "from-env" || cfg.Name != "executor-0" {
		t.Errorf("env lost: %+v", cfg)
	}
	if cfg.Sandboxes != 3 || !cfg.SandboxEveryRun {
		t.Errorf("sandboxes = %d, every run %t; want 3 and true", cfg.Sandboxes, cfg.SandboxEveryRun)
	}
	// A sandbox of this executor shares nothing it cannot and migrates nothing.
	sb := cfg.ForSandbox()
	if sb.HTTPAddr != HTTPOff || sb.Postgres.AutoMigrate || sb.Postgres.MaxConns != 2 || sb.Name != cfg.Name || !sb.SandboxEveryRun {
		t.Errorf("ForSandbox = %+v", sb)
	}
}

func TestEmptyVariableIsUnset(t *testing.T) {
	t.Parallel()
	cfg, err := LoadTimer(Source{Env: env("KAGZI_STALE_AFTER", "", "NATS_URL", "")})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.StaleAfter != 30*time.Second || cfg.NATS.URL != DefaultNATSURL {
		t.Errorf("cfg = %+v", cfg)
	}
}

func TestNATSSecretsComeFromEnvironmentOnly(t *testing.T) {
	t.Parallel()
	cfg, err := LoadScheduler(Source{Env: env("NATS_USER", "u", "NATS_PASSWORD", "p")})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NATS.User != "u" || cfg.NATS.Password != "p" {
		t.Errorf("nats = %+v", cfg.NATS)
	}
	if _, err := LoadScheduler(Source{Args: []string{"--nats-password", "p"}}); err == nil {
		t.Error("a --nats-password flag was accepted")
	}
}

func TestDevEmbedsNATSUnlessURLGiven(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		src   Source
		embed bool
	}{
		{"default", Source{}, true},
		{"env", Source{Env: env("NATS_URL", "nats://127.0.0.1:4333")}, false},
		{"flag", Source{Args: []string{"--nats-url", "nats://127.0.0.1:4333"}}, false},
		{"flag equal to default", Source{Args: []string{"--nats-url", DefaultNATSURL}}, false},
	} {
		cfg, err := LoadDev(tc.src)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if cfg.EmbedNATS != tc.embed {
			t.Errorf("%s: EmbedNATS = %v, want %v", tc.name, cfg.EmbedNATS, tc.embed)
		}
		if !cfg.Postgres.AutoMigrate {
			t.Errorf("%s: dev does not migrate", tc.name)
		}
	}
}

func TestDevSplitsIntoServiceConfigs(t *testing.T) {
	t.Parallel()
	cfg, err := LoadDev(Source{Args: []string{"--concurrency", "3", "--stale-after", "5s", "--namespace", "ns1", "--request-queue", "9"},
		Env: env("KAGZI_EXECUTOR_NAME", "laptop", "KAGZI_MAX_STEPS", "40")})
	if err != nil {
		t.Fatal(err)
	}
	if e := cfg.Executor(); e.Concurrency != 3 || e.Namespace != "ns1" || e.Name != "laptop" || e.Limits.MaxSteps != 40 {
		t.Errorf("executor = %+v", e)
	}
	if tc := cfg.Timer(); tc.StaleAfter != 5*time.Second || tc.Namespace != "ns1" {
		t.Errorf("timer = %+v", tc)
	}
	if sc := cfg.Scheduler(); sc.Namespace != "ns1" || sc.RequestQueue != 9 {
		t.Errorf("scheduler = %+v", sc)
	}
}

func TestSchedulerRequestQueue(t *testing.T) {
	t.Parallel()
	cfg, err := LoadScheduler(Source{})
	if err != nil || cfg.RequestQueue != 256 {
		t.Fatalf("default request queue %d, %v; want 256", cfg.RequestQueue, err)
	}
	cfg, err = LoadScheduler(Source{Env: env("KAGZI_REQUEST_QUEUE", "32")})
	if err != nil || cfg.RequestQueue != 32 {
		t.Fatalf("KAGZI_REQUEST_QUEUE=32: %d, %v", cfg.RequestQueue, err)
	}
	var ce *ConfigError
	if _, err := LoadScheduler(Source{Env: env("KAGZI_REQUEST_QUEUE", "0")}); !errors.As(err, &ce) || !strings.Contains(err.Error(), "request-queue 0") {
		t.Fatalf("KAGZI_REQUEST_QUEUE=0: %v, want a configuration error", err)
	}
	if cfg.NamespaceRate != 0 {
		t.Fatalf("default namespace rate %d, want 0 (no limit)", cfg.NamespaceRate)
	}
	if cfg, err := LoadDev(Source{Args: []string{"--namespace-rate", "300"}}); err != nil || cfg.Scheduler().NamespaceRate != 300 {
		t.Fatalf("--namespace-rate 300: %d, %v", cfg.Scheduler().NamespaceRate, err)
	}
	if _, err := LoadScheduler(Source{Env: env("KAGZI_NAMESPACE_RATE", "-1")}); !errors.As(err, &ce) || !strings.Contains(err.Error(), "namespace-rate -1") {
		t.Fatalf("KAGZI_NAMESPACE_RATE=-1: %v, want a configuration error", err)
	}
}

func TestBadConfiguration(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		src  Source
		want []string // every problem is reported, not only the first
	}{
		{"duration", Source{Env: env("KAGZI_LEASE", "thirty")}, []string{`KAGZI_LEASE="thirty" is not a duration`}},
		{"integer", Source{Env: env("KAGZI_CONCURRENCY", "many", "KAGZI_DB_MAX_CONNS", "x")}, []string{"KAGZI_CONCURRENCY", "KAGZI_DB_MAX_CONNS"}},
		{"boolean", Source{Env: env("KAGZI_AUTO_MIGRATE", "perhaps")}, []string{"KAGZI_AUTO_MIGRATE"}},
		{"zero concurrency", Source{Args: []string{"--concurrency", "0"}}, []string{"concurrency 0"}},
		{"short lease", Source{Env: env("KAGZI_LEASE", "10ms")}, []string{"lease 10ms"}},
		{"negative pool", Source{Env: env("KAGZI_DB_MAX_CONNS", "-1")}, []string{"pool size -1"}},
		{"log level", Source{Env: env("KAGZI_LOG_LEVEL", "loud", "KAGZI_LOG_FORMAT", "xml")}, []string{`log level "loud"`, `log format "xml"`}},
		{"namespace", Source{Env: env("KAGZI_NAMESPACE", "a.b")}, []string{"namespace"}},
		{"executor name", Source{Env: env("KAGZI_EXECUTOR_NAME", "pod/0")}, []string{`executor name "pod/0"`}},
		{"run limits", Source{Env: env("KAGZI_MAX_STEPS", "0", "KAGZI_MAX_RUN_STATE", "-5")}, []string{"max-steps 0", "max-run-state -5"}},
		{"sandboxes", Source{Env: env("KAGZI_SANDBOXES", "-1")}, []string{"sandboxes -1"}},
		{"sandbox every run", Source{Env: env("KAGZI_SANDBOX_EVERY_RUN", "often")}, []string{"KAGZI_SANDBOX_EVERY_RUN"}},
		{"http addr", Source{Env: env("KAGZI_HTTP_ADDR", "9103")}, []string{"http address"}},
		{"nats scheme", Source{Env: env("NATS_URL", "http://127.0.0.1:4222")}, []string{`scheme "http"`}},
		{"nats url", Source{Env: env("NATS_URL", "127.0.0.1")}, []string{"is not a URL"}},
		{"nats auth", Source{Env: env("NATS_TOKEN", "t", "NATS_CREDS", "/c")}, []string{"at most one NATS authentication"}},
		{"nats password alone", Source{Env: env("NATS_PASSWORD", "p")}, []string{"without NATS_USER"}},
		{"nats tls pair", Source{Env: env("NATS_TLS_CERT", "/c.pem")}, []string{"NATS_TLS_CERT and NATS_TLS_KEY"}},
		{"nats inbox prefix", Source{Env: env("NATS_INBOX_PREFIX", "_INBOX.*")}, []string{"NATS_INBOX_PREFIX"}},
		{"database url", Source{Env: env("DATABASE_URL", "postgres://u:secret@host:notaport/db")}, []string{"database url is not a PostgreSQL connection string"}},
		{"unknown flag", Source{Args: []string{"--bogus"}}, []string{"flag provided but not defined: -bogus"}},
		{"positional", Source{Args: []string{"extra"}}, []string{`unexpected arguments ["extra"]`}},
	} {
		_, err := LoadExecutor(tc.src)
		var ce *ConfigError
		if !errors.As(err, &ce) {
			t.Errorf("%s: err = %v, want a *ConfigError", tc.name, err)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %q does not mention %q", tc.name, err, w)
			}
		}
		if strings.Contains(err.Error(), "secret") {
			t.Errorf("%s: error leaks a password: %q", tc.name, err)
		}
	}
}

func TestTimerWakeLead(t *testing.T) {
	t.Parallel()
	if cfg, err := LoadTimer(Source{Env: env("KAGZI_WAKE_LEAD", "0")}); err != nil || cfg.WakeLead != 0 {
		t.Errorf("KAGZI_WAKE_LEAD=0: %v, %v; want no lead", cfg.WakeLead, err)
	}
	for _, bad := range []string{"-1ms", "6s"} {
		if _, err := LoadTimer(Source{Env: env("KAGZI_WAKE_LEAD", bad)}); err == nil || !strings.Contains(err.Error(), "wake-lead "+bad) {
			t.Errorf("KAGZI_WAKE_LEAD=%s: err = %v, want it refused", bad, err)
		}
	}
}

func TestHelp(t *testing.T) {
	t.Parallel()
	var out strings.Builder
	_, err := LoadTimer(Source{Program: "timer", Args: []string{"-h"}, Output: &out})
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("err = %v, want flag.ErrHelp", err)
	}
	for _, want := range []string{"-stale-after", "(env KAGZI_STALE_AFTER)", "-database-url"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("usage lacks %q:\n%s", want, out.String())
		}
	}
}

func TestMigrateConfig(t *testing.T) {
	t.Parallel()
	cfg, err := LoadMigrate(Source{Env: env("DATABASE_URL", "postgres://app@h/db", "MIGRATION_DATABASE_URL", "postgres://owner@h/db")})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.URL != "postgres://owner@h/db" || cfg.Action != "up" {
		t.Errorf("cfg = %+v", cfg)
	}
	cfg, err = LoadMigrate(Source{Args: []string{"version", "--database-url", "postgres://x@h/db"}})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.URL != "postgres://x@h/db" || cfg.Action != "version" {
		t.Errorf("cfg = %+v", cfg)
	}
	if _, err := LoadMigrate(Source{Args: []string{"down-all"}}); err == nil || !strings.Contains(err.Error(), "--yes") {
		t.Errorf("down-all without --yes: err = %v", err)
	}
	if cfg, err := LoadMigrate(Source{Args: []string{"down-all", "--yes"}}); err != nil || cfg.Action != "down-all" {
		t.Errorf("down-all --yes: cfg = %+v, err = %v", cfg, err)
	}
	if _, err := LoadMigrate(Source{Args: []string{"sideways"}}); err == nil || !strings.Contains(err.Error(), `unknown migrate action "sideways"`) {
		t.Errorf("err = %v", err)
	}
}

func TestClientConfigFlagsAfterArguments(t *testing.T) {
	t.Parallel()
	var wait bool
	var input string
	cfg, err := LoadClient(Source{Args: []string{"greet", "--wait", "--input", `{"a":1}`, "--timeout", "5s"}}, 1,
		func(fs *flag.FlagSet) {
			fs.BoolVar(&wait, "wait", false, "")
			fs.StringVar(&input, "input", "", "")
		})
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Args) != 1 || cfg.Args[0] != "greet" || !wait || input != `{"a":1}` || cfg.Timeout != 5*time.Second {
		t.Errorf("cfg = %+v wait %v input %q", cfg, wait, input)
	}
	cfg, err = LoadClient(Source{Args: []string{"--", "-odd-name"}}, 1, nil)
	if err != nil || cfg.Args[0] != "-odd-name" {
		t.Errorf("after --: cfg = %+v, err = %v", cfg, err)
	}
	if _, err := LoadClient(Source{}, 1, nil); err == nil {
		t.Error("a missing argument was accepted")
	}
}

// TestEveryVariableIsDocumented keeps docs/configuration.md, the one place settings are
// documented, in step with what the loaders read.
func TestEveryVariableIsDocumented(t *testing.T) {
	t.Parallel()
	doc, err := os.ReadFile("../../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	collect := func(b *binder) {
		for _, name := range b.envNames {
			seen[name] = true
		}
		b.fs.VisitAll(func(f *flag.Flag) { seen["--"+f.Name] = true })
	}
	for _, load := range []func(b *binder){
		func(b *binder) { _, _ = loadScheduler(b) },
		func(b *binder) { _, _ = loadTimer(b) },
		func(b *binder) { _, _ = loadExecutor(b) },
		func(b *binder) { _, _ = loadDev(b) },
		func(b *binder) { _, _ = loadMigrate(b) },
		func(b *binder) { _, _ = loadClient(b, 0, nil) },
	} {
		b := newBinder(Source{})
		load(b)
		collect(b)
	}
	for name := range seen {
		if !strings.Contains(string(doc), "`"+name+"`") {
			t.Errorf("docs/configuration.md does not document `%s`", name)
		}
	}
	if len(seen) < 20 {
		t.Fatalf("only %d settings seen; the test no longer collects them", len(seen))
	}
}
