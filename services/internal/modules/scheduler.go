package modules

import (
	"go.uber.org/fx"

	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/platform"
	"github.com/kagzi/kagzi/services/internal/scheduler"
)

// SchedulerModule runs the scheduler: it accepts starts (request-reply and the submit
// stream), commits them and dispatches their first task. It needs PlatformModule and a
// platform.SchedulerConfig.
var SchedulerModule = fx.Module("scheduler",
	fx.Provide(
		schedulerConfig,
		scheduler.NewMetrics,
		scheduler.New,
		fx.Private,
	),
	fx.Invoke(func(lc fx.Lifecycle, s *scheduler.Scheduler) {
		lc.Append(platform.Hook("scheduler", s))
	}),
)

// schedulerConfig leaves the other limits, attempts and consumer tuning at the
// scheduler's own defaults; only what the operator configures is set here.
func schedulerConfig(cfg platform.SchedulerConfig) scheduler.Config {
	return scheduler.Config{RequestQueue: cfg.RequestQueue, NamespaceRate: cfg.NamespaceRate,
		Limits: wire.Limits{MaxDepth: cfg.MaxDepth, MaxTreeRuns: cfg.MaxTreeRuns}}
}
