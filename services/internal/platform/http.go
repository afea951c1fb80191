package platform

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// NewRegistry returns the process's metrics registry, with Go runtime and process
// metrics. Each process has its own instead of Prometheus's global default, so tests and
// `kagzi dev` never collide on registration.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return reg
}

// ReadyCheck is one dependency /readyz looks at.
type ReadyCheck struct {
	Name  string
	Check func(ctx context.Context) error
}

// HTTPServer serves /healthz, /readyz and /metrics.
//
// /healthz says the process is alive and serving (an orchestrator restarts it when this
// fails); /readyz says its dependencies answer (a load balancer or `make demo` waits for
// it), so a PostgreSQL outage makes replicas unready, not restarted.
type HTTPServer struct {
	addr   string
	mux    *http.ServeMux
	srv    *http.Server
	log    *zap.Logger
	checks []ReadyCheck

	mu   sync.Mutex
	ln   net.Listener
	done chan struct{}
}

// NewHTTPServer builds the server; it listens on Start.
func NewHTTPServer(addr string, reg *prometheus.Registry, log *zap.Logger, checks ...ReadyCheck) *HTTPServer {
	mux := http.NewServeMux()
	s := &HTTPServer{addr: addr, mux: mux, log: log, checks: checks}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", s.readyz)
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		Registry:          reg, // counts scrape errors in the same registry
		EnableOpenMetrics: true,
	}))
	s.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		ErrorLog:          zap.NewStdLog(log.Named("http")),
	}
	return s
}

// ServeProfiler adds Go's profiler under /debug/pprof/ (net/http/pprof's handlers, on
// this server's mux rather than the process-wide default one). Call it before Start.
// A CPU profile or trace streams for as long as asked, and net/http/pprof refuses one
// longer than the write timeout: the timeout becomes profileMax.
func (s *HTTPServer) ServeProfiler() {
	s.srv.WriteTimeout = max(s.srv.WriteTimeout, profileMax)
	s.mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	s.mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	s.mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	s.mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	s.mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
}

// profileMax is the longest CPU profile or trace the profiler serves (less a little).
const profileMax = 5 * time.Minute

// readyz runs every check with a short deadline: a probe that hangs is as bad as a
// failing one, and the prober has its own timeout.
func (s *HTTPServer) readyz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	status := http.StatusOK
	result := make(map[string]string, len(s.checks))
	for _, c := range s.checks {
		if err := c.Check(ctx); err != nil {
			status = http.StatusServiceUnavailable
			result[c.Name] = err.Error()
			continue
		}
		result[c.Name] = "ok"
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(result)
}

// Start listens before returning, so a taken port fails start-up instead of a goroutine.
func (s *HTTPServer) Start(context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln != nil {
		return nil
	}
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", s.addr, err)
	}
	s.ln = ln
	s.done = make(chan struct{})
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("http server stopped", zap.Error(err))
		}
	}()
	s.log.Info("http listening", zap.String("addr", ln.Addr().String()))
	return nil
}

// Stop lets in-flight requests (a scrape) finish for a few seconds, then closes.
func (s *HTTPServer) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil || s.done == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		_ = s.srv.Close()
	}
	<-s.done
	s.done = nil
}

// Addr is the address the server listens on, with the port chosen when it was 0; empty
// before Start.
func (s *HTTPServer) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return ""
	}
	return s.ln.Addr().String()
}
