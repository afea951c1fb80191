package scheduler_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/scheduler"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// env is one test's private PostgreSQL database and NATS server.
type env struct {
	pool *pgxpool.Pool
	st   *store.Store
	nc   *nats.Conn
	b    *bus.Bus
	m    *scheduler.Metrics
}

func newEnv(t *testing.T) *env {
	t.Helper()
	dbURL := testkit.NewDatabase(t)
	srv := testkit.StartNATS(t)
	pool, err := store.Connect(context.Background(), dbURL, 8)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	nc, err := bus.Connect(bus.ConnOptions{URL: srv.URL(), Name: t.Name()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	b, err := bus.New(nc, bus.DefaultStreamConfig())
	if err != nil {
		t.Fatal(err)
	}
	return &env{pool: pool, st: store.New(pool), nc: nc, b: b, m: scheduler.NewMetrics(prometheus.NewRegistry())}
}

func (e *env) newScheduler(t *testing.T, cfg scheduler.Config) *scheduler.Scheduler {
	t.Helper()
	s := scheduler.New(cfg, e.st, e.b, zaptest.NewLogger(t), e.m)
	t.Cleanup(s.Stop)
	return s
}

func (e *env) startScheduler(t *testing.T, cfg scheduler.Config) *scheduler.Scheduler {
	t.Helper()
	s := e.newScheduler(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return s
}

// start sends a request-reply start with a raw body in the default namespace.
func (e *env) start(t *testing.T, workflow string, body []byte) wire.StartReply {
	t.Helper()
	return e.startOn(t, wire.StartSubject(wire.DefaultNamespace, workflow), body)
}

// startOn sends a request-reply start with a raw body on any subject.
func (e *env) startOn(t *testing.T, subject string, body []byte) wire.StartReply {
	t.Helper()
	msg, err := e.nc.Request(subject, body, 10*time.Second)
	if err != nil {
		t.Fatalf("start request: %v", err)
	}
	var rep wire.StartReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		t.Fatalf("start reply %q: %v", msg.Data, err)
	}
	return rep
}

func (e *env) startJSON(t *testing.T, workflow string, req wire.StartRequest) wire.StartReply {
	t.Helper()
	body, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	return e.start(t, workflow, body)
}

func (e *env) describe(t *testing.T, namespace string, body []byte) wire.DescribeReply {
	t.Helper()
	msg, err := e.nc.Request(wire.DescribeSubject(namespace), body, 10*time.Second)
	if err != nil {
		t.Fatalf("describe request: %v", err)
	}
	var rep wire.DescribeReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		t.Fatalf("describe reply %q: %v", msg.Data, err)
	}
	return rep
}

func (e *env) countRuns(t *testing.T) int {
	t.Helper()
	var n int
	if err := e.pool.QueryRow(context.Background(), `SELECT count(*) FROM workflow_runs`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// nextTask waits for the next doorbell of a workflow in the task stream.
func (e *env) nextTask(t *testing.T, namespace, workflow string) wire.Task {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cons, err := e.b.EnsureTaskConsumer(ctx, namespace, workflow, bus.DefaultConsumerConfig())
	if err != nil {
		t.Fatal(err)
	}
	msg, err := cons.Next(jetstream.FetchMaxWait(10 * time.Second))
	if err != nil {
		t.Fatalf("no task doorbell for %s/%s: %v", namespace, workflow, err)
	}
	task, err := bus.DecodeTask(msg.Data())
	if err != nil {
		t.Fatal(err)
	}
	if err := msg.Ack(); err != nil {
		t.Fatal(err)
	}
	return task
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestStartRepliesAfterCommit(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.startScheduler(t, scheduler.Config{})

	rep := e.startJSON(t, "greet", wire.StartRequest{Input: json.RawMessage(`{ "name": "ada" }`)})
	if rep.Error != nil || !wire.ValidRunID(rep.RunID) || rep.Existing {
		t.Fatalf("reply = %+v, want a new run id", rep)
	}
	// The reply came after the commit: the row is readable at once, with no waiting.
	run, err := e.st.RunGet(context.Background(), wire.DefaultNamespace, rep.RunID)
	if err != nil {
		t.Fatalf("run %s not readable right after the reply: %v", rep.RunID, err)
	}
	if run.Status != wire.StatusQueued || run.Workflow != "greet" || string(run.Input) != `{"name":"ada"}` ||
		run.MaxAttempts != 5 || run.IdempotencyKey != "run:"+rep.RunID {
		t.Fatalf("run = %+v", run)
	}
	task := e.nextTask(t, wire.DefaultNamespace, "greet")
	if task.RunID != rep.RunID || task.DispatchSeq != 1 {
		t.Fatalf("doorbell = %+v, want run %s dispatch 1", task, rep.RunID)
	}
	if got := testutil.ToFloat64(e.m.Starts.WithLabelValues("created")); got != 1 {
		t.Fatalf("kagzi_starts_total{result=created} = %v, want 1", got)
	}
}

func TestStartAbsentInputIsNull(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.startScheduler(t, scheduler.Config{})
	// A body may repeat its subject's namespace.
	rep := e.startOn(t, wire.StartSubject("billing", "wf"), []byte(`{"namespace":"billing","max_attempts":3}`))
	if rep.Error != nil {
		t.Fatal(rep.Error)
	}
	run, err := e.st.RunGet(context.Background(), "billing", rep.RunID)
	if err != nil {
		t.Fatal(err)
	}
	if string(run.Input) != "null" || run.MaxAttempts != 3 || run.Namespace != "billing" {
		t.Fatalf("run = %+v", run)
	}
}

func TestStartIdempotent(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.startScheduler(t, scheduler.Config{})

	first := e.startJSON(t, "wf", wire.StartRequest{Input: json.RawMessage(`{"a":1}`), IdempotencyKey: "signup-42"})
	// The same input with different whitespace is the same start.
	again := e.start(t, "wf", []byte(`{"input": {"a": 1}, "idempotency_key": "signup-42"}`))
	if first.Error != nil || again.Error != nil || again.RunID != first.RunID || !again.Existing || first.Existing {
		t.Fatalf("first = %+v, again = %+v, want the same run, the second existing", first, again)
	}

	// A retried request (same request id, no key) also makes one run.
	r1 := e.startJSON(t, "wf", wire.StartRequest{RequestID: "req-1"})
	r2 := e.startJSON(t, "wf", wire.StartRequest{RequestID: "req-1"})
	if r1.Error != nil || r2.Error != nil || r1.RunID != r2.RunID || !r2.Existing {
		t.Fatalf("r1 = %+v, r2 = %+v, want one run", r1, r2)
	}
	if n := e.countRuns(t); n != 2 {
		t.Fatalf("%d runs, want 2", n)
	}
}

func TestStartIdempotencyConflict(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.startScheduler(t, scheduler.Config{})

	first := e.startJSON(t, "wf", wire.StartRequest{Input: json.RawMessage(`{"a":1}`), IdempotencyKey: "k"})
	if first.Error != nil {
		t.Fatal(first.Error)
	}
	rep := e.startJSON(t, "wf", wire.StartRequest{Input: json.RawMessage(`{"a":2}`), IdempotencyKey: "k"})
	if rep.Error == nil || rep.Error.Code != wire.CodeIdempotencyConflict || !errors.Is(rep.Error, wire.ErrIdempotencyConflict) {
		t.Fatalf("reply = %+v, want idempotency_conflict", rep)
	}
	if rep.RunID != "" || rep.Existing {
		t.Fatalf("a conflict must not hand out the existing run as a success: %+v", rep)
	}
	if n := e.countRuns(t); n != 1 {
		t.Fatalf("%d runs, want 1", n)
	}
	if got := testutil.ToFloat64(e.m.Starts.WithLabelValues("conflict")); got != 1 {
		t.Fatalf("kagzi_starts_total{result=conflict} = %v, want 1", got)
	}
}

func TestStartRejectsBadInput(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const limit = 64
	e.startScheduler(t, scheduler.Config{Limits: wire.Limits{MaxInputBytes: limit}})

	// A JSON string whose encoding is exactly n bytes.
	jsonString := func(n int) string { return `"` + strings.Repeat("x", n-2) + `"` }

	cases := []struct {
		name     string
		workflow string // in the default namespace, unless subject is set
		body     string
		code     wire.Code
		sentinel error
		subject  string
	}{
		{"malformed json", "wf", `{"input":`, wire.CodeInvalidArgument, wire.ErrInvalidArgument, ""},
		{"not json", "wf", `hello`, wire.CodeInvalidArgument, wire.ErrInvalidArgument, ""},
		{"empty body", "wf", ``, wire.CodeInvalidArgument, wire.ErrInvalidArgument, ""},
		{"json null", "wf", `null`, wire.CodeInvalidArgument, wire.ErrInvalidArgument, ""},
		{"unknown field", "wf", `{"inputs":1}`, wire.CodeInvalidArgument, wire.ErrInvalidArgument, ""},
		{"trailing data", "wf", `{"input":1} {"input":2}`, wire.CodeInvalidArgument, wire.ErrInvalidArgument, ""},
		{"oversized input", "wf", `{"input":` + jsonString(limit+1) + `}`, wire.CodePayloadTooLarge, wire.ErrPayloadTooLarge, ""},
		{"bad workflow name", "bad$name", `{}`, wire.CodeInvalidArgument, wire.ErrInvalidArgument, ""},
		{"bad namespace name", "", `{}`, wire.CodeInvalidArgument, wire.ErrInvalidArgument, wire.StartSubjectPrefix + "bad$ns.wf"},
		{"another namespace in the body", "wf", `{"namespace":"billing"}`, wire.CodePermissionDenied, wire.ErrPermissionDenied, ""},
		{"dotted namespace in the body", "wf", `{"namespace":"a.b"}`, wire.CodePermissionDenied, wire.ErrPermissionDenied, ""},
		{"max attempts too high", "wf", `{"max_attempts":101}`, wire.CodeInvalidArgument, wire.ErrInvalidArgument, ""},
		{"negative max attempts", "wf", `{"max_attempts":-1}`, wire.CodeInvalidArgument, wire.ErrInvalidArgument, ""},
		{"NUL in idempotency key", "wf", `{"idempotency_key":"a\u0000b"}`, wire.CodeInvalidArgument, wire.ErrInvalidArgument, ""},
		{"long request id", "wf", `{"request_id":"` + strings.Repeat("r", 256) + `"}`, wire.CodeInvalidArgument, wire.ErrInvalidArgument, ""},
	}
	for _, tc := range cases {
		subject := tc.subject
		if subject == "" {
			subject = wire.StartSubject(wire.DefaultNamespace, tc.workflow)
		}
		rep := e.startOn(t, subject, []byte(tc.body))
		if rep.Error == nil || rep.Error.Code != tc.code || !errors.Is(rep.Error, tc.sentinel) || rep.RunID != "" {
			t.Errorf("%s: reply = %+v, want code %s and no run", tc.name, rep, tc.code)
		} else if rep.Error.Message == "" {
			t.Errorf("%s: error has no message", tc.name)
		}
	}
	if n := e.countRuns(t); n != 0 {
		t.Fatalf("%d runs written by rejected starts, want 0", n)
	}
	if got := testutil.ToFloat64(e.m.Starts.WithLabelValues("denied")); got != 2 {
		t.Errorf("kagzi_starts_total{result=denied} = %v, want 2", got)
	}

	// Exactly at the limit is accepted.
	rep := e.start(t, "wf", []byte(`{"input":`+jsonString(limit)+`}`))
	if rep.Error != nil {
		t.Fatalf("input of exactly %d bytes: %v", limit, rep.Error)
	}
}

func TestStartConcurrent(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.startScheduler(t, scheduler.Config{})

	const n = 100
	ids := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			body, _ := json.Marshal(wire.StartRequest{Input: json.RawMessage(fmt.Sprint(i))})
			msg, err := e.nc.Request(wire.StartSubject(wire.DefaultNamespace, "wf"), body, 20*time.Second)
			if err != nil {
				errs[i] = err
				return
			}
			var rep wire.StartReply
			if err := json.Unmarshal(msg.Data, &rep); err != nil {
				errs[i] = err
				return
			}
			if rep.Error != nil {
				errs[i] = rep.Error
			}
			ids[i] = rep.RunID
		})
	}
	wg.Wait()
	seen := map[string]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("start %d: %v", i, errs[i])
		}
		if seen[ids[i]] {
			t.Fatalf("run id %s handed out twice", ids[i])
		}
		seen[ids[i]] = true
	}
	if got := e.countRuns(t); got != n {
		t.Fatalf("%d runs, want %d", got, n)
	}
}

