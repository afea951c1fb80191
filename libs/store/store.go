// Package store holds all of Kagzi's SQL. One file per table family (runs.go, steps.go,
// workers.go); queries are named entity-first and take a params struct. Rows become
// domain types here, and pgx.ErrNoRows and unique violations become Kagzi's errors here,
// so no other package sees pgx errors or SQL.
//
// Every executor write is fenced: it names the run, the fence the executor claimed with,
// the executor itself (its lease owner) and status RUNNING in the same statement, and zero
// rows means wire.ErrLeaseLost.
// Every time-dependent query takes an optional Now so tests pin the database clock.
package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// DBTX is what queries run on: a *pgxpool.Pool, a *pgx.Conn or a pgx.Tx.
type DBTX interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
}

// Store runs Kagzi's queries on a DBTX.
type Store struct {
	db DBTX
}

// New returns a Store over db.
func New(db DBTX) *Store { return &Store{db: db} }

// Connect opens a pool for the services' runtime role. The settings below the pool are
// chosen for a queue workload: many short statements, prepared once per connection.
func Connect(ctx context.Context, databaseURL string, maxConns int32, opts ...ConnectOption) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(databaseURL)
	if err != nil {
		return nil, fmt.Errorf("parse database url: %w", err)
	}
	for _, opt := range opts {
		opt(cfg)
	}
	// Group commit keeps a few statements in flight per table family at once; pgx's
	// default of max(4, CPUs) would queue them on a small machine.
	cfg.MaxConns = 10
	if maxConns > 0 {
		cfg.MaxConns = maxConns
	}
	cfg.MaxConnIdleTime = 5 * time.Minute
	cfg.HealthCheckPeriod = 30 * time.Second
	// pgx pings a connection idle for over a second before handing it out: on an idle
	// system that is a transaction per statement. Kagzi's writers retry a failed
	// statement anyway, and connections idle for minutes are closed, so skip the ping.
	cfg.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool { return false }
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open database pool: %w", err)
	}
	return pool, nil
}

// ConnectOption adjusts a pool's configuration.
type ConnectOption func(*pgxpool.Config)

// ApplicationName names the pool's sessions in pg_stat_activity and the server's logs,
// unless the URL names them already: an operator (or a test terminating one service's
// backends) can tell Kagzi's services apart.
func ApplicationName(name string) ConnectOption {
	return func(c *pgxpool.Config) {
		if c.ConnConfig.RuntimeParams["application_name"] == "" {
			c.ConnConfig.RuntimeParams["application_name"] = name
		}
	}
}

const pgUniqueViolation = "23505"

func isUniqueViolation(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == pgUniqueViolation
}

// Rejected says whether the database refused a statement with an ERROR: its transaction
// rolled back, so nothing of it committed and no re-check is needed. A lost connection or
// a FATAL (the backend terminated, perhaps after the commit) leaves the outcome unknown.
func Rejected(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	severity := pgErr.SeverityUnlocalized // Severity follows lc_messages
	if severity == "" {
		severity = pgErr.Severity
	}
	return severity == "ERROR"
}

// nowArg passes an injected clock to a query, or NULL for the database clock.
func nowArg(now *time.Time) any {
	if now == nil {
		return nil
	}
	return *now
}

// timeArg passes an optional time: the zero time is NULL.
func timeArg(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t
}

func micros(d time.Duration) int64 { return d.Microseconds() }
