package timer

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kagzi/kagzi/services/internal/telemetry"
)

// Metrics are the timer's Prometheus collectors.
type Metrics struct {
	// Redispatched counts runs re-dispatched because they sat QUEUED unclaimed.
	Redispatched prometheus.Counter
	// LeasesExpired counts expired leases by outcome: requeued, failed.
	LeasesExpired *prometheus.CounterVec
	// Woken counts sleepers and retries moved to QUEUED.
	Woken prometheus.Counter
	// Sweeps counts sweep rounds (each runs all three sweeps).
	Sweeps prometheus.Counter
	// Polls counts next-due-time queries: one per MaxIdle on an idle system.
	Polls prometheus.Counter
	// Errors counts failed database calls by operation: next_due, sweep, prune.
	Errors *prometheus.CounterVec
	// WakeLateness is, for each sweep that wakes runs, how late the earliest of them is
	// by the database clock at the moment the timer looked (late on its wake time less
	// Config.WakeLead, when the timer means to wake it).
	WakeLateness prometheus.Histogram
	// EnsureFailures counts failed stream (re)creations.
	EnsureFailures prometheus.Counter
	// PublishFailures counts doorbells not published after a commit; the next reconcile
	// sweep relays them.
	PublishFailures prometheus.Counter
}

// NewMetrics creates the timer's collectors and registers them with reg (nil: not
// registered). Registering twice on one registry reuses the collectors already there.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	return &Metrics{
		Redispatched: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kagzi_reconcile_redispatch_total",
			Help: "Runs re-dispatched by the reconciler because their dispatch went unclaimed.",
		})),
		LeasesExpired: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kagzi_lease_expired_total",
			Help: "Runs whose executor lease expired, by outcome (requeued, failed).",
		}, []string{"outcome"})),
		Woken: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kagzi_runs_woken_total",
			Help: "Sleeping runs and retries moved to QUEUED at their wake time.",
		})),
		Sweeps: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kagzi_timer_sweeps_total",
			Help: "Timer sweep rounds (wake, lease expiry and reconcile).",
		})),
		Polls: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kagzi_timer_polls_total",
			Help: "Queries for the next due time; an idle timer makes one per max idle period.",
		})),
		Errors: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kagzi_timer_errors_total",
			Help: "Failed timer database calls, by operation.",
		}, []string{"op"})),
		WakeLateness: telemetry.Register(reg, prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kagzi_wake_lateness_seconds",
			Help:    "How late the timer woke the earliest due sleeper (on its wake time less the wake lead), by the database clock.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		})),
		EnsureFailures: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kagzi_timer_ensure_failures_total",
			Help: "Failed attempts by the timer to (re)create JetStream streams.",
		})),
		PublishFailures: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kagzi_timer_publish_failures_total",
			Help: "Task doorbells the timer could not publish after a sweep committed.",
		})),
	}
}
