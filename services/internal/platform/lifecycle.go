package platform

import (
	"context"
	"fmt"

	"go.uber.org/fx"
)

// Component is the start/stop contract of every long-lived part of a service.
//
// Start returns once the component is running. Its ctx bounds start-up only: fx cancels
// it as soon as the whole app has started, so a component must not keep it for its
// goroutines. Stop is idempotent and returns after every goroutine has ended.
type Component interface {
	Start(ctx context.Context) error
	Stop()
}

// Hook turns a Component into an fx lifecycle hook, so the logic packages stay free of fx.
//
// Stop runs in its own goroutine: a component that does not stop within fx's stop timeout
// makes app.Stop return an error naming it instead of hanging the process. The goroutine
// is then left behind, which is acceptable only because the process is exiting.
func Hook(name string, c Component) fx.Hook {
	return fx.Hook{
		OnStart: func(ctx context.Context) error {
			if err := c.Start(ctx); err != nil {
				return fmt.Errorf("start %s: %w", name, err)
			}
			return nil
		},
		OnStop: func(ctx context.Context) error {
			done := make(chan struct{})
			go func() {
				defer close(done)
				c.Stop()
			}()
			select {
			case <-done:
				return nil
			case <-ctx.Done():
				return fmt.Errorf("stop %s: %w", name, ctx.Err())
			}
		},
	}
}
