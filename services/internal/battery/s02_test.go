package battery

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// S02 — forged and cross-tenant doorbells. The system is brought to a state in which
// nothing is due, yet much is claimable by the right doorbell: COMPLETED runs, runs
// asleep for an hour, runs QUEUED on their second dispatch whose doorbells were purged
// (no relay runs: the stale threshold is 10 minutes), and another namespace's QUEUED
// runs of the same workflow. Then 10,000 well-formed task messages are published on the
// workflow's task subject, a quarter of each class:
//
//   - random UUIDv7 ids
//   - another namespace's QUEUED runs, with their current dispatch_seq
//   - COMPLETED runs, with their last or an earlier dispatch_seq
//   - live runs with a dispatch_seq that is not their current one: the QUEUED runs'
//     stale first dispatch or a future one, the sleepers' next one (and their current
//     one, which no longer counts once they sleep)
//
// Pass: workflow_runs and step_runs unchanged (checksums of every column of every row),
// no transition and no step body, every message handled once and acked (the executors
// counted 10,000 no-op claims, 0 claims and 0 poison, and the consumer has nothing
// pending, nothing awaiting an ack and nothing redelivered). A control
// then shows what the forgeries missed: each QUEUED run's real doorbell, published by
// the test, claims and completes it.
func TestS02ForgedDoorbells(t *testing.T) {
	const forged = 10_000 // BATTERY.md gives S02 one size
	const completedN, queuedN, sleepingN, otherN = 200, 50, 50, 50
	sum := newSummary(t, fmt.Sprintf("%d forged task messages against %d COMPLETED, %d QUEUED (doorbells purged), %d SLEEPING and %d other-namespace runs",
		forged, completedN, queuedN, sleepingN, otherN))
	s := newSystem(t)
	s.scheduler("scheduler")
	tmr := s.timer("timer", "KAGZI_STALE_AFTER=10m", "KAGZI_MAX_IDLE=1s")
	execs := []*testkit.Process{
		s.executor("exec-a", "KAGZI_CONCURRENCY=32", "KAGZI_LEASE=5s", parkSleeps),
		s.executor("exec-b", "KAGZI_CONCURRENCY=32", "KAGZI_LEASE=5s", parkSleeps),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// COMPLETED runs, half of them on their second dispatch (a parked sleep).
	completedIDs := s.startRuns(inputs(completedN, func(i int) chaoswf.Input {
		in := chaoswf.Input{Seed: 20000 + i, Steps: 2, MinMS: 1, MaxMS: 5}
		if i%2 == 1 {
			in.SleepAfter, in.SleepMS = 1, 200
		}
		return in
	}))
	if !s.waitCompleted(completedN, 30*time.Second) {
		t.FailNow()
	}
	// With the timer down, runs that park stay asleep past their wake time: the soon
	// ones wake only once the executors are gone, and wait QUEUED on their second dispatch.
	tmr.Stop(10 * time.Second)
	queuedIDs := s.startRuns(inputs(queuedN, func(i int) chaoswf.Input {
		return chaoswf.Input{Seed: 21000 + i, Steps: 2, MinMS: 1, MaxMS: 5, SleepAfter: 1, SleepMS: 100}
	}))
	sleepingIDs := s.startRuns(inputs(sleepingN, func(i int) chaoswf.Input {
		return chaoswf.Input{Seed: 22000 + i, Steps: 2, MinMS: 1, MaxMS: 5, SleepAfter: 1, SleepMS: int(time.Hour / time.Millisecond)}
	}))
	if got, ok := s.oracle.WaitCount(30*time.Second, queuedN+sleepingN, `SELECT count(*) FROM workflow_runs WHERE status = 'SLEEPING'`); !ok {
		t.Fatalf("%d of %d runs asleep", got, queuedN+sleepingN)
	}
	for _, p := range execs {
		p.Stop(10 * time.Second)
	}
	tmr.Start()
	if got, ok := s.oracle.WaitCount(30*time.Second, queuedN, `SELECT count(*) FROM workflow_runs
		WHERE status = 'QUEUED' AND dispatch_seq = 2 AND id = ANY ($1::uuid[])`, queuedIDs); !ok {
		t.Fatalf("%d of %d runs woken and QUEUED on their second dispatch", got, queuedN)
	}
	subject := wire.TaskSubject(wire.DefaultNamespace, chaoswf.Name)
	st, err := s.js.Stream(ctx, wire.TaskStream)
	if err != nil {
		t.Fatal(err)
	}
	// The timer publishes after its commit: purge once every wake-up doorbell is in.
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(25 * time.Millisecond) {
		info, err := st.Info(ctx, jetstream.WithSubjectFilter(subject))
		if err != nil {
			t.Fatal(err)
		}
		if info.State.Subjects[subject] == queuedN {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("%d wake-up doorbells in the stream, want %d", info.State.Subjects[subject], queuedN)
		}
	}
	if err := st.Purge(ctx, jetstream.WithPurgeSubject(subject)); err != nil {
		t.Fatalf("purge the wake-up doorbells: %v", err)
	}
	other := sdk.NewClient(s.nc, sdk.WithNamespace("tenant-b"), sdk.WithRequestTimeout(2*time.Second))
	otherIDs := make([]string, otherN)
	for i := range otherIDs {
		if otherIDs[i], err = other.StartByName(ctx, chaoswf.Name, chaoswf.Input{Seed: 23000 + i, Steps: 2}); err != nil {
			t.Fatalf("start tenant-b run %d: %v", i, err)
		}
	}
	for _, p := range execs {
		p.Start()
	}
	// Nothing is due and nothing has a doorbell: the state the forgeries must not move.
	expectEq(t, "runs by status before forging", s.oracle.Count(`SELECT count(*) FROM workflow_runs WHERE
		(status = 'COMPLETED' AND id = ANY ($1::uuid[])) OR (status = 'QUEUED' AND id = ANY ($2::uuid[]))
		OR (status = 'SLEEPING' AND id = ANY ($3::uuid[])) OR (status = 'QUEUED' AND id = ANY ($4::uuid[]))`,
		completedIDs, queuedIDs, sleepingIDs, otherIDs), completedN+queuedN+sleepingN+otherN)
	before := s.s02Snapshot(ctx)

	seed := time.Now().UnixNano()
	t.Logf("forgery seed %d", seed)
	msgs := s02Forgeries(t, s, rand.New(rand.NewPCG(uint64(seed), 2)), forged, completedIDs, queuedIDs, sleepingIDs, otherIDs)
	pub, err := jetstream.New(s.nc, jetstream.WithPublishAsyncMaxPending(forged))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		if _, err := pub.PublishAsync(subject, m); err != nil {
			t.Fatalf("publish a forged doorbell: %v", err)
		}
	}
	select {
	case <-pub.PublishAsyncComplete():
	case <-time.After(30 * time.Second):
		t.Fatalf("forged doorbells still unacknowledged by JetStream after 30 s")
	}
	sum.Faults = fmt.Sprintf("%d forged doorbells (4 classes)", len(msgs))

	noops := `SELECT coalesce(sum(claim_noops), 0)::int FROM test_worker_stats`
	if got, ok := s.oracle.WaitCount(60*time.Second, before.noops+forged, noops); !ok {
		t.Errorf("executors answered %d forged doorbells with a no-op claim, want %d", got-before.noops, forged)
	}
	info, drained, err := s.waitDrained(10 * time.Second)
	if !drained {
		t.Fatalf("consumer not drained: %+v (%v)", info, err)
	}
	// Handled once each: the executors answered exactly as many as were published and
	// none is pending or unacknowledged, so none was handled twice at another's expense.
	// The consumer's delivery sequence is only logged: under a steady stream of pull
	// requests it runs ahead of what the executors received (by up to 0.7 % here) with
	// nothing redelivered, pending or unacknowledged, so it does not count handlings.
	after := s.s02Snapshot(ctx)
	t.Logf("broker deliveries for the %d forged doorbells: %d", forged, info.Delivered.Consumer-before.delivered)
	expectEq(t, "forged doorbells answered with a no-op claim", after.noops-before.noops, forged)
	expectZero(t, "messages redelivered", info.NumRedelivered)
	expectZero(t, "claims of forged doorbells", after.claimed-before.claimed)
	expectZero(t, "forged doorbells taken for poison", after.poison-before.poison)
	if after.runs != before.runs {
		t.Errorf("workflow_runs changed: checksum %s before, %s after", before.runs, after.runs)
	}
	if after.steps != before.steps {
		t.Errorf("step_runs changed: checksum %s before, %s after", before.steps, after.steps)
	}
	expectZero(t, "run transitions", after.transitions-before.transitions)
	expectZero(t, "step bodies run", after.effects-before.effects)

	// The control: the QUEUED runs' own doorbells claim them, which is all the forged
	// stale and future ones lacked.
	for _, id := range queuedIDs {
		data := fmt.Sprintf(`{"run_id":%q,"dispatch_seq":2}`, id)
		if _, err := s.js.Publish(ctx, subject, []byte(data)); err != nil {
			t.Fatalf("publish the real doorbell of %s: %v", id, err)
		}
	}
	if !s.waitCompleted(completedN+queuedN, 30*time.Second) {
		t.FailNow()
	}
	expectZero(t, "QUEUED runs not completed by their real doorbell", s.oracle.NotCompleted(queuedIDs))
	tl := s.oracle.Tally(s.faultedPIDs())
	sum.fill(tl, s.oracle.NotCompleted(append(completedIDs, queuedIDs...)), 2*(completedN+queuedN)+sleepingN)
	sum.Stuck = tl.Active - sleepingN - otherN
	t.Logf("tally: %+v", tl)
	expectEq(t, "runs active (asleep for an hour, or another namespace's)", tl.Active, sleepingN+otherN)
	expectEq(t, "step results recorded", tl.StepResults, 2*(completedN+queuedN)+sleepingN)
	expectZero(t, "repeated step bodies", tl.DupBodies)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, completedN+queuedN)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	s.checkNoPanics()
}

