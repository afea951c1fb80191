package testkit

import (
	"net"
	"testing"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/kagzi/kagzi/libs/embednats"
)

// NATS is an in-process nats-server with JetStream, private to one test.
type NATS struct {
	t        testing.TB
	storeDir string
	port     int
	srv      *server.Server
}

// StartNATS runs a private server (fsync on every write, as Kagzi ships it) and shuts it
// down when the test ends.
func StartNATS(t testing.TB) *NATS {
	t.Helper()
	n := &NATS{t: t, storeDir: t.TempDir()}
	n.start()
	t.Cleanup(n.Shutdown)
	return n
}

func (n *NATS) start() {
	n.t.Helper()
	srv, err := embednats.Start(embednats.Config{Port: n.port, StoreDir: n.storeDir, SyncAlways: true})
	if err != nil {
		n.t.Fatalf("testkit: %v", err)
	}
	n.srv = srv
	n.port = srv.Addr().(*net.TCPAddr).Port // a restart must come back where clients look
}

// URL is the client URL of the server.
func (n *NATS) URL() string { return n.srv.ClientURL() }

// Shutdown stops the server; idempotent.
func (n *NATS) Shutdown() {
	if n.srv != nil {
		n.srv.Shutdown()
		n.srv.WaitForShutdown()
		n.srv = nil
	}
}

// Restart stops the server and starts it again on the same port with the same store, as
// a broker restart looks to clients.
func (n *NATS) Restart() {
	n.t.Helper()
	n.Shutdown()
	n.start()
}
