// Package platform holds what every Kagzi service shares at its edge: configuration from
// the environment and flags, the zap logger, the PostgreSQL pool, the NATS connection and
// the HTTP server for health and Prometheus metrics.
package platform
