package platform

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap/zapcore"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/wire"
)

// Configuration
//
// Every setting is an environment variable, and most have a flag that overrides it
// (flag > environment > default). The table in docs/configuration.md lists them all; a
// test keeps it in step with the loaders below, which are the only code that reads the
// environment.
//
//	DATABASE_URL            --database-url            all services, dev, migrate
//	MIGRATION_DATABASE_URL  --migration-database-url  all services, dev, migrate
//	KAGZI_AUTO_MIGRATE      --auto-migrate            all services
//	KAGZI_DB_MAX_CONNS      --db-max-conns            all services, dev
//	NATS_URL                --nats-url                all services, dev, start, describe
//	NATS_USER, NATS_PASSWORD, NATS_TOKEN (environment only), NATS_NKEY_SEED, NATS_CREDS,
//	NATS_TLS_CA, NATS_TLS_CERT, NATS_TLS_KEY                  wherever NATS_URL is read
//	KAGZI_NAMESPACE         --namespace               all services, dev, start, describe
//	KAGZI_HTTP_ADDR         --http-addr               all services, dev ("off" disables)
//	KAGZI_PPROF             --pprof                   all services, dev
//	KAGZI_LOG_LEVEL         --log-level               all services, dev
//	KAGZI_LOG_FORMAT        --log-format              all services, dev (json|console)
//	KAGZI_CONCURRENCY       --concurrency             executor, dev
//	KAGZI_LEASE             --lease                   executor, dev
//	KAGZI_SHUTDOWN_GRACE    --shutdown-grace          executor, dev
//	KAGZI_EXECUTOR_NAME     --executor-name           executor, dev
//	KAGZI_MAX_STEPS         --max-steps               executor, dev
//	KAGZI_MAX_STEP_OUTPUT   --max-step-output         executor, dev
//	KAGZI_MAX_RUN_STATE     --max-run-state           executor, dev
//	KAGZI_SANDBOXES         --sandboxes               executor
//	KAGZI_SANDBOX_EVERY_RUN --sandbox-every-run       executor
//	KAGZI_STALE_AFTER       --stale-after             timer, dev
//	KAGZI_MAX_IDLE          --max-idle                timer, dev
//	KAGZI_WAKE_LEAD         --wake-lead               timer, dev
//	KAGZI_DATA_DIR          --data                    dev
//
// A bad value is an error that names the variable or flag; the commands exit with code 2
// before starting anything.

// Default listen addresses of the health and metrics server. The services listen on all
// interfaces because they run in containers and are scraped from outside; kagzi dev runs
// on a laptop and stays on loopback.
const (
	DefaultSchedulerHTTPAddr = ":9101"
	DefaultTimerHTTPAddr     = ":9102"
	DefaultExecutorHTTPAddr  = ":9103"
	DefaultDevHTTPAddr       = "127.0.0.1:9100"

	// DefaultDatabaseURL is a local PostgreSQL with trust authentication, as a
	// development machine has it.
	DefaultDatabaseURL = "postgres://postgres@127.0.0.1:5432/kagzi?sslmode=disable"
	DefaultNATSURL     = "nats://127.0.0.1:4222"

	// HTTPOff as KAGZI_HTTP_ADDR runs no HTTP server.
	HTTPOff = "off"
)

// LookupEnv reads one environment variable; main passes os.LookupEnv, tests a map.
type LookupEnv func(key string) (string, bool)

// Source is what a command's configuration is read from.
type Source struct {
	Program string    // shown in usage, e.g. "kagzi timer"
	Args    []string  // command-line arguments after the program or subcommand name
	Env     LookupEnv // nil reads no environment
	Output  io.Writer // usage and flag errors; nil discards them
}

// LogConfig chooses the logger.
type LogConfig struct {
	Level  zapcore.Level
	Format string // "json" or "console"
}

// PostgresConfig says how to reach and prepare PostgreSQL.
type PostgresConfig struct {
	URL          string
	MigrationURL string // a role allowed to run DDL; defaults to URL
	AutoMigrate  bool   // migrate at start-up, else only check the schema version
	MaxConns     int32  // 0: store.Connect's default (10)
	AppName      string // application_name of the sessions unless the URL sets one
}

