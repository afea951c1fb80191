package platform

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap/zaptest"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func TestHTTPServer(t *testing.T) {
	t.Parallel()
	reg := NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "kagzi_test_total", Help: "test"})
	reg.MustRegister(c)
	c.Inc()
	var dbErr error
	s := NewHTTPServer("127.0.0.1:0", reg, zaptest.NewLogger(t),
		ReadyCheck{Name: "postgres", Check: func(context.Context) error { return dbErr }},
		ReadyCheck{Name: "nats", Check: func(context.Context) error { return nil }},
	)
	if err := s.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	base := "http://" + s.Addr()

	if code, body := get(t, base+"/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("healthz = %d %q", code, body)
	}
	if code, body := get(t, base+"/readyz"); code != 200 || !strings.Contains(body, `"postgres":"ok"`) {
		t.Errorf("readyz = %d %q", code, body)
	}
	dbErr = errors.New("connection refused")
	if code, body := get(t, base+"/readyz"); code != 503 || !strings.Contains(body, `"postgres":"connection refused"`) || !strings.Contains(body, `"nats":"ok"`) {
		t.Errorf("readyz while down = %d %q", code, body)
	}
	code, body := get(t, base+"/metrics")
	if code != 200 || !strings.Contains(body, "kagzi_test_total 1") || !strings.Contains(body, "go_goroutines") {
		t.Errorf("metrics = %d, missing series:\n%.500s", code, body)
	}

	s.Stop()
	s.Stop() // idempotent
	if _, err := http.Get(base + "/healthz"); err == nil {
		t.Error("server still answers after Stop")
	}
}

func TestHTTPServerPortTaken(t *testing.T) {
	t.Parallel()
	a := NewHTTPServer("127.0.0.1:0", NewRegistry(), zaptest.NewLogger(t))
	if err := a.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer a.Stop()
	b := NewHTTPServer(a.Addr(), NewRegistry(), zaptest.NewLogger(t))
	if err := b.Start(t.Context()); err == nil {
		b.Stop()
		t.Fatal("a second server started on a taken port")
	}
}

// The profiler is served only when asked for: it shows code paths and memory.
func TestHTTPServerProfiler(t *testing.T) {
	t.Parallel()
	plain := NewHTTPServer("127.0.0.1:0", NewRegistry(), zaptest.NewLogger(t))
	profiled := NewHTTPServer("127.0.0.1:0", NewRegistry(), zaptest.NewLogger(t))
	profiled.ServeProfiler()
	for _, s := range []*HTTPServer{plain, profiled} {
		if err := s.Start(t.Context()); err != nil {
			t.Fatal(err)
		}
		defer s.Stop()
	}
	if code, _ := get(t, "http://"+plain.Addr()+"/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("profiler index without ServeProfiler = %d, want 404", code)
	}
	if code, body := get(t, "http://"+profiled.Addr()+"/debug/pprof/"); code != 200 || !strings.Contains(body, "goroutine") {
		t.Errorf("profiler index = %d %.200q", code, body)
	}
	code, body := get(t, "http://"+profiled.Addr()+"/debug/pprof/profile?seconds=1")
	if code != 200 || len(body) == 0 {
		t.Errorf("cpu profile = %d, %d bytes", code, len(body))
	}
	// net/http/pprof refuses a profile longer than the write timeout.
	if plain.srv.WriteTimeout >= profileMax || profiled.srv.WriteTimeout != profileMax {
		t.Errorf("write timeouts %s without the profiler, %s with it; want %s only with it",
			plain.srv.WriteTimeout, profiled.srv.WriteTimeout, profileMax)
	}
}
