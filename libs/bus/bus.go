// Package bus is Kagzi's use of NATS: connecting with credentials, the JetStream streams
// and consumers (created idempotently at start-up and re-checked), and publishing the
// messages the services exchange. Messages carry ids only; PostgreSQL holds the state.
package bus

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/wire"
)

// ConnOptions says how to reach NATS. Every service and the SDK client take it.
type ConnOptions struct {
	URL       string
	Name      string // shown in the server's connection list
	User      string
	Password  string
	Token     string
	NKeySeed  string // path of an NKey seed file
	CredsFile string // path of a JWT creds file
	TLSCA     string // path of a CA bundle to verify the server with
	TLSCert   string // client certificate (mutual TLS)
	TLSKey    string
	// InboxPrefix replaces _INBOX as the prefix of reply subjects, so an identity can be
	// allowed its own replies only (nats-secure.conf's tenant identities).
	InboxPrefix string
}

// Connect dials NATS and keeps reconnecting forever: a service that loses the broker
// waits for it instead of exiting.
func Connect(o ConnOptions) (*nats.Conn, error) {
	url := o.URL
	if url == "" {
		url = nats.DefaultURL
	}
	opts := []nats.Option{
		nats.Name(o.Name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.RetryOnFailedConnect(true),
		nats.ReconnectBufSize(8 << 20),
	}
	if o.User != "" {
		opts = append(opts, nats.UserInfo(o.User, o.Password))
	}
	if o.Token != "" {
		opts = append(opts, nats.Token(o.Token))
	}
	if o.NKeySeed != "" {
		opt, err := nats.NkeyOptionFromSeed(o.NKeySeed)
		if err != nil {
			return nil, fmt.Errorf("load nkey seed %s: %w", o.NKeySeed, err)
		}
		opts = append(opts, opt)
	}
	if o.CredsFile != "" {
		opts = append(opts, nats.UserCredentials(o.CredsFile))
	}
	if o.TLSCA != "" {
		opts = append(opts, nats.RootCAs(o.TLSCA))
	}
	if o.TLSCert != "" {
		opts = append(opts, nats.ClientCert(o.TLSCert, o.TLSKey))
	}
	if o.InboxPrefix != "" {
		opts = append(opts, nats.CustomInboxPrefix(o.InboxPrefix))
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to nats %s: %w", url, err)
	}
	return nc, nil
}

// StreamConfig tunes the task and submit streams.
type StreamConfig struct {
	Replicas        int           // 1 on a single server, 3 on a cluster
	DuplicateWindow time.Duration // JetStream de-duplication window for Nats-Msg-Id
	MaxAge          time.Duration // a doorbell older than this is useless: the reconciler re-dispatches
}

// DefaultStreamConfig suits one server.
func DefaultStreamConfig() StreamConfig {
	return StreamConfig{Replicas: 1, DuplicateWindow: 2 * time.Minute, MaxAge: 24 * time.Hour}
}

// ConsumerConfig tunes a task consumer. The lease, not AckWait, says whether an executor is
// alive: executors ack as soon as their claim commits (keeping the message in progress
// while the claim is held up), so AckWait only bounds how long a message fetched by an
// executor that then died or stalled waits before another executor may have it.
type ConsumerConfig struct {
	AckWait       time.Duration
	MaxDeliver    int // -1: unlimited; attempts are counted in PostgreSQL
	MaxAckPending int
}

// DefaultConsumerConfig is used when none is configured.
//
// AckWait is 5 s: the doorbells an executor had fetched and not yet claimed when it was
// killed come back to the others that soon, where 30 s left their runs waiting that long
// (T14 saw good runs wait 20 s for the reconciler instead). An executor keeps a message
// in progress while its claim waits (a backlog of claims, a slow database), so a short
// AckWait does not redeliver the doorbells of a live one: at 5 s without that, T11
// (50,000 parked sleepers, 3 timers killed in turn) woke 38,777 runs in its 6 minutes
// against all 50,000 at 30 s, every redelivery being another claim to make.
//
// MaxDeliver is unlimited: an executor that must not take a doorbell now (it is making
// room for a run that runs alone) hands it back, and every hand-back is a delivery;
// past a cap the broker would drop the doorbell, and its run would wait for the
// reconciler (T14 saw good runs wait 20 s so). Poison is terminated explicitly.
func DefaultConsumerConfig() ConsumerConfig {
	return ConsumerConfig{AckWait: 5 * time.Second, MaxDeliver: -1, MaxAckPending: 10_000}
}

// Bus publishes and consumes Kagzi's messages on one connection.
type Bus struct {
	nc      *nats.Conn
	js      jetstream.JetStream
	streams StreamConfig
}

// New wraps a connection.
func New(nc *nats.Conn, streams StreamConfig) (*Bus, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("open jetstream: %w", err)
	}
	if streams.Replicas <= 0 {
		streams.Replicas = 1
	}
	return &Bus{nc: nc, js: js, streams: streams}, nil
}

