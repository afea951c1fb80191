package battery

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// T10 — a partitioned executor self-fences. Lease 2 s (the SDK renews every lease/3,
// 0.67 s). Executor A reaches PostgreSQL only through a fault proxy (its DATABASE_URL,
// which its oracle pool shares, points at the proxy); executor B and the other services
// reach it directly. A holds two runs when the proxy blackholes A↔PG for 8 s:
//
//   - v1 is inside a long step body (step 2, held on a latch the test releases during
//     the partition; A sees the release only after the heal, its latch poll being cut off
//     too). Its result can only be written after the heal, under a lease long gone.
//   - v2 is in a sleep A waits out in process (7 s, recorded before the partition). When
//     it ends, nothing but A's own monotonic clock tells A that its lease lapsed: no
//     write stands between the sleep and step 2's body.
//
// Pass: B reclaims both runs after A's lease expired and completes them with the
// outputs of fault-free runs; A starts 0 step bodies after its lease expired (its
// test_effects rows with at > lease_expires_at: 0; a body it started during the
// partition would record its effect, at the latest, when the partition heals); after the
// heal A's pending write is refused by the fence (fenced_rejected grows by ≥ 1); A's
// process lives on (same pid) and, with B stopped, completes every new run.
func TestT10PartitionedExecutorSelfFences(t *testing.T) {
	if !*chaos {
		t.Skip("chaos tier: BATTERY.md runs T10 in make chaos (-args -kagzi.chaos)")
	}
	const (
		partition = 8 * time.Second
		napMS     = 7000
		afterHeal = 3 // runs A must complete once healed
	)
	sum := newSummary(t, fmt.Sprintf("2 runs held by A across an %s A↔PG blackhole, lease 2 s; then %d runs on A alone", partition, afterHeal))
	s := newSystem(t)
	s.scheduler("scheduler")
	s.timer("timer", "KAGZI_STALE_AFTER=2s", "KAGZI_MAX_IDLE=1s")

	dbURL, err := url.Parse(s.dbURL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := testkit.StartProxy(t, dbURL.Host)
	viaProxy := *dbURL
	viaProxy.Host = proxy.Addr()
	// Concurrency 2: one slot per victim, so A holds no open pull request during the
	// partition that could swallow the doorbell of B's reclaim. Sleeps up to 10 s are
	// waited out in process (by B too, so v2 never parks and needs no new doorbell).
	a := s.executor("exec-a", "DATABASE_URL="+viaProxy.String(), "KAGZI_CONCURRENCY=2", "KAGZI_LEASE=2s",
		"KAGZI_LOCAL_SLEEP_MAX=10s")
	pidA := a.PID()

	v1 := s.startRuns([]chaoswf.Input{{Seed: 10_001, Steps: 3, MinMS: 5, MaxMS: 10, LatchStep: 2}})[0]
	if _, ok := s.oracle.WaitCount(20*time.Second, 1,
		`SELECT count(*) FROM test_effects WHERE run_id = $1 AND step_key = 'step#2' AND pid = $2`, v1, pidA); !ok {
		t.Fatalf("run v1 %s never entered step 2 on A", v1)
	}
	v2 := s.startRuns([]chaoswf.Input{{Seed: 10_002, Steps: 3, MinMS: 5, MaxMS: 10, SleepAfter: 1, SleepMS: napMS}})[0]
	if _, ok := s.oracle.WaitCount(20*time.Second, 1,
		`SELECT count(*) FROM step_runs WHERE run_id = $1 AND kind = 'sleep'`, v2); !ok {
		t.Fatalf("run v2 %s never started its sleep", v2)
	}
	napFrom := time.Now()
	b := s.executor("exec-b", "KAGZI_LEASE=2s", "KAGZI_LOCAL_SLEEP_MAX=10s")
	waitLogLine(t, b, "chaosexec ready", 20*time.Second)

	type victim struct {
		id, owner string
		fence     int64
		expiry    time.Time // A's lease as the database last extended it
	}
	victims := []*victim{{id: v1}, {id: v2}}
	for _, v := range victims {
		var status string
		if err := s.pool.QueryRow(context.Background(), `SELECT status, coalesce(lease_owner, ''), fence FROM workflow_runs WHERE id = $1`,
			v.id).Scan(&status, &v.owner, &v.fence); err != nil {
			t.Fatal(err)
		}
		if status != "RUNNING" || s.oracle.Count(`SELECT count(*) FROM test_effects WHERE run_id = $1 AND pid <> $2`, v.id, pidA) != 0 {
			t.Fatalf("run %s is %s, not held by A alone, when the partition should start", v.id, status)
		}
	}
	fencedBefore := s.workerStat(pidA, "fenced_rejected")
	if proxy.Accepted() == 0 {
		t.Fatal("executor A never connected through the proxy")
	}

	s.fault(a, "blackhole A↔PG")
	proxy.SetMode(testkit.Blackhole)
	cut := time.Now()
	// Leave v2's sleep long enough to end after A's lease: past it, the only thing
	// between A and step 2's body is A's own clock.
	if left := time.Duration(napMS)*time.Millisecond - cut.Sub(napFrom); left < 3*time.Second {
		t.Fatalf("setup too slow: v2's sleep ends %s after the cut, want at least 3 s (the lease and a margin)", left)
	}
	if _, err := s.pool.Exec(context.Background(), `INSERT INTO test_latches (run_id) VALUES ($1)`, v1); err != nil {
		t.Fatal(err)
	}
	// A statement A sent just before the cut has long committed; one the proxy holds is
	// delivered after the heal, under a fence B has changed by then.
	time.Sleep(300 * time.Millisecond)
	for _, v := range victims {
		var fence int64
		var owner string
		err := s.pool.QueryRow(context.Background(), `SELECT fence, coalesce(lease_owner, ''), lease_expires_at FROM workflow_runs
			WHERE id = $1 AND status = 'RUNNING'`, v.id).Scan(&fence, &owner, &v.expiry)
		if err != nil || fence != v.fence || owner != v.owner {
			t.Fatalf("run %s left A's hands within 300 ms of the cut (fence %d→%d, owner %q→%q): %v", v.id, v.fence, fence, v.owner, owner, err)
		}
	}

	// B's reclaims, during the partition.
	for _, v := range victims {
		if _, ok := s.oracle.WaitCount(time.Until(cut.Add(partition)), 1,
			`SELECT count(*) FROM workflow_runs WHERE id = $1 AND fence > $2`, v.id, v.fence); !ok {
			t.Errorf("run %s not reclaimed within the %s partition", v.id, partition)
		}
	}
	time.Sleep(time.Until(cut.Add(partition)))
	proxy.SetMode(testkit.Pass)
	t.Logf("partition healed after %s", time.Since(cut).Round(time.Millisecond))
	sum.Faults = fmt.Sprintf("%s blackhole A↔PG", partition)

	if !s.waitCompleted(len(victims), 20*time.Second) {
		t.FailNow()
	}
	// A's step-2 write of v1 reaches the database after the heal and is refused.
	end := time.Now().Add(15 * time.Second)
	for s.workerStat(pidA, "fenced_rejected") <= fencedBefore {
		if time.Now().After(end) {
			t.Fatalf("no write of A was refused by the fence after the heal (fenced_rejected stayed %d)", fencedBefore)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("A's fenced_rejected %d → %d", fencedBefore, s.workerStat(pidA, "fenced_rejected"))

	for _, v := range victims {
		if n := s.oracle.Count(`SELECT count(*) FROM test_effects WHERE run_id = $1 AND pid = $2 AND at > $3`, v.id, pidA, v.expiry); n != 0 {
			t.Errorf("run %s: A started %d step bodies after its lease expired at %s", v.id, n, v.expiry.Format(time.RFC3339Nano))
		}
		var reclaimedAt time.Time
		if err := s.pool.QueryRow(context.Background(), `SELECT min(at) FROM test_transitions WHERE run_id = $1 AND fence > $2`,
			v.id, v.fence).Scan(&reclaimedAt); err != nil {
			t.Fatal(err)
		}
		if reclaimedAt.Before(v.expiry) {
			t.Errorf("run %s reclaimed at %s, before A's lease expired at %s", v.id, reclaimedAt.Format(time.RFC3339Nano), v.expiry.Format(time.RFC3339Nano))
		}
		// Steps 2 and 3 were recorded by B, from bodies B ran.
		if n := s.oracle.Count(`SELECT count(*) FROM step_runs r JOIN test_effects e ON e.run_id = r.run_id
			AND e.step_key = r.step_key AND e.attempt = r.attempt
			WHERE r.run_id = $1 AND r.step_key IN ('step#2', 'step#3') AND e.pid = $2`, v.id, b.PID()); n != 2 {
			t.Errorf("run %s: %d of steps 2–3 recorded from B's bodies, want 2", v.id, n)
		}
	}
	expectZero(t, "victims' outputs that differ from a fault-free run's", s.wrongOutputs())

	// A lives on and serves: with B gone, every new run is A's.
	b.Stop(10 * time.Second)
	if a.Exited() || a.PID() != pidA {
		t.Fatalf("executor A did not survive the partition (exited %v, pid %d → %d)", a.Exited(), pidA, a.PID())
	}
	healedRuns := s.startRuns(inputs(afterHeal, func(i int) chaoswf.Input {
		return chaoswf.Input{Seed: 10_100 + i, Steps: 3, MinMS: 5, MaxMS: 10}
	}))
	if !s.waitCompleted(len(victims)+afterHeal, 20*time.Second) {
		t.FailNow()
	}
	expectEq(t, "step bodies of the new runs run by A", s.oracle.Count(`SELECT count(*) FROM test_effects
		WHERE run_id = ANY($1::uuid[]) AND pid = $2`, healedRuns, pidA), 3*afterHeal)
	if a.Exited() || a.PID() != pidA {
		t.Errorf("executor A exited or restarted (pid %d → %d)", pidA, a.PID())
	}

	all := append([]string{v1, v2}, healedRuns...)
	tl := s.oracle.Tally(s.faultedPIDs())
	sum.fill(tl, s.oracle.NotCompleted(all), 3*len(all))
	t.Logf("tally: %+v", tl)
	expectEq(t, "runs COMPLETED", tl.Completed, len(all))
	expectEq(t, "step results recorded", tl.StepResults, 3*len(all))
	// v1's step 2, begun by A before the cut and run again by B: the only repeat.
	expectEq(t, "repeated step bodies", tl.DupBodies, 1)
	expectZero(t, "repeats no partitioned or fenced process explains", tl.Unattributed)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, len(all))
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	s.checkNoPanics()
}

// waitLogLine waits until a process has logged a line containing want.
func waitLogLine(t *testing.T, p *testkit.Process, want string, timeout time.Duration) {
	t.Helper()
	end := time.Now().Add(timeout)
	for !strings.Contains(p.Log(), want) {
		if p.Exited() || time.Now().After(end) {
			t.Fatalf("%s did not log %q within %s", p.Name, want, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