// Config is the part of the configuration every long-running command shares.
type Config struct {
	Service   string // "scheduler", "timer", "executor" or "dev"; names logs and the NATS connection
	Postgres  PostgresConfig
	NATS      bus.ConnOptions
	Namespace string
	HTTPAddr  string // HTTPOff: no HTTP server
	// Pprof serves Go's profiler under /debug/pprof/ on HTTPAddr. Off by default: a
	// profile shows the process's code paths and a heap dump its memory, payloads
	// included, so it belongs on a private address only.
	Pprof bool
	Log   LogConfig
}

// SchedulerConfig configures the scheduler service.
type SchedulerConfig struct {
	Config
	// RequestQueue bounds the requests of one namespace waiting for the scheduler; more
	// are refused as overloaded.
	RequestQueue int
	// NamespaceRate bounds the requests a second of one namespace (0: no limit); more
	// are refused as overloaded.
	NamespaceRate int
	// MaxDepth and MaxTreeRuns bound the trees of runs started from steps
	// (wire.Limits).
	MaxDepth    int
	MaxTreeRuns int
}

// TimerConfig configures the timer service.
type TimerConfig struct {
	Config
	StaleAfter time.Duration // a QUEUED run unclaimed for this long is dispatched again
	MaxIdle    time.Duration // the longest the timer sleeps between sweeps
	WakeLead   time.Duration // sleepers and retries are queued this long before their wake time (0: none)
}

// ExecutorConfig configures an executor: the reference executor or a user's.
type ExecutorConfig struct {
	Config
	Concurrency   int           // runs executed at once
	Lease         time.Duration // how long a claim lasts without renewal
	ShutdownGrace time.Duration // how long running steps may finish on shutdown
	LocalSleepMax time.Duration // sleeps this short are waited out in process; 0: the SDK's default, <0: none
	// Name is the executor's stable name (sdk.WorkerConfig.Name), the same across its
	// restarts and never shared by two live executors; "": unnamed.
	Name string
	// Limits bound what one run may record (steps, a step's output, its whole state);
	// only those fields are set, the rest take their defaults in the SDK.
	Limits wire.Limits
	// Sandboxes and SandboxEveryRun are sdk.WorkerConfig's: child processes of the
	// executor that run one run each, so that a run which kills its process takes no
	// other down.
	Sandboxes       int
	SandboxEveryRun bool
}

// ForSandbox is the configuration of a sandbox of this executor (sdk.InSandbox): the
// same worker, without what two processes cannot share or need not do twice. It
// serves no HTTP (the address is its executor's), leaves the schema to its executor,
// which migrated it or checked it, and runs one run at a time on a pool to match: two
// sessions, as a named worker's pool needs.
func (c ExecutorConfig) ForSandbox() ExecutorConfig {
	c.HTTPAddr = HTTPOff
	c.Postgres.AutoMigrate = false
	c.Postgres.MaxConns = 2
	return c
}

// DevConfig configures `kagzi dev`: every service in one process.
type DevConfig struct {
	Config
	DataDir string // embedded NATS keeps JetStream under DataDir/nats
	// EmbedNATS is true unless NATS_URL or --nats-url named a server to use instead.
	EmbedNATS     bool
	Concurrency   int
	Lease         time.Duration
	ShutdownGrace time.Duration
	LocalSleepMax time.Duration
	ExecutorName  string      // ExecutorConfig.Name of the embedded executor
	RunLimits     wire.Limits // ExecutorConfig.Limits of the embedded executor
	StaleAfter    time.Duration
	MaxIdle       time.Duration
	WakeLead      time.Duration
	RequestQueue  int
	NamespaceRate int
	MaxDepth      int
	MaxTreeRuns   int
}

// Scheduler is the scheduler's share of a dev configuration.
func (d DevConfig) Scheduler() SchedulerConfig {
	return SchedulerConfig{Config: d.Config, RequestQueue: d.RequestQueue, NamespaceRate: d.NamespaceRate,
		MaxDepth: d.MaxDepth, MaxTreeRuns: d.MaxTreeRuns}
}

// Timer is the timer's share of a dev configuration.
func (d DevConfig) Timer() TimerConfig {
	return TimerConfig{Config: d.Config, StaleAfter: d.StaleAfter, MaxIdle: d.MaxIdle, WakeLead: d.WakeLead}
}

// Executor is the executor's share of a dev configuration.
func (d DevConfig) Executor() ExecutorConfig {
	return ExecutorConfig{Config: d.Config, Concurrency: d.Concurrency, Lease: d.Lease, ShutdownGrace: d.ShutdownGrace,
		LocalSleepMax: d.LocalSleepMax, Name: d.ExecutorName, Limits: d.RunLimits}
}

