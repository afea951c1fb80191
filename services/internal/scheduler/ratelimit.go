package scheduler

import (
	"sync"
	"time"
)

// rateLimiter bounds the request-reply requests each namespace may bring to this
// scheduler per second: a token bucket per namespace, filled at rate and holding at most
// one second's worth. The queue bound (admission) alone keeps a flooding namespace from
// delaying others in the queue, but not from taking every worker, the database and the
// broker with the requests it does get in; on a machine without spare capacity that
// slows every other namespace's requests too. A rate caps what one namespace's
// requests can cost, so the others keep their latency (BATTERY.md S08).
//
// Like admission it keys on the subject's namespace token before anything is decoded.
// Buckets that are full again are forgotten when the map grows, so tokens sprayed by a
// client allowed every namespace cost memory only while they are in use.
type rateLimiter struct {
	rate, burst float64 // tokens a second, bucket size
	now         func() time.Time

	mu      sync.Mutex
	buckets map[string]*bucket
}

type bucket struct {
	tokens float64
	at     time.Time // when tokens was last brought up to date
}

// maxBuckets bounds the namespaces tracked at once; past it, full buckets are dropped,
// and while none is, a new namespace is refused.
const maxBuckets = 4096

// newRateLimiter returns a limiter of rate requests a second per namespace; nil when
// rate is 0 (no limit).
func newRateLimiter(rate int, now func() time.Time) *rateLimiter {
	if rate <= 0 {
		return nil
	}
	return &rateLimiter{rate: float64(rate), burst: float64(rate), now: now, buckets: map[string]*bucket{}}
}

// allow takes a token of namespace ns; false: the namespace is over its rate.
func (l *rateLimiter) allow(ns string) bool {
	if l == nil {
		return true
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[ns]
	if b == nil {
		if len(l.buckets) >= maxBuckets && !l.forgetFull(now) {
			return false
		}
		b = &bucket{tokens: l.burst, at: now}
		l.buckets[ns] = b
	}
	if el := now.Sub(b.at); el > 0 {
		b.tokens = min(l.burst, b.tokens+el.Seconds()*l.rate)
		b.at = now
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// forgetFull drops the buckets that have refilled (a full bucket is what a new one
// would be) and reports whether that made room.
func (l *rateLimiter) forgetFull(now time.Time) bool {
	for ns, b := range l.buckets {
		if b.tokens+now.Sub(b.at).Seconds()*l.rate >= l.burst {
			delete(l.buckets, ns)
		}
	}
	return len(l.buckets) < maxBuckets
}
