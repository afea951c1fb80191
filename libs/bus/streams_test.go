package bus_test

import (
	"context"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

// A task stream left file-backed by an earlier release cannot be changed in place:
// EnsureStreams replaces it with a memory-backed one (a new Created time, which the
// timer takes for a lost stream and relays from PostgreSQL), and leaves the submit
// stream, whose messages are promises, on file storage.
func TestEnsureStreamsMovesTheTaskStreamToMemory(t *testing.T) {
	t.Parallel()
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
