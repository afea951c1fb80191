package scheduler

import (
	"fmt"
	"testing"
	"time"
)

func TestRateLimiterPerNamespace(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newRateLimiter(10, func() time.Time { return now })
	allowed := func(ns string, n int) int {
		got := 0
		for range n {
			if l.allow(ns) {
				got++
			}
		}
		return got
	}
	// A burst of one second's worth, then nothing until time passes.
	if got := allowed("a", 25); got != 10 {
		t.Fatalf("burst of 25: %d allowed, want 10", got)
	}
	if got := allowed("b", 3); got != 3 {
		t.Fatalf("another namespace: %d of 3 allowed, want 3: buckets are per namespace", got)
	}
	now = now.Add(300 * time.Millisecond)
	if got := allowed("a", 10); got != 3 {
		t.Fatalf("after 300 ms at 10/s: %d allowed, want 3", got)
	}
	now = now.Add(time.Hour)
	if got := allowed("a", 25); got != 10 {
		t.Fatalf("after an hour: %d allowed, want the burst of 10, no more", got)
	}
	if newRateLimiter(0, time.Now) != nil || !(*rateLimiter)(nil).allow("a") {
		t.Fatal("rate 0 must mean no limit")
	}
}

func TestRateLimiterForgetsIdleNamespaces(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newRateLimiter(1, func() time.Time { return now })
	for i := range maxBuckets {
		if !l.allow(fmt.Sprint("ns", i)) {
			t.Fatalf("namespace %d refused", i)
		}
	}
	// Every bucket is in use (empty): a new namespace waits.
	if l.allow("late") {
		t.Fatal("a namespace beyond maxBuckets was tracked while every bucket was in use")
	}
	now = now.Add(2 * time.Second) // all full again: forgotten on the next new namespace
	if !l.allow("late") || len(l.buckets) != 1 {
		t.Fatalf("after the buckets refilled: %d buckets, want only the new one", len(l.buckets))
	}
}
