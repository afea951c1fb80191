package modules

import (
	"go.uber.org/fx"

	"github.com/kagzi/kagzi/services/internal/platform"
	"github.com/kagzi/kagzi/services/internal/timer"
)

// TimerModule runs the timer: it wakes due sleepers and retries, expires lost leases and
// re-dispatches runs whose task message went missing. It needs PlatformModule and a
// platform.TimerConfig.
var TimerModule = fx.Module("timer",
	fx.Provide(
		timerConfig,
		timer.NewMetrics,
		timer.New,
		fx.Private,
	),
	fx.Invoke(func(lc fx.Lifecycle, t *timer.Timer) {
		lc.Append(platform.Hook("timer", t))
	}),
)

// timerConfig sets what the operator configures; batch sizes and the periodic checks
// stay at the timer's own defaults.
func timerConfig(cfg platform.TimerConfig) timer.Config {
	lead := cfg.WakeLead
	if lead == 0 {
		lead = -1 // the operator's 0 is "none"; the timer's zero value is its default
	}
	return timer.Config{StaleAfter: cfg.StaleAfter, MaxIdle: cfg.MaxIdle, WakeLead: lead}
}
