package security

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

// S08 sizes (BATTERY.md gives one): the flood's target rate and length, the idle crowd,
// the second client's rate, and the server limits the test configures.
const (
	s08FloodRate     = 10_000
	s08FloodFor      = 10 * time.Second
	s08IdleConns     = 1000
	s08QuietEvery    = 100 * time.Millisecond // 10 starts a second
	s08MaxConns      = 1200
	s08MaxPayload    = 1 << 20
	s08SchedulerPool = 8
	// s08NamespaceRate is the scheduler's KAGZI_NAMESPACE_RATE: what a deployment shared
	// by tenants sets so that one tenant's flood leaves room for the others.
	s08NamespaceRate = 300
	tenantA, tenantB = "tenant-a", "tenant-b"
	tenantAInbox     = "_INBOX_tenant-a"
)

// S08 — admin/API authentication and ingress flooding, over the real scheduler under
// deploy/nats/nats-secure.conf as shipped, with max_connections lowered to 1,200 for the
// test. The engine's API is what the scheduler serves: start (request-reply), submit
// (the JetStream submit stream), describe (a run with its payloads), plus the completion
// notices, which carry outcomes; there is no list, cancel or retry endpoint to attack.
//
//  1. Every call without credentials (anonymous, or signed with an unknown NKey) is
//     refused at the connection: Authorization Violation (401), nothing served.
//  2. The example tenant identity (tenant_a, namespace tenant-a) calling into tenant-b:
//     NATS refuses every subject of another namespace (permission violation, 403), and the
//     scheduler refuses, with permission_denied, a body that names tenant-b on tenant-a's
//     own subjects (start, submit, describe); a describe of tenant-b's run id in its own
//     namespace finds nothing (not_found). Its own calls succeed (the control).
//  3. A flood: 10 s of starts at 10,000/s from tenant_a (its own process), beside 1,000
//     idle connections, while the all-namespace client starts 10 runs/s in tenant-b; the
//     same 10/s alone before is the baseline. The scheduler runs as a deployment shared by
//     tenants would: KAGZI_NAMESPACE_RATE=300 (without a rate, the flood's admitted
//     starts took the machine from tenant-b in development runs: p99 6–11× its
//     baseline, p50 5–10×, on two cores).
//     Pass: tenant-b's p99 ≤ 2× the baseline's, all its starts accepted; the scheduler
//     sheds the flood with explicit overloaded answers (count > 0, equal to its own
//     metrics, so none was tenant-b's), every flood start answered (none unanswered); the
//     scheduler's PostgreSQL sessions never exceed its pool.
//  4. Limits: with 1,200 connections open one more is refused (maximum connections
//     exceeded); a message of exactly max_payload (1 MiB) is accepted, one byte more is
//     refused (Maximum Payload Violation).
func TestS08APIAuthenticationAndIngressFlooding(t *testing.T) {
	if !*chaos {
		t.Skip("chaos tier: BATTERY.md runs S08 in make chaos (-args -kagzi.chaos)")
	}
	row := newSecurityRow(t, fmt.Sprintf("flood %d/s × %s + %d idle connections; 2nd namespace 10/s; namespace rate %d/s; max_connections %d, max_payload 1 MiB",
		s08FloodRate, s08FloodFor, s08IdleConns, s08NamespaceRate, s08MaxConns))
	flooder, err := testkit.Build(t.TempDir(), "github.com/kagzi/kagzi/services/internal/security/s08flood")
	if err != nil {
		t.Fatal(err)
	}
	n := startSecureNATSWith(t, fmt.Sprintf("max_connections: %d", s08MaxConns))
	v, err := n.varz()
	if err != nil {
		t.Fatal(err)
	}
	if !v.AuthRequired || !v.TLSRequired || v.MaxConnections != s08MaxConns || v.MaxPayload != s08MaxPayload {
		t.Fatalf("server runs auth=%v tls=%v max_connections=%d max_payload=%d; want auth, TLS, %d and %d",
			v.AuthRequired, v.TLSRequired, v.MaxConnections, v.MaxPayload, s08MaxConns, s08MaxPayload)
	}

	dbURL := testkit.NewDatabase(t)
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sched := testkit.StartProcess(t, "scheduler", bins["scheduler"], append(n.Env("scheduler"), "DATABASE_URL="+dbURL,
		"KAGZI_DB_MAX_CONNS="+strconv.Itoa(s08SchedulerPool), "KAGZI_HTTP_ADDR="+metricsAddr,
		"KAGZI_NAMESPACE_RATE="+strconv.Itoa(s08NamespaceRate),
		"KAGZI_LOG_FORMAT=console", "KAGZI_LOG_LEVEL=info")...)
	pool := connectPG(t, dbURL)

	quietConn := connect(t, n.ConnOptions("client"))
	quiet := sdk.NewClient(quietConn, sdk.WithNamespace(tenantB), sdk.WithRequestTimeout(5*time.Second))
	ctx := ctxT(t, 5*time.Minute)
	bRun, err := quiet.StartByName(ctx, "wf", map[string]string{"secret": "tenant-b's"})
	if err != nil {
		t.Fatalf("tenant-b's first start: %v", err)
	}

	a := checkS08Auth(t, n, pool, metricsAddr, bRun)
	row.Faults = fmt.Sprintf("%d unauthenticated calls, %d cross-namespace calls", a.unauthTried, a.natsTried+a.schedTried)
	row.Refused = fmt.Sprintf("401: %d/%d; 403 by NATS: %d/%d, by the scheduler: %d/%d",
		a.unauthRefused, a.unauthTried, a.natsRefused, a.natsTried, a.schedRefused, a.schedTried)
	t.Logf("S08 refused: %s", row.Refused)

	f := floodS08(t, n, flooder["s08flood"], pool, metricsAddr, quiet)
	row.Faults += fmt.Sprintf("; flood %d starts at %.0f/s (target %d/s), %d idle connections", f.flood.Sent, f.flood.Rate, s08FloodRate, s08IdleConns)
	row.Measured = fmt.Sprintf("2nd namespace p99 %.1f ms (baseline %.1f ms, ≤ 2×); flood: %d created, %d overloaded, %d unanswered; PG sessions ≤ %d (pool %d)",
		f.p99, f.baselineP99, f.flood.Created, f.flood.Overloaded, f.flood.Unanswered, f.pgMax, s08SchedulerPool)

	l := checkS08Limits(t, n)
	row.Refused += fmt.Sprintf("; limits: %d/2 refused", l)
	if sched.Exited() {
		t.Errorf("the scheduler exited during the test")
	}
	if strings.Contains(sched.Log(), "too many clients") {
		t.Errorf("the scheduler met PostgreSQL's connection limit")
	}
}

