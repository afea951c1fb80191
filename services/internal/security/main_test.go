// Package security is the security battery (BATTERY.md b.2) of the gate tier: S01 NATS
// authentication and least privilege under the shipped deploy/nats config, S03 hostile
// identifiers, S04 oversized payloads, S06 PostgreSQL least privilege under the
// shipped deploy/postgres roles and S07 payload encryption at rest; and of the chaos
// tier (-args -kagzi.chaos, see tier_test.go): S08 API authentication and ingress
// flooding. Every test runs
// against real PostgreSQL and real NATS servers (child processes where the shipped
// configuration is under test); the files in deploy/ are used as they ship, never
// copied or rewritten.
package security

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
)

var bins map[string]string

// repoRoot is where deploy/ lives, from this package's directory.
var repoRoot = filepath.Join("..", "..", "..")

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kagzi-security-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins, err = testkit.Build(dir,
		"github.com/kagzi/kagzi/services/scheduler",
		"github.com/kagzi/kagzi/services/timer",
		"github.com/kagzi/kagzi/services/executor",
		"github.com/kagzi/kagzi/services/internal/security/sealedexec",
		"github.com/nats-io/nats-server/v2",
		"github.com/nats-io/nkeys/nk")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func deployFile(t testing.TB, rel string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join(repoRoot, "deploy", rel))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("shipped file missing: %v", err)
	}
	return p
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls cond every 20ms until it holds or d passes.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	end := time.Now().Add(d)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// connectPG opens a small pool, closed when the test ends.
func connectPG(t testing.TB, dbURL string) *pgxpool.Pool {
	t.Helper()
	pool, err := store.Connect(context.Background(), dbURL, 4)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}