// MigrateConfig configures `kagzi migrate`.
type MigrateConfig struct {
	URL    string // MIGRATION_DATABASE_URL, else DATABASE_URL
	Action string // "up" (default), "down-all" or "version"
	Yes    bool   // down-all drops every table: it runs only when confirmed
}

// ClientConfig configures the commands that talk to a running Kagzi over NATS.
type ClientConfig struct {
	NATS      bus.ConnOptions
	Namespace string        // empty: wire.DefaultNamespace
	Timeout   time.Duration // bounds the whole command; 0: the command's default
	Args      []string      // positional arguments, flags removed
}

// LoadScheduler reads the scheduler's configuration.
func LoadScheduler(src Source) (SchedulerConfig, error) { return loadScheduler(newBinder(src)) }

func loadScheduler(b *binder) (SchedulerConfig, error) {
	var cfg SchedulerConfig
	b.common(&cfg.Config, "scheduler", DefaultSchedulerHTTPAddr, "json")
	b.scheduler(&cfg.RequestQueue, &cfg.MaxDepth, &cfg.MaxTreeRuns)
	b.namespaceRate(&cfg.NamespaceRate)
	if err := b.finish(); err != nil {
		return SchedulerConfig{}, err
	}
	return cfg, nil
}

// LoadTimer reads the timer's configuration.
func LoadTimer(src Source) (TimerConfig, error) { return loadTimer(newBinder(src)) }

func loadTimer(b *binder) (TimerConfig, error) {
	var cfg TimerConfig
	b.common(&cfg.Config, "timer", DefaultTimerHTTPAddr, "json")
	b.timer(&cfg.StaleAfter, &cfg.MaxIdle, &cfg.WakeLead)
	if err := b.finish(); err != nil {
		return TimerConfig{}, err
	}
	return cfg, nil
}

// LoadExecutor reads an executor's configuration.
func LoadExecutor(src Source) (ExecutorConfig, error) { return loadExecutor(newBinder(src)) }

func loadExecutor(b *binder) (ExecutorConfig, error) {
	var cfg ExecutorConfig
	b.common(&cfg.Config, "executor", DefaultExecutorHTTPAddr, "json")
	b.executor(&cfg.Concurrency, &cfg.Lease, &cfg.ShutdownGrace, &cfg.LocalSleepMax)
	b.executorName(&cfg.Name)
	b.runLimits(&cfg.Limits)
	b.sandboxes(&cfg.Sandboxes, &cfg.SandboxEveryRun)
	if err := b.finish(); err != nil {
		return ExecutorConfig{}, err
	}
	return cfg, nil
}

// LoadDev reads the configuration of `kagzi dev`. It always migrates: a development
// database should follow the binary.
func LoadDev(src Source) (DevConfig, error) { return loadDev(newBinder(src)) }

func loadDev(b *binder) (DevConfig, error) {
	var cfg DevConfig
	b.common(&cfg.Config, "dev", DefaultDevHTTPAddr, "console")
	b.executor(&cfg.Concurrency, &cfg.Lease, &cfg.ShutdownGrace, &cfg.LocalSleepMax)
	b.executorName(&cfg.ExecutorName)
	b.runLimits(&cfg.RunLimits)
	b.timer(&cfg.StaleAfter, &cfg.MaxIdle, &cfg.WakeLead)
	b.scheduler(&cfg.RequestQueue, &cfg.MaxDepth, &cfg.MaxTreeRuns)
	b.namespaceRate(&cfg.NamespaceRate)
	b.str(&cfg.DataDir, "data", "KAGZI_DATA_DIR", ".kagzi", "directory for the embedded NATS server's JetStream data")
	if err := b.finish(); err != nil {
		return DevConfig{}, err
	}
	cfg.Postgres.AutoMigrate = true
	cfg.EmbedNATS = !b.isSet("NATS_URL")
	return cfg, nil
}

// LoadMigrate reads the configuration of `kagzi migrate [up|down-all|version]`.
func LoadMigrate(src Source) (MigrateConfig, error) { return loadMigrate(newBinder(src)) }

