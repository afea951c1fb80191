package sdk_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// BenchmarkWorkerThroughput measures one worker executing runs of three no-op steps that
// are already QUEUED with their doorbells published: the executor's share of `kagzi bench`
// S1, without the scheduler, in one process so that -cpuprofile covers it.
func BenchmarkWorkerThroughput(b *testing.B) {
	e := newEnv(b)
	noop3 := sdk.Workflow("noop3", func(ctx sdk.Context, in int) (int, error) {
		sum := 0
		for k := range 3 {
			v, err := sdk.Step(ctx, "noop", func(context.Context) (map[string]int, error) { return map[string]int{"i": k}, nil })
			if err != nil {
				return 0, err
			}
			sum += v["i"]
		}
		return sum, nil
	})
	const n = 2000
	ctx := context.Background()
	reqs := make([]store.RunInsertParams, n)
	for i := range reqs {
		reqs[i] = store.RunInsertParams{ID: wire.NewRunID(), Namespace: "default", Workflow: "noop3", Input: []byte(fmt.Sprint(i)), IdempotencyKey: wire.NewRunID()}
	}
	var ds []store.Dispatch
	for _, r := range e.st.RunsInsert(ctx, reqs) {
		if r.Err != nil {
			b.Fatal(r.Err)
		}
		ds = append(ds, r.Dispatch)
	}
	e.publish(ds...)
	b.ResetTimer()
	start := time.Now()
	e.worker(b, []sdk.Registration{noop3}, func(c *sdk.WorkerConfig) { c.Concurrency = 0 }) // the default
	for {
		var done int
		if err := e.pool.QueryRow(ctx, `SELECT count(*) FROM workflow_runs WHERE status = 'COMPLETED'`).Scan(&done); err != nil {
			b.Fatal(err)
		}
		if done == n {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.ReportMetric(float64(n)/time.Since(start).Seconds(), "runs/s")
}
