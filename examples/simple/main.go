// Command simple is the smallest complete Kagzi program: it hosts one workflow in an
// in-process worker, starts a run through the scheduler and prints the result.
//
// It needs a running Kagzi (scheduler and timer): `make demo` starts `kagzi dev` and
// runs this, or run `kagzi dev` yourself and then `go run ./examples/simple`.
//
//	DATABASE_URL  default postgres://postgres@127.0.0.1:5432/kagzi?sslmode=disable
//	NATS_URL      default nats://127.0.0.1:4222
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"log/slog"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"

	"github.com/kagzi/kagzi/libs/sdk"
)

// Order is the workflow's input.
type Order struct {
	ID       string  `json:"id"`
	Amount   float64 `json:"amount"`
	Customer string  `json:"customer"`
}

// Receipt is its output.
type Receipt struct {
	OrderID  string `json:"order_id"`
	ChargeID string `json:"charge_id"`
	Message  string `json:"message"`
}

// ProcessOrder validates, charges and confirms an order. Each step is recorded in
// PostgreSQL: if this process dies after "charge", a replay never charges twice.
var ProcessOrder = sdk.Workflow("process-order", func(ctx sdk.Context, o Order) (Receipt, error) {
	if _, err := sdk.Step(ctx, "validate", func(context.Context) (bool, error) {
		if o.Amount <= 0 {
			return false, sdk.Terminal(fmt.Errorf("order %s has amount %.2f", o.ID, o.Amount))
		}
		return true, nil
	}); err != nil {
		return Receipt{}, err
	}
	chargeID, err := sdk.Step(ctx, "charge", func(ctx context.Context) (string, error) {
		// sdk.StepKey(ctx) is stable across retries: hand it to the payment provider as
		// its idempotency key.
		h := fnv.New64a()
		h.Write([]byte(sdk.StepKey(ctx)))
		return fmt.Sprintf("ch_%x", h.Sum64()), nil
	})
	if err != nil {
		return Receipt{}, err
	}
	if err := ctx.Sleep("settle", 500*time.Millisecond); err != nil {
		return Receipt{}, err
	}
	msg, err := sdk.Step(ctx, "confirm", func(context.Context) (string, error) {
		return fmt.Sprintf("%s paid %.2f for order %s", o.Customer, o.Amount, o.ID), nil
	})
	if err != nil {
		return Receipt{}, err
	}
	return Receipt{OrderID: o.ID, ChargeID: chargeID, Message: msg}, nil
})

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "simple:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	pool, err := pgxpool.New(ctx, env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/kagzi?sslmode=disable"))
	if err != nil {
		return fmt.Errorf("connect to postgres: %w", err)
	}
	defer pool.Close()
	nc, err := nats.Connect(env("NATS_URL", nats.DefaultURL))
	if err != nil {
		return fmt.Errorf("connect to nats: %w", err)
	}
	defer nc.Close()

	worker, err := sdk.NewWorker(sdk.WorkerConfig{Pool: pool, Conn: nc,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		return err
	}
	if err := worker.Register(ProcessOrder); err != nil {
		return err
	}
	if err := worker.Start(ctx); err != nil {
		return err
	}
	defer worker.Stop(context.Background()) //nolint:errcheck // best effort at exit

	client := sdk.NewClient(nc)
	order := Order{ID: fmt.Sprintf("ord-%d", time.Now().Unix()), Amount: 42.5, Customer: "Ada"}
	run, err := ProcessOrder.Start(ctx, client, order, sdk.IdempotencyKey(order.ID))
	if err != nil {
		return err
	}
	fmt.Println("started run", run.ID)
	receipt, err := run.Result(ctx)
	if err != nil {
		return err
	}
	out, _ := json.MarshalIndent(receipt, "", "  ")
	fmt.Printf("result:\n%s\n", out)

	info, err := run.Describe(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("status %s after %d attempt(s); steps:", info.Status, info.Attempt)
	for _, s := range info.Steps {
		fmt.Printf(" %s(%s)", s.Key, s.Kind)
	}
	fmt.Println()
	return nil
}

func env(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
