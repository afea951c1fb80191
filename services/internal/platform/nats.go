package platform

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/kagzi/kagzi/libs/bus"
)

// NATS is the process's NATS connection and the bus over it.
type NATS struct {
	Conn *nats.Conn
	Bus  *bus.Bus
	log  *zap.Logger
	once sync.Once
}

// NewNATS connects. bus.Connect retries forever in the background, so a broker that is
// still starting delays readiness rather than failing the process.
func NewNATS(o bus.ConnOptions, log *zap.Logger) (*NATS, error) {
	nc, err := bus.Connect(o)
	if err != nil {
		return nil, err
	}
	b, err := bus.New(nc, bus.DefaultStreamConfig())
	if err != nil {
		nc.Close()
		return nil, err
	}
	nc.SetDisconnectErrHandler(func(_ *nats.Conn, err error) {
		if err != nil { // nil: our own Close
			log.Warn("nats disconnected", zap.Error(err))
		}
	})
	nc.SetReconnectHandler(func(c *nats.Conn) {
		log.Info("nats reconnected", zap.String("url", c.ConnectedUrlRedacted()))
	})
	return &NATS{Conn: nc, Bus: b, log: log}, nil
}

// Start creates the streams. A failure is a warning: NATS may still be starting, and the
// scheduler and timer ensure the streams again periodically.
func (n *NATS) Start(ctx context.Context) error {
	// While the broker is unreachable a JetStream request waits for its context, and the
	// start context lasts minutes; a warning is worth a few seconds at most.
	ctx, cancel := context.WithTimeout(ctx, ensureAtStartTimeout)
	defer cancel()
	if err := n.Bus.EnsureStreams(ctx); err != nil {
		n.log.Warn("nats streams not ensured at start-up; will retry", zap.Error(err))
		return nil
	}
	n.log.Info("nats ready", zap.String("url", n.Conn.ConnectedUrlRedacted()))
	return nil
}

// Stop flushes what was published and closes the connection. It runs after every
// component using the connection has stopped.
func (n *NATS) Stop() {
	n.once.Do(func() {
		if n.Conn.IsConnected() {
			_ = n.Conn.FlushTimeout(2 * time.Second)
		}
		n.Conn.Close()
	})
}

const ensureAtStartTimeout = 5 * time.Second

var errNATSNotConnected = errors.New("not connected")

// NATSCheck is the readiness check of a connection: it is connected (not reconnecting).
func NATSCheck(nc *nats.Conn) ReadyCheck {
	return ReadyCheck{Name: "nats", Check: func(context.Context) error {
		if !nc.IsConnected() {
			return errNATSNotConnected
		}
		return nil
	}}
}
