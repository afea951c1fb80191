package chaoswf

import (
	"context"
	"fmt"
	"time"

	"github.com/kagzi/kagzi/libs/sdk"
)

// BombName is the workflow of BATTERY.md S05's workflow bombs. Executors host it only
// when asked to (KAGZI_BOMBS=1), so that the other tests' executors pull no second
// consumer.
const BombName = "battery-bomb"

// The bomb kinds.
const (
	// BombSteps loops N steps, each writing its effect.
	BombSteps = "steps"
	// BombSleep0 loops N Sleep(0)s: each is recorded like a step.
	BombSleep0 = "sleep0"
	// BombRestart loops N steps that each start the run itself again, by the idempotency
	// key it was started with: every start must name the run that is making it.
	BombRestart = "restart"
	// BombFanout starts Fanout children, each a fan-out bomb of Depth-1, from steps
	// (the SDK has no child-workflow API): a tree of Fanout^Depth leaves if nothing
	// bounds it. The client names the starting run as each child's parent, so the
	// scheduler's tree limits (max_depth, max_tree_runs) refuse the starts beyond them.
	BombFanout = "fanout"
)

// BombInput shapes one bomb run.
type BombInput struct {
	Kind string `json:"kind"`
	N    int    `json:"n,omitempty"` // loop bound of steps, sleep0 and restart
	// Key is the idempotency key the run was started with (restart, fanout): a restart
	// reuses it, children derive theirs from it.
	Key    string `json:"key,omitempty"`
	Fanout int    `json:"fanout,omitempty"`
	Depth  int    `json:"depth,omitempty"`
}

// Client starts runs from bomb step bodies, in the executor's namespace; the executor
// sets it before starting its worker.
var Client *sdk.Client

// startTimeout bounds one Start from a step body: the client retries an unanswered
// request until its context ends.
const startTimeout = 30 * time.Second

// ChildKey is the idempotency key of a fan-out run's i-th child, deterministic so that
// a replayed parent names the same children.
func ChildKey(parent string, i int) string { return fmt.Sprintf("%s/%d", parent, i) }

// Bomb is the bombs' workflow. Its output is the number of loop turns it finished,
// which a bomb stopped by a limit never returns.
var Bomb = sdk.Workflow(BombName, func(ctx sdk.Context, in BombInput) (int, error) {
	switch in.Kind {
	case BombSteps:
		for i := range in.N {
			if _, err := sdk.Step(ctx, "step", func(sctx context.Context) (int, error) {
				return i, effect(ctx, sctx)
			}); err != nil {
				return 0, err
			}
		}
		return in.N, nil
	case BombSleep0:
		for range in.N {
			if err := ctx.Sleep("nap", 0); err != nil {
				return 0, err
			}
		}
		return in.N, nil
	case BombRestart:
		for i := range in.N {
			id, err := sdk.Step(ctx, "restart", func(sctx context.Context) (string, error) {
				if err := effect(ctx, sctx); err != nil {
					return "", err
				}
				return start(sctx, in)
			})
			if err != nil {
				return 0, err
			}
			if id != ctx.RunID() {
				return 0, sdk.Terminal(fmt.Errorf("chaoswf: restart %d by key %q made run %s, not this run", i, in.Key, id))
			}
		}
		return in.N, nil
	case BombFanout:
		if in.Depth <= 0 {
			_, err := sdk.Step(ctx, "leaf", func(sctx context.Context) (int, error) { return 0, effect(ctx, sctx) })
			return 0, err
		}
		for i := range in.Fanout {
			child := BombInput{Kind: BombFanout, Key: ChildKey(in.Key, i), Fanout: in.Fanout, Depth: in.Depth - 1}
			if _, err := sdk.Step(ctx, "child", func(sctx context.Context) (string, error) {
				if err := effect(ctx, sctx); err != nil {
					return "", err
				}
				return start(sctx, child)
			}); err != nil {
				return 0, err
			}
		}
		return in.Fanout, nil
	}
	return 0, sdk.Terminal(fmt.Errorf("chaoswf: unknown bomb kind %q", in.Kind))
})

func start(ctx context.Context, in BombInput) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	id, err := Client.StartByName(ctx, BombName, in, sdk.IdempotencyKey(in.Key))
	if err != nil {
		return "", fmt.Errorf("start bomb %q: %w", in.Key, err)
	}
	return id, nil
}