// Conn is the underlying connection.
func (b *Bus) Conn() *nats.Conn { return b.nc }

// JetStream is the underlying JetStream context.
func (b *Bus) JetStream() jetstream.JetStream { return b.js }

func (b *Bus) taskStreamConfig() jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:        wire.TaskStream,
		Description: "Kagzi task doorbells {run_id, dispatch_seq}",
		Subjects:    []string{wire.TaskSubjectPrefix + ">"},
		Retention:   jetstream.WorkQueuePolicy,
		// Memory: a doorbell is a hint, never the record. PostgreSQL holds every QUEUED
		// run (the outbox), and the timer relays every run queued before the stream it
		// sees was created (timer.watchTasks), so a broker restart costs a relay, not a
		// run. On file storage with sync_interval: always, each doorbell and each ack was
		// an fsync, and the pipeline of one stream is serial: that, not PostgreSQL, was
		// what bounded throughput (kagzi bench S1, 1.4–2.3× with memory).
		Storage:    jetstream.MemoryStorage,
		Replicas:   b.streams.Replicas,
		Duplicates: b.streams.DuplicateWindow,
		MaxAge:     b.streams.MaxAge,
		MaxMsgSize: 4 << 10, // a doorbell is ~80 bytes; anything larger is not ours
		Discard:    jetstream.DiscardOld,
	}
}

func (b *Bus) submitStreamConfig() jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:        wire.SubmitStream,
		Description: "Kagzi start requests published with JetStream",
		Subjects:    []string{wire.SubmitSubjectPrefix + ">"},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    b.streams.Replicas,
		Duplicates:  b.streams.DuplicateWindow,
		MaxAge:      7 * 24 * time.Hour,
		Discard:     jetstream.DiscardNew, // refuse new starts rather than drop accepted ones
	}
}

// EnsureStreams creates or updates both streams. Safe to call at any time and from any
// number of processes; services call it at start-up and periodically, so a broker that
// lost its store gets its streams back without a manual step.
func (b *Bus) EnsureStreams(ctx context.Context) error {
	for _, cfg := range []jetstream.StreamConfig{b.taskStreamConfig(), b.submitStreamConfig()} {
		// Look before writing: an update that changes nothing still makes the server
		// rewrite the stream's config, and every service checks every half minute.
		st, err := b.js.Stream(ctx, cfg.Name)
		switch {
		case err == nil && sameStreamConfig(st.CachedInfo().Config, cfg):
			continue
		case err == nil && st.CachedInfo().Config.Storage != cfg.Storage:
			// The storage of a stream cannot be changed in place: a task stream made
			// file-backed by an earlier release is replaced. Its doorbells go with it,
			// and the timer relays their runs when it sees the new stream.
			err = b.replaceStream(ctx, cfg)
		case err == nil:
			_, err = b.js.UpdateStream(ctx, cfg)
		case errors.Is(err, jetstream.ErrStreamNotFound):
			_, err = b.js.CreateStream(ctx, cfg)
			if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
				err = nil // another service created it first
			}
		}
		if err != nil {
			return fmt.Errorf("ensure stream %s: %w", cfg.Name, err)
		}
	}
	return nil
}

func (b *Bus) replaceStream(ctx context.Context, cfg jetstream.StreamConfig) error {
	if err := b.js.DeleteStream(ctx, cfg.Name); err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
		return fmt.Errorf("delete stream %s to change its storage to %s: %w", cfg.Name, cfg.Storage, err)
	}
	_, err := b.js.CreateStream(ctx, cfg)
	if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
		return nil // another service replaced it first
	}
	return err
}

