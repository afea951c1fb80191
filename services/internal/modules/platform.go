// Package modules wires Kagzi's services with fx. It is the only package below main that
// imports fx: the logic packages (scheduler, timer, the SDK worker) take plain
// constructor arguments, and each gets one module here of a few provides and one invoke
// that ties its Start and Stop to the app's lifecycle.
//
// A process supplies platform.Config plus the typed config of each service it runs, and
// composes PlatformModule with the service modules:
//
//	fx.New(modules.AppOptions(),
//		fx.Supply(cfg.Config, cfg), // cfg is a platform.TimerConfig
//		modules.PlatformModule, modules.TimerModule)
package modules

import (
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/fx"
	"go.uber.org/fx/fxevent"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/services/internal/platform"
)

// Start and stop budgets of a process. Start-up may migrate the schema, which waits for
// other replicas holding the migration lock. Stopping lets an executor's running steps
// finish for their grace period (25s by default) and then hand their runs back, so the
// stop budget is larger than that; an orchestrator's kill timeout should be larger still.
const (
	StartTimeout = 2 * time.Minute
	StopTimeout  = 45 * time.Second
)

// AppOptions are the app-level options of every Kagzi process: fx's own events go to
// the process logger at debug level, and the start and stop budgets above.
func AppOptions() fx.Option {
	return fx.Options(
		fx.WithLogger(func(log *zap.Logger) fxevent.Logger {
			l := &fxevent.ZapLogger{Logger: log.Named("fx")}
			l.UseLogLevel(zapcore.DebugLevel)
			return l
		}),
		fx.StartTimeout(StartTimeout),
		fx.StopTimeout(StopTimeout),
	)
}

// PlatformModule provides what the services of one process share: the logger, the Prometheus registry, the PostgreSQL pool and store, the
// NATS connection and bus, and the health and metrics server. It needs a platform.Config.
var PlatformModule = fx.Module("platform",
	fx.Provide(
		fx.Annotate(newLogger, fx.ParamTags(``, ``, `optional:"true"`)),
		fx.Annotate(platform.NewRegistry, fx.As(fx.Self()), fx.As(new(prometheus.Registerer))),
		newPostgres,
		newNATS,
		newHTTPServer,
	),
	fx.Invoke(serveHTTP),
)

// LogOutput is where a process logs. It is optional: stderr unless the process supplies
// one (the kagzi command supplies its own stderr, so tests of it capture the logs).
type LogOutput struct{ zapcore.WriteSyncer }

func newLogger(lc fx.Lifecycle, cfg platform.Config, out *LogOutput) (*zap.Logger, error) {
	ws := zapcore.Lock(os.Stderr)
	if out != nil {
		ws = zapcore.Lock(out.WriteSyncer)
	}
	log, err := platform.NewLogger(cfg.Log, ws)
	if err != nil {
		return nil, err
	}
	if cfg.Log.Format == "json" { // a person at a console knows which process it is
		log = log.With(zap.String("service", cfg.Service))
	}
	lc.Append(fx.StopHook(func() {
		_ = log.Sync() // stderr cannot be synced on some systems; nothing is lost
	}))
	return log, nil
}

// newPostgres appends its hook at construction, which is before any component using the
// pool is constructed, so the schema is migrated (or checked) before they start and the
// pool closes after they stop.
func newPostgres(lc fx.Lifecycle, cfg platform.Config, log *zap.Logger) (*pgxpool.Pool, *store.Store, error) {
	pg, err := platform.NewPostgres(cfg.Postgres, log.Named("postgres"))
	if err != nil {
		return nil, nil, err
	}
	lc.Append(platform.Hook("postgres", pg))
	return pg.Pool, store.New(pg.Pool), nil
}

func newNATS(lc fx.Lifecycle, cfg platform.Config, log *zap.Logger) (*nats.Conn, *bus.Bus, error) {
	n, err := platform.NewNATS(cfg.NATS, log.Named("nats"))
	if err != nil {
		return nil, nil, err
	}
	lc.Append(platform.Hook("nats", n))
	return n.Conn, n.Bus, nil
}

// newHTTPServer returns nil when KAGZI_HTTP_ADDR is "off".
func newHTTPServer(cfg platform.Config, reg *prometheus.Registry, log *zap.Logger, pool *pgxpool.Pool, nc *nats.Conn) *platform.HTTPServer {
	if cfg.HTTPAddr == platform.HTTPOff {
		return nil
	}
	s := platform.NewHTTPServer(cfg.HTTPAddr, reg, log.Named("http"),
		platform.PostgresCheck(pool), platform.NATSCheck(nc))
	if cfg.Pprof {
		s.ServeProfiler()
	}
	return s
}

func serveHTTP(lc fx.Lifecycle, s *platform.HTTPServer) {
	if s != nil {
		lc.Append(platform.Hook("http server", s))
	}
}