func TestSubmitCommittedWhenSchedulerStarts(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	if err := e.b.EnsureStreams(ctx); err != nil {
		t.Fatal(err)
	}
	js := e.b.JetStream()
	publish := func(body string, opts ...jetstream.PublishOpt) {
		t.Helper()
		if _, err := js.Publish(ctx, wire.SubmitSubject(wire.DefaultNamespace, "report"), []byte(body), opts...); err != nil {
			t.Fatal(err)
		}
	}
	// No scheduler runs: the stream holds these.
	publish(`{"input":{"n":1},"request_id":"r-1"}`)
	publish(`{"input":{"n":1},"request_id":"r-1"}`) // a client's retry: still one run
	publish(`{"input":{"n":2}}`)                    // keyless: named by its stream position
	publish(`{"input":{"n":3}}`, jetstream.WithMsgID("pub-7"))

	if n := e.countRuns(t); n != 0 {
		t.Fatalf("%d runs before any scheduler ran", n)
	}
	e.startScheduler(t, scheduler.Config{})
	eventually(t, 10*time.Second, "3 runs committed", func() bool { return e.countRuns(t) == 3 })

	keys := map[string]bool{}
	rows, err := e.pool.Query(ctx, `SELECT idempotency_key FROM workflow_runs`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var k string
		if err := rows.Scan(&k); err != nil {
			t.Fatal(err)
		}
		keys[k] = true
	}
	if rows.Err() != nil {
		t.Fatal(rows.Err())
	}
	if !keys["request:r-1"] || !keys["msgid:pub-7"] {
		t.Fatalf("idempotency keys = %v", keys)
	}

	// Every committed start rang its doorbell.
	runs := map[string]bool{}
	for range 3 {
		runs[e.nextTask(t, wire.DefaultNamespace, "report").RunID] = true
	}
	if len(runs) != 3 {
		t.Fatalf("doorbells for %d distinct runs, want 3", len(runs))
	}
	// And every submit message was acked, so the work-queue stream is empty.
	eventually(t, 10*time.Second, "submit stream emptied", func() bool {
		st, err := js.Stream(ctx, wire.SubmitStream)
		if err != nil {
			t.Fatal(err)
		}
		info, err := st.Info(ctx)
		return err == nil && info.State.Msgs == 0
	})
}

