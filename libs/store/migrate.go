package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"net/url"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" database/sql driver goose migrates through
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/migrations"
)

func newProvider(db *sql.DB) (*goose.Provider, error) {
	locker, err := lock.NewPostgresSessionLocker()
	if err != nil {
		return nil, fmt.Errorf("create migration locker: %w", err)
	}
	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations.FS, goose.WithSessionLocker(locker))
	if err != nil {
		return nil, fmt.Errorf("create migration provider: %w", err)
	}
	return p, nil
}

// Migrate applies every embedded migration not yet applied. Concurrent callers (several
// services starting together) serialise on a PostgreSQL advisory lock.
func Migrate(ctx context.Context, databaseURL string) error {
	db, err := sql.Open("pgx", databaseURL)
	if err != nil {
		return fmt.Errorf("open database for migration: %w", err)
	}
	defer db.Close()
	p, err := newProvider(db)
	if err != nil {
		return err
	}
	if _, err := p.Up(ctx); err != nil {
		return fmt.Errorf("migrate up: %w", err)
	}
	return nil
}

// MigrateDownAll reverts every migration; CI uses it to prove the down path works.
func MigrateDownAll(ctx context.Context, databaseURL string) error {
	db, err := sql.Open("pgx", databaseURL)
	if err != nil {
		return fmt.Errorf("open database for migration: %w", err)
	}
	defer db.Close()
	p, err := newProvider(db)
	if err != nil {
		return err
	}
	if _, err := p.DownTo(ctx, 0); err != nil {
		return fmt.Errorf("migrate down: %w", err)
	}
	return nil
}

// LatestSchemaVersion is the newest migration embedded in this binary.
func LatestSchemaVersion() (int64, error) {
	entries, err := fs.Glob(migrations.FS, "*.sql")
	if err != nil {
		return 0, fmt.Errorf("list migrations: %w", err)
	}
	var latest int64
	for _, name := range entries {
		var v int64
		if _, err := fmt.Sscanf(name, "%d_", &v); err == nil && v > latest {
			latest = v
		}
	}
	return latest, nil
}

// CheckSchema refuses to run against a database older than this binary: an executor
// built with a newer SDK must not write rows an old schema cannot hold.
func CheckSchema(ctx context.Context, pool *pgxpool.Pool) error {
	want, err := LatestSchemaVersion()
	if err != nil {
		return err
	}
	// goose's own reading of the version is this query (its GetLatestVersion), behind a
	// check that the table exists and a provider that parses every migration: three round
	// trips where one will do, and every executor (re)start waits for them.
	var have *int64
	err = pool.QueryRow(ctx, `SELECT max(version_id) FROM goose_db_version`).Scan(&have)
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && pgErr.Code == "42P01": // undefined_table: never migrated
	case err != nil:
		return fmt.Errorf("read schema version: %w", err)
	}
	if have == nil || *have < want {
		var v int64
		if have != nil {
			v = *have
		}
		return fmt.Errorf("%w: database is at version %d, this binary needs %d (run `kagzi migrate`)",
			wire.ErrSchemaTooOld, v, want)
	}
	return nil
}

// CreateDatabaseIfMissing connects to the server's maintenance database and creates the
// database named in databaseURL when it does not exist. kagzi dev uses it so that a new
// user needs nothing but a reachable PostgreSQL.
func CreateDatabaseIfMissing(ctx context.Context, databaseURL string) error {
	cfg, err := pgx.ParseConfig(databaseURL)
	if err != nil {
		return fmt.Errorf("parse database url: %w", err)
	}
	name := cfg.Database
	if name == "" || name == "postgres" {
		return nil
	}
	cfg.Database = "postgres"
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("connect to maintenance database: %w", err)
	}
	defer conn.Close(ctx)
	var exists bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)`, name).Scan(&exists); err != nil {
		return fmt.Errorf("look up database %s: %w", name, err)
	}
	if exists {
		return nil
	}
	_, err = conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
	if err != nil && !isDuplicateDatabase(err) {
		return fmt.Errorf("create database %s: %w", name, err)
	}
	return nil
}

func isDuplicateDatabase(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "42P04"
}

// RedactURL hides the password of a database URL for logs.
func RedactURL(databaseURL string) string {
	u, err := url.Parse(databaseURL)
	if err != nil {
		return "(unparseable database url)"
	}
	return u.Redacted()
}