type s08AuthResult struct {
	unauthTried, unauthRefused int
	natsTried, natsRefused     int
	schedTried, schedRefused   int
}

// checkS08Auth makes every unauthenticated and cross-namespace call and counts the
// refusals; bRun is a run of tenant-b that tenant_a must not read.
func checkS08Auth(t *testing.T, n *secureNATS, pool *pgxpool.Pool, metricsAddr, bRun string) s08AuthResult {
	t.Helper()
	var r s08AuthResult
	ctx := ctxT(t, time.Minute)
	countB := func() int {
		return countRows(t, pool, `SELECT count(*) FROM workflow_runs WHERE namespace = $1`, tenantB)
	}
	runsB := countB()

	// 1. No credentials: the server answers the CONNECT with Authorization Violation and
	// closes the connection, whatever call follows it.
	calls := map[string]string{
		"start":    fmt.Sprintf("PUB %s _INBOX.s08 2\r\n{}\r\n", wire.StartSubject(tenantB, "wf")),
		"submit":   fmt.Sprintf("PUB %s _INBOX.s08 2\r\n{}\r\n", wire.SubmitSubject(tenantB, "wf")),
		"describe": fmt.Sprintf("PUB %s _INBOX.s08 %d\r\n%s\r\n", wire.DescribeSubject(tenantB), len(`{"run_id":"`+bRun+`"}`), `{"run_id":"`+bRun+`"}`),
		"done":     fmt.Sprintf("SUB %s 1\r\n", wire.RunSubjectPrefix+tenantB+".*.done"),
	}
	stranger, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	for _, who := range []string{"anonymous", "unknown nkey"} {
		for _, call := range slices.Sorted(maps.Keys(calls)) {
			r.unauthTried++
			rc := dialRaw(t, n.Addr())
			rc.upgradeTLS(t, n.pki.CA)
			connect := map[string]any{"verbose": false, "pedantic": false, "tls_required": true, "protocol": 1, "name": "s08-" + who}
			if who == "unknown nkey" {
				nonce, _ := rc.info["nonce"].(string)
				sig, _ := stranger.Sign([]byte(nonce))
				pub, _ := stranger.PublicKey()
				connect["nkey"], connect["sig"] = pub, encodeSig(sig)
			}
			line, _ := json.Marshal(connect)
			rc.send(t, "CONNECT "+string(line)+"\r\n"+calls[call]+"PING\r\n")
			var answers []string
			for l := rc.readLine(); l != ""; l = rc.readLine() {
				answers = append(answers, l)
			}
			if slices.ContainsFunc(answers, func(l string) bool { return strings.Contains(l, "Authorization Violation") }) &&
				!slices.Contains(answers, "PONG") && !slices.ContainsFunc(answers, func(l string) bool { return strings.HasPrefix(l, "MSG ") }) {
				r.unauthRefused++
			} else {
				t.Errorf("%s %s call answered %q; want Authorization Violation and the connection closed", who, call, answers)
			}
		}
	}

	// 2. tenant_a on tenant-b's subjects: refused by NATS, as publish or subscription
	// permission violations, and nothing delivered.
	denied := newViolationRecorder()
	opts := n.ConnOptions("tenant_a")
	opts.InboxPrefix = tenantAInbox
	a := connect(t, opts)
	a.SetErrorHandler(denied.handle)
	violationsBefore := n.violations()
	var leaked []string
	var leakMu sync.Mutex
	leak := func(m *nats.Msg) { leakMu.Lock(); leaked = append(leaked, m.Subject); leakMu.Unlock() }
	attempts := []struct{ subject, what string }{
		{wire.StartSubject(tenantB, "wf"), "pub"},
		{wire.SubmitSubject(tenantB, "wf"), "pub"},
		{wire.DescribeSubject(tenantB), "pub"},
		{wire.RunSubjectPrefix + tenantB + ".*.done", "sub"}, // tenant-b's outcomes
		{wire.RunSubjectPrefix + ">", "sub"},
		{"_INBOX.>", "sub"}, // replies meant for others: a describe's run data
	}
	for _, at := range attempts {
		r.natsTried++
		var err error
		if at.what == "sub" {
			_, err = a.Subscribe(at.subject, leak)
		} else {
			err = a.PublishRequest(at.subject, a.NewInbox(), []byte(`{"run_id":"`+bRun+`"}`))
		}
		if err != nil {
			t.Fatalf("send %s: %v", at.subject, err)
		}
		if err := a.Flush(); err != nil {
			t.Fatalf("flush after %s: %v", at.subject, err)
		}
	}
	want := make([]string, len(attempts))
	for i, at := range attempts {
		want[i] = at.subject
	}
	r.natsRefused = denied.waitFor(want, 5*time.Second)
	if r.natsRefused != len(attempts) {
		t.Errorf("%d/%d cross-namespace subjects refused by NATS; seen %q", r.natsRefused, len(attempts), denied.seen())
	}
	// The subscriptions would have had something to hear: tenant-b reads its run.
	quiet := sdk.NewClient(connect(t, n.ConnOptions("client")), sdk.WithNamespace(tenantB))
	if info, err := quiet.Describe(ctx, bRun); err != nil || info.ID != bRun {
		t.Fatalf("tenant-b describing its own run: %+v, %v", info, err)
	}
	if logged := n.violations() - violationsBefore; logged != len(attempts) {
		t.Errorf("server logged %d violations, want %d:\n%s", logged, len(attempts), violationLines(n.proc.Log()))
	}

	// 3. tenant_a on its own subjects, the body naming tenant-b: refused by the scheduler.
	request := func(subject string, body string) wire.Error {
		t.Helper()
		msg, err := a.RequestWithContext(ctx, subject, []byte(body))
		if err != nil {
			t.Fatalf("request on %s: %v", subject, err)
		}
		var rep struct {
			RunID string          `json:"run_id"`
			Run   json.RawMessage `json:"run"`
			Error *wire.Error     `json:"error"`
		}
		if err := json.Unmarshal(msg.Data, &rep); err != nil {
			t.Fatalf("reply on %s: %q: %v", subject, msg.Data, err)
		}
		if rep.Error == nil || rep.RunID != "" || rep.Run != nil {
			t.Errorf("%s %s answered %s; want an error and nothing else", subject, body, msg.Data)
			return wire.Error{}
		}
		return *rep.Error
	}
	schedCalls := []struct {
		subject, body string
		want          wire.Code
	}{
		{wire.StartSubject(tenantA, "wf"), `{"namespace":"` + tenantB + `","input":1}`, wire.CodePermissionDenied},
		{wire.DescribeSubject(tenantA), `{"namespace":"` + tenantB + `","run_id":"` + bRun + `"}`, wire.CodePermissionDenied},
		// An id is no key: the read is of tenant-a's runs only.
		{wire.DescribeSubject(tenantA), `{"run_id":"` + bRun + `"}`, wire.CodeNotFound},
	}
	for _, c := range schedCalls {
		r.schedTried++
		if e := request(c.subject, c.body); e.Code == c.want {
			r.schedRefused++
		} else {
			t.Errorf("%s %s: code %q, want %q", c.subject, c.body, e.Code, c.want)
		}
	}
	// Submit: the stream takes it, the scheduler terminates it.
	js, err := jetstream.New(a)
	if err != nil {
		t.Fatal(err)
	}
	deniedBefore := scrapeS08(t, metricsAddr, "kagzi_starts_total", `result="denied"`)
	r.schedTried++
	if _, err := js.Publish(ctx, wire.SubmitSubject(tenantA, "wf"), []byte(`{"namespace":"`+tenantB+`","input":2}`)); err != nil {
		t.Fatalf("tenant_a submitting on its own subject: %v", err)
	}
	eventually(t, 20*time.Second, "the scheduler to refuse the submit", func() bool {
		return scrapeS08(t, metricsAddr, "kagzi_starts_total", `result="denied"`) == deniedBefore+1
	})
	r.schedRefused++
	if got := countB(); got != runsB {
		t.Errorf("tenant-b has %d runs after tenant_a's attempts, had %d", got, runsB)
	}

	// The control: the same identity, in its own namespace, is served.
	own, err := sdk.NewClient(a, sdk.WithNamespace(tenantA)).StartByName(ctx, "wf", 3)
	if err != nil {
		t.Fatalf("tenant_a starting in its own namespace: %v", err)
	}
	if info, err := sdk.NewClient(a, sdk.WithNamespace(tenantA)).Describe(ctx, own); err != nil || info.Namespace != tenantA {
		t.Fatalf("tenant_a describing its own run: %+v, %v", info, err)
	}
	if _, err := sdk.NewClient(a, sdk.WithNamespace(tenantA)).SubmitByName(ctx, "wf", 4); err != nil {
		t.Fatalf("tenant_a submitting in its own namespace: %v", err)
	}
	eventually(t, 20*time.Second, "tenant_a's submit committed", func() bool {
		return countRows(t, pool, `SELECT count(*) FROM workflow_runs WHERE namespace = $1`, tenantA) == 2
	})
	leakMu.Lock()
	defer leakMu.Unlock()
	if len(leaked) != 0 {
		t.Errorf("tenant_a received %d messages on subjects it may not read: %q", len(leaked), leaked)
	}
	return r
}

