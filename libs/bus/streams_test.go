package bus_test

import (
	"context"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

// newBus is a Bus on a nats-server of the test's own.
func newBus(t *testing.T) *bus.Bus {
	t.Helper()
	srv := testkit.StartNATS(t)
	nc, err := bus.Connect(bus.ConnOptions{URL: srv.URL(), Name: t.Name()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	b, err := bus.New(nc, bus.DefaultStreamConfig())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// A task stream left file-backed by an earlier release cannot be changed in place:
// EnsureStreams replaces it with a memory-backed one (a new Created time, which the
// timer takes for a lost stream and relays from PostgreSQL), and leaves the submit
// stream, whose messages are promises, on file storage.
func TestEnsureStreamsMovesTheTaskStreamToMemory(t *testing.T) {
	t.Parallel()
	b := newBus(t)
	ctx := context.Background()
	old, err := b.JetStream().CreateStream(ctx, jetstream.StreamConfig{Name: wire.TaskStream,
		Subjects: []string{wire.TaskSubjectPrefix + ">"}, Retention: jetstream.WorkQueuePolicy, Storage: jetstream.FileStorage})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second call finds nothing to change
		if err := b.EnsureStreams(ctx); err != nil {
			t.Fatal(err)
		}
		info, err := b.TaskStreamInfo(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.Config.Storage != jetstream.MemoryStorage || info.Created.Equal(old.CachedInfo().Created) {
			t.Fatalf("task stream storage %v created %v, want a new memory-backed stream", info.Config.Storage, info.Created)
		}
	}
	sub, err := b.JetStream().Stream(ctx, wire.SubmitStream)
	if err != nil {
		t.Fatal(err)
	}
	if s := sub.CachedInfo().Config.Storage; s != jetstream.FileStorage {
		t.Fatalf("submit stream storage %v, want file", s)
	}
}

// A submitted start is readable at its publish sequence until a scheduler acks it, and
// not after.
func TestSubmittedStart(t *testing.T) {
	t.Parallel()
	b := newBus(t)
	ctx := context.Background()
	if err := b.EnsureStreams(ctx); err != nil {
		t.Fatal(err)
	}
	subject := wire.SubmitSubject("default", "wf")
	ack, err := b.JetStream().Publish(ctx, subject, []byte(`{"request_id":"r1"}`))
	if err != nil {
		t.Fatal(err)
	}
	got, body, ok, err := b.SubmittedStart(ctx, ack.Sequence)
	if err != nil || !ok || got != subject || string(body) != `{"request_id":"r1"}` {
		t.Fatalf("submitted start at %d: %q %q ok=%v err=%v", ack.Sequence, got, body, ok, err)
	}
	cons, err := b.EnsureSubmitConsumer(ctx, bus.DefaultConsumerConfig())
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := cons.Fetch(1)
	if err != nil {
		t.Fatal(err)
	}
	for m := range msgs.Messages() {
		if _, _, ok, err := b.SubmittedStart(ctx, ack.Sequence); err != nil || !ok {
			t.Fatalf("fetched, not acked: ok=%v err=%v", ok, err)
		}
		if err := m.DoubleAck(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, ok, err := b.SubmittedStart(ctx, ack.Sequence); err != nil || ok {
		t.Fatalf("acked: ok=%v err=%v, want gone", ok, err)
	}
	if _, _, ok, err := b.SubmittedStart(ctx, ack.Sequence+10); err != nil || ok {
		t.Fatalf("never published: ok=%v err=%v, want gone", ok, err)
	}
}
