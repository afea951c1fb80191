package battery

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// t13DDL records every lease and wake time written to workflow_runs beside the
// database clock of the transaction that wrote it (now(), the value the engine's own
// statements use), so the test can tell a value the database computed from one a
// process's clock supplied.
const t13DDL = `
CREATE TABLE test_clock_writes (
    run_id uuid        NOT NULL,
    what   text        NOT NULL,  -- 'lease' or 'wake'
    value  timestamptz NOT NULL,
    tx_now timestamptz NOT NULL
);
CREATE FUNCTION test_record_clock_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.lease_expires_at IS NOT NULL AND NEW.lease_expires_at IS DISTINCT FROM OLD.lease_expires_at THEN
        INSERT INTO test_clock_writes VALUES (NEW.id, 'lease', NEW.lease_expires_at, now());
    END IF;
    IF NEW.wake_at IS NOT NULL AND NEW.wake_at IS DISTINCT FROM OLD.wake_at THEN
        INSERT INTO test_clock_writes VALUES (NEW.id, 'wake', NEW.wake_at, now());
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER test_clock_writes AFTER UPDATE ON workflow_runs
    FOR EACH ROW EXECUTE FUNCTION test_record_clock_write();`

// T13 — clock skew. One executor's clock runs 300 s ahead, another's 300 s behind, and
// the only timer's 300 s ahead; W 5-step runs sleep 5 s after their first step, lease 2 s.
// Every lease and wake time must come from the database clock, so the skew changes
// nothing. Pass: no run went on before its wake time (by the database clock); no lease
// was taken from a live holder (no RUNNING → QUEUED transition, and the timer's
// kagzi_lease_expired_total agrees, unless the holder's own renewals had timed out on a
// starved database: see t13Reclaims); all W COMPLETED; every lease written is its
// transaction's now() + 2 s and every wake time its now() + 5 s, within 1 s (a skewed
// clock would be 300 s off).
//
// The skew must have been in force: each skewed process announces its offset on
// start-up, and both executors ran step bodies.
func TestT13ClockSkew(t *testing.T) {
	if !*chaos {
		t.Skip("chaos tier: make chaos")
	}
	const (
		w     = 1000
		lease = 2 * time.Second
		sleep = 5 * time.Second
		skew  = 300 * time.Second
	)
	sum := newSummary(t, fmt.Sprintf("W=%d 5-step, Sleep(%s) after step 1, lease %s; executors at %+v and %+v, timer at %+v",
		w, sleep, lease, skew, -skew, skew))
	s := newSystem(t)
	if _, err := s.pool.Exec(context.Background(), t13DDL); err != nil {
		t.Fatalf("create the clock-write recorder: %v", err)
	}
	s.scheduler("scheduler")
	metrics := freeAddr(t)
	tmr := s.timer("timer", "KAGZI_TEST_CLOCK_OFFSET=+300s", "KAGZI_HTTP_ADDR="+metrics)
	// Every sleep parks, so the skewed timer must be the one to wake it.
	execEnv := []string{"KAGZI_CONCURRENCY=32", "KAGZI_LEASE=" + lease.String(), "KAGZI_LOCAL_SLEEP_MAX=-1s"}
	ahead := s.executor("exec-ahead", append(execEnv, "KAGZI_TEST_CLOCK_OFFSET=+300s")...)
	behind := s.executor("exec-behind", append(execEnv, "KAGZI_TEST_CLOCK_OFFSET=-300s")...)
	sum.Faults = "clocks skewed +300 s (1 executor, timer) and −300 s (1 executor)"

	ids := s.startRuns(inputs(w, func(i int) chaoswf.Input {
		return chaoswf.Input{Seed: 13000 + i, Steps: 5, MinMS: 5, MaxMS: 20, SleepAfter: 1, SleepMS: int(sleep.Milliseconds())}
	}))
	s.waitCompleted(w, 60*time.Second)

	for _, c := range []struct {
		p   *testkit.Process
		off time.Duration
	}{{tmr, skew}, {ahead, skew}, {behind, -skew}} {
		if want := fmt.Sprintf("clock reads %s off", c.off); !strings.Contains(c.p.Log(), want) {
			t.Errorf("%s never announced %q: the skew was not in force", c.p.Name, want)
		}
	}
	// Both skewed executors must have run step bodies, or their clocks proved nothing.
	for _, p := range []*testkit.Process{ahead, behind} {
		pid := p.PID()
		bodies := s.oracle.Count(`SELECT count(*) FROM test_effects WHERE pid = $1`, pid)
		t.Logf("%s (pid %d): %d step bodies, %d claims, %d leases lost, %d writes fenced", p.Name, pid, bodies,
			s.workerStat(pid, "claimed"), s.workerStat(pid, "lease_lost"), s.workerStat(pid, "fenced_rejected"))
		if bodies == 0 {
			t.Errorf("%s ran no step body: its skewed clock was never exercised", p.Name)
		}
	}

	// No lease may be taken from a live holder. A skewed clock would show as a reclaim
	// (RUNNING → QUEUED) with nothing to explain it: the timer expiring a lease early, or
	// an executor dropping a run it still held, whose lease then ran out. The one
	// explanation admitted is the database not answering the holder's renewals within
	// half a lease, which the holder logs: a machine too loaded for a 2 s lease, a fault
	// of the environment and not of any clock.
	recl := s.t13Reclaims(lease, ahead, behind)
	expectZero(t, "reclaims of runs whose holder's renewals had not failed", recl.unexplained)
	if recl.total > 0 {
		sum.Faults += fmt.Sprintf("; %d reclaims during database stalls (renewals timed out)", recl.total)
	}
	expired, err := scrapeMetric(metrics, "kagzi_lease_expired_total")
	if errors.Is(err, errMetricAbsent) {
		expired, err = 0, nil // no lease ever expired, so no series exists
	}
	if err != nil {
		t.Errorf("scrape the timer: %v", err)
	}
	expectEq(t, "kagzi_lease_expired_total (the reclaims the oracle saw)", int(expired), recl.total)
	fenced := s.workerStat(ahead.PID(), "fenced_rejected") + s.workerStat(behind.PID(), "fenced_rejected")
	if fenced > recl.total {
		t.Errorf("%d writes refused by the fence, more than the %d runs reclaimed", fenced, recl.total)
	}
	woken, err := scrapeMetric(metrics, "kagzi_runs_woken_total")
	if err != nil {
		t.Errorf("scrape the timer: %v", err)
	}
	if int(woken) != w {
		t.Errorf("the skewed timer woke %v runs, want %d (every sleep parked)", woken, w)
	}

	s.expectNoEarlyWakes()
	s.expectNoEarlyQueueing()

	// The values themselves: each lease and wake time written is the writing
	// transaction's now() plus the lease or the sleep, to the microsecond unless a
	// process's clock got into it.
	for _, c := range []struct {
		what string
		want time.Duration
		min  int
	}{{"lease", lease, 2 * w}, {"wake", sleep, w}} {
		var n, off int
		var worst float64
		err := s.pool.QueryRow(context.Background(), `SELECT count(*),
			count(*) FILTER (WHERE abs(extract(epoch FROM value - tx_now) - $2) > 1),
			coalesce(max(abs(extract(epoch FROM value - tx_now) - $2)), 0)::float8
			FROM test_clock_writes WHERE what = $1`, c.what, c.want.Seconds()).Scan(&n, &off, &worst)
		if err != nil {
			t.Fatalf("read the %s writes: %v", c.what, err)
		}
		t.Logf("%d %s times written, worst %.6fs from now() + %s", n, c.what, worst, c.want)
		if n < c.min {
			t.Errorf("%d %s times written, want at least %d", n, c.what, c.min)
		}
		expectZero(t, c.what+" times more than 1 s from the database's now() + "+c.want.String(), off)
	}
	expectZero(t, "sleep records whose wake time is not their creation + 5 s (±1 s)", s.oracle.Count(
		`SELECT count(*) FROM step_runs WHERE kind = 'sleep' AND abs(extract(epoch FROM wake_at - created_at) - $1) > 1`,
		sleep.Seconds()))

	tl := s.oracle.Tally(s.faultedPIDs())
	sum.fill(tl, s.oracle.NotCompleted(ids), 5*w)
	t.Logf("tally: %+v", tl)
	expectEq(t, "runs COMPLETED", tl.Completed, w)
	expectEq(t, "step results recorded", tl.StepResults, 5*w)
	// A step body repeats only on a reclaimed run, whose holder was fenced.
	expectZero(t, "repeated step bodies no fenced holder explains", tl.Unattributed)
	if tl.DupBodies > recl.total {
		t.Errorf("%d repeated step bodies, more than the %d runs reclaimed", tl.DupBodies, recl.total)
	}
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, w)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	s.checkNoPanics()
}

