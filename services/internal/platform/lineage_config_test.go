package platform

import (
	"errors"
	"strings"
	"testing"
)

func TestSchedulerTreeLimits(t *testing.T) {
	cfg, err := LoadScheduler(Source{Env: env()})
	if err != nil || cfg.MaxDepth != 10 || cfg.MaxTreeRuns != 10_000 {
		t.Fatalf("defaults: max depth %d, max tree runs %d, %v; want 10 and 10000", cfg.MaxDepth, cfg.MaxTreeRuns, err)
	}
	cfg, err = LoadScheduler(Source{Env: env("KAGZI_MAX_DEPTH", "3", "KAGZI_MAX_TREE_RUNS", "50")})
	if err != nil || cfg.MaxDepth != 3 || cfg.MaxTreeRuns != 50 {
		t.Fatalf("KAGZI_MAX_DEPTH=3 KAGZI_MAX_TREE_RUNS=50: %d, %d, %v", cfg.MaxDepth, cfg.MaxTreeRuns, err)
	}
	var ce *ConfigError
	for _, kv := range [][2]string{{"KAGZI_MAX_DEPTH", "0"}, {"KAGZI_MAX_TREE_RUNS", "-1"}} {
		_, err := LoadScheduler(Source{Env: env(kv[0], kv[1])})
		if !errors.As(err, &ce) || !strings.Contains(err.Error(), "want at least 1") {
			t.Errorf("%s=%s: %v, want a configuration error", kv[0], kv[1], err)
		}
	}
}
