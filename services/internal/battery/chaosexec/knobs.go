package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/platform"
)

// knobs are the settings the soak and bomb tests (T20, S05) add to the chaos executor.
type knobs struct {
	namespace string
	// limits sets MaxSteps when KAGZI_MAX_STEPS is set; the SDK fills every zero field
	// with its default (wire.Limits.OrDefaults).
	limits      wire.Limits
	poolConns   int32 // the worker's pool
	effectConns int32 // the oracle's pool
	httpAddr    string
	bombs       bool
	sandboxes   int  // sdk.WorkerConfig.Sandboxes
	everyRun    bool // sdk.WorkerConfig.SandboxEveryRun
}

func readKnobs() (knobs, error) {
	k := knobs{namespace: envOr("KAGZI_NAMESPACE", wire.DefaultNamespace), httpAddr: envOr("KAGZI_HTTP_ADDR", "off"),
		bombs: os.Getenv("KAGZI_BOMBS") == "1", everyRun: os.Getenv("KAGZI_SANDBOX_EVERY_RUN") == "1"}
	if err := wire.ValidateName("namespace", k.namespace); err != nil {
		return k, fmt.Errorf("KAGZI_NAMESPACE: %w", err)
	}
	if v := os.Getenv("KAGZI_MAX_STEPS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return k, fmt.Errorf("KAGZI_MAX_STEPS %q: want a positive integer", v)
		}
		k.limits.MaxSteps = n
	}
	if v := os.Getenv("KAGZI_SANDBOXES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return k, fmt.Errorf("KAGZI_SANDBOXES %q: want a count", v)
		}
		k.sandboxes = n
	}
	for _, c := range []struct {
		env string
		dst *int32
	}{{"KAGZI_DB_MAX_CONNS", &k.poolConns}, {"KAGZI_EFFECTS_MAX_CONNS", &k.effectConns}} {
		n, err := strconv.ParseInt(envOr(c.env, "8"), 10, 32)
		if err != nil || n <= 0 {
			return k, fmt.Errorf("%s: want a positive pool size", c.env)
		}
		*c.dst = int32(n)
	}
	if sdk.InSandbox() {
		// One run at a time: each sandbox's sessions count against the server's limit.
		k.poolConns, k.effectConns, k.httpAddr = 1, 1, "off"
	}
	return k, nil
}

// serveMetrics serves the Go runtime and process metrics (go_goroutines,
// process_resident_memory_bytes) on /metrics, as the services do on KAGZI_HTTP_ADDR;
// "off" serves nothing. The returned func stops the server.
func (k knobs) serveMetrics() (func(), error) {
	if k.httpAddr == "off" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", k.httpAddr)
	if err != nil {
		return nil, fmt.Errorf("KAGZI_HTTP_ADDR: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(platform.NewRegistry(), promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fmt.Fprintln(os.Stderr, "chaosexec: metrics server:", err)
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-done
	}, nil
}
