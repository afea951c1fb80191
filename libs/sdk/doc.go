// Package sdk is Kagzi's Go SDK: write workflows as plain Go functions, run them in your
// own executor binary, and start them from anywhere.
//
// A workflow is a function of a Context and a typed input. Every Step it takes is
// recorded in PostgreSQL before the workflow moves on, so after a crash, a deploy or a
// Sleep of months the function is replayed and each recorded Step returns its stored
// result instead of running again:
//
//	var Welcome = sdk.Workflow("welcome-email", func(ctx sdk.Context, in Signup) (Result, error) {
//		user, err := sdk.Step(ctx, "fetch-user", func(ctx context.Context) (User, error) {
//			return users.Get(ctx, in.UserID)
//		})
//		if err != nil {
//			return Result{}, err
//		}
//		if err := ctx.Sleep("wait-a-day", 24*time.Hour); err != nil {
//			return Result{}, err
//		}
//		...
//	})
//
// A Worker hosts workflows: it shares a JetStream consumer with every other replica,
// claims runs with a fenced lease and replays them. A Client starts runs through the
// scheduler and waits for their results.
//
// # Determinism
//
// Between steps a workflow must be deterministic: the same input and the same step
// results must lead to the same sequence of step keys. Read the clock, random numbers,
// the network or the disk inside a Step, never outside one. A replay that reaches a
// different key sequence than the recorded one stops the run with ErrNonDeterminism
// instead of diverging silently.
//
// # Guarantees
//
// A recorded step never runs again. A step body runs at least once: it can run twice
// only if its executor died or lost its lease after the body began and before its result
// was committed. StepKey gives each step a stable idempotency key to pass to external
// systems so that such a repeat is harmless.
package sdk
