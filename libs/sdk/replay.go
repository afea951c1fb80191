package sdk

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// Replay runs a workflow against a recorded history (a run as Describe returns it)
// without a database, a broker or a worker: every step comes back from the history and
// no step body runs. Use it in tests to prove that a code change still replays the runs
// already in flight (keep their histories as fixtures).
//
// It returns nil when the workflow reaches the end of the history in step (a run still
// in flight) or finishes having consumed all of it, and an error wrapping
// ErrNonDeterminism when it reaches another step sequence than the recorded one.
// Pass the codec the workers use when the history holds sealed payloads.
func Replay(def Registration, history *RunInfo, codec Codec) (err error) {
	if history == nil {
		return wire.Errorf(wire.ErrInvalidArgument, "replay %s: no history", def.Name())
	}
	w := &Worker{pl: payloads{codec: codec}}
	w.cfg.Limits = wire.DefaultLimits()
	run := store.ClaimedRun{ID: history.ID, Namespace: history.Namespace, Workflow: history.Workflow,
		Input: history.Input, Attempt: max(history.Attempt, 1), DBNow: time.Now().Add(100 * 365 * 24 * time.Hour)}
	for _, st := range history.Steps {
		run.Steps = append(run.Steps, store.Step{Key: st.Key, Seq: st.Seq, Kind: st.Kind, Status: st.Status,
			Output: st.Output, Error: st.Error, WakeAt: st.WakeAt, CreatedAt: st.CreatedAt})
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rc := &runContext{Context: ctx, w: w, run: run, def: def, cancel: cancel, replayOnly: true,
		log: slog.New(slog.DiscardHandler), seen: map[string]int{}}
	_, u, werr := w.invoke(rc)
	switch {
	case u != nil && u.reason == unwindHistoryEnd:
		return nil
	case u != nil && u.reason == unwindTerminal:
		return fmt.Errorf("replay %s run %s: %w", def.Name(), history.ID, u.err)
	case u != nil:
		return fmt.Errorf("replay %s run %s: unexpected stop", def.Name(), history.ID)
	case werr != nil && IsTerminal(werr) && history.Status != wire.StatusFailed:
		return fmt.Errorf("replay %s run %s: %w", def.Name(), history.ID, werr)
	}
	if rc.seq < len(run.Steps) {
		return wire.Errorf(wire.ErrNonDeterminism, "replay %s run %s: the workflow finished after %d steps but the history has %d",
			def.Name(), history.ID, rc.seq, len(run.Steps))
	}
	return nil
}
