package store_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

// The executor's hot path, statement by statement, single and in batches of 64 (what
// group commit produces under load). Compare two runs with benchstat; a regression in a
// query plan shows here before it shows in `kagzi bench`.

func benchStore(b *testing.B) *store.Store {
	b.Helper()
	pool, err := store.Connect(context.Background(), testkit.NewDatabase(b), 8)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(pool.Close)
	return store.New(pool)
}

func seedQueued(b *testing.B, s *store.Store, n int) []store.ClaimRequest {
	b.Helper()
	reqs := make([]store.ClaimRequest, n)
	for i := range reqs {
		res, err := s.RunInsert(context.Background(), store.RunInsertParams{ID: wire.NewRunID(), Namespace: "default",
			Workflow: "wf", Input: []byte(`{"i":1}`), IdempotencyKey: wire.NewRunID()})
		if err != nil {
			b.Fatal(err)
		}
		reqs[i] = store.ClaimRequest{RunID: res.RunID, DispatchSeq: res.DispatchSeq, Workflow: "wf"}
	}
	return reqs
}

func BenchmarkRunInsert(b *testing.B) {
	s := benchStore(b)
	ctx := context.Background()
	b.ResetTimer()
	for b.Loop() {
		if _, err := s.RunInsert(ctx, store.RunInsertParams{ID: wire.NewRunID(), Namespace: "default", Workflow: "wf",
			Input: []byte(`{"i":1}`), IdempotencyKey: wire.NewRunID()}); err != nil {
			b.Fatal(err)
		}
	}
}

func benchClaim(b *testing.B, batch int) {
	s := benchStore(b)
	ctx := context.Background()
	b.ResetTimer()
	b.StopTimer()
	for range b.N {
		reqs := seedQueued(b, s, batch)
		b.StartTimer()
		for _, r := range s.RunsClaim(ctx, "default", "bench", time.Minute, reqs) {
			if !r.OK || r.Err != nil {
				b.Fatalf("claim: %+v", r)
			}
		}
		b.StopTimer()
	}
	b.ReportMetric(float64(batch), "runs/op")
}

func BenchmarkRunsClaim1(b *testing.B)  { benchClaim(b, 1) }
func BenchmarkRunsClaim64(b *testing.B) { benchClaim(b, 64) }

func benchSteps(b *testing.B, batch int) {
	s := benchStore(b)
	ctx := context.Background()
	var held []store.FencedParams
	for _, r := range s.RunsClaim(ctx, "default", "bench", time.Hour, seedQueued(b, s, batch)) {
		held = append(held, r.Run.Fenced())
	}
	seq := 0
	b.ResetTimer()
	for b.Loop() {
		ps := make([]store.StepInsertParams, batch)
		for i, h := range held {
			ps[i] = store.StepInsertParams{FencedParams: h, Key: fmt.Sprint("step#", seq), Seq: seq, Kind: wire.StepKindStep, Output: []byte(`{"i":1}`)}
		}
		for _, err := range s.StepsInsert(ctx, ps) {
			if err != nil {
				b.Fatal(err)
			}
		}
		seq++
	}
	b.ReportMetric(float64(batch), "steps/op")
}

func BenchmarkStepsInsert1(b *testing.B)  { benchSteps(b, 1) }
func BenchmarkStepsInsert64(b *testing.B) { benchSteps(b, 64) }

// benchComplete measures completions; withStep: each carries the run's last step.
func benchComplete(b *testing.B, batch int, withStep bool) {
	s := benchStore(b)
	ctx := context.Background()
	b.ResetTimer()
	b.StopTimer()
	for range b.N {
		var reqs []store.CompleteRequest
		for _, r := range s.RunsClaim(ctx, "default", "bench", time.Hour, seedQueued(b, s, batch)) {
			req := store.CompleteRequest{FencedParams: r.Run.Fenced(), Output: []byte(`3`)}
			if withStep {
				req.Step = &store.StepInsertParams{Key: "last", Kind: wire.StepKindStep, Output: []byte(`{"i":3}`)}
			}
			reqs = append(reqs, req)
		}
		b.StartTimer()
		for _, err := range s.RunsComplete(ctx, reqs) {
			if err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
	}
	b.ReportMetric(float64(batch), "runs/op")
}

func BenchmarkRunsComplete1(b *testing.B)          { benchComplete(b, 1, false) }
func BenchmarkRunsComplete64(b *testing.B)         { benchComplete(b, 64, false) }
func BenchmarkRunsCompleteLastStep1(b *testing.B)  { benchComplete(b, 1, true) }
func BenchmarkRunsCompleteLastStep64(b *testing.B) { benchComplete(b, 64, true) }
