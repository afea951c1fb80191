package platform

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

func TestPostgresChecksSchemaWithoutAutoMigrate(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	// A fresh, empty database: the check must refuse it, and migration must fix it.
	url := testkit.NewDatabase(t)
	if err := store.MigrateDownAll(ctx, url); err != nil {
		t.Fatal(err)
	}
	pg, err := NewPostgres(PostgresConfig{URL: url, MigrationURL: url}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Stop()
	if err := pg.Start(ctx); !errors.Is(err, wire.ErrSchemaTooOld) {
		t.Fatalf("start on an old schema: err = %v, want ErrSchemaTooOld", err)
	}

	pg2, err := NewPostgres(PostgresConfig{URL: url, AutoMigrate: true}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer pg2.Stop()
	if err := pg2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := PostgresCheck(pg2.Pool).Check(ctx); err != nil {
		t.Fatal(err)
	}
	pg2.Stop()
	pg2.Stop() // idempotent
}

func TestPostgresUnreachable(t *testing.T) {
	t.Parallel()
	pg, err := NewPostgres(PostgresConfig{URL: "postgres://postgres@127.0.0.1:1/kagzi?sslmode=disable&connect_timeout=2"}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Stop()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := pg.Start(ctx); err == nil {
		t.Fatal("started against a closed port")
	}
}

func TestNATSEnsuresStreams(t *testing.T) {
	t.Parallel()
	srv := testkit.StartNATS(t)
	n, err := NewNATS(bus.ConnOptions{URL: srv.URL(), Name: "platform-test"}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Stop()
	if err := n.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := NATSCheck(n.Conn).Check(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Bus.JetStream().Stream(t.Context(), wire.TaskStream); err != nil {
		t.Errorf("task stream: %v", err)
	}
	n.Stop()
	n.Stop()
	if err := NATSCheck(n.Conn).Check(t.Context()); err == nil {
		t.Error("ready after Stop")
	}
}

func TestNATSDownIsNotFatal(t *testing.T) {
	t.Parallel()
	srv := testkit.StartNATS(t)
	url := srv.URL()
	srv.Shutdown()
	n, err := NewNATS(bus.ConnOptions{URL: url}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("connect to a stopped server: %v (bus.Connect retries in the background)", err)
	}
	defer n.Stop()
	began := time.Now()
	if err := n.Start(t.Context()); err != nil {
		t.Fatalf("start while NATS is down: %v", err)
	}
	if waited := time.Since(began); waited > ensureAtStartTimeout+time.Second {
		t.Errorf("start waited %s for a broker that is down", waited)
	}
	ctx := t.Context()
	if err := NATSCheck(n.Conn).Check(ctx); err == nil {
		t.Error("ready while NATS is down")
	}
}
