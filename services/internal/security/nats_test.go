package security

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/demo"
)

// S01: under deploy/nats/nats-secure.conf the real services, each with its own identity
// over TLS (and PostgreSQL's runtime role from deploy/postgres/roles.sql), complete a run
// without a single permission violation; then every way in without credentials is
// refused and every operation outside an identity's role is denied, changing nothing.
func TestS01NATSAuthenticationAndLeastPrivilege(t *testing.T) {
	t.Parallel()
	n := startSecureNATS(t)

	v, err := n.varz()
	if err != nil {
		t.Fatal(err)
	}
	if !v.TLSRequired || !v.AuthRequired || v.MaxPayload != 1<<20 || v.JetStream.Config == nil || !v.JetStream.Config.SyncAlways {
		t.Fatalf("server runs tls_required=%v auth_required=%v max_payload=%d jetstream=%+v; want TLS, auth, 1 MiB and sync_always",
			v.TLSRequired, v.AuthRequired, v.MaxPayload, v.JetStream.Config)
	}

	// The services work under their permissions.
	roles := newPGRoles(t)
	dbURL := testkit.NewDatabase(t)
	roles.apply(t, dbURL)
	runtimeURL := roles.url(t, dbURL, roles.Runtime)
	for _, id := range []string{"scheduler", "timer", "executor"} {
		env := append(n.Env(id), "DATABASE_URL="+runtimeURL, "KAGZI_AUTO_MIGRATE=false", "KAGZI_HTTP_ADDR=off",
			"KAGZI_LOG_FORMAT=console", "KAGZI_LOG_LEVEL=info")
		testkit.StartProcess(t, id, bins[id], env...)
	}
	client := sdk.NewClient(connect(t, n.ConnOptions("client")), sdk.WithRequestTimeout(5*time.Second))
	ctx := ctxT(t, 30*time.Second)
	run, err := demo.Greet.Start(ctx, client, demo.GreetInput{Name: "Ada"})
	if err != nil {
		t.Fatalf("start greet as the client identity: %v", err)
	}
	out, err := run.Result(ctx)
	if err != nil || out.Greeting != "Hello, Ada! — Kagzi" {
		t.Fatalf("greet run ended %+v, %v; want it completed (it sleeps, so scheduler, executor and timer all took part)", out, err)
	}
	// Submitted runs waited for at once: a describe that comes before the commit makes
	// the scheduler read the start from the submit stream.
	var submitted []*sdk.Run[demo.GreetOutput]
	for range 3 {
		r, err := demo.Greet.Submit(ctx, client, demo.GreetInput{Name: "Grace"})
		if err != nil {
			t.Fatalf("submit greet as the client identity: %v", err)
		}
		if _, err := r.Describe(ctx); err != nil && !errors.Is(err, wire.ErrRunNotFound) {
			t.Fatalf("describe a submitted run: %v", err)
		}
		submitted = append(submitted, r)
	}
	for _, r := range submitted {
		if out, err := r.Result(ctx); err != nil || out.Greeting != "Hello, Grace! — Kagzi" {
			t.Fatalf("submitted greet run ended %+v, %v", out, err)
		}
	}
	if got := n.violations(); got != 0 {
		t.Fatalf("the services hit %d permission violations running one workflow; the shipped permissions are missing something:\n%s",
			got, violationLines(n.proc.Log()))
	}

	t.Run("connections without valid credentials over TLS are refused", func(t *testing.T) {
		refused := 0
		// 1. Anonymous, over TLS.
		if nc, err := nats.Connect(n.URL(), nats.RootCAs(n.pki.CA), nats.NoReconnect(), nats.Timeout(3*time.Second)); err == nil {
			nc.Close()
			t.Error("anonymous connection accepted")
		} else if errors.Is(err, nats.ErrAuthorization) {
			refused++
		} else {
			t.Errorf("anonymous connection failed for another reason than authorization: %v", err)
		}

		// 2. Plaintext, with a valid identity: the server must not speak NATS before TLS.
		rc := dialRaw(t, n.Addr())
		if rc.info["tls_required"] != true {
			t.Errorf("INFO does not say tls_required: %v", rc.info)
		}
		kp, err := nkeys.FromSeed(readSeed(t, n.seeds["scheduler"]))
		if err != nil {
			t.Fatal(err)
		}
		nonce, _ := rc.info["nonce"].(string)
		sig, _ := kp.Sign([]byte(nonce))
		pub, _ := kp.PublicKey()
		connect, _ := json.Marshal(map[string]any{"verbose": false, "nkey": pub, "sig": encodeSig(sig), "protocol": 1})
		rc.send(t, "CONNECT "+string(connect)+"\r\nPING\r\n")
		var answers []string
		for line := rc.readLine(); line != ""; line = rc.readLine() {
			answers = append(answers, line)
		}
		if slices.Contains(answers, "PONG") {
			t.Errorf("plaintext CONNECT on the TLS port was served: %q", answers)
		} else {
			refused++ // the server closed the connection
		}

		// 3. A well-formed NKey that is not one of the configured identities.
		stranger, err := nkeys.CreateUser()
		if err != nil {
			t.Fatal(err)
		}
		seed, _ := stranger.Seed()
		seedFile := filepath.Join(t.TempDir(), "stranger.nk")
		if err := os.WriteFile(seedFile, seed, 0o600); err != nil {
			t.Fatal(err)
		}
		nkeyOpt, err := nats.NkeyOptionFromSeed(seedFile)
		if err != nil {
			t.Fatal(err)
		}
		if nc, err := nats.Connect(n.URL(), nats.RootCAs(n.pki.CA), nkeyOpt, nats.NoReconnect(), nats.Timeout(3*time.Second)); err == nil {
			nc.Close()
			t.Error("connection with an unknown NKey accepted")
		} else if errors.Is(err, nats.ErrAuthorization) {
			refused++
		} else {
			t.Errorf("unknown NKey failed for another reason than authorization: %v", err)
		}
		t.Logf("S01 connections refused: %d/3", refused)
		if refused != 3 {
			t.Errorf("%d/3 connections refused", refused)
		}
	})

	t.Run("operations outside a role are denied and change nothing", func(t *testing.T) {
		ctx := ctxT(t, 30*time.Second)
		// Doorbells nobody consumes, so the task stream holds something a purge would lose.
		b, err := bus.New(connect(t, n.ConnOptions("scheduler")), bus.DefaultStreamConfig())
		if err != nil {
			t.Fatal(err)
		}
		var bells []bus.Doorbell
		for i := range 3 {
			bells = append(bells, bus.Doorbell{Namespace: "default", Workflow: "nobody-serves-this",
				Task: wire.Task{RunID: wire.NewRunID(), DispatchSeq: int64(i + 1)}})
		}
		if err := b.PublishTasks(ctx, bells); err != nil {
			t.Fatalf("scheduler identity publishing doorbells: %v", err)
		}
		operator := connect(t, n.ConnOptions("operator"))
		before := jetStreamState(t, ctx, operator)
		if before[wire.TaskStream].msgs != 3 || !slices.Contains(before[wire.TaskStream].consumers, wire.TaskConsumer("default", "greet")) {
			t.Fatalf("unexpected starting state %+v", before)
		}
		violationsBefore := n.violations()

		denied := newViolationRecorder()
		executor := connect(t, n.ConnOptions("executor"))
		executor.SetErrorHandler(denied.handle)
		client := connect(t, n.ConnOptions("client"))
		client.SetErrorHandler(denied.handle)
		attempts := []struct {
			conn    *nats.Conn
			subject string
			sub     bool
		}{
			{executor, "$JS.API.STREAM.PURGE." + wire.TaskStream, false},
			{executor, "$JS.API.STREAM.DELETE." + wire.TaskStream, false},
			{executor, "$JS.API.CONSUMER.DELETE." + wire.TaskStream + "." + wire.TaskConsumer("default", "greet"), false},
			{executor, wire.StartSubject(wire.DefaultNamespace, "x"), false},
			{client, wire.TaskSubjectPrefix + ">", true},
			// Beyond the battery: an update could shrink the stream's limits, a purge by
			// other means, which is why executors may create streams but not update them.
			{executor, "$JS.API.STREAM.UPDATE." + wire.TaskStream, false},
		}
		for _, a := range attempts {
			var err error
			if a.sub {
				_, err = a.conn.Subscribe(a.subject, func(*nats.Msg) { t.Errorf("client identity received a doorbell") })
			} else {
				err = a.conn.Publish(a.subject, []byte(`{}`))
			}
			if err != nil {
				t.Fatalf("send %s: %v", a.subject, err)
			}
			if err := a.conn.Flush(); err != nil {
				t.Fatalf("flush after %s: %v", a.subject, err)
			}
		}
		want := make([]string, len(attempts))
		for i, a := range attempts {
			want[i] = a.subject
		}
		got := denied.waitFor(want, 5*time.Second)
		t.Logf("S01 operations denied: %d/5 of the battery's, %d/%d in all", min(got, 5), got, len(attempts))
		if got != len(attempts) {
			t.Errorf("%d/%d operations got a permissions violation; seen: %q", got, len(attempts), denied.seen())
		}
		if logged := n.violations() - violationsBefore; logged != len(attempts) {
			t.Errorf("server logged %d violations, want %d:\n%s", logged, len(attempts), violationLines(n.proc.Log()))
		}
		if after := jetStreamState(t, ctx, operator); !sameState(before, after) {
			t.Errorf("JetStream changed: before %+v, after %+v", before, after)
		}
		var runs int
		pool := connectPG(t, dbURL)
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM workflow_runs`).Scan(&runs); err != nil || runs != 1+len(submitted) {
			t.Errorf("workflow_runs holds %d rows (%v), want only the %d greet runs", runs, err, 1+len(submitted))
		}
	})
}

// connect opens a connection the way the services do (bus.Connect) and waits until it
// is up, so an authentication or TLS failure shows here and not as a later timeout.
func connect(t *testing.T, o bus.ConnOptions) *nats.Conn {
	t.Helper()
	nc, err := bus.Connect(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	end := time.Now().Add(10 * time.Second)
	for !nc.IsConnected() {
		if time.Now().After(end) {
			t.Fatalf("connect as %s: %v", o.Name, nc.LastError())
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nc
}

func readSeed(t *testing.T, file string) []byte {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return []byte(strings.TrimSpace(string(b)))
}

func violationLines(log string) string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, " Violation - ") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// violationRecorder collects the asynchronous permission errors the server sends.
type violationRecorder struct {
	mu       sync.Mutex
	subjects map[string]bool
	changed  chan struct{}
}

func newViolationRecorder() *violationRecorder {
	return &violationRecorder{subjects: map[string]bool{}, changed: make(chan struct{}, 1)}
}

func (r *violationRecorder) handle(_ *nats.Conn, _ *nats.Subscription, err error) {
	if !errors.Is(err, nats.ErrPermissionViolation) {
		return
	}
	// "… Permissions Violation for Publish to "subject"" (or "Subscription to").
	msg := err.Error()
	i := strings.LastIndex(msg, ` to "`)
	if i < 0 {
		return
	}
	subject, _, _ := strings.Cut(msg[i+len(` to "`):], `"`)
	r.mu.Lock()
	r.subjects[subject] = true
	r.mu.Unlock()
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

// waitFor waits until every subject in want was denied or d passes, and returns how many
// were.
func (r *violationRecorder) waitFor(want []string, d time.Duration) int {
	deadline := time.After(d)
	for {
		r.mu.Lock()
		n := 0
		for _, s := range want {
			if r.subjects[s] {
				n++
			}
		}
		r.mu.Unlock()
		if n == len(want) {
			return n
		}
		select {
		case <-r.changed:
		case <-deadline:
			return n
		}
	}
}

func (r *violationRecorder) seen() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for s := range r.subjects {
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

type streamState struct {
	msgs      uint64
	consumers []string
}

// jetStreamState reads both streams' message counts and consumer names as the
// read-only operator identity.
func jetStreamState(t *testing.T, ctx context.Context, nc *nats.Conn) map[string]streamState {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]streamState{}
	for _, name := range []string{wire.TaskStream, wire.SubmitStream} {
		s, err := js.Stream(ctx, name)
		if err != nil {
			t.Fatalf("operator reads stream %s: %v", name, err)
		}
		st := streamState{msgs: s.CachedInfo().State.Msgs}
		names := s.ConsumerNames(ctx)
		for c := range names.Name() {
			st.consumers = append(st.consumers, c)
		}
		if err := names.Err(); err != nil {
			t.Fatalf("operator lists consumers of %s: %v", name, err)
		}
		slices.Sort(st.consumers)
		out[name] = st
	}
	return out
}

func sameState(a, b map[string]streamState) bool {
	if len(a) != len(b) {
		return false
	}
	for k, x := range a {
		y, ok := b[k]
		if !ok || x.msgs != y.msgs || !slices.Equal(x.consumers, y.consumers) {
			return false
		}
	}
	return true
}
