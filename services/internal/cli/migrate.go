package cli

import (
	"context"
	"database/sql"
	"fmt"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" database/sql driver goose uses
	"github.com/pressly/goose/v3"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/migrations"
	"github.com/kagzi/kagzi/services/internal/platform"
)

// Migrate runs `kagzi migrate [up|version|down-all --yes]` with MIGRATION_DATABASE_URL
// (else DATABASE_URL), for deployments whose services run without DDL rights.
func Migrate(ctx context.Context, program string, args []string, env Env) int {
	cfg, err := platform.LoadMigrate(env.source(program, args))
	if err != nil {
		return configFailed(env, program, err)
	}
	target := store.RedactURL(cfg.URL)
	switch cfg.Action {
	case "up":
		err = store.Migrate(ctx, cfg.URL)
	case "down-all":
		err = store.MigrateDownAll(ctx, cfg.URL)
	}
	if err != nil {
		fmt.Fprintf(env.Stderr, "%s: %s on %s: %v\n", program, cfg.Action, target, err)
		return ExitFailure
	}
	have, want, err := schemaVersions(ctx, cfg.URL)
	if err != nil {
		fmt.Fprintf(env.Stderr, "%s: %s: %v\n", program, target, err)
		return ExitFailure
	}
	state := "up to date"
	switch {
	case have < want:
		state = "behind this binary: run `kagzi migrate up`"
	case have > want:
		state = "ahead of this binary"
	}
	fmt.Fprintf(env.Stdout, "%s: schema version %d, this binary's %d (%s)\n", target, have, want, state)
	return ExitOK
}

// schemaVersions reads the database's schema version and the newest one embedded here.
// store.CheckSchema answers only "new enough", so the version is read through goose.
func schemaVersions(ctx context.Context, url string) (have, want int64, err error) {
	want, err = store.LatestSchemaVersion()
	if err != nil {
		return 0, 0, err
	}
	db, err := sql.Open("pgx", url)
	if err != nil {
		return 0, 0, fmt.Errorf("open database: %w", err)
	}
	defer db.Close()
	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations.FS)
	if err != nil {
		return 0, 0, fmt.Errorf("create migration provider: %w", err)
	}
	have, err = p.GetDBVersion(ctx)
	if err != nil {
		return 0, 0, fmt.Errorf("read schema version: %w", err)
	}
	return have, want, nil
}