func loadMigrate(b *binder) (MigrateConfig, error) {
	var cfg MigrateConfig
	var dbURL, migrationURL string
	b.str(&dbURL, "database-url", "DATABASE_URL", DefaultDatabaseURL, "PostgreSQL URL")
	b.str(&migrationURL, "migration-database-url", "MIGRATION_DATABASE_URL", "", "PostgreSQL URL of a role allowed to run DDL (default: DATABASE_URL)")
	b.fs.BoolVar(&cfg.Yes, "yes", false, "confirm down-all, which drops every Kagzi table and its data")
	b.positional = func(args []string) error {
		switch {
		case len(args) == 0:
			cfg.Action = "up"
		case len(args) > 1:
			return fmt.Errorf("unexpected arguments %q: want one of up, down-all, version", args[1:])
		default:
			cfg.Action = args[0]
		}
		switch cfg.Action {
		case "up", "down-all", "version":
			return nil
		}
		return fmt.Errorf("unknown migrate action %q: want one of up, down-all, version", cfg.Action)
	}
	if err := b.finish(); err != nil {
		return MigrateConfig{}, err
	}
	cfg.URL = dbURL
	if migrationURL != "" {
		cfg.URL = migrationURL
	}
	if err := validateDatabaseURL("database url", cfg.URL); err != nil {
		return MigrateConfig{}, &ConfigError{Errs: []error{err}}
	}
	if cfg.Action == "down-all" && !cfg.Yes {
		return MigrateConfig{}, &ConfigError{Errs: []error{errors.New("down-all drops every Kagzi table and its data: add --yes to confirm")}}
	}
	return cfg, nil
}

// LoadClient reads the configuration of a command that talks to Kagzi over NATS. Flags
// may come before or after the positional arguments; nargs is how many of those the
// command takes, and extra ones are an error.
func LoadClient(src Source, nargs int, extraFlags func(fs *flag.FlagSet)) (ClientConfig, error) {
	return loadClient(newBinder(src), nargs, extraFlags)
}

func loadClient(b *binder, nargs int, extraFlags func(fs *flag.FlagSet)) (ClientConfig, error) {
	var cfg ClientConfig
	b.nats(&cfg.NATS)
	b.str(&cfg.Namespace, "namespace", "KAGZI_NAMESPACE", "", "namespace of the run (default: default)")
	b.check(func() error {
		if cfg.Namespace == "" {
			return nil
		}
		return wire.ValidateName("namespace", cfg.Namespace)
	})
	b.dur(&cfg.Timeout, "timeout", "", 0, "give up after this long (0: 30s, or no limit with --wait)")
	if extraFlags != nil {
		extraFlags(b.fs)
	}
	b.positional = func(args []string) error {
		if len(args) != nargs {
			return fmt.Errorf("want %d argument(s), got %d: %q", nargs, len(args), args)
		}
		cfg.Args = args
		return nil
	}
	if err := b.finish(); err != nil {
		return ClientConfig{}, err
	}
	if cfg.Timeout < 0 {
		return ClientConfig{}, fmt.Errorf("--timeout %s is negative", cfg.Timeout)
	}
	cfg.NATS.Name = "kagzi-cli"
	return cfg, nil
}

// binder registers settings on a flag set with their environment values as defaults, so
// a flag given on the command line wins over the environment, which wins over the
// built-in default. It collects every error instead of stopping at the first, so one run
// tells the user everything that is wrong.
type binder struct {
	fs         *flag.FlagSet
	args       []string
	env        LookupEnv
	errs       []error
	envNames   []string          // every variable read, for the documentation test
	fromEnv    map[string]bool   // variables that gave a value
	flagOf     map[string]string // variable → its flag
	checks     []func() error
	positional func(args []string) error
}

func newBinder(src Source) *binder {
	fs := flag.NewFlagSet(src.Program, flag.ContinueOnError)
	out := src.Output
	if out == nil {
		out = io.Discard
	}
	fs.SetOutput(out)
	env := src.Env
	if env == nil {
		env = func(string) (string, bool) { return "", false }
	}
	b := &binder{fs: fs, args: src.Args, env: env, fromEnv: map[string]bool{}, flagOf: map[string]string{}}
	b.positional = func(args []string) error {
		if len(args) > 0 {
			return fmt.Errorf("unexpected arguments %q", args)
		}
		return nil
	}
	return b
}

// lookup returns the environment value of name, treating an empty value as unset so
// that `FOO= cmd` in a compose file or shell does not replace a default with nothing.
func (b *binder) lookup(name string) (string, bool) {
	if name == "" {
		return "", false
	}
	b.envNames = append(b.envNames, name)
	v, ok := b.env(name)
	if !ok || v == "" {
		return "", false
	}
	b.fromEnv[name] = true
	return v, true
}

