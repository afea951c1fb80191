package testkit

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"sort"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/migrations"
)

// AdminURL is the PostgreSQL server tests create their databases on.
func AdminURL() string {
	if u := os.Getenv("KAGZI_TEST_DATABASE_URL"); u != "" {
		return u
	}
	return "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
}

// WithDatabase returns u with its database name replaced.
func WithDatabase(u, name string) string {
	parsed, err := url.Parse(u)
	if err != nil {
		panic(fmt.Sprintf("testkit: bad database url %q: %v", u, err))
	}
	parsed.Path = "/" + name
	return parsed.String()
}

// templateName names the migrated template by a hash of the migrations, so a changed
// schema gets a new template and stale ones are never reused.
func templateName() (string, error) {
	h := sha256.New()
	names, err := fs.Glob(migrations.FS, "*.sql")
	if err != nil {
		return "", err
	}
	sort.Strings(names)
	for _, n := range names {
		b, err := fs.ReadFile(migrations.FS, n)
		if err != nil {
			return "", err
		}
		h.Write([]byte(n))
		h.Write(b)
	}
	return "kagzi_tmpl_" + hex.EncodeToString(h.Sum(nil))[:16], nil
}

// NewDatabase creates a database for one test, cloned from the migrated template (about
// 20–50 ms), and drops it when the test ends. It returns the database's URL.
func NewDatabase(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	url, err := CreateDatabase(ctx)
	if err != nil {
		t.Fatalf("testkit: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := DropDatabase(ctx, url); err != nil {
			t.Logf("testkit: %v", err)
		}
	})
	return url
}

// CreateDatabase is NewDatabase without a testing.TB, for TestMain and benchmarks.
func CreateDatabase(ctx context.Context) (string, error) {
	admin := AdminURL()
	tmpl, err := templateName()
	if err != nil {
		return "", fmt.Errorf("hash migrations: %w", err)
	}
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		return "", fmt.Errorf("connect to %s: %w", store.RedactURL(admin), err)
	}
	defer conn.Close(ctx)
	if err := ensureTemplate(ctx, conn, admin, tmpl); err != nil {
		return "", err
	}
	var rnd [6]byte
	_, _ = rand.Read(rnd[:])
	name := "kagzi_t_" + hex.EncodeToString(rnd[:])
	// CREATE DATABASE … TEMPLATE fails while anyone else is connected to the template;
	// the lock keeps concurrent test packages from tripping over each other.
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock(7243)`); err != nil {
		return "", fmt.Errorf("lock template: %w", err)
	}
	_, err = conn.Exec(ctx, fmt.Sprintf(`CREATE DATABASE %s TEMPLATE %s`, name, tmpl))
	_, _ = conn.Exec(ctx, `SELECT pg_advisory_unlock(7243)`)
	if err != nil {
		return "", fmt.Errorf("create test database: %w", err)
	}
	return WithDatabase(admin, name), nil
}

func ensureTemplate(ctx context.Context, conn *pgx.Conn, admin, tmpl string) error {
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock(7243)`); err != nil {
		return fmt.Errorf("lock template: %w", err)
	}
	defer conn.Exec(ctx, `SELECT pg_advisory_unlock(7243)`) //nolint:errcheck // unlock on a closing session
	var exists bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)`, tmpl).Scan(&exists); err != nil {
		return fmt.Errorf("look up template: %w", err)
	}
	if exists {
		return nil
	}
	building := tmpl + "_building"
	_, _ = conn.Exec(ctx, `DROP DATABASE IF EXISTS `+building+` WITH (FORCE)`)
	if _, err := conn.Exec(ctx, `CREATE DATABASE `+building); err != nil {
		return fmt.Errorf("create template: %w", err)
	}
	if err := store.Migrate(ctx, WithDatabase(admin, building)); err != nil {
		return fmt.Errorf("migrate template: %w", err)
	}
	// Renamed only once complete, so an interrupted build is never used.
	if _, err := conn.Exec(ctx, `ALTER DATABASE `+building+` RENAME TO `+tmpl); err != nil {
		return fmt.Errorf("finish template: %w", err)
	}
	return nil
}

// DropDatabase drops a database made by CreateDatabase, closing its connections.
func DropDatabase(ctx context.Context, dbURL string) error {
	parsed, err := url.Parse(dbURL)
	if err != nil {
		return err
	}
	name := parsed.Path[1:]
	conn, err := pgx.Connect(ctx, AdminURL())
	if err != nil {
		return fmt.Errorf("connect to drop %s: %w", name, err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `DROP DATABASE IF EXISTS `+pgx.Identifier{name}.Sanitize()+` WITH (FORCE)`); err != nil {
		return fmt.Errorf("drop database %s: %w", name, err)
	}
	return nil
}
