package sdk

import (
	"testing"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
)

// newTestWorker makes a worker on a database and a NATS server of its own, cfg's Pool
// (of poolSize sessions) and Conn filled in; it is neither registered nor started.
func newTestWorker(t *testing.T, cfg WorkerConfig, poolSize int32) *Worker {
	t.Helper()
	pool, err := store.Connect(t.Context(), testkit.NewDatabase(t), poolSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	nc, err := bus.Connect(bus.ConnOptions{URL: testkit.StartNATS(t).URL(), Name: t.Name()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	cfg.Pool, cfg.Conn = pool, nc
	w, err := NewWorker(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return w
}