func usage(text, envName string) string {
	if envName == "" {
		return text
	}
	return text + " (env " + envName + ")"
}

func (b *binder) str(p *string, flagName, envName, def, text string) {
	*p = def
	if v, ok := b.lookup(envName); ok {
		*p = v
	}
	if flagName != "" {
		b.fs.StringVar(p, flagName, *p, usage(text, envName))
		b.flagOf[envName] = flagName
	}
}

func (b *binder) boolean(p *bool, flagName, envName string, def bool, text string) {
	*p = def
	if v, ok := b.lookup(envName); ok {
		parsed, err := strconv.ParseBool(v)
		if err != nil {
			b.errs = append(b.errs, fmt.Errorf("%s=%q is not a boolean (want true or false)", envName, v))
		} else {
			*p = parsed
		}
	}
	b.fs.BoolVar(p, flagName, *p, usage(text, envName))
	b.flagOf[envName] = flagName
}

func (b *binder) integer(p *int, flagName, envName string, def int, text string) {
	*p = def
	if v, ok := b.lookup(envName); ok {
		parsed, err := strconv.Atoi(v)
		if err != nil {
			b.errs = append(b.errs, fmt.Errorf("%s=%q is not an integer", envName, v))
		} else {
			*p = parsed
		}
	}
	b.fs.IntVar(p, flagName, *p, usage(text, envName))
	b.flagOf[envName] = flagName
}

func (b *binder) dur(p *time.Duration, flagName, envName string, def time.Duration, text string) {
	*p = def
	if v, ok := b.lookup(envName); ok {
		parsed, err := time.ParseDuration(v)
		if err != nil {
			b.errs = append(b.errs, fmt.Errorf("%s=%q is not a duration (e.g. 30s, 5m)", envName, v))
		} else {
			*p = parsed
		}
	}
	b.fs.DurationVar(p, flagName, *p, usage(text, envName))
	b.flagOf[envName] = flagName
}

// check runs after flags are parsed, on the final values.
func (b *binder) check(f func() error) { b.checks = append(b.checks, f) }

// isSet says whether an environment variable or its flag gave a setting a value.
func (b *binder) isSet(envName string) bool {
	if b.fromEnv[envName] {
		return true
	}
	set := false
	b.fs.Visit(func(f *flag.Flag) {
		if f.Name == b.flagOf[envName] {
			set = true
		}
	})
	return set
}

func (b *binder) common(c *Config, service, httpAddr, logFormat string) {
	c.Service = service
	b.postgres(&c.Postgres)
	b.nats(&c.NATS)
	c.NATS.Name = "kagzi-" + service
	c.Postgres.AppName = "kagzi-" + service
	b.str(&c.Namespace, "namespace", "KAGZI_NAMESPACE", wire.DefaultNamespace, "namespace of runs started without one")
	b.str(&c.HTTPAddr, "http-addr", "KAGZI_HTTP_ADDR", httpAddr, `listen address of /healthz, /readyz and /metrics ("off": none)`)
	b.boolean(&c.Pprof, "pprof", "KAGZI_PPROF", false, "also serve Go's profiler at /debug/pprof/ on the HTTP address (keep that address private)")
	b.log(&c.Log, logFormat)
	b.check(func() error { return wire.ValidateName("namespace", c.Namespace) })
	b.check(func() error {
		if c.HTTPAddr == HTTPOff {
			return nil
		}
		if _, port, err := net.SplitHostPort(c.HTTPAddr); err != nil || port == "" {
			return fmt.Errorf("http address %q is not host:port (e.g. :9101, 127.0.0.1:9101) or %q", c.HTTPAddr, HTTPOff)
		}
		return nil
	})
}

func (b *binder) postgres(p *PostgresConfig) {
	var maxConns int
	b.str(&p.URL, "database-url", "DATABASE_URL", DefaultDatabaseURL, "PostgreSQL URL of the runtime role")
	b.str(&p.MigrationURL, "migration-database-url", "MIGRATION_DATABASE_URL", "", "PostgreSQL URL of a role allowed to run DDL (default: DATABASE_URL)")
	b.boolean(&p.AutoMigrate, "auto-migrate", "KAGZI_AUTO_MIGRATE", true, "migrate the schema at start-up (false: only check its version)")
	b.integer(&maxConns, "db-max-conns", "KAGZI_DB_MAX_CONNS", 0, "PostgreSQL pool size (0: 10)")
	b.check(func() error {
		if maxConns < 0 || maxConns > math.MaxInt32 {
			return fmt.Errorf("database pool size %d is out of range (0 to %d)", maxConns, math.MaxInt32)
		}
		p.MaxConns = int32(maxConns)
		if err := validateDatabaseURL("database url", p.URL); err != nil {
			return err
		}
		if p.MigrationURL == "" {
			p.MigrationURL = p.URL
			return nil
		}
		return validateDatabaseURL("migration database url", p.MigrationURL)
	})
}

