package platform

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/kagzi/kagzi/libs/store"
)

// Postgres is the process's PostgreSQL pool. The pool is created at construction without
// connecting, so components can be wired to it; Start migrates (or checks the schema) and
// proves the database is reachable before anything that depends on it starts.
type Postgres struct {
	Pool *pgxpool.Pool
	cfg  PostgresConfig
	log  *zap.Logger
}

// NewPostgres creates the pool. It does not connect.
func NewPostgres(cfg PostgresConfig, log *zap.Logger) (*Postgres, error) {
	// pgxpool does not dial in NewWithConfig (MinConns is 0), so this context only
	// satisfies the signature.
	var opts []store.ConnectOption
	if cfg.AppName != "" {
		opts = append(opts, store.ApplicationName(cfg.AppName))
	}
	pool, err := store.Connect(context.Background(), cfg.URL, cfg.MaxConns, opts...)
	if err != nil {
		return nil, err
	}
	return &Postgres{Pool: pool, cfg: cfg, log: log}, nil
}

// Start migrates the schema under goose's advisory lock, so replicas starting together
// take turns, or, without auto-migration, refuses a schema older than this binary.
func (p *Postgres) Start(ctx context.Context) error {
	if p.cfg.AutoMigrate {
		url := p.cfg.MigrationURL
		if url == "" {
			url = p.cfg.URL
		}
		if err := store.Migrate(ctx, url); err != nil {
			return fmt.Errorf("migrate %s: %w", store.RedactURL(url), err)
		}
	} else if err := store.CheckSchema(ctx, p.Pool); err != nil {
		return fmt.Errorf("check schema of %s: %w", store.RedactURL(p.cfg.URL), err)
	}
	if err := p.Pool.Ping(ctx); err != nil {
		return fmt.Errorf("reach postgres at %s: %w", store.RedactURL(p.cfg.URL), err)
	}
	p.log.Info("postgres ready",
		zap.String("database", store.RedactURL(p.cfg.URL)),
		zap.Bool("auto_migrate", p.cfg.AutoMigrate),
		zap.Int32("max_conns", p.Pool.Config().MaxConns))
	return nil
}

// Stop closes the pool; it waits for connections in use to be returned.
func (p *Postgres) Stop() { p.Pool.Close() }

// PostgresCheck is the readiness check of a pool: PostgreSQL answers a ping.
func PostgresCheck(pool *pgxpool.Pool) ReadyCheck {
	return ReadyCheck{Name: "postgres", Check: pool.Ping}
}
