package testkit

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// OracleDDL creates the fault tests' oracle tables in a test database (never in a real
// one):
//
//   - test_effects: one row per step-body execution, written by the test workflows
//     through their own autocommit pool before the body does anything else, so a body
//     that ran but whose result was never recorded is still counted. No unique key: a
//     repeat is what the tests look for.
//   - test_transitions: one row per change of a run's status, fence or dispatch_seq,
//     written by a trigger on workflow_runs in the transaction that made the change, so
//     the engine cannot make a transition the tests do not see. Lease renewals change
//     none of the three and are left out; they would drown the rest.
const OracleDDL = `
CREATE TABLE test_effects (
    run_id      uuid        NOT NULL,
    step_key    text        NOT NULL,
    idem_key    text        NOT NULL,
    executor_id text        NOT NULL,
    fence       bigint,
    attempt     integer,
    pid         integer     NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX test_effects_run ON test_effects (run_id, step_key);

CREATE TABLE test_transitions (
    id           bigserial   PRIMARY KEY,
    run_id       uuid        NOT NULL,
    old_status   text,                       -- NULL: the run was inserted
    new_status   text        NOT NULL,
    fence        bigint      NOT NULL,
    attempt      integer     NOT NULL,
    dispatch_seq bigint      NOT NULL,
    lease_owner  text,
    at           timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX test_transitions_run ON test_transitions (run_id, id);

CREATE FUNCTION test_record_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status OR NEW.fence <> OLD.fence
       OR NEW.dispatch_seq <> OLD.dispatch_seq THEN
        INSERT INTO test_transitions (run_id, old_status, new_status, fence, attempt, dispatch_seq, lease_owner)
        VALUES (NEW.id, CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END, NEW.status, NEW.fence, NEW.attempt,
                NEW.dispatch_seq, NEW.lease_owner);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER test_transitions AFTER INSERT OR UPDATE ON workflow_runs
    FOR EACH ROW EXECUTE FUNCTION test_record_transition();
`

// Oracle reads the oracle tables of one test database and, when the test fails, dumps
// what is needed to diagnose it without a rerun: the offending runs with their steps,
// step-body executions and transitions, plus whatever the test added with OnDump.
type Oracle struct {
	t    testing.TB
	pool *pgxpool.Pool

	mu     sync.Mutex
	extra  []func()
	dumped bool
}

// NewOracle creates the oracle tables in the database behind pool and arranges the dump
// on failure. Call it after the pool is made, so the dump runs before the pool closes.
func NewOracle(t testing.TB, pool *pgxpool.Pool) *Oracle {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := pool.Exec(ctx, OracleDDL); err != nil {
		t.Fatalf("testkit: create oracle tables: %v", err)
	}
	o := &Oracle{t: t, pool: pool}
	t.Cleanup(func() {
		if t.Failed() {
			o.Dump()
		}
	})
	return o
}

// OnDump adds something to print when the test fails (consumer info, metrics, …).
func (o *Oracle) OnDump(f func()) {
	o.mu.Lock()
	o.extra = append(o.extra, f)
	o.mu.Unlock()
}

// Count runs a query returning one integer.
func (o *Oracle) Count(sql string, args ...any) int {
	o.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var n int
	if err := o.pool.QueryRow(ctx, sql, args...).Scan(&n); err != nil {
		o.t.Fatalf("testkit: %s: %v", sql, err)
	}
	return n
}

