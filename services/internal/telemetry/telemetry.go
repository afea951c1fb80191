// Package telemetry holds what the services share for logs and metrics: the typed log
// fields every line about a run carries, and registration of Prometheus collectors.
package telemetry

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/kagzi/kagzi/libs/wire"
)

// RunID, Workflow and Namespace are the fields of every log line about a run.
func RunID(id wire.RunID) zap.Field { return zap.String("run_id", id) }

// Workflow names the workflow of a log line.
func Workflow(w string) zap.Field { return zap.String("workflow", w) }

// Namespace names the namespace of a log line.
func Namespace(n string) zap.Field { return zap.String("namespace", n) }

// Register adds c to reg, or returns the identical collector already registered. A
// clashing definition leaves c unregistered instead of panicking: a metric missing from a
// scrape is better than a service that does not start. A nil reg registers nothing.
func Register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if reg == nil {
		return c
	}
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
	}
	return c
}
