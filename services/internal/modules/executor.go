package modules

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/fx"
	"go.uber.org/zap"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/services/internal/platform"
)

// ExecutorModule runs an SDK worker hosting workflows. The reference executor passes the
// demo workflows; an operator's own executor binary passes its own. It needs
// PlatformModule and a platform.ExecutorConfig.
func ExecutorModule(workflows ...sdk.Registration) fx.Option {
	return fx.Module("executor",
		fx.Provide(
			func(cfg platform.ExecutorConfig, pool *pgxpool.Pool, nc *nats.Conn, log *zap.Logger, reg prometheus.Registerer) (*sdk.Worker, error) {
				w, err := newWorker(cfg, pool, nc, log, workflows)
				if err != nil {
					return nil, err
				}
				if err := registerWorkerMetrics(reg, w); err != nil {
					return nil, err
				}
				return w, nil
			},
			fx.Private,
		),
		fx.Invoke(func(lc fx.Lifecycle, w *sdk.Worker, sd fx.Shutdowner, log *zap.Logger) {
			if sdk.InSandbox() {
				lc.Append(fx.StartHook(func() { go serveSandbox(w, sd, log) }))
				return
			}
			// The worker's Stop takes the stop context itself, so it is a hook as it is.
			lc.Append(fx.Hook{OnStart: w.Start, OnStop: w.Stop})
		}),
	)
}

// serveSandbox is the worker's Start in a sandbox of an executor (sdk.InSandbox). There
// Start serves the runs the executor hands it, ends the process itself when the
// executor stops or dies, and returns only when it cannot begin: it runs beside the
// start hooks, not in one, and a return shuts the process down with a failure. Signals
// do not stop a sandbox (see cli.Executor): its executor does.
func serveSandbox(w *sdk.Worker, sd fx.Shutdowner, log *zap.Logger) {
	err := w.Start(context.Background())
	log.Error("sandbox: the worker's Start returned (it cannot begin, or another namespace is sandboxed); ending the process", zap.Error(err))
	_ = sd.Shutdown(fx.ExitCode(1))
}

func newWorker(cfg platform.ExecutorConfig, pool *pgxpool.Pool, nc *nats.Conn, log *zap.Logger, workflows []sdk.Registration) (*sdk.Worker, error) {
	w, err := sdk.NewWorker(sdk.WorkerConfig{
		Pool:          pool,
		Conn:          nc,
		Namespace:     cfg.Namespace,
		Concurrency:   cfg.Concurrency,
		Lease:         cfg.Lease,
		ShutdownGrace: cfg.ShutdownGrace,
		LocalSleepMax: cfg.LocalSleepMax,
		Name:          cfg.Name,
		Limits:        cfg.Limits,
		Sandboxes:     cfg.Sandboxes,
		Logger:        platform.NewSlog(log.Named("executor")),
		// A sandbox is this binary started again: cli.Executor gives it ForSandbox.
		SandboxEveryRun: cfg.SandboxEveryRun,
		// PlatformModule has already migrated the schema or checked its version.
		SkipSchemaCheck: true,
	})
	if err != nil {
		return nil, fmt.Errorf("create worker: %w", err)
	}
	if err := w.Register(workflows...); err != nil {
		return nil, fmt.Errorf("register workflows: %w", err)
	}
	return w, nil
}

// registerWorkerMetrics exposes the worker's counters. The SDK keeps plain counters so
// that users' executors do not take on Prometheus; the services read them at scrape time.
func registerWorkerMetrics(reg prometheus.Registerer, w *sdk.Worker) error {
	type metric struct {
		name, help string
		value      func(sdk.WorkerStats) int64
	}
	counters := []metric{
		{"runs_claimed_total", "Runs claimed by this executor.", func(s sdk.WorkerStats) int64 { return s.Claimed }},
		{"claim_noops_total", "Task messages that claimed nothing (stale, duplicate or forged).", func(s sdk.WorkerStats) int64 { return s.ClaimNoops }},
		{"poison_messages_total", "Task messages that were not tasks, terminated.", func(s sdk.WorkerStats) int64 { return s.Poison }},
		{"steps_recorded_total", "Step results recorded.", func(s sdk.WorkerStats) int64 { return s.StepsRecorded }},
		{"runs_completed_total", "Runs that ended COMPLETED here.", func(s sdk.WorkerStats) int64 { return s.Completed }},
		{"runs_failed_total", "Runs that ended FAILED here.", func(s sdk.WorkerStats) int64 { return s.Failed }},
		{"runs_retried_total", "Attempts that ended in a durable retry.", func(s sdk.WorkerStats) int64 { return s.Retried }},
		{"fenced_writes_rejected_total", "Writes refused because another executor holds the run.", func(s sdk.WorkerStats) int64 { return s.FencedRejected }},
		{"leases_lost_total", "Runs dropped because their lease was lost.", func(s sdk.WorkerStats) int64 { return s.LeaseLost }},
		{"runs_released_total", "Runs handed back to the queue at shutdown.", func(s sdk.WorkerStats) int64 { return s.Released }},
		{"runs_ran_alone_total", "Attempts run alone after lapses in a row.", func(s sdk.WorkerStats) int64 { return s.RanAlone }},
		{"runs_sandboxed_total", "Attempts run in a sandbox process.", func(s sdk.WorkerStats) int64 { return s.Sandboxed }},
		{"sandboxes_lost_total", "Sandbox processes that died while they ran a run.", func(s sdk.WorkerStats) int64 { return s.SandboxesLost }},
		{"sandboxes_retired_total", "Sandbox processes ended after their run to stop a step body abandoned at its timeout.", func(s sdk.WorkerStats) int64 { return s.SandboxesRetired }},
		{"step_timeouts_total", "Step bodies that did not return within their timeout.", func(s sdk.WorkerStats) int64 { return s.StepTimeouts }},
	}
	gauges := []metric{
		{"runs_in_flight", "Runs executing now.", func(s sdk.WorkerStats) int64 { return s.InFlight }},
		{"step_bodies_abandoned", "Step bodies abandoned at their timeout that still run in this process.", func(s sdk.WorkerStats) int64 { return s.Abandoned }},
	}
	for i, m := range append(counters, gauges...) {
		value := func() float64 { return float64(m.value(w.Stats())) }
		var c prometheus.Collector
		if i >= len(counters) {
			c = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "kagzi", Subsystem: "executor", Name: m.name, Help: m.help}, value)
		} else {
			c = prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "kagzi", Subsystem: "executor", Name: m.name, Help: m.help}, value)
		}
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("register executor metric %s: %w", m.name, err)
		}
	}
	return nil
}
