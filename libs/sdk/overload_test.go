package sdk_test

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

// stubScheduler answers starts on a real NATS server the way an overloaded scheduler
// does: the first refuse requests of each request id get overloaded (the first silence
// ones get no answer at all), later ones a run id.
type stubScheduler struct {
	mu       sync.Mutex
	bodies   map[string][]string // request id → bodies received, in order
	received []time.Time
}

func startStub(t *testing.T, nc *nats.Conn, silence, refuse int) *stubScheduler {
	t.Helper()
	st := &stubScheduler{bodies: map[string][]string{}}
	overloaded, _ := json.Marshal(wire.StartReply{Error: wire.ToError(wire.Errorf(wire.ErrOverloaded, "queue full"))})
	sub, err := nc.Subscribe(wire.StartSubjects, func(m *nats.Msg) {
		var req wire.StartRequest
		if err := json.Unmarshal(m.Data, &req); err != nil {
			t.Errorf("stub: %v", err)
			return
		}
		st.mu.Lock()
		st.bodies[req.RequestID] = append(st.bodies[req.RequestID], string(m.Data))
		st.received = append(st.received, time.Now())
		n := len(st.bodies[req.RequestID])
		st.mu.Unlock()
		switch {
		case n <= silence:
		case n <= silence+refuse:
			_ = m.Respond(overloaded)
		default:
			ok, _ := json.Marshal(wire.StartReply{RunID: req.RequestID})
			_ = m.Respond(ok)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return st
}

func stubConn(t *testing.T) *nats.Conn {
	t.Helper()
	nc, err := bus.Connect(bus.ConnOptions{URL: testkit.StartNATS(t).URL(), Name: t.Name()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// An overloaded answer is retried with the same request after a backoff that grows and
// is jittered; the caller sees only the run once the scheduler takes it.
func TestClientRetriesOverloaded(t *testing.T) {
	t.Parallel()
	nc := stubConn(t)
	st := startStub(t, nc, 0, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	id, err := sdk.NewClient(nc).StartByName(ctx, "wf", 1)
	if err != nil {
		t.Fatalf("start after 3 overloaded answers: %v", err)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	bodies := st.bodies[id]
	if len(st.bodies) != 1 || len(bodies) != 4 {
		t.Fatalf("requests by request id: %d ids, %d requests for %s; want 4 requests of one id", len(st.bodies), len(bodies), id)
	}
	for _, b := range bodies[1:] {
		if b != bodies[0] {
			t.Fatalf("a retry changed the request: %s, then %s", bodies[0], b)
		}
	}
	// Backoffs of 100, 200 and 400 ms, each jittered down to no less than half.
	for i, min := range []time.Duration{50, 100, 200} {
		if gap := st.received[i+1].Sub(st.received[i]); gap < min*time.Millisecond {
			t.Errorf("retry %d came %s after the refusal, want at least %dms", i+1, gap, min)
		}
	}
}

// A client that gives up while refused says that nothing was done; one whose earlier
// attempt went unanswered does not, since that attempt may have made the run.
func TestClientGivesUpOverloaded(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		silence    int
		overloaded bool
	}{
		{"refused every time", 0, true},
		{"first attempt unanswered", 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			nc := stubConn(t)
			startStub(t, nc, tc.silence, 1_000_000)
			ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
			defer cancel()
			_, err := sdk.NewClient(nc, sdk.WithRequestTimeout(100*time.Millisecond)).StartByName(ctx, "wf", 1)
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("err = %v, want the deadline", err)
			}
			if got := errors.Is(err, wire.ErrOverloaded); got != tc.overloaded {
				t.Fatalf("errors.Is(%v, ErrOverloaded) = %v, want %v", err, got, tc.overloaded)
			}
		})
	}
}
