package sdk_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/clock"
	"github.com/kagzi/kagzi/libs/sdk"
)

// An executor whose clock is minutes off keeps its leases and sleeps no shorter than
// asked: leases and wake times come from the database, and the worker only measures
// intervals between readings of its own clock. A reading compared with a database time
// or with time.Now would make the worker drop its lease (clock ahead) or end a sleep
// minutes early (clock behind).
func TestSkewedClockKeepsLeasesAndSleeps(t *testing.T) {
	t.Parallel()
	for _, off := range []time.Duration{5 * time.Minute, -5 * time.Minute} {
		t.Run(fmt.Sprint(off), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			wf := sdk.Workflow("skewed", func(ctx sdk.Context, _ struct{}) (string, error) {
				// Longer than the lease: only renewals keep the run.
				if _, err := sdk.Step(ctx, "long", func(context.Context) (int, error) {
					time.Sleep(2500 * time.Millisecond)
					return 1, nil
				}); err != nil {
					return "", err
				}
				if err := ctx.Sleep("short", 300*time.Millisecond); err != nil { // waited out in process
					return "", err
				}
				if err := ctx.Sleep("long", time.Second); err != nil { // parked
					return "", err
				}
				return "done", nil
			})
			w := e.worker(t, []sdk.Registration{wf}, func(c *sdk.WorkerConfig) {
				c.Clock, c.LocalSleepMax = clock.Offset(off), 500*time.Millisecond
			})
			run, err := wf.Start(ctxT(t), e.client(), struct{}{})
			if err != nil {
				t.Fatal(err)
			}
			if got, err := run.Result(ctxT(t)); err != nil || got != "done" {
				t.Fatalf("result = %q, %v", got, err)
			}
			// Each sleep ended no earlier than its wake time: the next thing the run did
			// was recorded, or the run finished, after it.
			var early int
			err = e.pool.QueryRow(ctxT(t), `SELECT count(*) FROM step_runs s WHERE s.run_id = $1 AND s.kind = 'sleep'
				AND coalesce((SELECT min(n.created_at) FROM step_runs n WHERE n.run_id = s.run_id AND n.seq > s.seq),
				             (SELECT finished_at FROM workflow_runs WHERE id = s.run_id)) < s.wake_at`, run.ID).Scan(&early)
			if err != nil || early != 0 {
				t.Fatalf("%d sleeps ended before their wake time (%v)", early, err)
			}
			st := w.Stats()
			if st.LeaseLost != 0 || st.FencedRejected != 0 || st.Claimed != 2 {
				t.Fatalf("stats %+v: want 0 leases lost, 0 fenced writes, 2 claims (the parked sleep's wake)", st)
			}
		})
	}
}
