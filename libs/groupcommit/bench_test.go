package groupcommit_test

import (
	"context"
	"testing"

	"github.com/kagzi/kagzi/libs/groupcommit"
)

// One caller at a time, as on an idle system (S2): what a write pays for the batcher
// beyond its flush.
func BenchmarkDoAlone(b *testing.B) {
	g := groupcommit.New(2, 256, func(_ context.Context, reqs []int) []int { return reqs })
	defer g.Close()
	for b.Loop() {
		g.Do(1)
	}
}

// Many callers at once (S1): batches form while a flush is in flight.
func BenchmarkDoParallel(b *testing.B) {
	g := groupcommit.New(2, 256, func(_ context.Context, reqs []int) []int { return reqs })
	defer g.Close()
	b.SetParallelism(32)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			g.Do(1)
		}
	})
}
