package security

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/scheduler"
)

// system is a private Kagzi in one process: its own database and NATS server, the real
// scheduler, and an SDK worker hosting the test's workflows. The input tests need no
// process boundary, and in-process they run in well under a second.
type system struct {
	dbName string
	pool   *pgxpool.Pool
	nats   *testkit.NATS
	nc     *nats.Conn
	client *sdk.Client
	worker *sdk.Worker
	sched  *scheduler.Scheduler
	stop   sync.Once
}

func newSystem(t *testing.T, limits wire.Limits, defs ...sdk.Registration) *system {
	t.Helper()
	ctx := ctxT(t, 30*time.Second)
	dbURL := testkit.NewDatabase(t)
	cfg, err := pgx.ParseConfig(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	s := &system{dbName: cfg.Database, nats: testkit.StartNATS(t)}
	s.pool, err = store.Connect(ctx, dbURL, 8)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.pool.Close)
	s.nc = connect(t, bus.ConnOptions{URL: s.nats.URL(), Name: t.Name()})
	b, err := bus.New(s.nc, bus.DefaultStreamConfig())
	if err != nil {
		t.Fatal(err)
	}
	s.sched = scheduler.New(scheduler.Config{}, store.New(s.pool), b, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)), nil)
	if err := s.sched.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.shutdown)
	s.worker, err = sdk.NewWorker(sdk.WorkerConfig{Pool: s.pool, Conn: s.nc, Limits: limits, Lease: 2 * time.Second,
		RetryBackoff: 50 * time.Millisecond, ShutdownGrace: time.Second, Concurrency: 16})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.worker.Register(defs...); err != nil {
		t.Fatal(err)
	}
	if err := s.worker.Start(ctx); err != nil {
		t.Fatal(err)
	}
	s.client = sdk.NewClient(s.nc, sdk.WithRequestTimeout(5*time.Second))
	return s
}

// shutdown stops the worker, then the scheduler; once.
func (s *system) shutdown() {
	s.stop.Do(func() {
		if s.worker != nil {
			_ = s.worker.Stop(context.Background())
		}
		s.sched.Stop()
	})
}

func (s *system) count(t *testing.T, sql string, args ...any) int {
	t.Helper()
	var n int
	if err := s.pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// rows counts what the tests check stays unchanged after a rejection.
func (s *system) rows(t *testing.T) [2]int {
	t.Helper()
	return [2]int{s.count(t, `SELECT count(*) FROM workflow_runs`), s.count(t, `SELECT count(*) FROM step_runs`)}
}

// wait returns the run once it is terminal.
func (s *system) wait(t *testing.T, runID string) *wire.RunInfo {
	t.Helper()
	info, err := s.client.Wait(ctxT(t, 20*time.Second), runID)
	if err != nil {
		t.Fatalf("wait for run %s: %v", runID, err)
	}
	return info
}

// pgErrors is how many transactions of the system's database ended in an error, by
// PostgreSQL's own count. It stops the system first: a backend reports its counts when
// it exits, so this is exact only once every connection is closed.
func (s *system) pgErrors(t *testing.T) int64 {
	t.Helper()
	s.shutdown()
	s.pool.Close()
	ctx := ctxT(t, 10*time.Second)
	admin, err := pgx.Connect(ctx, testkit.AdminURL())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	var n int64
	eventually(t, 5*time.Second, "the database's backends to exit", func() bool {
		var backends int
		err := admin.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = $1`, s.dbName).Scan(&backends)
		return err == nil && backends == 0
	})
	if err := admin.QueryRow(ctx, `SELECT xact_rollback FROM pg_stat_database WHERE datname = $1`, s.dbName).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}