func validateDatabaseURL(what, u string) error {
	if _, err := pgconn.ParseConfig(u); err != nil {
		// pgconn's message quotes the URL; hide the password it may hold.
		return fmt.Errorf("%s is not a PostgreSQL connection string: %s", what, redactedParseError(err))
	}
	return nil
}

// redactedParseError keeps pgconn's reason but none of the connection string: both
// pgconn's message and net/url's quote it, password included.
func redactedParseError(err error) string {
	inner := errors.Unwrap(err)
	var ue *url.Error
	if errors.As(inner, &ue) {
		inner = ue.Err
	}
	if inner == nil {
		return "malformed"
	}
	return inner.Error()
}

func (b *binder) nats(o *bus.ConnOptions) {
	b.str(&o.URL, "nats-url", "NATS_URL", DefaultNATSURL, "NATS server URL(s), comma-separated")
	b.str(&o.User, "nats-user", "NATS_USER", "", "NATS user name")
	// Secrets are read from the environment only: a command line is visible to every
	// user of the machine through ps.
	b.str(&o.Password, "", "NATS_PASSWORD", "", "")
	b.str(&o.Token, "", "NATS_TOKEN", "", "")
	b.str(&o.NKeySeed, "nats-nkey-seed", "NATS_NKEY_SEED", "", "path of an NKey seed file")
	b.str(&o.CredsFile, "nats-creds", "NATS_CREDS", "", "path of a NATS credentials (JWT) file")
	b.str(&o.TLSCA, "nats-tls-ca", "NATS_TLS_CA", "", "path of a CA bundle to verify the NATS server")
	b.str(&o.TLSCert, "nats-tls-cert", "NATS_TLS_CERT", "", "path of a client certificate for NATS mutual TLS")
	b.str(&o.TLSKey, "nats-tls-key", "NATS_TLS_KEY", "", "path of the client certificate's key")
	b.str(&o.InboxPrefix, "nats-inbox-prefix", "NATS_INBOX_PREFIX", "", "prefix of reply subjects instead of _INBOX")
	b.check(func() error { return validateNATS(*o) })
}

func validateNATS(o bus.ConnOptions) error {
	var errs []error
	for _, s := range strings.Split(o.URL, ",") {
		s = strings.TrimSpace(s)
		u, err := url.Parse(s)
		if err != nil || u.Host == "" {
			errs = append(errs, fmt.Errorf("nats url %q is not a URL (e.g. nats://127.0.0.1:4222)", s))
			continue
		}
		switch u.Scheme {
		case "nats", "tls", "ws", "wss":
		default:
			errs = append(errs, fmt.Errorf("nats url %q has scheme %q, want nats, tls, ws or wss", u.Redacted(), u.Scheme))
		}
	}
	if o.Password != "" && o.User == "" {
		errs = append(errs, errors.New("NATS_PASSWORD is set without NATS_USER"))
	}
	auth := 0
	for _, set := range []bool{o.User != "", o.Token != "", o.NKeySeed != "", o.CredsFile != ""} {
		if set {
			auth++
		}
	}
	if auth > 1 {
		errs = append(errs, errors.New("set at most one NATS authentication: NATS_USER, NATS_TOKEN, NATS_NKEY_SEED or NATS_CREDS"))
	}
	if (o.TLSCert == "") != (o.TLSKey == "") {
		errs = append(errs, errors.New("NATS_TLS_CERT and NATS_TLS_KEY go together: set both or neither"))
	}
	if p := o.InboxPrefix; p != "" && (strings.ContainsAny(p, "*> \t\r\n") || strings.HasPrefix(p, ".") ||
		strings.HasSuffix(p, ".") || strings.Contains(p, "..")) {
		errs = append(errs, fmt.Errorf("NATS_INBOX_PREFIX %q is not a subject prefix (e.g. _INBOX_tenant-a)", p))
	}
	return errors.Join(errs...)
}

