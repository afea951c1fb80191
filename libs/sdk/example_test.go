package sdk_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"

	"github.com/kagzi/kagzi/libs/embednats"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
)

// exampleEnv is the PostgreSQL database and NATS server the examples run against: real
// ones, made in TestMain, so every example's Output is what Kagzi really does.
var exampleEnv *env

func TestMain(m *testing.M) {
	if _, ok := os.LookupEnv("KAGZI_SANDBOX"); ok {
		os.Exit(sandboxMain()) // this process is a sandbox of a test's worker
	}
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dbURL, err := testkit.CreateDatabase(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer testkit.DropDatabase(context.Background(), dbURL) //nolint:errcheck // best effort
	dir, err := os.MkdirTemp("", "kagzi-sdk-examples-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	ns, err := embednats.Start(embednats.Config{StoreDir: dir})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer ns.Shutdown()
	e, stop, err := setupEnv(dbURL, ns.ClientURL(), "examples")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer stop()
	exampleEnv = e
	return m.Run()
}

// startExampleWorker hosts workflows for an example; examples show the wiring itself in
// ExampleNewWorker.
func startExampleWorker(defs ...sdk.Registration) *sdk.Worker {
	w, err := sdk.NewWorker(sdk.WorkerConfig{Pool: exampleEnv.pool, Conn: exampleEnv.nc, RetryBackoff: 10 * time.Millisecond})
	if err != nil {
		panic(err)
	}
	if err := w.Register(defs...); err != nil {
		panic(err)
	}
	if err := w.Start(context.Background()); err != nil {
		panic(err)
	}
	return w
}

func ExampleWorkflow() {
	greet := sdk.Workflow("example-greet", func(ctx sdk.Context, name string) (string, error) {
		return sdk.Step(ctx, "compose", func(context.Context) (string, error) {
			return "Hello, " + name + "!", nil
		})
	})
	worker := startExampleWorker(greet)
	defer worker.Stop(context.Background())

	ctx := context.Background()
	client := sdk.NewClient(exampleEnv.nc)
	run, err := greet.Start(ctx, client, "Ada")
	if err != nil {
		fmt.Println(err)
		return
	}
	out, err := run.Result(ctx)
	fmt.Println(out, err)
	// Output: Hello, Ada! <nil>
}

func ExampleNewWorker() {
	// pool is a *pgxpool.Pool and nc a *nats.Conn, opened by the program.
	pool, nc := exampleEnv.pool, exampleEnv.nc

	double := sdk.Workflow("example-double", func(ctx sdk.Context, n int) (int, error) {
		return sdk.Step(ctx, "double", func(context.Context) (int, error) { return 2 * n, nil })
	})
	worker, err := sdk.NewWorker(sdk.WorkerConfig{Pool: pool, Conn: nc, Concurrency: 16, Lease: 10 * time.Second})
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := worker.Register(double); err != nil {
		fmt.Println(err)
		return
	}
	if err := worker.Start(context.Background()); err != nil {
		fmt.Println(err)
		return
	}
	defer worker.Stop(context.Background()) // hands unfinished runs back to the queue

	run, _ := double.Start(context.Background(), sdk.NewClient(nc), 21)
	n, _ := run.Result(context.Background())
	fmt.Println(n)
	// Output: 42
}

func ExampleStep() {
	// A step taken in a loop gets a stable key per occurrence: "charge", "charge#2", …
	payAll := sdk.Workflow("example-pay-all", func(ctx sdk.Context, amounts []int) (int, error) {
		total := 0
		for _, a := range amounts {
			paid, err := sdk.Step(ctx, "charge", func(context.Context) (int, error) { return a, nil })
			if err != nil {
				return 0, err
			}
			total += paid
		}
		return total, nil
	})
	worker := startExampleWorker(payAll)
	defer worker.Stop(context.Background())

	ctx := context.Background()
	run, _ := payAll.Start(ctx, sdk.NewClient(exampleEnv.nc), []int{5, 7, 9})
	total, _ := run.Result(ctx)
	info, _ := run.Describe(ctx)
	fmt.Println(total)
	for _, s := range info.Steps {
		fmt.Println(s.Key, string(s.Output))
	}
	// Output:
	// 21
	// charge 5
	// charge#2 7
	// charge#3 9
}

func ExampleContext_sleep() {
	remind := sdk.Workflow("example-remind", func(ctx sdk.Context, who string) (string, error) {
		// The run is parked in PostgreSQL while it sleeps; no executor holds it.
		if err := ctx.Sleep("wait", 200*time.Millisecond); err != nil {
			return "", err
		}
		return sdk.Step(ctx, "remind", func(context.Context) (string, error) { return "reminded " + who, nil })
	})
	worker := startExampleWorker(remind)
	defer worker.Stop(context.Background())

	ctx := context.Background()
	run, _ := remind.Start(ctx, sdk.NewClient(exampleEnv.nc), "Grace")
	out, _ := run.Result(ctx)
	info, _ := run.Describe(ctx)
	fmt.Println(out)
	fmt.Println(info.Steps[0].Kind, info.Steps[0].Key)
	// Output:
	// reminded Grace
	// sleep wait
}

func ExampleIdempotencyKey() {
	wf := sdk.Workflow("example-signup", func(ctx sdk.Context, email string) (string, error) { return email, nil })
	ctx := context.Background()
	client := sdk.NewClient(exampleEnv.nc)

	first, _ := wf.Start(ctx, client, "ada@example.com", sdk.IdempotencyKey("signup-ada"))
	again, _ := wf.Start(ctx, client, "ada@example.com", sdk.IdempotencyKey("signup-ada"))
	_, err := wf.Start(ctx, client, "eve@example.com", sdk.IdempotencyKey("signup-ada"))
	fmt.Println(first.ID == again.ID)
	fmt.Println(errors.Is(err, sdk.ErrIdempotencyConflict))
	// Output:
	// true
	// true
}

func ExampleTerminal() {
	charge := sdk.Workflow("example-charge", func(ctx sdk.Context, card string) (string, error) {
		if card == "expired" {
			return "", sdk.Terminal(errors.New("card expired")) // no retry can fix this
		}
		return "charged", nil
	})
	worker := startExampleWorker(charge)
	defer worker.Stop(context.Background())

	ctx := context.Background()
	run, _ := charge.Start(ctx, sdk.NewClient(exampleEnv.nc), "expired")
	_, err := run.Result(ctx)
	var failed *sdk.RunFailedError
	if errors.As(err, &failed) {
		fmt.Println(failed.Status, failed.Attempt, failed.Message)
	}
	// Output: FAILED 1 card expired
}

// An executor with sandboxes (WorkerConfig.Sandboxes) runs a run whose last attempt
// lapsed in a child process: its own program, started again. The program's main reaches
// Start there too, and may size itself for one run at a time; what two processes
// cannot share, such as a listening port, it does only outside a sandbox. (Not run:
// it would connect to the servers its environment names.)
func ExampleInSandbox() {
	ctx := context.Background()
	pcfg, err := pgxpool.ParseConfig(os.Getenv("DATABASE_URL"))
	if err != nil {
		fmt.Println(err)
		return
	}
	pcfg.MaxConns = 16
	if sdk.InSandbox() {
		pcfg.MaxConns = 2 // a sandbox runs one run at a time
	}
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		fmt.Println(err)
		return
	}
	nc, err := nats.Connect(os.Getenv("NATS_URL"))
	if err != nil {
		fmt.Println(err)
		return
	}
	worker, err := sdk.NewWorker(sdk.WorkerConfig{Pool: pool, Conn: nc, Name: "exec-1", Sandboxes: 4})
	if err != nil {
		fmt.Println(err)
		return
	}
	double := sdk.Workflow("example-double", func(ctx sdk.Context, n int) (int, error) {
		return sdk.Step(ctx, "double", func(context.Context) (int, error) { return 2 * n, nil })
	})
	if err := worker.Register(double); err != nil {
		fmt.Println(err)
		return
	}
	// In a sandbox, Start serves the runs its executor hands it, and never returns.
	if err := worker.Start(ctx); err != nil {
		fmt.Println(err)
		return
	}
	// Only the executor gets here: serve metrics, wait for a signal, then worker.Stop.
}
