package modules

import (
	"go.uber.org/fx"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/services/internal/platform"
)

// Scheduler is the whole scheduler process: its config, the platform and the scheduler.
func Scheduler(cfg platform.SchedulerConfig) fx.Option {
	return fx.Options(AppOptions(), fx.Supply(cfg.Config, cfg), PlatformModule, SchedulerModule)
}

// Timer is the whole timer process.
func Timer(cfg platform.TimerConfig) fx.Option {
	return fx.Options(AppOptions(), fx.Supply(cfg.Config, cfg), PlatformModule, TimerModule)
}

// Executor is the whole process of an executor hosting workflows.
func Executor(cfg platform.ExecutorConfig, workflows []sdk.Registration) fx.Option {
	return fx.Options(AppOptions(), fx.Supply(cfg.Config, cfg), PlatformModule, ExecutorModule(workflows...))
}

// Dev is every service in one process over one pool, one NATS connection and one HTTP
// server: `kagzi dev`.
func Dev(cfg platform.DevConfig, workflows []sdk.Registration) fx.Option {
	return fx.Options(
		AppOptions(),
		fx.Supply(cfg.Config, cfg.Scheduler(), cfg.Timer(), cfg.Executor()),
		PlatformModule,
		SchedulerModule,
		TimerModule,
		ExecutorModule(workflows...),
	)
}
