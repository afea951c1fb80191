package scheduler

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/kagzi/kagzi/services/internal/telemetry"
)

// Metrics are the scheduler's Prometheus collectors.
type Metrics struct {
	// Starts counts start requests by result: created, existing, invalid, too_large,
	// conflict, denied (the body named another namespace than the subject),
	// limit_exceeded (a start from a step beyond the tree's depth or size), overloaded
	// (refused unprocessed: its namespace's queue was full), rate_limited (refused
	// unprocessed: its namespace over its rate), error (the store failed; the caller
	// retries).
	Starts *prometheus.CounterVec
	// Poison counts messages terminated because they can never be processed, by source
	// (submit: the JetStream start stream).
	Poison *prometheus.CounterVec
	// StartSeconds is the time from receiving a start to answering (reply or ack), by
	// source (request, submit).
	StartSeconds *prometheus.HistogramVec
	// Describes counts describe requests by result: ok, pending (submitted, not yet
	// committed), not_found, invalid, denied, overloaded, rate_limited, error.
	Describes *prometheus.CounterVec
	// Queued is how many request-reply requests wait for a worker.
	Queued prometheus.Gauge
	// EnsureFailures counts failed stream or consumer (re)creations: a missing stream is
	// a warning and this metric, never a crash.
	EnsureFailures prometheus.Counter
	// PublishFailures counts task doorbells that could not be published after a commit;
	// the timer's reconciler relays them.
	PublishFailures prometheus.Counter
}

// NewMetrics creates the scheduler's collectors and registers them with reg (nil: not
// registered). Registering twice on one registry reuses the collectors already there, so
// a process running several components on one registry (kagzi dev) does not panic.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	return &Metrics{
		Starts: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kagzi_starts_total",
			Help: "Start requests handled by the scheduler, by result.",
		}, []string{"result"})),
		Poison: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kagzi_poison_message_total",
			Help: "Messages that could never be processed and were terminated, by source.",
		}, []string{"source"})),
		StartSeconds: telemetry.Register(reg, prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kagzi_start_duration_seconds",
			Help:    "Time from receiving a start to answering it (reply or ack), by source.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"source"})),
		Describes: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kagzi_describe_total",
			Help: "Describe requests handled by the scheduler, by result.",
		}, []string{"result"})),
		Queued: telemetry.Register(reg, prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kagzi_scheduler_queued_requests",
			Help: "Request-reply requests (starts and describes) waiting for a scheduler worker.",
		})),
		EnsureFailures: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kagzi_scheduler_ensure_failures_total",
			Help: "Failed attempts by the scheduler to (re)create JetStream streams or its consumer.",
		})),
		PublishFailures: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kagzi_scheduler_publish_failures_total",
			Help: "Task doorbells the scheduler could not publish after committing a start.",
		})),
	}
}
