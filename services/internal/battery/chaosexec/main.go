// Command chaosexec is the executor the fault battery runs as a real process (built
// with -tags kagzi_failpoints, so KAGZI_FAILPOINTS arms the SDK's crash points). It hosts
// the chaoswf workflow and, every 100 ms while they change, writes its Worker.Stats into
// test_worker_stats under its pid: the tests read fenced writes and no-op claims there,
// with no port to allocate and nothing lost when the process is later killed.
//
//	DATABASE_URL, NATS_URL, KAGZI_EXECUTOR_NAME (the worker's stable name, kept across
//	restarts: a restarted executor hands back at once what its dead predecessor held),
//	KAGZI_LEASE (2s), KAGZI_CONCURRENCY (8),
//	KAGZI_LOCAL_SLEEP_MAX (the SDK's default; negative: every sleep parks the run),
//	KAGZI_TASK_ACK_WAIT (the task consumer's AckWait; default the bus's, 5s),
//	KAGZI_NAMESPACE (default), KAGZI_MAX_STEPS (the SDK's limit), KAGZI_DB_MAX_CONNS and
//	KAGZI_EFFECTS_MAX_CONNS (8 each: the worker's and the oracle's pools), KAGZI_HTTP_ADDR
//	(off; else Go runtime and process metrics on /metrics), KAGZI_BOMBS (1: also host
//	chaoswf.Bomb, with a client in the executor's namespace), KAGZI_SANDBOXES (0: the
//	worker's Sandboxes; its sandboxes are this program again, and write their effects
//	under their own pids), KAGZI_SANDBOX_EVERY_RUN (1: the worker's SandboxEveryRun)
package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "chaosexec:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	lease, err := time.ParseDuration(envOr("KAGZI_LEASE", "2s"))
	if err != nil {
		return fmt.Errorf("KAGZI_LEASE: %w", err)
	}
	conc, err := strconv.Atoi(envOr("KAGZI_CONCURRENCY", "8"))
	if err != nil {
		return fmt.Errorf("KAGZI_CONCURRENCY: %w", err)
	}
	localSleep, err := time.ParseDuration(envOr("KAGZI_LOCAL_SLEEP_MAX", "0s"))
	if err != nil {
		return fmt.Errorf("KAGZI_LOCAL_SLEEP_MAX: %w", err)
	}
	consumer := bus.DefaultConsumerConfig()
	if v := os.Getenv("KAGZI_TASK_ACK_WAIT"); v != "" {
		if consumer.AckWait, err = time.ParseDuration(v); err != nil || consumer.AckWait <= 0 {
			return fmt.Errorf("KAGZI_TASK_ACK_WAIT %q: want a positive duration (%v)", v, err)
		}
	}
	k, err := readKnobs()
	if err != nil {
		return err
	}
	stopMetrics, err := k.serveMetrics()
	if err != nil {
		return err
	}
	defer stopMetrics()
	pool, err := store.Connect(ctx, os.Getenv("DATABASE_URL"), k.poolConns)
	if err != nil {
		return fmt.Errorf("connect worker pool: %w", err)
	}
	defer pool.Close()
	// The oracle's pool is named apart from the worker's, which takes its application_name
	// from DATABASE_URL: a test that drops the services' connections leaves it alone.
	effects, err := store.Connect(ctx, withAppName(os.Getenv("DATABASE_URL"), oracleAppName), k.effectConns)
	if err != nil {
		return fmt.Errorf("connect effects pool: %w", err)
	}
	defer effects.Close()
	chaoswf.Effects = effects
	nc, err := bus.Connect(bus.ConnOptions{URL: os.Getenv("NATS_URL"), Name: "chaosexec-" + chaoswf.ExecutorName})
	if err != nil {
		return err
	}
	defer nc.Close()
	w, err := sdk.NewWorker(sdk.WorkerConfig{Pool: pool, Conn: nc, Lease: lease, Concurrency: conc,
		RetryBackoff: 100 * time.Millisecond, MaxBackoff: time.Second, ShutdownGrace: time.Second, LocalSleepMax: localSleep,
		Namespace: k.namespace, Limits: k.limits, Name: chaoswf.ExecutorName, Sandboxes: k.sandboxes,
		SandboxEveryRun: k.everyRun, Consumer: consumer,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	if err != nil {
		return fmt.Errorf("new worker: %w", err)
	}
	defs := []sdk.Registration{chaoswf.Workflow}
	if k.bombs {
		chaoswf.Client = sdk.NewClient(nc, sdk.WithNamespace(k.namespace), sdk.WithRequestTimeout(2*time.Second))
		defs = append(defs, chaoswf.Bomb)
	}
	if err := w.Register(defs...); err != nil {
		return fmt.Errorf("register: %w", err)
	}
	if err := w.Start(ctx); err != nil {
		return fmt.Errorf("start worker: %w", err)
	}
	fmt.Fprintf(os.Stderr, "chaosexec ready pid=%d worker=%s\n", os.Getpid(), w.ID())
	statsDone := make(chan struct{})
	go func() { defer close(statsDone); publishStats(ctx, effects, w) }()
	<-ctx.Done()
	err = w.Stop(context.Background())
	<-statsDone
	writeStats(effects, w.Stats()) // the last word, counting what Stop did
	return err
}

const statsSQL = `
INSERT INTO test_worker_stats (pid, executor, claimed, claim_noops, poison, steps_recorded, completed, failed,
    retried, fenced_rejected, lease_lost, released, at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, clock_timestamp())
ON CONFLICT (pid) DO UPDATE SET claimed = $3, claim_noops = $4, poison = $5, steps_recorded = $6,
    completed = $7, failed = $8, retried = $9, fenced_rejected = $10, lease_lost = $11, released = $12,
    at = clock_timestamp()`

func publishStats(ctx context.Context, pool *pgxpool.Pool, w *sdk.Worker) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last sdk.WorkerStats
	first := true
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		s := w.Stats()
		s.InFlight = 0 // changes all the time and no test reads it
		if s == last && !first {
			continue
		}
		if writeStats(pool, s) {
			last, first = s, false
		}
	}
}

func writeStats(pool *pgxpool.Pool, s sdk.WorkerStats) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err := pool.Exec(ctx, statsSQL, os.Getpid(), chaoswf.ExecutorName, s.Claimed, s.ClaimNoops, s.Poison,
		s.StepsRecorded, s.Completed, s.Failed, s.Retried, s.FencedRejected, s.LeaseLost, s.Released)
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaosexec: write stats:", err)
		return false
	}
	return true
}

// oracleAppName is the application_name of the connections that write the oracle tables
// and the worker stats.
const oracleAppName = "battery-oracle"

// withAppName sets a PostgreSQL URL's application_name; a URL it cannot parse is
// returned unchanged, for store.Connect to report.
func withAppName(dbURL, name string) string {
	u, err := url.Parse(dbURL)
	if err != nil {
		return dbURL
	}
	q := u.Query()
	q.Set("application_name", name)
	u.RawQuery = q.Encode()
	return u.String()
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
