package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/platform"
)

// Start runs `kagzi start <workflow> [--input JSON] [--key K] [--wait]`: it prints the
// run id once the scheduler has committed the run and, with --wait, the run's output.
func Start(ctx context.Context, program string, args []string, env Env) int {
	var (
		input       string
		key         string
		maxAttempts int
		wait        bool
	)
	cfg, err := platform.LoadClient(env.source(program, args), 1, func(fs *flag.FlagSet) {
		fs.StringVar(&input, "input", "", "the run's input, JSON (default: null)")
		fs.StringVar(&key, "key", "", "idempotency key: a second start with the same key returns the first run")
		fs.IntVar(&maxAttempts, "max-attempts", 0, "attempts before the run fails (default: the scheduler's)")
		fs.BoolVar(&wait, "wait", false, "wait for the run to finish and print its output")
	})
	if err != nil {
		return configFailed(env, program, err)
	}
	workflow := cfg.Args[0]
	if input != "" && !json.Valid([]byte(input)) {
		return configFailed(env, program, errors.New("--input is not valid JSON"))
	}
	var opts []sdk.StartOption
	if key != "" {
		opts = append(opts, sdk.IdempotencyKey(key))
	}
	if maxAttempts != 0 {
		opts = append(opts, sdk.MaxAttempts(maxAttempts))
	}

	ctx, cancel := clientContext(ctx, cfg, wait)
	defer cancel()
	client, closeConn, err := connectClient(cfg)
	if err != nil {
		fmt.Fprintf(env.Stderr, "%s: %v\n", program, err)
		return ExitFailure
	}
	defer closeConn()

	var in any // nil encodes as null
	if input != "" {
		in = json.RawMessage(input)
	}
	runID, err := client.StartByName(ctx, workflow, in, opts...)
	if err != nil {
		return clientFailed(env, program, cfg, err)
	}
	fmt.Fprintln(env.Stdout, runID)
	if !wait {
		return ExitOK
	}
	info, err := client.Wait(ctx, runID)
	if err != nil {
		return clientFailed(env, program, cfg, err)
	}
	if info.Status != wire.StatusCompleted {
		fmt.Fprintf(env.Stderr, "%s: run %s ended %s: %s\n", program, runID, info.Status, info.Error)
		return ExitFailure
	}
	out := info.Output
	if len(out) == 0 {
		out = json.RawMessage("null")
	}
	fmt.Fprintln(env.Stdout, string(out))
	return ExitOK
}

// Describe runs `kagzi describe <run-id>`: the run and its steps as JSON.
func Describe(ctx context.Context, program string, args []string, env Env) int {
	cfg, err := platform.LoadClient(env.source(program, args), 1, nil)
	if err != nil {
		return configFailed(env, program, err)
	}
	runID := cfg.Args[0]
	if !wire.ValidRunID(runID) {
		return configFailed(env, program, fmt.Errorf("%q is not a run id", runID))
	}
	ctx, cancel := clientContext(ctx, cfg, false)
	defer cancel()
	client, closeConn, err := connectClient(cfg)
	if err != nil {
		fmt.Fprintf(env.Stderr, "%s: %v\n", program, err)
		return ExitFailure
	}
	defer closeConn()
	info, err := client.Describe(ctx, runID)
	if err != nil {
		return clientFailed(env, program, cfg, err)
	}
	enc := json.NewEncoder(env.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(info); err != nil {
		fmt.Fprintf(env.Stderr, "%s: %v\n", program, err)
		return ExitFailure
	}
	return ExitOK
}

func clientContext(ctx context.Context, cfg platform.ClientConfig, waiting bool) (context.Context, context.CancelFunc) {
	timeout := cfg.Timeout
	if timeout == 0 && !waiting {
		timeout = clientTimeout
	}
	if timeout == 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, timeout)
}

func connectClient(cfg platform.ClientConfig) (*sdk.Client, func(), error) {
	nc, err := bus.Connect(cfg.NATS)
	if err != nil {
		return nil, nil, err
	}
	var opts []sdk.ClientOption
	if cfg.Namespace != "" {
		opts = append(opts, sdk.WithNamespace(cfg.Namespace))
	}
	return sdk.NewClient(nc, opts...), nc.Close, nil
}

// clientFailed explains the usual cause of a timeout: nothing is serving the request.
func clientFailed(env Env, program string, cfg platform.ClientConfig, err error) int {
	fmt.Fprintf(env.Stderr, "%s: %v\n", program, err)
	if errors.Is(err, context.DeadlineExceeded) {
		fmt.Fprintf(env.Stderr, "no scheduler answered on %s: is `kagzi dev` or a scheduler running there? (NATS_URL, --timeout)\n", cfg.NATS.URL)
	}
	return ExitFailure
}
