package platform

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
)

func TestSlogWritesThroughZap(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	zl, err := NewLogger(LogConfig{Level: zapcore.InfoLevel, Format: "json"}, zapcore.AddSync(&buf))
	if err != nil {
		t.Fatal(err)
	}
	log := NewSlog(zl.Named("sdk"))

	log.Debug("hidden") // below the zap level
	log.With("worker", "w1").WithGroup("run").Info("step done",
		"run_id", "r1", "attempt", 2, "took", time.Second, "err", errors.New("boom"),
		slog.Group("step", "key", "fetch"))
	log.WithGroup("empty").Warn("no attrs")

	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("got %d lines, want 2:\n%s", len(lines), buf.String())
	}
	var first map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &first); err != nil {
		t.Fatal(err)
	}
	if first["msg"] != "step done" || first["level"] != "info" || first["logger"] != "sdk" || first["worker"] != "w1" {
		t.Errorf("line = %v", first)
	}
	if _, ok := first["caller"].(string); !ok || !strings.Contains(first["caller"].(string), "log_test.go") {
		t.Errorf("caller = %v, want this file", first["caller"])
	}
	run, _ := first["run"].(map[string]any)
	if run["run_id"] != "r1" || run["attempt"] != float64(2) || run["took"] != float64(1) || run["err"] != "boom" {
		t.Errorf("run group = %v", run)
	}
	if step, _ := run["step"].(map[string]any); step["key"] != "fetch" {
		t.Errorf("step group = %v", run["step"])
	}
	var second map[string]any
	if err := json.Unmarshal([]byte(lines[1]), &second); err != nil {
		t.Fatal(err)
	}
	if _, ok := second["empty"]; ok || second["level"] != "warn" {
		t.Errorf("an empty group was written: %v", second)
	}
}

func TestConsoleLogger(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	zl, err := NewLogger(LogConfig{Level: zapcore.DebugLevel, Format: "console"}, zapcore.AddSync(&buf))
	if err != nil {
		t.Fatal(err)
	}
	zl.Debug("hello")
	if !strings.Contains(buf.String(), "DEBUG\thello") {
		t.Errorf("console line = %q", buf.String())
	}
	if _, err := NewLogger(LogConfig{Format: "xml"}, zapcore.AddSync(&buf)); err == nil {
		t.Error("format xml accepted")
	}
}
