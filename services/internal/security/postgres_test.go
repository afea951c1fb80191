package security

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

// S06: a fresh install done the way deploy/postgres/README.md says (roles.sql, migrate as
// the migrator, roles.sql again) leaves a runtime role that can do the services' work and
// nothing else, with its timeouts set.
func TestS06PostgresLeastPrivilege(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t, 60*time.Second)
	roles := newPGRoles(t)
	dbURL := emptyDatabase(t)

	roles.apply(t, dbURL)
	if err := store.Migrate(ctx, roles.url(t, dbURL, roles.Migrator)); err != nil {
		t.Fatalf("migrate as the migrator role: %v", err)
	}
	roles.apply(t, dbURL)

	runtimeURL := roles.url(t, dbURL, roles.Runtime)
	pool := connectPG(t, runtimeURL)
	// What the services do works: the schema check, and every kind of row write.
	if err := store.CheckSchema(ctx, pool); err != nil {
		t.Fatalf("schema check as the runtime role: %v", err)
	}
	st := store.New(pool)
	res, err := st.RunInsert(ctx, store.RunInsertParams{ID: wire.NewRunID(), Namespace: "default", Workflow: "w",
		Input: []byte(`{}`), IdempotencyKey: "k"})
	if err != nil {
		t.Fatalf("insert a run as the runtime role: %v", err)
	}
	for _, sql := range []string{
		`UPDATE workflow_runs SET attempt = attempt WHERE id = $1`,
		`DELETE FROM workflow_runs WHERE id = $1`,
	} {
		if _, err := pool.Exec(ctx, sql, res.RunID); err != nil {
			t.Fatalf("%s as the runtime role: %v", sql, err)
		}
	}

	conn, err := pgx.Connect(ctx, runtimeURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	migrator := pgx.Identifier{roles.Migrator}.Sanitize()
	attempts := []struct{ what, sql string }{
		{"DROP TABLE", `DROP TABLE workflow_runs`},
		{"TRUNCATE", `TRUNCATE step_runs`},
		{"CREATE TABLE", `CREATE TABLE kagzi_intruder (x int)`},
		{"ALTER ROLE", `ALTER ROLE ` + migrator + ` PASSWORD 'taken-over'`},
		{"COPY TO PROGRAM", `COPY workflow_runs TO PROGRAM 'id'`},
		{"SET ROLE", `SET ROLE ` + migrator},
		// Beyond the battery.
		{"ALTER ROLE self", `ALTER ROLE CURRENT_USER CREATEROLE`},
		{"CREATE TEMP TABLE", `CREATE TEMP TABLE kagzi_scratch (x int)`},
		{"write the schema version", `UPDATE goose_db_version SET is_applied = is_applied`},
	}
	denied := 0
	for i, a := range attempts {
		_, err := conn.Exec(ctx, a.sql)
		var pgErr *pgconn.PgError
		switch {
		case err == nil:
			t.Errorf("%s as the runtime role succeeded", a.what)
		case errors.As(err, &pgErr) && pgErr.Code == "42501": // insufficient_privilege
			if i < 6 {
				denied++
			}
		default:
			t.Errorf("%s failed, but not with permission denied: %v", a.what, err)
		}
	}
	t.Logf("S06 permission denied: %d/6 of the battery's attempts (%d more checked)", denied, len(attempts)-6)
	if denied != 6 {
		t.Errorf("%d/6 attempts were denied", denied)
	}

	for setting, want := range map[string]string{
		"statement_timeout":                   "30s",
		"lock_timeout":                        "5s",
		"idle_in_transaction_session_timeout": "1min",
	} {
		var got string
		if err := conn.QueryRow(ctx, `SHOW `+setting).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("runtime role's %s = %q, want %q", setting, got, want)
		}
	}

	var tables int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_tables WHERE schemaname = 'public'`).Scan(&tables); err != nil || tables != 4 {
		t.Errorf("public schema holds %d tables (%v), want Kagzi's 3 and goose's", tables, err)
	}
}

// emptyDatabase creates a database with nothing in it, as a fresh install starts from,
// and drops it when the test ends.
func emptyDatabase(t *testing.T) string {
	t.Helper()
	ctx := ctxT(t, 30*time.Second)
	admin, err := pgx.Connect(ctx, testkit.AdminURL())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	name := "kagzi_t_sec_" + randHex(6)
	if _, err := admin.Exec(ctx, `CREATE DATABASE `+name); err != nil {
		t.Fatal(err)
	}
	dbURL := testkit.WithDatabase(testkit.AdminURL(), name)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := testkit.DropDatabase(ctx, dbURL); err != nil {
			t.Logf("drop %s: %v", name, err)
		}
	})
	return dbURL
}