func (b *binder) log(l *LogConfig, format string) {
	var level string
	b.str(&level, "log-level", "KAGZI_LOG_LEVEL", "info", "debug, info, warn or error")
	b.str(&l.Format, "log-format", "KAGZI_LOG_FORMAT", format, "json or console")
	b.check(func() error {
		var errs []error
		lvl, err := zapcore.ParseLevel(level)
		if err != nil {
			errs = append(errs, fmt.Errorf("log level %q: want debug, info, warn or error", level))
		}
		l.Level = lvl
		if l.Format != "json" && l.Format != "console" {
			errs = append(errs, fmt.Errorf("log format %q: want json or console", l.Format))
		}
		return errors.Join(errs...)
	})
}

func (b *binder) executorName(name *string) {
	b.str(name, "executor-name", "KAGZI_EXECUTOR_NAME", "",
		"stable name kept across restarts (a pod or unit name): a restarted executor hands back at once what its dead predecessor held")
	b.check(func() error {
		if *name == "" {
			return nil
		}
		return wire.ValidateName("executor", *name)
	})
}

// runLimits binds the limits an executor enforces on what one run records.
func (b *binder) runLimits(l *wire.Limits) {
	d := wire.DefaultLimits()
	b.integer(&l.MaxSteps, "max-steps", "KAGZI_MAX_STEPS", d.MaxSteps,
		"steps (and sleeps) one run may record; the next one fails the run")
	b.integer(&l.MaxStepOutputBytes, "max-step-output", "KAGZI_MAX_STEP_OUTPUT", d.MaxStepOutputBytes,
		"bytes of one step's recorded output; a larger output fails the run")
	b.integer(&l.MaxRunStateBytes, "max-run-state", "KAGZI_MAX_RUN_STATE", d.MaxRunStateBytes,
		"bytes of a run's input and recorded outputs together; a step that would exceed it fails the run")
	b.check(func() error {
		var errs []error
		for _, v := range []struct {
			name string
			n    int
		}{{"max-steps", l.MaxSteps}, {"max-step-output", l.MaxStepOutputBytes}, {"max-run-state", l.MaxRunStateBytes}} {
			if v.n < 1 {
				errs = append(errs, fmt.Errorf("%s %d: want at least 1", v.name, v.n))
			}
		}
		return errors.Join(errs...)
	})
}

// sandboxes binds the executor's sandboxes (sdk.WorkerConfig). Not for `kagzi dev`: a
// sandbox is its program started again, which for dev is every service.
func (b *binder) sandboxes(n *int, everyRun *bool) {
	b.integer(n, "sandboxes", "KAGZI_SANDBOXES", 0,
		"child processes that run, one run each, the runs whose last attempt lapsed (0: none; such runs run alone)")
	b.boolean(everyRun, "sandbox-every-run", "KAGZI_SANDBOX_EVERY_RUN", false,
		"run every run in a sandbox, one per slot of --concurrency: a run that kills its process takes no other down")
	b.check(func() error {
		if *n < 0 {
			return fmt.Errorf("sandboxes %d: want 0 or more", *n)
		}
		return nil
	})
}

func (b *binder) executor(concurrency *int, lease, grace, localSleep *time.Duration) {
	b.integer(concurrency, "concurrency", "KAGZI_CONCURRENCY", 1000, "runs executed at once")
	b.dur(localSleep, "local-sleep-max", "KAGZI_LOCAL_SLEEP_MAX", 0, "sleeps this short are waited out in process (0: min(5s, lease/3); negative: none)")
	b.dur(lease, "lease", "KAGZI_LEASE", 30*time.Second, "how long a claimed run stays ours without renewal")
	b.dur(grace, "shutdown-grace", "KAGZI_SHUTDOWN_GRACE", 25*time.Second, "how long running steps may finish on shutdown")
	b.check(func() error {
		var errs []error
		if *concurrency < 1 {
			errs = append(errs, fmt.Errorf("concurrency %d: want at least 1", *concurrency))
		}
		// A lease shorter than a second would expire between renewals under any load.
		if *lease < time.Second {
			errs = append(errs, fmt.Errorf("lease %s: want at least 1s", *lease))
		}
		if *grace < 0 {
			errs = append(errs, fmt.Errorf("shutdown grace %s is negative", *grace))
		}
		return errors.Join(errs...)
	})
}

