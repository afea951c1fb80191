package testkit

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

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

// NATSProcess is a nats-server running as a child process (built from the nats-server Go
// module by Build), for tests that kill the broker for real.
type NATSProcess struct {
	*Process
	port     int
	StoreDir string
}

// StartNATSProcess runs bin (a nats-server binary) on a free port with JetStream, fsync on
// every write, and its own store directory.
func StartNATSProcess(t testing.TB, bin string) *NATSProcess {
	t.Helper()
	port := freePort(t)
	dir := t.TempDir()
	conf := filepath.Join(dir, "nats.conf")
	store := filepath.Join(dir, "js")
	cfg := fmt.Sprintf("listen: 127.0.0.1:%d\njetstream {\n  store_dir: %q\n  sync_interval: always\n}\n", port, store)
	if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	n := &NATSProcess{Process: StartCommand(t, "nats-server", bin, []string{"-c", conf}), port: port, StoreDir: store}
	n.WaitReady(t)
	return n
}

// URL is the server's client URL.
func (n *NATSProcess) URL() string { return fmt.Sprintf("nats://127.0.0.1:%d", n.port) }

// WaitReady blocks until the server accepts TCP connections.
func (n *NATSProcess) WaitReady(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", n.port), time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nats-server not ready on port %d: %v", n.port, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
