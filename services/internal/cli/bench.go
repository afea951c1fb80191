package cli

import (
	"context"
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/kagzi/kagzi/services/internal/bench"
	"github.com/kagzi/kagzi/services/internal/platform"
)

// Bench runs `kagzi bench`: the scenarios of issue 4 against fresh databases on the
// PostgreSQL server of DATABASE_URL, with this binary's services as child processes.
func Bench(ctx context.Context, program string, args []string, env Env) int {
	var (
		dbURL       string
		scenarios   string
		cfg         bench.Config
		concurrency int
	)
	defaultDB := platform.DefaultDatabaseURL
	if v, ok := env.Lookup("DATABASE_URL"); ok && v != "" {
		defaultDB = v
	}
	client, err := platform.LoadClient(env.source(program, args), 0, func(fs *flag.FlagSet) {
		fs.StringVar(&dbURL, "database-url", defaultDB, "PostgreSQL server (and credentials) to create the bench databases on (env DATABASE_URL)")
		fs.StringVar(&scenarios, "scenarios", strings.Join(bench.AllScenarios, ","), "comma-separated scenarios to run")
		fs.IntVar(&cfg.N, "n", 5000, "S1: runs started at once")
		fs.IntVar(&cfg.Sleepers, "sleepers", 0, "S5: runs asleep at once (0: 100,000, fewer if they would not fit in 4 minutes here)")
		fs.DurationVar(&cfg.Idle, "idle", time.Minute, "S6: idle window")
		fs.IntVar(&concurrency, "concurrency", 0, "executor KAGZI_CONCURRENCY in S1, S3 and S5 (0: the executor's default)")
		fs.StringVar(&cfg.Out, "out", "bench.json", `JSON report ("-": none)`)
		fs.BoolVar(&cfg.Keep, "keep", false, "keep the bench databases and service logs")
		fs.StringVar(&cfg.ProfileDir, "profile", "", "directory for CPU profiles of every service, taken after S2's measurement under the same load")
		fs.DurationVar(&cfg.ProfileFor, "profile-for", 20*time.Second, "how long each --profile CPU profile runs")
		fs.StringVar(&cfg.ServiceLogLevel, "service-log-level", "warn", "KAGZI_LOG_LEVEL of the services the bench runs")
	})
	if err != nil {
		return configFailed(env, program, err)
	}
	cfg.DatabaseURL = dbURL
	cfg.Namespace = client.Namespace
	cfg.Concurrency = concurrency
	for _, s := range strings.Split(scenarios, ",") {
		if s = strings.ToLower(strings.TrimSpace(s)); s != "" {
			cfg.Scenarios = append(cfg.Scenarios, s)
		}
	}
	// An explicit NATS server replaces the embedded one; the default URL alone does not,
	// so the bench needs nothing running but PostgreSQL.
	if v, ok := env.Lookup("NATS_URL"); (ok && v != "") || hasFlag(args, "nats-url") {
		cfg.NATS = client.NATS
		cfg.NATS.Name = "kagzi-bench"
	}
	cfg.Progress = env.Stderr
	if client.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, client.Timeout)
		defer cancel()
	}
	if err := bench.Run(ctx, cfg, env.Stdout); err != nil {
		fmt.Fprintf(env.Stderr, "%s: %v\n", program, err)
		return ExitFailure
	}
	return ExitOK
}

// hasFlag says whether args set the named flag, in any of the forms package flag takes.
func hasFlag(args []string, name string) bool {
	for _, a := range args {
		a = strings.TrimLeft(a, "-")
		if a == name || strings.HasPrefix(a, name+"=") {
			return true
		}
	}
	return false
}
