package cli

import (
	"context"

	"github.com/kagzi/kagzi/libs/sdk"
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
	workflows := append(demo.Workflows(), benchwf.Workflows()...)
	if sdk.InSandbox() {
		// A sandbox of an executor (KAGZI_SANDBOXES, KAGZI_SANDBOX_EVERY_RUN): its
		// executor ends it by closing its pipe, not a signal, which a terminal's Ctrl-C
		// sends the whole process group; this process's run finishes or is handed back
		// within the grace its executor gives its own.
		return runApp(context.Background(), env, program, modules.Executor(cfg.ForSandbox(), workflows))
	}
	return runApp(ctx, env, program, modules.Executor(cfg, workflows))
}
