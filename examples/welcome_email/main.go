// Command welcome_email is the classic durable workflow: send a welcome email, wait,
// send a follow-up. Run a worker in one terminal and trigger runs from another; kill the
// worker while a run waits and start it again: the run goes on where it was.
//
//	go run ./examples/welcome_email worker
//	go run ./examples/welcome_email trigger Ada
//
// WELCOME_DELAY (default 10s) is the wait between the two emails.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"

	"github.com/kagzi/kagzi/libs/sdk"
)

// Signup is the workflow's input.
type Signup struct {
	Name  string        `json:"name"`
	Email string        `json:"email"`
	Delay time.Duration `json:"delay"`
}

// Outcome is its result.
type Outcome struct {
	Sent []string `json:"sent"`
}

// WelcomeEmail sends two emails a delay apart. The delay is a durable sleep: no process
// holds the run while it waits.
var WelcomeEmail = sdk.Workflow("welcome-email", func(ctx sdk.Context, in Signup) (Outcome, error) {
	welcome, err := sdk.Step(ctx, "send-welcome", func(ctx context.Context) (string, error) {
		return sendEmail(ctx, in.Email, "Welcome, "+in.Name+"!")
	})
	if err != nil {
		return Outcome{}, err
	}
	if err := ctx.Sleep("wait-before-follow-up", in.Delay); err != nil {
		return Outcome{}, err
	}
	followUp, err := sdk.Step(ctx, "send-follow-up", func(ctx context.Context) (string, error) {
		return sendEmail(ctx, in.Email, "How is it going, "+in.Name+"?")
	})
	if err != nil {
		return Outcome{}, err
	}
	return Outcome{Sent: []string{welcome, followUp}}, nil
})

// sendEmail stands in for a mail API; the step key is the idempotency key a real
// provider would deduplicate on.
func sendEmail(ctx context.Context, to, subject string) (string, error) {
	fmt.Printf("email to %s: %q (idempotency key %s)\n", to, subject, sdk.StepKey(ctx))
	return subject, nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: welcome_email worker | trigger <name>")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "worker":
		err = runWorker(ctx)
	case "trigger":
		if len(os.Args) < 3 {
			fmt.Fprintln(os.Stderr, "usage: welcome_email trigger <name>")
			os.Exit(2)
		}
		err = trigger(ctx, os.Args[2])
	default:
		fmt.Fprintf(os.Stderr, "unknown mode %q: want worker or trigger\n", os.Args[1])
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "welcome_email:", err)
		os.Exit(1)
	}
}

func runWorker(ctx context.Context) error {
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
	w, err := sdk.NewWorker(sdk.WorkerConfig{Pool: pool, Conn: nc, Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))})
	if err != nil {
		return err
	}
	if err := w.Register(WelcomeEmail); err != nil {
		return err
	}
	if err := w.Start(ctx); err != nil {
		return err
	}
	fmt.Println("worker running; Ctrl-C to stop")
	<-ctx.Done()
	return w.Stop(context.Background())
}

func trigger(ctx context.Context, name string) error {
	nc, err := nats.Connect(env("NATS_URL", nats.DefaultURL))
	if err != nil {
		return fmt.Errorf("connect to nats: %w", err)
	}
	defer nc.Close()
	delay, err := time.ParseDuration(env("WELCOME_DELAY", "10s"))
	if err != nil {
		return fmt.Errorf("WELCOME_DELAY: %w", err)
	}
	in := Signup{Name: name, Email: name + "@example.com", Delay: delay}
	run, err := WelcomeEmail.Start(ctx, sdk.NewClient(nc), in, sdk.IdempotencyKey("signup-"+name))
	if err != nil {
		return err
	}
	fmt.Printf("started run %s for %s; waiting %s for the follow-up\n", run.ID, name, delay)
	out, err := run.Result(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("run %s completed: sent %q\n", run.ID, out.Sent)
	return nil
}

func env(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