type s08FloodResult struct {
	flood            floodResult
	baselineP99, p99 float64 // tenant-b's start latency, ms
	pgMax            int     // most scheduler sessions seen
}

// floodResult is what s08flood prints.
type floodResult struct {
	Sent          int     `json:"sent"`
	SendSeconds   float64 `json:"send_seconds"`
	Rate          float64 `json:"rate"`
	Created       int     `json:"created"`
	Overloaded    int     `json:"overloaded"`
	Other         int     `json:"other"`
	Unanswered    int     `json:"unanswered"`
	CreatedP50    float64
	CreatedP99    float64
	OverloadedP50 float64
	OverloadedP99 float64
	FirstOther    string `json:"first_other"`
}

func floodS08(t *testing.T, n *secureNATS, flooder string, pool *pgxpool.Pool, metricsAddr string, quiet *sdk.Client) s08FloodResult {
	t.Helper()
	var r s08FloodResult
	runsA := countRows(t, pool, `SELECT count(*) FROM workflow_runs WHERE namespace = $1`, tenantA)
	// Refused unprocessed: over the namespace's rate, or its queue full. Both answer
	// with the overloaded code.
	refused := func() (rate, queue int) {
		return scrapeS08(t, metricsAddr, "kagzi_starts_total", `result="rate_limited"`),
			scrapeS08(t, metricsAddr, "kagzi_starts_total", `result="overloaded"`)
	}
	rateBefore, queueBefore := refused()

	// The baseline: tenant-b alone, at the rate it keeps during the flood.
	base := paceStarts(t, quiet, s08FloodFor)
	r.baselineP99 = percentile(base, 99)
	t.Logf("S08 baseline: %d starts of tenant-b at 10/s, p50 %.1f ms, p99 %.1f ms", len(base), percentile(base, 50), r.baselineP99)

	seed := n.seeds["tenant_a"]
	connArgs := []string{"-url", n.URL(), "-seed", seed, "-ca", n.pki.CA, "-inbox", tenantAInbox}
	idle := exec.Command(flooder, append(connArgs, "-mode", "idle", "-conns", strconv.Itoa(s08IdleConns))...)
	idleIn, err := idle.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	idleOut, idleErr := &syncWriter{w: &bytes.Buffer{}}, &syncWriter{w: &bytes.Buffer{}}
	idle.Stdout, idle.Stderr = idleOut, idleErr
	if err := idle.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = idleIn.Close(); _ = idle.Wait() })
	ready := fmt.Sprintf(`"ready":%d`, s08IdleConns)
	end := time.Now().Add(2 * time.Minute)
	for !strings.Contains(idleOut.String(), ready) {
		if time.Now().After(end) || strings.Contains(idleErr.String(), "s08flood:") {
			t.Fatalf("s08flood did not hold %d idle connections: %s", s08IdleConns, idleErr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	v, err := n.varz()
	if err != nil || v.Connections < s08IdleConns {
		t.Fatalf("server holds %d connections (%v), want at least the %d idle ones", v.Connections, err, s08IdleConns)
	}

	// The flood, and tenant-b beside it; PostgreSQL's sessions sampled throughout.
	var floodOut, floodErr bytes.Buffer
	fl := exec.Command(flooder, append(connArgs, "-mode", "flood", "-subject", wire.StartSubject(tenantA, "wf"),
		"-rate", strconv.Itoa(s08FloodRate), "-for", s08FloodFor.String(), "-grace", "5s")...)
	fl.Stdout, fl.Stderr = &floodOut, &floodErr
	// The flooder plays a client on another machine. Here it shares two cores with the
	// system under test, so it runs at the lowest priority: its own CPU time (TLS, its
	// bookkeeping) comes from what the system leaves idle instead of being taken from the
	// scheduler and nats-server. Its real send rate is recorded, and stays near the
	// target.
	if nice, err := exec.LookPath("nice"); err == nil {
		fl.Path, fl.Args = nice, append([]string{"nice", "-n", "19", flooder}, fl.Args[1:]...)
	} else {
		t.Logf("no nice(1): the flooder runs at normal priority")
	}
	sampling := make(chan struct{})
	sampled := make(chan int)
	go func() {
		most := 0
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			var n int
			if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity
				WHERE datname = current_database() AND application_name = 'kagzi-scheduler'`).Scan(&n); err == nil {
				most = max(most, n)
			}
			select {
			case <-sampling:
				sampled <- most
				return
			case <-tick.C:
			}
		}
	}()
	if err := fl.Start(); err != nil {
		t.Fatal(err)
	}
	during := paceStarts(t, quiet, s08FloodFor)
	if err := fl.Wait(); err != nil {
		t.Fatalf("s08flood: %v\n%s", err, floodErr.String())
	}
	close(sampling)
	r.pgMax = <-sampled
	if err := json.Unmarshal(floodOut.Bytes(), &r.flood); err != nil {
		t.Fatalf("s08flood printed %q: %v", floodOut.String(), err)
	}
	r.p99 = percentile(during, 99)
	fr := r.flood
	t.Logf("S08 flood: %d starts in %.1f s (%.0f/s, target %d/s): %d created (p50 %.1f ms, p99 %.1f ms), %d overloaded (p50 %.1f ms, p99 %.1f ms), %d other, %d unanswered",
		fr.Sent, fr.SendSeconds, fr.Rate, s08FloodRate, fr.Created, fr.CreatedP50, fr.CreatedP99, fr.Overloaded, fr.OverloadedP50, fr.OverloadedP99, fr.Other, fr.Unanswered)
	t.Logf("S08 tenant-b during the flood: %d starts, p50 %.1f ms, p99 %.1f ms (baseline p99 %.1f ms, limit %.1f ms); scheduler PostgreSQL sessions at most %d (pool %d)",
		len(during), percentile(during, 50), r.p99, r.baselineP99, 2*r.baselineP99, r.pgMax, s08SchedulerPool)

	if fr.Overloaded == 0 {
		t.Errorf("the scheduler refused none of %d flood starts as overloaded", fr.Sent)
	}
	if fr.Unanswered != 0 || fr.Other != 0 {
		t.Errorf("%d flood starts unanswered and %d answered otherwise (first: %s); want each created or refused as overloaded",
			fr.Unanswered, fr.Other, fr.FirstOther)
	}
	rateN, queueN := refused()
	rateN, queueN = rateN-rateBefore, queueN-queueBefore
	t.Logf("S08 scheduler refusals: %d over the namespace's rate, %d with its queue full", rateN, queueN)
	if rateN+queueN != fr.Overloaded {
		// More than the flood saw means tenant-b was refused too (its client retried).
		t.Errorf("kagzi_starts_total{result=rate_limited|overloaded} grew by %d, the flood saw %d refusals", rateN+queueN, fr.Overloaded)
	}
	if got := countRows(t, pool, `SELECT count(*) FROM workflow_runs WHERE namespace = $1`, tenantA) - runsA; got != fr.Created {
		t.Errorf("tenant-a has %d new runs, the flood was told of %d", got, fr.Created)
	}
	if len(during) != len(base) {
		t.Errorf("tenant-b completed %d starts during the flood, %d before", len(during), len(base))
	}
	if r.p99 > 2*r.baselineP99 {
		t.Errorf("tenant-b's start p99 during the flood is %.1f ms, over 2× its baseline p99 of %.1f ms", r.p99, r.baselineP99)
	}
	if r.pgMax == 0 || r.pgMax > s08SchedulerPool {
		t.Errorf("the scheduler held up to %d PostgreSQL sessions, its pool is %d", r.pgMax, s08SchedulerPool)
	}
	return r
}

// paceStarts starts tenant-b runs every s08QuietEvery for d, each on its own goroutine so
// a slow one does not delay the next, and returns their latencies in ms. A start that
// fails fails the test.
func paceStarts(t *testing.T, c *sdk.Client, d time.Duration) []float64 {
	t.Helper()
	ctx := ctxT(t, d+time.Minute)
	var (
		mu  sync.Mutex
		out []float64
		wg  sync.WaitGroup
	)
	tick := time.NewTicker(s08QuietEvery)
	defer tick.Stop()
	for i := range int(d / s08QuietEvery) {
		wg.Go(func() {
			began := time.Now()
			_, err := c.StartByName(ctx, "wf", i)
			ms := float64(time.Since(began).Microseconds()) / 1000
			if err != nil {
				t.Errorf("tenant-b start %d: %v", i, err)
				return
			}
			mu.Lock()
			out = append(out, ms)
			mu.Unlock()
		})
		<-tick.C
	}
	wg.Wait()
	return out
}

// checkS08Limits shows max_connections and max_payload enforced, and returns how many of
// the two one-beyond attempts were refused.
func checkS08Limits(t *testing.T, n *secureNATS) int {
	t.Helper()
	refused := 0
	opts := n.ConnOptions("tenant_a")
	opts.InboxPrefix = tenantAInbox

	// Fill the server up to max_connections, then one more.
	v, err := n.varz()
	if err != nil {
		t.Fatal(err)
	}
	var extra []*nats.Conn
	defer func() {
		for _, nc := range extra {
			nc.Close()
		}
	}()
	dial := func() (*nats.Conn, error) {
		nkey, err := nats.NkeyOptionFromSeed(opts.NKeySeed)
		if err != nil {
			t.Fatal(err)
		}
		return nats.Connect(opts.URL, nats.RootCAs(opts.TLSCA), nkey, nats.NoReconnect(), nats.Timeout(5*time.Second),
			nats.CustomInboxPrefix(tenantAInbox))
	}
	for range s08MaxConns - v.Connections {
		nc, err := dial()
		if err != nil {
			t.Fatalf("connection %d of %d: %v", len(extra)+v.Connections+1, s08MaxConns, err)
		}
		extra = append(extra, nc)
	}
	if v, err = n.varz(); err != nil || v.Connections != s08MaxConns {
		t.Fatalf("server holds %d connections (%v), want %d", v.Connections, err, s08MaxConns)
	}
	// The server refuses before the TLS handshake, in the clear after its INFO (a TLS
	// client sees only the connection close), so the refusal is read off the raw socket.
	over := dialRaw(t, n.Addr())
	var answers []string
	for l := over.readLine(); l != ""; l = over.readLine() {
		answers = append(answers, l)
	}
	if slices.ContainsFunc(answers, func(l string) bool { return strings.Contains(l, "maximum connections exceeded") }) {
		refused++
	} else {
		t.Errorf("connection %d answered %q with max_connections %d; want maximum connections exceeded", s08MaxConns+1, answers, s08MaxConns)
	}
	if v, err = n.varz(); err != nil || v.Connections != s08MaxConns {
		t.Errorf("server holds %d connections (%v) after refusing one, want %d", v.Connections, err, s08MaxConns)
	}
	t.Logf("S08 max_connections: %d held, connection %d refused: %q", s08MaxConns, s08MaxConns+1, answers)
	for _, nc := range extra {
		nc.Close()
	}
	extra = nil

	// A message of exactly max_payload is accepted; one byte more is refused.
	eventually(t, 10*time.Second, "the extra connections to close", func() bool {
		v, err := n.varz()
		return err == nil && v.Connections < s08MaxConns
	})
	rc := dialRaw(t, n.Addr())
	rc.upgradeTLS(t, n.pki.CA)
	rc.connectNKey(t, opts.NKeySeed)
	subject := wire.APISubjectPrefix + tenantA + ".nothing" // allowed to tenant_a, served by nobody
	body := bytes.Repeat([]byte{'x'}, s08MaxPayload)
	rc.send(t, fmt.Sprintf("PUB %s %d\r\n%s\r\nPING\r\n", subject, len(body), body))
	if line := rc.readLine(); line != "PONG" {
		t.Fatalf("PUB of exactly max_payload (%d bytes) answered %q, want PONG", len(body), line)
	}
	rc.send(t, fmt.Sprintf("PUB %s %d\r\n", subject, s08MaxPayload+1))
	line := rc.readLine()
	if strings.Contains(line, "Maximum Payload Violation") {
		refused++
	} else {
		t.Errorf("PUB of max_payload+1 bytes answered %q, want a Maximum Payload Violation", line)
	}
	t.Logf("S08 max_payload: %d bytes accepted, %d bytes answered %q", s08MaxPayload, s08MaxPayload+1, line)
	return refused
}

func countRows(t *testing.T, pool *pgxpool.Pool, sql string, args ...any) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

// scrapeS08 sums the series of a metric on the scheduler's /metrics whose labels
// contain label ("" for all); a series never written counts as 0.
func scrapeS08(t *testing.T, addr, name, label string) int {
	t.Helper()
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape %s: %v", addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("scrape %s: %v", addr, err)
	}
	sum := 0.0
	for _, line := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(line, name) || (line[len(name)] != ' ' && line[len(name)] != '{') || !strings.Contains(line, label) {
			continue
		}
		f, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		sum += f
	}
	return int(sum)
}

// percentile is the nearest-rank percentile p of xs (ms).
func percentile(xs []float64, p int) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[max((len(s)*p+99)/100-1, 0)]
}

// syncWriter is a buffer a child process writes while the test reads it.
type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func (s *syncWriter) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.String()
}
