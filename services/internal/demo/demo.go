// Package demo holds the workflows the reference executor (services/executor, and
// `kagzi dev`) hosts out of the box, so a new system can run something before any user
// code is deployed: `kagzi start greet --input '{"name":"Ada"}' --wait`.
package demo

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/kagzi/kagzi/libs/sdk"
)

// GreetInput is the input of the greet workflow.
type GreetInput struct {
	Name string `json:"name"`
}

// GreetOutput is its result.
type GreetOutput struct {
	Greeting string `json:"greeting"`
	Steps    int    `json:"steps"`
}

// Greet takes three steps around a one-second durable sleep.
var Greet = sdk.Workflow("greet", func(ctx sdk.Context, in GreetInput) (GreetOutput, error) {
	name, err := sdk.Step(ctx, "normalise-name", func(context.Context) (string, error) {
		n := strings.TrimSpace(in.Name)
		if n == "" {
			n = "world"
		}
		return n, nil
	})
	if err != nil {
		return GreetOutput{}, err
	}
	greeting, err := sdk.Step(ctx, "compose", func(context.Context) (string, error) {
		return fmt.Sprintf("Hello, %s!", name), nil
	})
	if err != nil {
		return GreetOutput{}, err
	}
	if err := ctx.Sleep("pause", time.Second); err != nil {
		return GreetOutput{}, err
	}
	signed, err := sdk.Step(ctx, "sign", func(context.Context) (string, error) {
		return greeting + " — Kagzi", nil
	})
	if err != nil {
		return GreetOutput{}, err
	}
	return GreetOutput{Greeting: signed, Steps: 3}, nil
})

// Workflows lists what the reference executor registers.
func Workflows() []sdk.Registration {
	return []sdk.Registration{Greet}
}