// TaskStreamInfo reads the task stream's state, for the timer to notice a stream that
// was lost and made anew (its Created time moves, or its last sequence goes back).
func (b *Bus) TaskStreamInfo(ctx context.Context) (*jetstream.StreamInfo, error) {
	st, err := b.js.Stream(ctx, wire.TaskStream)
	if err != nil {
		return nil, fmt.Errorf("task stream info: %w", err)
	}
	return st.CachedInfo(), nil
}

// SubmittedStart reads the start the submit stream holds at seq: its subject and body.
// ok is false once the start is gone from the stream (a scheduler committed or refused
// it: the stream keeps a start only until then) or when seq never held one.
func (b *Bus) SubmittedStart(ctx context.Context, seq uint64) (subject string, body []byte, ok bool, err error) {
	st, err := b.js.Stream(ctx, wire.SubmitStream)
	if err != nil {
		return "", nil, false, fmt.Errorf("submit stream: %w", err)
	}
	m, err := st.GetMsg(ctx, seq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return "", nil, false, nil
	}
	if err != nil {
		return "", nil, false, fmt.Errorf("read submitted start %d: %w", seq, err)
	}
	return m.Subject, m.Data, true, nil
}

func sameStreamConfig(have, want jetstream.StreamConfig) bool {
	return slices.Equal(have.Subjects, want.Subjects) && have.Retention == want.Retention &&
		have.Storage == want.Storage && have.Replicas == want.Replicas && have.Duplicates == want.Duplicates &&
		have.MaxAge == want.MaxAge && unlimited(have.MaxMsgSize) == unlimited(want.MaxMsgSize) && have.Discard == want.Discard
}

// unlimited spells "no limit" the way the server reports it: a stream created with
// MaxMsgSize 0 comes back as -1, and taking that for a difference would make every
// ensure rewrite the stream (and fail outright for an identity not allowed to update).
func unlimited(n int32) int32 {
	if n == 0 {
		return -1
	}
	return n
}

// EnsureTaskConsumer creates or updates the durable consumer that every executor serving
// a workflow shares.
func (b *Bus) EnsureTaskConsumer(ctx context.Context, namespace, workflow string, cc ConsumerConfig) (jetstream.Consumer, error) {
	name := wire.TaskConsumer(namespace, workflow)
	cons, err := b.js.CreateOrUpdateConsumer(ctx, wire.TaskStream, jetstream.ConsumerConfig{
		Durable:       name,
		FilterSubject: wire.TaskSubject(namespace, workflow),
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       cc.AckWait,
		MaxDeliver:    cc.MaxDeliver,
		MaxAckPending: cc.MaxAckPending,
		DeliverPolicy: jetstream.DeliverAllPolicy,
	})
	if err != nil {
		return nil, fmt.Errorf("ensure task consumer %s: %w", name, err)
	}
	return cons, nil
}

// EnsureSubmitConsumer creates or updates the durable consumer the schedulers share.
func (b *Bus) EnsureSubmitConsumer(ctx context.Context, cc ConsumerConfig) (jetstream.Consumer, error) {
	cons, err := b.js.CreateOrUpdateConsumer(ctx, wire.SubmitStream, jetstream.ConsumerConfig{
		Durable:       wire.SchedulerQueueGroup,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       cc.AckWait,
		MaxDeliver:    cc.MaxDeliver,
		MaxAckPending: cc.MaxAckPending,
		DeliverPolicy: jetstream.DeliverAllPolicy,
	})
	if err != nil {
		return nil, fmt.Errorf("ensure submit consumer: %w", err)
	}
	return cons, nil
}

// Doorbell is one task message to publish.
type Doorbell struct {
	Namespace string
	Workflow  string
	Task      wire.Task
	Resend    int64 // non-zero: a relay of a dispatch announced before (wire.ResendMsgID)
}

func (d Doorbell) msgID() string { return wire.ResendMsgID(d.Task.RunID, d.Task.DispatchSeq, d.Resend) }