type t13Reclaimed struct{ total, unexplained int }

var (
	readyRE        = regexp.MustCompile(`chaosexec ready pid=\d+ worker=(\S+)`)
	renewFailureRE = regexp.MustCompile(`(?m)^time=(\S+) level=WARN msg="extend leases"`)
)

// t13Reclaims finds every reclaim (RUNNING → QUEUED, which only lease expiry makes) and
// counts those that no failed lease renewal of the run's holder explains: none logged
// from two leases before the reclaim to one lease after it (the failure is logged when
// the renewal times out, half a lease after it was sent). The executors log by the real
// clock, which the database shares.
func (s *system) t13Reclaims(lease time.Duration, execs ...*testkit.Process) t13Reclaimed {
	s.t.Helper()
	failures := map[string][]time.Time{} // worker id → failed renewals
	for _, p := range execs {
		log := p.Log()
		m := readyRE.FindStringSubmatch(log)
		if m == nil {
			s.t.Fatalf("%s never logged its worker id", p.Name)
		}
		for _, f := range renewFailureRE.FindAllStringSubmatch(log, -1) {
			at, err := time.Parse(time.RFC3339Nano, f[1])
			if err != nil {
				s.t.Fatalf("%s: renewal failure time %q: %v", p.Name, f[1], err)
			}
			failures[m[1]] = append(failures[m[1]], at)
		}
	}
	rows, err := s.pool.Query(context.Background(), `SELECT t.run_id::text, t.at,
		coalesce((SELECT p.lease_owner FROM test_transitions p WHERE p.run_id = t.run_id AND p.id < t.id
		          AND p.new_status = 'RUNNING' ORDER BY p.id DESC LIMIT 1), '')
		FROM test_transitions t WHERE t.old_status = 'RUNNING' AND t.new_status = 'QUEUED' ORDER BY t.at`)
	if err != nil {
		s.t.Fatalf("read reclaims: %v", err)
	}
	defer rows.Close()
	var r t13Reclaimed
	for rows.Next() {
		var run, owner string
		var at time.Time
		if err := rows.Scan(&run, &at, &owner); err != nil {
			s.t.Fatalf("read reclaims: %v", err)
		}
		r.total++
		explained := slices.ContainsFunc(failures[owner], func(f time.Time) bool {
			return !f.Before(at.Add(-2*lease)) && !f.After(at.Add(lease))
		})
		if !explained {
			r.unexplained++
			if r.unexplained <= 5 {
				s.t.Logf("run %s reclaimed at %s from %q, whose renewals had not failed", run, at.Format("15:04:05.000"), owner)
			}
		}
	}
	if err := rows.Err(); err != nil {
		s.t.Fatalf("read reclaims: %v", err)
	}
	if r.total > 0 {
		s.t.Logf("%d reclaims, %d explained by renewals that timed out", r.total, r.total-r.unexplained)
	}
	return r
}
