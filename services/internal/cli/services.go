package cli

import (
	"context"

	"github.com/kagzi/kagzi/services/internal/benchwf"
	"github.com/kagzi/kagzi/services/internal/demo"
	"github.com/kagzi/kagzi/services/internal/modules"
	"github.com/kagzi/kagzi/services/internal/platform"
)

// Scheduler runs the scheduler service.
func Scheduler(ctx context.Context, program string, args []string, env Env) int {
	cfg, err := platform.LoadScheduler(env.source(program, args))
	if err != nil {
		return configFailed(env, program, err)
	}
	return runApp(ctx, env, program, modules.Scheduler(cfg))
}

// Timer runs the timer service.
func Timer(ctx context.Context, program string, args []string, env Env) int {
	cfg, err := platform.LoadTimer(env.source(program, args))
	if err != nil {
		return configFailed(env, program, err)
	}
	return runApp(ctx, env, program, modules.Timer(cfg))
}

// Executor runs the reference executor, which hosts the demo workflows and those of
// `kagzi bench` (so the bench measures the executor operators deploy). An executor of
// one's own workflows is the same app with other registrations.
func Executor(ctx context.Context, program string, args []string, env Env) int {
	cfg, err := platform.LoadExecutor(env.source(program, args))
	if err != nil {
		return configFailed(env, program, err)
	}
	return runApp(ctx, env, program, modules.Executor(cfg, append(demo.Workflows(), benchwf.Workflows()...)))
}