// TaskConsumerInfo reads the state of a workflow's task consumer.
func (b *Bus) TaskConsumerInfo(ctx context.Context, namespace, workflow string) (*jetstream.ConsumerInfo, error) {
	c, err := b.js.Consumer(ctx, wire.TaskStream, wire.TaskConsumer(namespace, workflow))
	if err != nil {
		return nil, fmt.Errorf("task consumer of %s/%s: %w", namespace, workflow, err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("task consumer of %s/%s: %w", namespace, workflow, err)
	}
	return info, nil
}

// PublishTasks publishes doorbells and waits for JetStream to accept them. Each carries
// Nats-Msg-Id <run_id>:<dispatch_seq> (plus the relay's mark), so a repeated publish of
// one announcement is dropped by the stream while a re-dispatch or a relay is not. A
// failure is not fatal to correctness: the run stays QUEUED and the reconciler publishes
// again.
func (b *Bus) PublishTasks(ctx context.Context, bells []Doorbell) error {
	if len(bells) == 1 {
		bell := bells[0]
		data, _ := json.Marshal(bell.Task)
		_, err := b.js.Publish(ctx, wire.TaskSubject(bell.Namespace, bell.Workflow), data,
			jetstream.WithMsgID(bell.msgID()))
		if err != nil {
			return fmt.Errorf("publish task for run %s: %w", bell.Task.RunID, err)
		}
		return nil
	}
	futures := make([]jetstream.PubAckFuture, 0, len(bells))
	for _, bell := range bells {
		data, _ := json.Marshal(bell.Task)
		f, err := b.js.PublishAsync(wire.TaskSubject(bell.Namespace, bell.Workflow), data,
			jetstream.WithMsgID(bell.msgID()))
		if err != nil {
			return fmt.Errorf("publish task for run %s: %w", bell.Task.RunID, err)
		}
		futures = append(futures, f)
	}
	var errs []error
	for i, f := range futures {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			errs = append(errs, fmt.Errorf("publish task for run %s: %w", bells[i].Task.RunID, err))
		case <-ctx.Done():
			return fmt.Errorf("publish %d tasks: %w", len(bells), ctx.Err())
		}
	}
	return errors.Join(errs...)
}

// PublishDone announces a terminal run on core NATS, on its namespace's subject (the
// notice carries the outcome: only that namespace's clients may read it). Best effort:
// waiters fall back to reading PostgreSQL.
// A result whose output is over wire.DoneInlineMax, or is not JSON, is left out.
func (b *Bus) PublishDone(namespace string, runID wire.RunID, status wire.Status, res *wire.RunResult) {
	if res != nil && len(res.Output)+len(res.Error) > wire.DoneInlineMax {
		res = nil
	}
	data, err := json.Marshal(wire.RunDone{RunID: runID, Status: status, Result: res})
	if err != nil {
		data, _ = json.Marshal(wire.RunDone{RunID: runID, Status: status})
	}
	_ = b.nc.Publish(wire.DoneSubject(namespace, runID), data)
}

// PublishTimerHint tells timers that a run will be due at wakeAt. Best effort: the timer's
// periodic look is the safety net.
func (b *Bus) PublishTimerHint(wakeAt time.Time) {
	data, _ := json.Marshal(wire.TimerHint{WakeAt: wakeAt})
	_ = b.nc.Publish(wire.TimerHintSubject, data)
}

// DecodeTask parses a doorbell strictly: a message that is not exactly a task with a valid
// run id and a positive dispatch_seq is poison.
func DecodeTask(data []byte) (wire.Task, error) {
	var t wire.Task
	if len(data) > 1024 {
		return t, wire.Errorf(wire.ErrInvalidArgument, "task message of %d bytes", len(data))
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&t); err != nil {
		return t, wire.Errorf(wire.ErrInvalidArgument, "task message is not a task: %v", err)
	}
	// Decode stops after the first value: a task followed by anything is not a task.
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return wire.Task{}, wire.Errorf(wire.ErrInvalidArgument, "task message has data after the task")
	}
	if !wire.ValidRunID(t.RunID) || t.DispatchSeq <= 0 {
		return t, wire.Errorf(wire.ErrInvalidArgument, "task message has run_id %q dispatch_seq %d", t.RunID, t.DispatchSeq)
	}
	return t, nil
}
