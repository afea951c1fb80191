package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// freeLoopbackAddr is a loopback address with a port free a moment ago, for a service's
// profiler. Another process could take the port first; the service then fails to start
// and says so, which the bench reports like any start-up failure.
func freeLoopbackAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free port for the profiler: %w", err)
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// profile keeps a scenario's load going (load, called again and again) while it takes a
// CPU profile of each service for ProfileFor, written to ProfileDir as <process>.pprof
// (the processes are named after their scenario). A no-op unless the bench profiles.
func (b *bencher) profile(ctx context.Context, scenario string, load func(context.Context) error, procs ...*proc) error {
	if b.cfg.ProfileDir == "" {
		return nil
	}
	if err := os.MkdirAll(b.cfg.ProfileDir, 0o755); err != nil {
		return fmt.Errorf("profile directory: %w", err)
	}
	secs := max(1, int(b.cfg.ProfileFor.Seconds()))
	b.progress("%s: CPU profiles of %d services over %d s, under the same load", scenario, len(procs), secs)
	lctx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	loadDone := make(chan error, 1)
	go func() {
		for lctx.Err() == nil {
			if err := load(lctx); err != nil && lctx.Err() == nil {
				loadDone <- err
				return
			}
		}
		loadDone <- nil
	}()
	var wg sync.WaitGroup
	errs := make([]error, len(procs))
	for i, p := range procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			path := filepath.Join(b.cfg.ProfileDir, p.name+".pprof")
			errs[i] = fetchCPUProfile(ctx, p.pprof, secs, path)
		}()
	}
	wg.Wait()
	stopLoad()
	errs = append(errs, <-loadDone)
	return errors.Join(errs...)
}

func fetchCPUProfile(ctx context.Context, addr string, secs int, path string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(secs)*time.Second+30*time.Second)
	defer cancel()
	url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", addr, secs)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("cpu profile from %s: %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("cpu profile from %s: %s: %s", addr, resp.Status, body)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}
