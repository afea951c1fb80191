package timer_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kagzi/kagzi/libs/clock"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/timer"
)

// A timer on a machine whose clock is minutes off still wakes a sleeper at its wake time
// and leaves a live lease alone: it compares nothing with its own clock, only measures
// waits with it. Were a reading of it compared with a database time, the sleeper would
// wake minutes early or late, or the lease would read as long expired.
func TestSkewedClockWakesOnTimeAndKeepsLeases(t *testing.T) {
	t.Parallel()
	for _, off := range []time.Duration{5 * time.Minute, -5 * time.Minute} {
		t.Run(fmt.Sprint(off), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			ctx := context.Background()
			cons := e.taskConsumer(t, "nap")
			held := e.insertRun(t, "busy", 5)
			e.claim(t, held, 30*time.Second)
			// MaxIdle is far longer than the sleep: the hint, translated through the
			// timer's clock, must wake the run (at its wake time: no wake lead).
			e.startTimer(t, timer.Config{MaxIdle: 20 * time.Second, WakeLead: -1, Clock: clock.Offset(off)})

			d := e.insertRun(t, "nap", 5)
			run := e.claim(t, d, time.Minute)
			wakeAt, err := e.st.RunSleep(ctx, store.RunSleepParams{
				FencedParams: run.Fenced(), StepKey: "nap", Seq: 1,
				Duration: 300 * time.Millisecond,
			})
			if err != nil {
				t.Fatal(err)
			}
			e.b.PublishTimerHint(wakeAt)

			task, arrived := nextTask(t, cons, 10*time.Second)
			if task.RunID != d.RunID {
				t.Fatalf("doorbell for run %s, want %s", task.RunID, d.RunID)
			}
			// The database and this test share the machine's (unskewed) clock. The bound
			// tells on time from minutes off, and leaves a loaded machine room (one took
			// 552 ms); how late a wake may be is S3's and T11's to measure.
			if late := arrived.Sub(wakeAt); late < 0 || late > 3*time.Second {
				t.Fatalf("doorbell arrived %v after the wake time, want within [0, 3s]", late)
			}
			info, err := e.st.RunGet(ctx, wire.DefaultNamespace, held.RunID)
			if err != nil {
				t.Fatal(err)
			}
			if info.Status != wire.StatusRunning || info.Attempt != 1 {
				t.Fatalf("held run = %s attempt %d, want RUNNING attempt 1", info.Status, info.Attempt)
			}
			if got := testutil.ToFloat64(e.m.LeasesExpired.WithLabelValues("requeued")); got != 0 {
				t.Fatalf("kagzi_lease_expired_total{outcome=requeued} = %v, want 0", got)
			}
		})
	}
}