func (b *binder) scheduler(requestQueue, maxDepth, maxTreeRuns *int) {
	d := wire.DefaultLimits()
	b.integer(requestQueue, "request-queue", "KAGZI_REQUEST_QUEUE", 256,
		"requests of one namespace that may wait for the scheduler; more are refused as overloaded")
	b.integer(maxDepth, "max-depth", "KAGZI_MAX_DEPTH", d.MaxDepth,
		"deepest a run started from a step may be below its root run; deeper starts are refused")
	b.integer(maxTreeRuns, "max-tree-runs", "KAGZI_MAX_TREE_RUNS", d.MaxTreeRuns,
		"unfinished runs a tree started from steps may hold below its root; more starts are refused")
	b.check(func() error {
		var errs []error
		if *requestQueue < 1 {
			errs = append(errs, fmt.Errorf("request-queue %d: want at least 1", *requestQueue))
		}
		if *maxDepth < 1 {
			errs = append(errs, fmt.Errorf("max-depth %d: want at least 1", *maxDepth))
		}
		if *maxTreeRuns < 1 {
			errs = append(errs, fmt.Errorf("max-tree-runs %d: want at least 1", *maxTreeRuns))
		}
		return errors.Join(errs...)
	})
}

func (b *binder) namespaceRate(rate *int) {
	b.integer(rate, "namespace-rate", "KAGZI_NAMESPACE_RATE", 0,
		"requests a second one namespace may bring to a scheduler (0: no limit); more are refused as overloaded")
	b.check(func() error {
		if *rate < 0 {
			return fmt.Errorf("namespace-rate %d: want 0 (no limit) or more", *rate)
		}
		return nil
	})
}

// maxWakeLead is the timer's bound on its wake lead (timer.MaxWakeLead).
const maxWakeLead = 5 * time.Second

func (b *binder) timer(staleAfter, maxIdle, wakeLead *time.Duration) {
	b.dur(staleAfter, "stale-after", "KAGZI_STALE_AFTER", 30*time.Second, "re-dispatch a QUEUED run unclaimed for this long")
	b.dur(maxIdle, "max-idle", "KAGZI_MAX_IDLE", 20*time.Second, "longest wait between timer sweeps")
	b.dur(wakeLead, "wake-lead", "KAGZI_WAKE_LEAD", 250*time.Millisecond,
		"queue sleepers and retries this long before their wake time; executors hold them until it (0: none)")
	b.check(func() error {
		var errs []error
		if *staleAfter <= 0 {
			errs = append(errs, fmt.Errorf("stale-after %s: want a positive duration", *staleAfter))
		}
		if *maxIdle <= 0 {
			errs = append(errs, fmt.Errorf("max-idle %s: want a positive duration", *maxIdle))
		}
		if *wakeLead < 0 || *wakeLead > maxWakeLead {
			errs = append(errs, fmt.Errorf("wake-lead %s: want 0 (none) to %s", *wakeLead, maxWakeLead))
		}
		return errors.Join(errs...)
	})
}

// finish parses the command line and validates the result. Flags may follow positional
// arguments (`kagzi start greet --wait`), which the flag package alone does not allow.
func (b *binder) finish() error {
	if len(b.errs) > 0 {
		return &ConfigError{Errs: b.errs}
	}
	var positional []string
	args := b.args
	for {
		if err := b.fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return err
			}
			return &ConfigError{Errs: []error{err}}
		}
		rest := b.fs.Args()
		if len(rest) == 0 {
			break
		}
		// After "--" everything is positional, even what looks like a flag.
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			positional = append(positional, rest...)
			break
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
	var errs []error
	if err := b.positional(positional); err != nil {
		errs = append(errs, err)
	}
	for _, c := range b.checks {
		err := c()
		if joined, ok := err.(interface{ Unwrap() []error }); ok {
			errs = append(errs, joined.Unwrap()...)
		} else if err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return &ConfigError{Errs: errs}
	}
	return nil
}

// ConfigError is a bad configuration. Commands exit with code 2 on it.
type ConfigError struct {
	Errs []error
}

func (e *ConfigError) Error() string {
	if len(e.Errs) == 1 {
		return "bad configuration: " + e.Errs[0].Error()
	}
	var sb strings.Builder
	sb.WriteString("bad configuration:")
	for _, err := range e.Errs {
		sb.WriteString("\n  - ")
		sb.WriteString(err.Error())
	}
	return sb.String()
}

func (e *ConfigError) Unwrap() []error { return e.Errs }
