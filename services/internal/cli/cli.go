// Package cli holds the commands of the Kagzi binaries: the services (scheduler, timer,
// executor), `kagzi dev`, `kagzi migrate` and the client commands. The mains only hand
// it their arguments, environment and signals, so `kagzi timer` and the timer binary are
// the same code.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap/zapcore"

	"github.com/kagzi/kagzi/services/internal/modules"
	"github.com/kagzi/kagzi/services/internal/platform"
)

// Exit codes of every command.
const (
	ExitOK      = 0
	ExitFailure = 1 // something failed at run time
	ExitUsage   = 2 // bad configuration or usage; nothing was started
)

// Version is the build's version, set by the Makefile with
// -ldflags "-X github.com/kagzi/kagzi/services/internal/cli.Version=…".
var Version = "dev"

// Env is what a command reads from its process besides its arguments.
type Env struct {
	Lookup platform.LookupEnv
	Stdout io.Writer
	Stderr io.Writer
}

// Command is one command: it returns the process's exit code.
type Command func(ctx context.Context, program string, args []string, env Env) int

// Main runs a command as the whole process: the first SIGINT or SIGTERM cancels ctx and
// the command shuts down cleanly; a second one kills the process at once, for when a
// clean shutdown is stuck.
func Main(program string, cmd Command) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop()
	}()
	os.Exit(cmd(ctx, program, os.Args[1:], Env{Lookup: os.LookupEnv, Stdout: os.Stdout, Stderr: os.Stderr}))
}

func (e Env) source(program string, args []string) platform.Source {
	return platform.Source{Program: program, Args: args, Env: e.Lookup, Output: e.Stderr}
}

// configFailed reports a configuration error and returns the exit code for it: 0 after
// -h (the usage is already printed), 2 otherwise.
func configFailed(env Env, program string, err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return ExitOK
	}
	fmt.Fprintf(env.Stderr, "%s: %v\n", program, err)
	return ExitUsage
}

// runApp starts app, waits for ctx to end and stops it. fx rolls back the hooks that had
// started when a later one fails, so a failed start needs no Stop.
func runApp(ctx context.Context, env Env, program string, opts ...fx.Option) int {
	app := fx.New(fx.Options(opts...), fx.Supply(&modules.LogOutput{WriteSyncer: zapcore.AddSync(env.Stderr)}))
	if err := app.Err(); err != nil {
		fmt.Fprintf(env.Stderr, "%s: %v\n", program, err)
		return ExitFailure
	}
	startCtx, cancel := context.WithTimeout(ctx, app.StartTimeout())
	err := app.Start(startCtx)
	cancel()
	if err != nil {
		fmt.Fprintf(env.Stderr, "%s: %v\n", program, err)
		return ExitFailure
	}
	code := ExitOK
	select {
	case <-ctx.Done():
	case sig := <-app.Wait():
		// A module shut the process down (fx.Shutdowner): a sandbox that could not start.
		if sig.ExitCode != 0 {
			code = ExitFailure
		}
	}
	// Stopping gets its own budget.
	stopCtx, cancel := context.WithTimeout(context.Background(), app.StopTimeout())
	defer cancel()
	if err := app.Stop(stopCtx); err != nil {
		fmt.Fprintf(env.Stderr, "%s: stop: %v\n", program, err)
		return ExitFailure
	}
	return code
}

// Kagzi is the `kagzi` command: a subcommand and its arguments.
func Kagzi(ctx context.Context, program string, args []string, env Env) int {
	if len(args) == 0 {
		usage(env.Stderr, program)
		return ExitUsage
	}
	sub, rest := args[0], args[1:]
	name := program + " " + sub
	switch sub {
	case "dev":
		return Dev(ctx, name, rest, env)
	case "scheduler":
		return Scheduler(ctx, name, rest, env)
	case "timer":
		return Timer(ctx, name, rest, env)
	case "executor":
		return Executor(ctx, name, rest, env)
	case "migrate":
		return Migrate(ctx, name, rest, env)
	case "start":
		return Start(ctx, name, rest, env)
	case "describe":
		return Describe(ctx, name, rest, env)
	case "bench":
		return Bench(ctx, name, rest, env)
	case "version", "--version", "-version":
		fmt.Fprintf(env.Stdout, "kagzi %s (%s %s/%s)\n", Version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return ExitOK
	case "help", "-h", "--help", "-help":
		usage(env.Stdout, program)
		return ExitOK
	default:
		fmt.Fprintf(env.Stderr, "%s: unknown command %q\n\n", program, sub)
		usage(env.Stderr, program)
		return ExitUsage
	}
}

func usage(w io.Writer, program string) {
	fmt.Fprintf(w, `Kagzi: durable workflows for Go over PostgreSQL and NATS JetStream.

Usage:
  %[1]s dev        [flags]                    scheduler, timer and executor in one process, embedded NATS
  %[1]s scheduler  [flags]                    run the scheduler service
  %[1]s timer      [flags]                    run the timer service
  %[1]s executor   [flags]                    run the reference executor (demo workflows)
  %[1]s migrate    [flags] [up|version|down-all --yes]
  %[1]s start      <workflow> [--input JSON] [--key K] [--wait] [flags]
  %[1]s describe   <run-id> [flags]
  %[1]s bench      [--scenarios s1,..,s6] [--n N] [--sleepers N] [--idle D] [--out FILE] [--keep]
  %[1]s version

Run "%[1]s <command> -h" for a command's flags. Every flag has an environment variable;
docs/configuration.md lists them all.
`, program)
}

// clientTimeout is how long a client command waits when no --timeout is given and it is
// not waiting for a run: long enough for a scheduler to restart, short enough that a
// mistyped NATS_URL does not hang a script.
const clientTimeout = 30 * time.Second
