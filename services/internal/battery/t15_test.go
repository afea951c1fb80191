package battery

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// T15 — poison messages on the bus. While W valid runs start, 1,500 hostile messages
// are published on their task subject, 300 of each class:
//
//   - not JSON (random bytes up to 1 KiB, empty, plain text)           → poison
//   - JSON of the wrong shape (other types, missing, extra or mistyped  → poison
//     fields, bad ids, seq ≤ 0, a task with trailing data, over 1 KiB)
//   - a task naming an unknown run (random UUIDv7)                      → no-op claim
//   - a task naming another namespace's QUEUED run, with its current    → no-op claim
//     dispatch_seq (only the namespace differs)
//   - 900 KB of random bytes                                            → refused by the
//     broker: the task stream's max_msg_size is 4 KiB, so JetStream refuses the publish
//     and no executor ever sees it
//
// Poison is what DecodeTask refuses; a message that parses as a task is a claim, which
// the database answers with nothing for a run that is not this namespace's current
// dispatch. Pass: W COMPLETED; the executors' poison counter = the poison messages, their
// no-op claims = the task-shaped hostile messages plus any duplicate doorbell, their
// claims = W; every message the stream took was handled exactly once and acked or
// terminated (the executors' counts add up to the messages published, and the consumer
// has nothing pending, awaiting an ack or redelivered); every oversized publish refused
// with the stream's size error; no row of workflow_runs other than the W changed.
func TestT15PoisonMessages(t *testing.T) {
	const w, perClass, otherRuns = 100, 300, 20 // BATTERY.md gives T15 one size
	sum := newSummary(t, fmt.Sprintf("W=%d 3-step, %d hostile task messages (%d per class), 2 executors × 16", w, 5*perClass, perClass))
	s := newSystem(t)
	s.scheduler("scheduler")
	s.timer("timer")
	execs := []string{"exec-a", "exec-b"}
	for _, name := range execs {
		s.executor(name, "KAGZI_CONCURRENCY=16", "KAGZI_LEASE=5s")
	}

	// Another namespace's runs, with the same workflow name: no executor serves that
	// namespace, so they stay QUEUED, claimable by their exact dispatch.
	other := sdk.NewClient(s.nc, sdk.WithNamespace("tenant-b"), sdk.WithRequestTimeout(2*time.Second))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	otherIDs := make([]string, otherRuns)
	for i := range otherIDs {
		id, err := other.StartByName(ctx, chaoswf.Name, chaoswf.Input{Seed: 15900 + i, Steps: 3})
		if err != nil {
			t.Fatalf("start tenant-b run %d: %v", i, err)
		}
		otherIDs[i] = id
	}
	before := s.runsChecksum(nil)

	// Every doorbell that is not ours (the engine's own, duplicates and relays included),
	// to know how many messages the consumer must deliver. Unlimited pending: the 900 KB
	// messages pass through here too (core NATS delivers what the stream refuses).
	subject := wire.TaskSubject(wire.DefaultNamespace, chaoswf.Name)
	var doorbells atomic.Int64
	sub, err := s.nc.Subscribe(subject, func(m *nats.Msg) {
		if m.Header.Get(hostileHeader) == "" {
			doorbells.Add(1)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		t.Fatal(err)
	}
	if err := s.nc.Flush(); err != nil {
		t.Fatal(err)
	}

	seed := time.Now().UnixNano()
	t.Logf("hostile seed %d", seed)
	hostile := t15Hostile(rand.New(rand.NewPCG(uint64(seed), 15)), perClass, otherIDs)
	type outcome struct{ accepted, refusedSize, otherErr int }
	published := map[string]*outcome{}
	for _, h := range hostile {
		if published[h.class] == nil {
			published[h.class] = &outcome{}
		}
	}
	pubDone := make(chan error, 1)
	go func() {
		// Each oversized message is fresh random bytes, made only as it is sent: 300 of them
		// held at once would take 270 MB.
		var chacha [32]byte
		binary.LittleEndian.PutUint64(chacha[:], uint64(seed))
		huge, random := make([]byte, 900<<10), rand.NewChaCha8(chacha)
		for _, h := range hostile {
			m := nats.NewMsg(subject)
			m.Data = h.data
			if h.class == t15Huge {
				_, _ = random.Read(huge)
				m.Data = huge
			}
			m.Header.Set(hostileHeader, h.class)
			_, err := s.js.PublishMsg(ctx, m)
			o := published[h.class]
			switch {
			case err == nil:
				o.accepted++
			case errors.Is(err, jetstream.ErrStreamMessageExceedsMaximum):
				o.refusedSize++
			default:
				o.otherErr++
				if o.otherErr == 1 {
					t.Logf("publish %s (%d bytes): %v", h.class, len(h.data), err)
				}
			}
		}
		pubDone <- nil
	}()
	ids := s.startRuns(inputs(w, func(i int) chaoswf.Input { return chaoswf.Input{Seed: 15000 + i, Steps: 3, MinMS: 5, MaxMS: 20} }))
	<-pubDone
	for _, class := range t15Classes {
		o := published[class.name]
		t.Logf("%s: %d published, %d accepted, %d refused for size, %d other errors", class.name, perClass, o.accepted, o.refusedSize, o.otherErr)
		expectZero(t, class.name+" publishes that failed otherwise than for size", o.otherErr)
		if class.refused {
			expectEq(t, class.name+" publishes refused by the stream for size", o.refusedSize, perClass)
		} else {
			expectEq(t, class.name+" publishes accepted by the stream", o.accepted, perClass)
		}
	}
	sum.Faults = fmt.Sprintf("%d hostile task messages (%d refused by the broker for size)", len(hostile), published[t15Huge].refusedSize)

	s.waitCompleted(w, 30*time.Second)
	var poisonWant, noopWant, accepted int
	for _, class := range t15Classes {
		o := published[class.name]
		accepted += o.accepted
		switch {
		case class.poison:
			poisonWant += o.accepted
		case !class.refused:
			noopWant += o.accepted
		}
	}
	// Everything the stream took is handled: claimed, a no-op claim, or poison.
	stats := `SELECT coalesce(sum(claimed + claim_noops + poison), 0)::int FROM test_worker_stats`
	if got, ok := s.oracle.WaitCount(20*time.Second, accepted+int(doorbells.Load()), stats); !ok {
		t.Errorf("executors handled %d messages, want %d hostile + %d doorbells", got, accepted, doorbells.Load())
	}
	bells := int(doorbells.Load())
	t.Logf("%d doorbells of the engine's own for %d runs", bells, w)
	expectEq(t, "poison messages the executors counted", s.oracle.Count(`SELECT coalesce(sum(poison), 0)::int FROM test_worker_stats`), poisonWant)
	expectEq(t, "no-op claims the executors counted", s.oracle.Count(`SELECT coalesce(sum(claim_noops), 0)::int FROM test_worker_stats`), noopWant+bells-w)
	expectEq(t, "claims the executors counted", s.oracle.Count(`SELECT coalesce(sum(claimed), 0)::int FROM test_worker_stats`), w)
	expectEq(t, "claims (QUEUED → RUNNING)", s.oracle.Count(`SELECT count(*) FROM test_transitions WHERE old_status = 'QUEUED' AND new_status = 'RUNNING'`), w)

	// Handled once each, and nothing left behind: the executors answered exactly as many
	// messages as the stream took and none is pending or unacknowledged, so none was
	// handled twice at another's expense. The consumer's delivery sequence is only logged
	// (see S02: it can run ahead of what the executors received).
	info, drained, err := s.waitDrained(10 * time.Second)
	if !drained {
		t.Errorf("consumer not drained (stalled?): %+v (%v)", info, err)
	}
	if info != nil {
		t.Logf("broker deliveries: %d for %d messages", info.Delivered.Consumer, accepted+bells)
		expectZero(t, "messages redelivered", info.NumRedelivered)
	}
	expectEq(t, "messages the executors handled", s.oracle.Count(stats), accepted+bells)
	if n, err := sub.Dropped(); err != nil || n != 0 {
		t.Errorf("the test's doorbell counter dropped %d messages (%v): its count is not exact", n, err)
	}

	after := s.runsChecksum(ids)
	if after != before {
		t.Errorf("workflow_runs rows other than the %d valid runs changed: checksum %s before, %s after", w, before, after)
	}
	tl := s.oracle.Tally(s.faultedPIDs())
	sum.fill(tl, s.oracle.NotCompleted(ids), 3*w)
	sum.Stuck = tl.Active - otherRuns
	t.Logf("tally: %+v", tl)
	expectEq(t, "runs COMPLETED", tl.Completed, w)
	expectEq(t, "runs active (tenant-b's, which no executor serves)", tl.Active, otherRuns)
	expectEq(t, "step results recorded", tl.StepResults, 3*w)
	expectZero(t, "repeated step bodies", tl.DupBodies)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, w)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	s.checkNoPanics()
}

// hostileHeader marks the test's hostile messages (its value is the class), so that the
// doorbell counter can tell them from the engine's.
const hostileHeader = "Battery-Hostile"

const t15Huge = "900KB random bytes"

var t15Classes = []struct {
	name            string
	poison, refused bool
}{
	{"not JSON", true, false},
	{"wrong-shape JSON", true, false},
	{"unknown run id", false, false},
	{"another namespace's run", false, false},
	{t15Huge, false, true},
}

type hostileMsg struct {
	class string
	data  []byte
}

// t15Hostile makes perClass messages of each class, shuffled.
func t15Hostile(rng *rand.Rand, perClass int, otherIDs []string) []hostileMsg {
	randBytes := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	task := func(id string, seq int64) string { return fmt.Sprintf(`{"run_id":%q,"dispatch_seq":%d}`, id, seq) }
	notJSON := []string{"", "hello", "\x00\x01\x02", "<task run_id=\"x\"/>", "{", "run_id=x&dispatch_seq=1", "\xff\xfe{}"}
	// Each names a real run (another namespace's) where it names one, so that a lenient
	// decoder would turn it into a claim attempt the database has to answer.
	shapes := []func(id string) string{
		func(string) string { return `{}` },
		func(string) string { return `[]` },
		func(string) string { return `null` },
		func(string) string { return `true` },
		func(string) string { return `42` },
		func(string) string { return `"task"` },
		func(string) string { return `{"run_id":123,"dispatch_seq":1}` },
		func(id string) string { return fmt.Sprintf(`{"run_id":%q}`, id) },
		func(id string) string { return task(id, 0) },
		func(id string) string { return task(id, -7) },
		func(id string) string { return fmt.Sprintf(`{"run_id":%q,"dispatch_seq":"1"}`, id) },
		func(id string) string { return fmt.Sprintf(`{"run_id":%q,"dispatch_seq":1.5}`, id) },
		func(id string) string { return fmt.Sprintf(`{"run_id":%q,"dispatch_seq":1e30}`, id) },
		func(string) string { return task("not-a-uuid", 1) },
		func(id string) string { return task(strings.ToUpper(id), 1) },
		func(id string) string { return fmt.Sprintf(`{"run_id":%q,"dispatch_seq":1,"namespace":"default"}`, id) },
		func(id string) string { return task(id, 1) + ` trailing` },
		func(id string) string { return task(id, 1) + task(id, 1) },
		func(id string) string { return `[` + task(id, 1) + `]` },
		func(id string) string { return `{"task":` + task(id, 1) + `}` },
		func(id string) string {
			return fmt.Sprintf(`{"run_id":%q,"dispatch_seq":1,"pad":%q}`, id, strings.Repeat("x", 2048))
		},
	}
	var out []hostileMsg
	for i := range perClass {
		var data []byte
		if i < len(notJSON) {
			data = []byte(notJSON[i])
		} else {
			data = randBytes(1 + rng.IntN(1024))
		}
		out = append(out, hostileMsg{"not JSON", data})
		out = append(out, hostileMsg{"wrong-shape JSON", []byte(shapes[i%len(shapes)](otherIDs[i%len(otherIDs)]))})
		out = append(out, hostileMsg{"unknown run id", []byte(task(wire.NewRunID(), 1+rng.Int64N(5)))})
		out = append(out, hostileMsg{"another namespace's run", []byte(task(otherIDs[i%len(otherIDs)], 1))})
		out = append(out, hostileMsg{t15Huge, nil}) // filled as it is sent
	}
	rng.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out
}

// runsChecksum digests every column of every workflow_runs row except the excluded runs'.
func (s *system) runsChecksum(exclude []string) string {
	s.t.Helper()
	if exclude == nil {
		exclude = []string{}
	}
	var sum string
	err := s.pool.QueryRow(context.Background(), `SELECT count(*) || ':' || coalesce(md5(string_agg(r::text, E'\n' ORDER BY r.id)), '')
		FROM workflow_runs r WHERE NOT r.id = ANY ($1::uuid[])`, exclude).Scan(&sum)
	if err != nil {
		s.t.Fatalf("checksum workflow_runs: %v", err)
	}
	return sum
}
