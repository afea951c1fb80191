package cli

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"go.uber.org/fx"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/kagzi/kagzi/libs/embednats"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/services/internal/demo"
	"github.com/kagzi/kagzi/services/internal/modules"
	"github.com/kagzi/kagzi/services/internal/platform"
)

// devNATSPort is where `kagzi dev` puts its NATS server when the port is free, so that
// examples and the CLI find it with their default NATS_URL.
const devNATSPort = 4222

// Dev runs `kagzi dev`: an embedded NATS server (unless NATS_URL names one), the
// database created and migrated, and scheduler, timer and executor in this process.
func Dev(ctx context.Context, program string, args []string, env Env) int {
	cfg, err := platform.LoadDev(env.source(program, args))
	if err != nil {
		return configFailed(env, program, err)
	}
	log, err := platform.NewLogger(cfg.Log, zapcore.AddSync(env.Stderr))
	if err != nil {
		return configFailed(env, program, err)
	}
	log = log.Named("dev")
	defer log.Sync() //nolint:errcheck // stderr cannot always be synced

	if cfg.EmbedNATS {
		ns, err := startDevNATS(cfg.DataDir, log)
		if err != nil {
			fmt.Fprintf(env.Stderr, "%s: %v\n", program, err)
			return ExitFailure
		}
		defer func() {
			ns.Shutdown()
			ns.WaitForShutdown()
		}()
		cfg.NATS.URL = ns.ClientURL()
	}

	prepCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = store.CreateDatabaseIfMissing(prepCtx, cfg.Postgres.URL)
	cancel()
	if err != nil {
		fmt.Fprintf(env.Stderr, "%s: prepare database %s: %v\n(is PostgreSQL running? set DATABASE_URL to point at it)\n",
			program, store.RedactURL(cfg.Postgres.URL), err)
		return ExitFailure
	}

	return runApp(ctx, env, program, modules.Dev(cfg, demo.Workflows()), fx.Invoke(func(lc fx.Lifecycle) {
		// Appended after every service's hook, so it runs once all of them have started.
		lc.Append(fx.StartHook(func() { printDevBanner(env, cfg) }))
	}))
}

func printDevBanner(env Env, cfg platform.DevConfig) {
	health := "off"
	if cfg.HTTPAddr != platform.HTTPOff {
		health = "http://" + loopbackAddr(cfg.HTTPAddr) + "/readyz"
	}
	fmt.Fprintf(env.Stdout, `
kagzi dev is running: scheduler, timer and executor (demo workflows)
  NATS_URL=%s
  DATABASE_URL=%s
  health:  %s
Try:     kagzi start greet --input '{"name":"Ada"}' --wait
Ctrl-C stops.

`, cfg.NATS.URL, store.RedactURL(cfg.Postgres.URL), health)
}

// loopbackAddr turns a listen address into one a browser on this machine can use.
func loopbackAddr(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

// startDevNATS runs the embedded server on 127.0.0.1:4222, or on a free port when 4222
// is taken (a system NATS, another kagzi dev). JetStream fsyncs every write, so a start
// acknowledged by the stream survives a crash of the machine, as in production.
func startDevNATS(dataDir string, log *zap.Logger) (*server.Server, error) {
	storeDir := filepath.Join(dataDir, "nats")
	if err := os.MkdirAll(storeDir, 0o750); err != nil {
		return nil, fmt.Errorf("create nats data directory: %w", err)
	}
	port := devNATSPort
	if !portFree("127.0.0.1", port) {
		log.Info("port 4222 is taken; embedded NATS uses a free port", zap.Int("taken", port))
		port = 0
	}
	ns, err := embednats.Start(embednats.Config{Host: "127.0.0.1", Port: port, StoreDir: storeDir, SyncAlways: true})
	if err != nil {
		return nil, fmt.Errorf("start embedded nats (data in %s): %w", storeDir, err)
	}
	log.Info("embedded nats started", zap.String("url", ns.ClientURL()), zap.String("store_dir", storeDir))
	return ns, nil
}

// portFree tries to listen on the port. It can race with another process taking the
// port in between; the embedded server then fails to start with a clear error.
func portFree(host string, port int) bool {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	if err != nil {
		return false
	}
	_ = ln.Close()
	return true
}