func TestSubmitPoisonIsTerminated(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	e.startScheduler(t, scheduler.Config{Limits: wire.Limits{MaxInputBytes: 16}})
	js := e.b.JetStream()
	for _, m := range []struct{ rest, body string }{
		{"default.wf", `not json`},
		{"default.wf", `{"input":1,"bogus":true}`},
		{"default.bad$name", `{}`},
		{"default.wf", `{"input":"this input is longer than sixteen bytes"}`},
		{"default.a.b", `{}`}, // the stream's wildcard is '>', so a dotted workflow reaches us
		{"wf", `{}`},          // no namespace token
		{"bad$ns.wf", `{}`},
		{"default.wf", `{"namespace":"billing"}`}, // the body reaches past its subject
	} {
		if _, err := js.Publish(ctx, wire.SubmitSubjectPrefix+m.rest, []byte(m.body)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := js.Publish(ctx, wire.SubmitSubject(wire.DefaultNamespace, "wf"), []byte(`{"input":1}`)); err != nil {
		t.Fatal(err)
	}
	poison := e.m.Poison.WithLabelValues("submit")
	eventually(t, 10*time.Second, "8 poison messages counted and 1 run", func() bool {
		return testutil.ToFloat64(poison) == 8 && e.countRuns(t) == 1
	})
	// Terminated, not left for redelivery: nothing pending or awaiting an ack.
	eventually(t, 10*time.Second, "submit consumer settled", func() bool {
		cons, err := js.Consumer(ctx, wire.SubmitStream, wire.SchedulerQueueGroup)
		if err != nil {
			t.Fatal(err)
		}
		info, err := cons.Info(ctx)
		return err == nil && info.NumPending == 0 && info.NumAckPending == 0 && info.NumRedelivered == 0
	})
	if got := testutil.ToFloat64(poison); got != 8 {
		t.Fatalf("poison count = %v, want 8", got)
	}
	if got := testutil.ToFloat64(e.m.Starts.WithLabelValues("denied")); got != 1 {
		t.Fatalf("kagzi_starts_total{result=denied} = %v, want 1", got)
	}
}

func TestSubmitSurvivesLostConsumerAndStream(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	e.startScheduler(t, scheduler.Config{})
	js := e.b.JetStream()

	submitAndWait := func(n int) {
		t.Helper()
		// The stream may be on its way back: retry the publish until it is accepted.
		eventually(t, 15*time.Second, "submit accepted", func() bool {
			_, err := js.Publish(ctx, wire.SubmitSubject(wire.DefaultNamespace, "wf"), fmt.Appendf(nil, `{"input":%d}`, n))
			return err == nil
		})
		eventually(t, 15*time.Second, fmt.Sprintf("%d runs", n), func() bool { return e.countRuns(t) == n })
	}
	submitAndWait(1)

	if err := js.DeleteConsumer(ctx, wire.SubmitStream, wire.SchedulerQueueGroup); err != nil {
		t.Fatal(err)
	}
	submitAndWait(2)

	if err := js.DeleteStream(ctx, wire.SubmitStream); err != nil {
		t.Fatal(err)
	}
	submitAndWait(3)
}

func TestDescribe(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.startScheduler(t, scheduler.Config{})

	body, _ := json.Marshal(wire.StartRequest{Input: json.RawMessage(`[1,2]`), IdempotencyKey: "d-1"})
	started := e.startOn(t, wire.StartSubject("ops", "wf"), body)
	if started.Error != nil {
		t.Fatal(started.Error)
	}
	body, _ = json.Marshal(wire.DescribeRequest{RunID: started.RunID})
	rep := e.describe(t, "ops", body)
	if rep.Error != nil || rep.Run == nil {
		t.Fatalf("describe = %+v", rep)
	}
	if rep.Run.ID != started.RunID || rep.Run.Status != wire.StatusQueued || rep.Run.Workflow != "wf" ||
		string(rep.Run.Input) != `[1,2]` || rep.Run.IdempotencyKey != "d-1" {
		t.Fatalf("run = %+v", rep.Run)
	}

	for name, req := range map[string]struct {
		namespace string
		body      wire.DescribeRequest
	}{
		"unknown id":      {"ops", wire.DescribeRequest{Namespace: "ops", RunID: wire.NewRunID()}},
		"other namespace": {wire.DefaultNamespace, wire.DescribeRequest{RunID: started.RunID}},
		"not an id":       {"ops", wire.DescribeRequest{Namespace: "ops", RunID: "nope"}},
	} {
		body, _ := json.Marshal(req.body)
		rep := e.describe(t, req.namespace, body)
		if rep.Run != nil || rep.Error == nil || rep.Error.Code != wire.CodeNotFound {
			t.Errorf("%s: describe = %+v, want not_found", name, rep)
		}
	}
	for name, body := range map[string]string{
		"garbage":       `{{`,
		"unknown field": `{"id":"x"}`,
	} {
		rep := e.describe(t, "ops", []byte(body))
		if rep.Run != nil || rep.Error == nil || rep.Error.Code != wire.CodeInvalidArgument {
			t.Errorf("%s: describe = %+v, want invalid_argument", name, rep)
		}
	}
	// The body may not name another namespace than the subject's: a client allowed only
	// kagzi.api.default.> must not read the run of ops.
	for name, body := range map[string]string{
		"ops run from default's subject": `{"namespace":"ops","run_id":"` + started.RunID + `"}`,
		"bad namespace in the body":      `{"namespace":"a.b","run_id":"` + started.RunID + `"}`,
	} {
		rep := e.describe(t, wire.DefaultNamespace, []byte(body))
		if rep.Run != nil || rep.Error == nil || rep.Error.Code != wire.CodePermissionDenied {
			t.Errorf("%s: describe = %+v, want permission_denied", name, rep)
		}
	}
	if got := testutil.ToFloat64(e.m.Describes.WithLabelValues("denied")); got != 2 {
		t.Errorf("kagzi_describe_total{result=denied} = %v, want 2", got)
	}
	rep = e.describe(t, "bad$ns", []byte(`{"run_id":"`+started.RunID+`"}`))
	if rep.Run != nil || rep.Error == nil || rep.Error.Code != wire.CodeInvalidArgument {
		t.Errorf("bad namespace in the subject: describe = %+v, want invalid_argument", rep)
	}
}

func TestStartStopContract(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	never := e.newScheduler(t, scheduler.Config{})
	never.Stop() // stopping what never started is fine
	never.Stop()
	if err := never.Start(context.Background()); err == nil {
		t.Fatal("Start after Stop succeeded")
	}

	s := e.startScheduler(t, scheduler.Config{})
	if err := s.Start(context.Background()); err == nil {
		t.Fatal("second Start succeeded")
	}
	if rep := e.startJSON(t, "wf", wire.StartRequest{}); rep.Error != nil {
		t.Fatal(rep.Error)
	}
	s.Stop()
	s.Stop()
	// Nobody serves starts any more.
	if _, err := e.nc.Request(wire.StartSubject(wire.DefaultNamespace, "wf"), []byte(`{}`), time.Second); !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("request after Stop: err = %v, want no responders", err)
	}
}
