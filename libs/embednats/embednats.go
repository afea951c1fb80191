// Package embednats runs a NATS server with JetStream inside the current process, for
// `kagzi dev` and for tests. It is built from the nats-server Go module, so it is as new
// as go.mod says whatever the machine has installed.
package embednats

import (
	"fmt"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Config says where the server listens and keeps its data.
type Config struct {
	Host     string // default 127.0.0.1
	Port     int    // 0: a free port
	StoreDir string // JetStream data; required
	// SyncAlways fsyncs every JetStream write before its PubAck, so an acknowledged start
	// survives a machine crash (Kagzi's default for anything it ships).
	SyncAlways bool
	MaxPayload int32 // default 1 MiB
}

// Start runs a server and waits until it accepts connections.
func Start(cfg Config) (*server.Server, error) {
	if cfg.StoreDir == "" {
		return nil, fmt.Errorf("embedded nats: a JetStream store directory is required")
	}
	host := cfg.Host
	if host == "" {
		host = "127.0.0.1"
	}
	port := cfg.Port
	if port == 0 {
		port = server.RANDOM_PORT
	}
	opts := &server.Options{
		ServerName: "kagzi-embedded",
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   cfg.StoreDir,
		SyncAlways: cfg.SyncAlways,
		NoSigs:     true,
		NoLog:      true,
		MaxPayload: cfg.MaxPayload,
	}
	if opts.MaxPayload == 0 {
		opts.MaxPayload = 1 << 20
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		ns.Shutdown()
		return nil, fmt.Errorf("embedded nats: not ready after 10s")
	}
	return ns, nil
}