type s02State struct {
	runs, steps            string
	transitions, effects   int
	claimed, noops, poison int
	delivered              uint64
}

// s02Snapshot reads everything a forged doorbell could change.
func (s *system) s02Snapshot(ctx context.Context) s02State {
	s.t.Helper()
	var st s02State
	err := s.pool.QueryRow(ctx, `SELECT
		(SELECT count(*) || ':' || coalesce(md5(string_agg(r::text, E'\n' ORDER BY r.id)), '') FROM workflow_runs r),
		(SELECT count(*) || ':' || coalesce(md5(string_agg(p::text, E'\n' ORDER BY p.run_id, p.step_key)), '') FROM step_runs p),
		(SELECT count(*) FROM test_transitions), (SELECT count(*) FROM test_effects),
		(SELECT coalesce(sum(claimed), 0) FROM test_worker_stats), (SELECT coalesce(sum(claim_noops), 0) FROM test_worker_stats),
		(SELECT coalesce(sum(poison), 0) FROM test_worker_stats)`).
		Scan(&st.runs, &st.steps, &st.transitions, &st.effects, &st.claimed, &st.noops, &st.poison)
	if err != nil {
		s.t.Fatalf("snapshot: %v", err)
	}
	info, err := s.taskConsumer(ctx)
	if err != nil {
		s.t.Fatalf("snapshot: %v", err)
	}
	st.delivered = info.Delivered.Consumer
	return st
}