// WaitCount polls a count until it equals want or timeout passes and reports whether
// it got there, with the last value seen.
func (o *Oracle) WaitCount(timeout time.Duration, want int, sql string, args ...any) (int, bool) {
	o.t.Helper()
	end := time.Now().Add(timeout)
	for {
		got := o.Count(sql, args...)
		if got == want {
			return got, true
		}
		if time.Now().After(end) {
			return got, false
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// ActiveSQL counts runs that are not finished: anything QUEUED, RUNNING, SLEEPING or
// WAITING after the system should have drained is stuck.
const ActiveSQL = `SELECT count(*) FROM workflow_runs WHERE status IN ('QUEUED','RUNNING','SLEEPING','WAITING')`

// WaitQuiescent waits until no run is active, or timeout passes, and returns how many
// runs are still active (the stuck ones).
func (o *Oracle) WaitQuiescent(timeout time.Duration) int {
	o.t.Helper()
	n, _ := o.WaitCount(timeout, 0, ActiveSQL)
	return n
}

// Tally is what the oracle tables say about a finished test.
type Tally struct {
	Runs, Completed, Failed, Active int
	StepResults                     int // step_runs rows of kind step
	Effects                         int // step-body executions
	// DupBodies counts body executions that repeat an earlier one of the same step.
	DupBodies int
	// Unattributed counts repeats whose earlier execution was by a process the test did
	// not kill, stop or see fenced: a repeat nothing explains.
	Unattributed int
	// IdemMismatch counts repeats whose idempotency key differs from the earlier one's.
	IdemMismatch int
	// CompletedEntries counts transitions into COMPLETED; MultiCompleted the runs that
	// entered it more than once.
	CompletedEntries, MultiCompleted int
	// TerminalExits counts transitions out of COMPLETED, FAILED or CANCELLED.
	TerminalExits int
}

const tallySQL = `
WITH e AS (
    SELECT pid, idem_key,
           lag(pid) OVER w AS prev_pid, lag(idem_key) OVER w AS prev_idem
    FROM test_effects WINDOW w AS (PARTITION BY run_id, step_key ORDER BY at, ctid)
), c AS (
    SELECT run_id, count(*) AS n FROM test_transitions WHERE new_status = 'COMPLETED'
      AND old_status IS DISTINCT FROM 'COMPLETED' GROUP BY run_id
)
SELECT
    (SELECT count(*) FROM workflow_runs),
    (SELECT count(*) FROM workflow_runs WHERE status = 'COMPLETED'),
    (SELECT count(*) FROM workflow_runs WHERE status = 'FAILED'),
    (SELECT count(*) FROM workflow_runs WHERE status IN ('QUEUED','RUNNING','SLEEPING','WAITING')),
    (SELECT count(*) FROM step_runs WHERE kind = 'step'),
    (SELECT count(*) FROM e),
    (SELECT count(*) FROM e WHERE prev_pid IS NOT NULL),
    (SELECT count(*) FROM e WHERE prev_pid IS NOT NULL AND NOT prev_pid = ANY ($1::int[])),
    (SELECT count(*) FROM e WHERE prev_pid IS NOT NULL AND idem_key <> prev_idem),
    (SELECT coalesce(sum(n), 0) FROM c),
    (SELECT count(*) FROM c WHERE n > 1),
    (SELECT count(*) FROM test_transitions WHERE old_status IN ('COMPLETED','FAILED','CANCELLED')
        AND new_status IS DISTINCT FROM old_status)`

// Tally counts everything at once. faulted are the pids the test killed, stopped or saw
// fenced: repeats after their executions are explained, any other repeat is not.
func (o *Oracle) Tally(faulted []int) Tally {
	o.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if faulted == nil {
		faulted = []int{}
	}
	var r Tally
	err := o.pool.QueryRow(ctx, tallySQL, faulted).Scan(&r.Runs, &r.Completed, &r.Failed, &r.Active,
		&r.StepResults, &r.Effects, &r.DupBodies, &r.Unattributed, &r.IdemMismatch,
		&r.CompletedEntries, &r.MultiCompleted, &r.TerminalExits)
	if err != nil {
		o.t.Fatalf("testkit: tally the oracle: %v", err)
	}
	return r
}

// NotCompleted counts the given run ids that are missing or not COMPLETED: accepted
// starts that were lost.
func (o *Oracle) NotCompleted(ids []string) int {
	o.t.Helper()
	return o.Count(`SELECT count(*) FROM unnest($1::uuid[]) AS s(id)
		WHERE NOT EXISTS (SELECT 1 FROM workflow_runs r WHERE r.id = s.id AND r.status = 'COMPLETED')`, ids)
}

// offendingSQL picks the runs worth printing, most telling first: runs that left a
// terminal status or entered COMPLETED twice, runs stuck QUEUED or RUNNING, FAILED runs,
// runs with a repeated step body, and last the sleepers.
const offendingSQL = `
SELECT id FROM (
    SELECT run_id AS id, 0 AS k FROM test_transitions WHERE old_status IN ('COMPLETED','FAILED','CANCELLED')
        AND new_status IS DISTINCT FROM old_status
    UNION SELECT run_id, 0 FROM test_transitions WHERE new_status = 'COMPLETED'
        AND old_status IS DISTINCT FROM 'COMPLETED' GROUP BY run_id HAVING count(*) > 1
    UNION SELECT id, 1 FROM workflow_runs WHERE status IN ('QUEUED','RUNNING','WAITING')
    UNION SELECT id, 2 FROM workflow_runs WHERE status IN ('FAILED','CANCELLED')
    UNION SELECT run_id, 3 FROM test_effects GROUP BY run_id, step_key HAVING count(*) > 1
    UNION SELECT id, 4 FROM workflow_runs WHERE status = 'SLEEPING'
) o GROUP BY id ORDER BY min(k), id LIMIT $1`

// Dump prints, once, the status counts and the offending runs (at most 15) with their
// steps, body executions and transitions, then whatever OnDump added.
func (o *Oracle) Dump() {
	o.mu.Lock()
	if o.dumped {
		o.mu.Unlock()
		return
	}
	o.dumped = true
	extra := append([]func(){}, o.extra...)
	o.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var b strings.Builder
	b.WriteString("==== oracle dump ====\n")
	rows, err := o.pool.Query(ctx, `SELECT status, count(*) FROM workflow_runs GROUP BY 1 ORDER BY 1`)
	if err == nil {
		for rows.Next() {
			var s string
			var n int
			_ = rows.Scan(&s, &n)
			fmt.Fprintf(&b, "runs %s: %d\n", s, n)
		}
		rows.Close()
	}
	ids, err := o.queryStrings(ctx, offendingSQL, 15)
	if err != nil {
		fmt.Fprintf(&b, "select offending runs: %v\n", err)
	}
	for _, id := range ids {
		o.dumpRun(ctx, &b, id)
	}
	o.t.Log(b.String())
	for _, f := range extra {
		f()
	}
}

func (o *Oracle) queryStrings(ctx context.Context, sql string, args ...any) ([]string, error) {
	rows, err := o.pool.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, rows.Err()
}

// dumpRun prints one run with everything the oracle knows of it, as text rows.
func (o *Oracle) dumpRun(ctx context.Context, b *strings.Builder, id string) {
	sections := []struct{ title, sql string }{
		{"run", `SELECT format('status=%s attempt=%s/%s fence=%s dispatch_seq=%s owner=%s lease=%s wake_at=%s queued_at=%s finished_at=%s error=%L',
			status, attempt, max_attempts, fence, dispatch_seq, lease_owner, lease_expires_at, wake_at, queued_at, finished_at, left(error, 300))
			FROM workflow_runs WHERE id = $1`},
		{"steps", `SELECT format('%s seq=%s kind=%s status=%s attempt=%s wake_at=%s at=%s', step_key, seq, kind, status, attempt, wake_at, created_at)
			FROM step_runs WHERE run_id = $1 ORDER BY seq`},
		{"effects", `SELECT format('%s pid=%s executor=%s attempt=%s fence=%s idem=%s at=%s', step_key, pid, executor_id, attempt, fence, idem_key, at)
			FROM test_effects WHERE run_id = $1 ORDER BY at`},
		{"transitions", `SELECT format('%s -> %s fence=%s attempt=%s dispatch_seq=%s owner=%s at=%s', coalesce(old_status, '(insert)'), new_status, fence, attempt, dispatch_seq, lease_owner, at)
			FROM test_transitions WHERE run_id = $1 ORDER BY id`},
	}
	fmt.Fprintf(b, "-- run %s\n", id)
	for _, s := range sections {
		lines, err := o.queryStrings(ctx, s.sql, id)
		if err != nil {
			fmt.Fprintf(b, "   %s: %v\n", s.title, err)
			continue
		}
		for _, l := range lines {
			fmt.Fprintf(b, "   %-11s %s\n", s.title, l)
		}
	}
}
