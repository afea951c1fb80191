package testkit_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
)

// A private server comes up migrated with the settings asked for, and a crash (stop -m
// immediate) loses no committed row: the next start recovers it from the WAL, fsynced at
// commit.
func TestPostgresCrashKeepsCommits(t *testing.T) {
	pg := testkit.StartPostgres(t, "max_connections=40")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, pg.URL())
	if err != nil {
		t.Fatal(err)
	}
	var maxConns, fsync string
	if err := conn.QueryRow(ctx, `SELECT current_setting('max_connections'), current_setting('fsync')`).Scan(&maxConns, &fsync); err != nil {
		t.Fatal(err)
	}
	if maxConns != "40" || fsync != "on" {
		t.Fatalf("max_connections %s, fsync %s; want 40 and on", maxConns, fsync)
	}
	pool, err := store.Connect(ctx, pg.URL(), 1)
	if err != nil {
		t.Fatal(err)
	}
	err = store.CheckSchema(ctx, pool)
	pool.Close()
	if err != nil {
		t.Fatalf("private server not migrated: %v", err)
	}
	if _, err := conn.Exec(ctx, `CREATE TABLE kept (n int); INSERT INTO kept SELECT generate_series(1, 100)`); err != nil {
		t.Fatal(err)
	}
	pg.Crash()
	if _, err := conn.Exec(ctx, `SELECT 1`); err == nil {
		t.Fatal("a connection survived the crash")
	}
	pg.Start()
	conn, err = pgx.Connect(ctx, pg.URL())
	if err != nil {
		t.Fatalf("reconnect after the restart: %v", err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM kept`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 100 {
		t.Fatalf("%d of 100 committed rows after the crash", n)
	}
}