// s02Forgeries makes n well-formed task messages, a quarter of each class, shuffled.
func s02Forgeries(t *testing.T, s *system, rng *rand.Rand, n int, completed, queued, sleeping, other []string) [][]byte {
	t.Helper()
	seqOf := map[string]int64{}
	rows, err := s.pool.Query(context.Background(), `SELECT id::text, dispatch_seq FROM workflow_runs`)
	if err != nil {
		t.Fatalf("read dispatch_seq: %v", err)
	}
	for rows.Next() {
		var id string
		var seq int64
		if err := rows.Scan(&id, &seq); err != nil {
			t.Fatalf("read dispatch_seq: %v", err)
		}
		seqOf[id] = seq
	}
	rows.Close()
	pickOf := func(ids []string) string { return ids[rng.IntN(len(ids))] }
	task := func(id string, seq int64) []byte {
		return fmt.Appendf(nil, `{"run_id":%q,"dispatch_seq":%d}`, id, seq)
	}
	classes := []func() []byte{
		func() []byte { return task(wire.NewRunID(), 1+rng.Int64N(5)) },
		func() []byte { id := pickOf(other); return task(id, seqOf[id]) },
		func() []byte { id := pickOf(completed); return task(id, 1+rng.Int64N(seqOf[id])) },
		func() []byte {
			if rng.IntN(2) == 0 {
				id := pickOf(queued) // QUEUED on dispatch 2: the stale 1, or a future one
				return task(id, []int64{1, 1, 3, 1 << 40}[rng.IntN(4)])
			}
			id := pickOf(sleeping) // asleep after dispatch 1: that one, or the next
			return task(id, seqOf[id]+rng.Int64N(2))
		},
	}
	out := make([][]byte, 0, n)
	for i := range n {
		out = append(out, classes[i%len(classes)]())
	}
	rng.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out
}
