package sdk_test

import (
	"context"
	"encoding/json"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

// env is a real PostgreSQL database and a real NATS server, plus minimal stand-ins for
// the scheduler's start handling and the timer's sweeps so the SDK can be tested without
// the services module (which has its own end-to-end suite over the real services).
type env struct {
	pool *pgxpool.Pool
	nc   *nats.Conn
	st   *store.Store
	bus  *bus.Bus

	describes atomic.Int64 // describe requests served
}

func newEnv(t testing.TB) *env {
	t.Helper()
	e, stop, err := setupEnv(testkit.NewDatabase(t), testkit.StartNATS(t).URL(), t.Name())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	return e
}

// setupEnv connects to the database and NATS server and starts the stand-ins; stop
// undoes it all.
func setupEnv(dbURL, natsURL, name string) (*env, func(), error) {
	ctx := context.Background()
	pool, err := store.Connect(ctx, dbURL, 16)
	if err != nil {
		return nil, nil, err
	}
	nc, err := bus.Connect(bus.ConnOptions{URL: natsURL, Name: name})
	if err != nil {
		pool.Close()
		return nil, nil, err
	}
	b, err := bus.New(nc, bus.DefaultStreamConfig())
	if err == nil {
		err = b.EnsureStreams(ctx)
	}
	if err != nil {
		nc.Close()
		pool.Close()
		return nil, nil, err
	}
	e := &env{pool: pool, nc: nc, st: store.New(pool), bus: b}
	stopStarts, err := e.serveStarts()
	if err != nil {
		nc.Close()
		pool.Close()
		return nil, nil, err
	}
	stopTimer := e.runTimer()
	return e, func() { stopTimer(); stopStarts(); nc.Close(); pool.Close() }, nil
}

func (e *env) serveStarts() (stop func(), err error) {
	sub, err := e.nc.Subscribe(wire.StartSubjects, func(m *nats.Msg) {
		var req wire.StartRequest
		reply := func(r wire.StartReply) { data, _ := json.Marshal(r); _ = m.Respond(data) }
		if err := json.Unmarshal(m.Data, &req); err != nil {
			reply(wire.StartReply{Error: wire.ToError(err)})
			return
		}
		ns, workflow, err := wire.ParseStartSubject(wire.StartSubjectPrefix, m.Subject)
		if err == nil {
			req.Namespace, err = wire.RequestNamespace(ns, req.Namespace)
		}
		if err != nil {
			reply(wire.StartReply{Error: wire.ToError(err)})
			return
		}
		key := req.IdempotencyKey
		if key == "" {
			key = "request:" + req.RequestID
		}
		id := wire.NewRunID()
		if wire.ValidRunID(req.RequestID) {
			id = req.RequestID
		}
		res, err := e.st.RunInsert(context.Background(), store.RunInsertParams{ID: id, Namespace: req.Namespace,
			Workflow: workflow, Input: req.Input, IdempotencyKey: key, MaxAttempts: req.MaxAttempts})
		if err != nil {
			reply(wire.StartReply{Error: wire.ToError(err)})
			return
		}
		reply(wire.StartReply{RunID: res.RunID, Existing: res.Existing})
		if !res.Existing {
			e.publish(res.Dispatch)
		}
	})
	if err != nil {
		return nil, err
	}
	desc, err := e.nc.Subscribe(wire.DescribeSubjects, func(m *nats.Msg) {
		e.describes.Add(1)
		var req wire.DescribeRequest
		_ = json.Unmarshal(m.Data, &req)
		ns, _, err := wire.ParseAPISubject(m.Subject)
		if err == nil {
			req.Namespace, err = wire.RequestNamespace(ns, req.Namespace)
		}
		var info wire.RunInfo
		if err == nil {
			info, err = e.st.RunGet(context.Background(), req.Namespace, req.RunID)
		}
		var r wire.DescribeReply
		if err != nil {
			r.Error = wire.ToError(err)
		} else {
			r.Run = &info
		}
		data, _ := json.Marshal(r)
		_ = m.Respond(data)
	})
	if err != nil {
		_ = sub.Unsubscribe()
		return nil, err
	}
	return func() { _ = sub.Unsubscribe(); _ = desc.Unsubscribe() }, nil
}

func (e *env) publish(ds ...store.Dispatch) {
	bells := make([]bus.Doorbell, len(ds))
	for i, d := range ds {
		bells[i] = bus.Doorbell{Namespace: d.Namespace, Workflow: d.Workflow, Task: wire.Task{RunID: d.RunID, DispatchSeq: d.DispatchSeq}}
	}
	_ = e.bus.PublishTasks(context.Background(), bells)
}

// harnessWakeLead is the lead the harness's timer wakes sleepers and retries with, as
// the timer service does by default: every sleep and retry test also proves that a run
// woken ahead of its time goes on no sooner.
const harnessWakeLead = 250 * time.Millisecond

// runTimer wakes due sleepers and re-queues expired leases every few milliseconds.
func (e *env) runTimer() (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if ds, err := e.st.RunsWakeDue(ctx, store.SweepParams{Limit: 100, WakeLead: harnessWakeLead}); err == nil {
				e.publish(ds...)
			}
			if exp, err := e.st.RunsExpireLeases(ctx, store.SweepParams{Limit: 100}); err == nil {
				for _, x := range exp {
					if x.Status == wire.StatusQueued {
						e.publish(x.Dispatch)
					}
				}
			}
		}
	}()
	return func() { cancel(); wg.Wait() }
}

type workerOpt func(*sdk.WorkerConfig)

func (e *env) worker(t testing.TB, defs []sdk.Registration, opts ...workerOpt) *sdk.Worker {
	t.Helper()
	cfg := sdk.WorkerConfig{Pool: e.pool, Conn: e.nc, Concurrency: 8, Lease: 2 * time.Second, RetryBackoff: 10 * time.Millisecond, ShutdownGrace: time.Second}
	if testing.Verbose() {
		cfg.Logger = slogToStderr()
	}
	for _, o := range opts {
		o(&cfg)
	}
	w, err := sdk.NewWorker(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Register(defs...); err != nil {
		t.Fatal(err)
	}
	if err := w.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Stop(context.Background()) })
	return w
}

func (e *env) client() *sdk.Client { return sdk.NewClient(e.nc, sdk.WithRequestTimeout(5*time.Second)) }

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func jetstreamMsgID(id string) jetstream.PublishOpt { return jetstream.WithMsgID(id) }
