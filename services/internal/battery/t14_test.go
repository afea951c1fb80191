package battery

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// t14AllKinds are the poison kinds BATTERY.md's T14 mixes with the good runs.
var t14AllKinds = []string{chaoswf.PoisonPanic, chaoswf.PoisonError, chaoswf.PoisonLoop, chaoswf.PoisonExit}

// t14Kinds narrows T14's poison to some kinds, to measure what each costs the good runs'
// p99 (logT14Slots says where the slots went).
var t14Kinds = flag.String("kagzi.t14-kinds", strings.Join(t14AllKinds, ","),
	"the poison kinds T14 mixes in, comma-separated (BATTERY.md: all four); fewer to measure what each costs")

// t14Isolation is how T14's executors keep a run that kills its process from taking
// others down.
var t14Isolation = flag.String("kagzi.t14-isolation", "every-run",
	"how T14's executors isolate runs: every-run (sdk.WorkerConfig.SandboxEveryRun, one sandbox per slot), "+
		"sandboxes (8 sandboxes, for runs whose last attempt lapsed) or alone (no sandboxes: such runs run alone in their executor)")

// t14ExecutorEnv is the chaos executor's environment for an isolation mode.
func t14ExecutorEnv(mode string) ([]string, error) {
	switch mode {
	case "every-run":
		return []string{"KAGZI_SANDBOX_EVERY_RUN=1"}, nil
	case "sandboxes":
		return []string{"KAGZI_SANDBOXES=8"}, nil
	case "alone":
		return nil, nil
	}
	return nil, fmt.Errorf("-kagzi.t14-isolation %q: want every-run, sandboxes or alone", mode)
}

// T14 — poison workflows. max_attempts 5, retry backoff 100 ms (the chaos executor's),
// lease 1 s, a 1 s timeout on every step body. First W good 3-step runs alone measure
// the completion p99 of a run without poison; then W more good runs are started mixed
// with N runs of each poison kind, which misbehave at step 2 on every attempt: a panic
// in workflow code, a step that always errors, a step body that loops forever ignoring
// its context, and a step body that os.Exit(1)s its executor. The test plays the
// supervisor: an executor that exits is restarted at once.
//
// Pass: every good run COMPLETED, with its expected output and only repeats a dead or
// fenced executor explains; every poison run FAILED with attempt = 5, each of attempts
// 1–5 claimed, at most one step-2 body per attempt, and a reason that says what ended
// its last attempt (its own failure, or the lapsed lease of an executor that died or was
// fenced under it; always the latter for os.Exit); processes restarted only for
// os.Exit, one per call (one exiting body per process, see chaoswf): executor restarts
// = os.Exit calls in executors, pid for pid, every sandbox seen dying called os.Exit,
// and with no executor dead every call in a sandbox was seen; and the good runs'
// completion p99 with poison at most twice the one without.
//
// An os.Exit takes every run its process holds down with it, and each of them loses an
// attempt to the lapsed lease: the good runs (and the other poison runs) beside an
// os.Exit run are what the first and last criteria are about. The executors run every
// run in a sandbox of its own (sdk.WorkerConfig.SandboxEveryRun), a child process per
// slot: an os.Exit kills its sandbox and nothing beside it, the executor sees it die
// and ends the attempt at once, and a sandbox that abandoned the looping body at its
// timeout ends itself after the run. -kagzi.t14-isolation measures the engine's other
// modes.
func TestT14PoisonWorkflows(t *testing.T) {
	w := pick(500, 5000)
	n := pick(20, 100)
	const maxAttempts = 5
	kinds := strings.Split(*t14Kinds, ",")
	for _, k := range kinds {
		if !slices.Contains(t14AllKinds, k) {
			t.Fatalf("-kagzi.t14-kinds: unknown poison kind %q (want some of %s)", k, strings.Join(t14AllKinds, ","))
		}
	}
	if !slices.Equal(kinds, t14AllKinds) {
		t.Logf("poison kinds %s only (-kagzi.t14-kinds): a measurement, not BATTERY.md's T14", *t14Kinds)
	}
	isolation, err := t14ExecutorEnv(*t14Isolation)
	if err != nil {
		t.Fatal(err)
	}
	sum := newSummary(t, fmt.Sprintf("W=%d good 3-step + %d runs of each of %d poison kinds, max_attempts %d, backoff 100 ms, lease 1 s, step timeout 1 s, 3 executors × 8",
		w, n, len(kinds), maxAttempts))
	s := newSystem(t)
	sched := s.scheduler("scheduler")
	// A doorbell fetched by an executor that exits before claiming it comes back after
	// AckWait (5 s) or a relay after the stale threshold: 2 s keeps the relay short.
	tmr := s.timer("timer", "KAGZI_STALE_AFTER=2s", "KAGZI_MAX_IDLE=1s")
	execs := make([]*testkit.Process, 3)
	for i := range execs {
		execs[i] = s.executor(fmt.Sprintf("exec-%d", i+1), append([]string{"KAGZI_CONCURRENCY=8", "KAGZI_LEASE=1s"}, isolation...)...)
	}
	good := func(seed int) chaoswf.Input {
		return chaoswf.Input{Seed: seed, Steps: 3, MinMS: 5, MaxMS: 20, TimeoutMS: 1000}
	}
	settle := pick(60*time.Second, 5*time.Minute)

	// Phase 1: the baseline, on the same system.
	baseIDs := s.startRuns(inputs(w, func(i int) chaoswf.Input { return good(14000 + i) }), sdk.MaxAttempts(maxAttempts))
	if !s.waitCompleted(w, settle) {
		t.FailNow()
	}
	baseP99 := s.completionP99(baseIDs)

	// Phase 2: good and poison runs in one shuffled start.
	mixed := inputs(w, func(i int) chaoswf.Input { return good(24000 + i) })
	for k, kind := range kinds {
		for i := range n {
			in := good(34000 + k*n + i)
			in.Poison = kind
			mixed = append(mixed, in)
		}
	}
	seed := time.Now().UnixNano()
	t.Logf("shuffle seed %d", seed)
	rng := rand.New(rand.NewPCG(uint64(seed), 14))
	rng.Shuffle(len(mixed), func(i, j int) { mixed[i], mixed[j] = mixed[j], mixed[i] })
	ids := s.startRuns(mixed, sdk.MaxAttempts(maxAttempts))
	var goodIDs []string
	byKind := map[string][]string{}
	for i, in := range mixed {
		if in.Poison == "" {
			goodIDs = append(goodIDs, ids[i])
		} else {
			byKind[in.Poison] = append(byKind[in.Poison], ids[i])
		}
	}
	var poisonIDs []string
	for _, kind := range kinds {
		poisonIDs = append(poisonIDs, byKind[kind]...)
	}

	// The supervisor: restart every executor that exits, until every run has ended.
	var dead []int
	var exits []time.Time // when the supervisor saw each exit
	total := 2*w + len(kinds)*n
	// It looks for exits every 10 ms whatever the database does: the count of ended
	// runs, slow on a loaded machine, is taken beside it, not between two looks.
	// Under the full chaos run's load the mixed phase has taken over 5 minutes (its p99
	// alone is 3 to 4): it gets 10, and a phase that outlasts them is tallied as it
	// stands, its unfinished runs counted stuck, rather than left uncounted.
	mixedSettle := pick(60*time.Second, 10*time.Minute)
	deadline := time.Now().Add(mixedSettle)
	allEnded, stopCounting := make(chan struct{}), make(chan struct{})
	go func() {
		for {
			var ended int // a failed count is taken again: t.Fatal is not for this goroutine
			err := s.pool.QueryRow(context.Background(),
				`SELECT count(*) FROM workflow_runs WHERE status IN ('COMPLETED','FAILED','CANCELLED')`).Scan(&ended)
			if err == nil && ended == total {
				close(allEnded)
				return
			}
			select {
			case <-stopCounting:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
supervise:
	for ; ; time.Sleep(10 * time.Millisecond) {
		for _, p := range execs {
			if p.Exited() {
				dead = append(dead, s.fault(p, "exited (os.Exit in a poison step), restarted"))
				exits = append(exits, time.Now())
				p.Start()
			}
		}
		select {
		case <-allEnded:
			break supervise
		default:
		}
		if time.Now().After(deadline) {
			t.Errorf("runs still active %s after the mixed start; tallied as they stand", mixedSettle)
			break supervise
		}
	}
	close(stopCounting)
	sum.Faults = fmt.Sprintf("%d poison runs (%d × %s), isolation %s", len(poisonIDs), n, strings.Join(kinds, ", "), *t14Isolation)
	t.Logf("%d executor exits, all restarted", len(dead))

	// Good runs: all completed, correctly, repeating only what a dead or fenced executor
	// explains.
	faulted := s.faultedPIDs()
	tl := s.oracle.Tally(faulted)
	allGood := append(slices.Clone(baseIDs), goodIDs...)
	lostGood := s.oracle.NotCompleted(allGood)
	// Good runs still active (a mixed phase that outlasted its deadline) are stuck, in
	// the tally's count, not lost.
	activeGood := s.oracle.Count(`SELECT count(*) FROM workflow_runs
		WHERE id = ANY ($1::uuid[]) AND status IN ('QUEUED','RUNNING','SLEEPING','WAITING')`, allGood)
	sum.fill(tl, lostGood-activeGood, 6*w+len(poisonIDs))
	repeats, unexplained := s.repeatsOf(allGood, faulted)
	sum.DupBodies, sum.Unattributed = repeats, unexplained // poison runs repeat step 2 by design
	t.Logf("tally: %+v; good runs: %d repeated bodies, %d unexplained", tl, repeats, unexplained)
	expectZero(t, "good runs not COMPLETED", lostGood)
	if lostGood > 0 {
		// The oracle's dump shows poison runs first; these are the ones that matter here.
		for _, line := range s.lines(`SELECT format('good run %s %s attempt %s: %s', r.id, r.status, r.attempt,
			string_agg(format('%s→%s a%s f%s %s %s', coalesce(c.old_status, '-'), c.new_status, c.attempt, c.fence,
			coalesce(c.lease_owner, ''), to_char(c.at, 'MI:SS.MS')), ', ' ORDER BY c.id))
			FROM workflow_runs r JOIN test_transitions c ON c.run_id = r.id
			WHERE r.id = ANY ($1::uuid[]) AND r.status <> 'COMPLETED' GROUP BY r.id LIMIT 3`, goodIDs) {
			t.Log(line)
		}
	}
	expectZero(t, "good-run step bodies repeated without a dead or fenced executor to explain it", unexplained)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, 2*w)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	// Good runs record 3 steps; every poison run records step 1 only.
	expectEq(t, "step results recorded", tl.StepResults, 6*w+len(poisonIDs))

	// Poison runs: dead-lettered after exactly max_attempts, each with its reason.
	t14CheckPoison(t, s, byKind, faulted, maxAttempts)
	expectZero(t, "attempts that ran step 2's body more than once", s.oracle.Count(`SELECT count(*) FROM (SELECT 1 FROM test_effects
		WHERE run_id = ANY ($1::uuid[]) AND step_key = 'step#2' GROUP BY run_id, attempt HAVING count(*) > 1) x`, poisonIDs))
	expectZero(t, "step-2 bodies of runs that panic before step 2", s.oracle.Count(`SELECT count(*) FROM test_effects
		WHERE run_id = ANY ($1::uuid[]) AND step_key = 'step#2'`, byKind[chaoswf.PoisonPanic]))

	// Restarts: one per os.Exit call and nothing else. Each call left one step-2 effect
	// (one exiting body per process), written by the pid that then died.
	var exitPIDs []int
	rows, err := s.pool.Query(context.Background(), `SELECT pid FROM test_effects
		WHERE run_id = ANY ($1::uuid[]) AND step_key = 'step#2' ORDER BY pid`, byKind[chaoswf.PoisonExit])
	if err != nil {
		t.Fatalf("read os.Exit effects: %v", err)
	}
	for rows.Next() {
		var pid int
		if err := rows.Scan(&pid); err != nil {
			t.Fatalf("read os.Exit effects: %v", err)
		}
		exitPIDs = append(exitPIDs, pid)
	}
	rows.Close()
	// A sandbox that called os.Exit is no executor restart: its executor starts another
	// when a run needs one. Every sandbox its executor saw die called os.Exit.
	sandboxes := s.sandboxes()
	execExits := slices.DeleteFunc(slices.Clone(exitPIDs), func(pid int) bool { _, ok := sandboxes[pid]; return ok })
	slices.Sort(dead)
	expectEq(t, "executor restarts vs os.Exit calls in executors", len(dead), len(execExits))
	if !slices.Equal(dead, execExits) {
		t.Errorf("executor pids that exited %v differ from executor pids that called os.Exit %v", dead, execExits)
	}
	sandboxExits := s.loggedSandboxExits()
	for _, pid := range sandboxExits {
		if !slices.Contains(exitPIDs, pid) {
			t.Errorf("sandbox %d died holding a run without calling os.Exit", pid)
		}
	}
	t.Logf("os.Exit calls: %d in executors, %d in sandboxes (%d seen dying by their executors; %d sandboxes in all)",
		len(execExits), len(exitPIDs)-len(execExits), len(sandboxExits), len(sandboxes))
	sum.Faults += fmt.Sprintf("; %d os.Exit calls: %d killed an executor (restarted), %d a sandbox", len(exitPIDs), len(dead), len(exitPIDs)-len(execExits))
	if len(dead) == 0 {
		// Only an executor's death can hide its sandbox's: with none, every process
		// restart is a sandbox its executor saw die, one per os.Exit call.
		expectEq(t, "sandbox deaths seen vs os.Exit calls in sandboxes", len(sandboxExits), len(exitPIDs)-len(execExits))
	}
	if *t14Isolation == "every-run" {
		expectZero(t, "os.Exit calls in executors, which run every run in a sandbox", len(execExits))
	}
	exitLines := 0
	for _, p := range execs {
		exitLines += strings.Count(p.Log(), chaoswf.PoisonExitLine)
	}
	// A sandbox's line goes to its executor's log. One written as its executor died may
	// be lost with the dead executor's pipe: every exit seen, by the test or by an
	// executor, must have left its line.
	if seen := len(dead) + len(sandboxExits); exitLines < seen || exitLines > len(exitPIDs) {
		t.Errorf("os.Exit lines in the executors' logs: %d, want between the %d exits seen and the %d calls", exitLines, seen, len(exitPIDs))
	}
	// A restarted executor takes its name's lock and hands back at once what its dead
	// predecessor held (sdk.WorkerConfig.Name), rather than leave it to the lease sweep.
	handedBack, nameTaken := 0, 0
	for _, p := range execs {
		handedBack += strings.Count(p.Log(), `msg="runs of earlier incarnations handed back"`)
		nameTaken += strings.Count(p.Log(), `msg="worker name held by another session`)
	}
	t.Logf("restarts that handed back their predecessor's runs at once: %d of %d (name still held at start: %d)", handedBack, len(dead), nameTaken)
	if len(exitPIDs) == 0 && slices.Contains(kinds, chaoswf.PoisonExit) {
		t.Errorf("no os.Exit called: the os.Exit runs never reached their poison step")
	}
	for _, p := range append([]*testkit.Process{sched, tmr}, execs...) {
		if p.Exited() {
			t.Errorf("%s exited after the last run ended", p.Name)
		}
	}
	s.checkNoPanics()

	p99 := s.completionP99(goodIDs)
	t.Logf("good-run completion p99: %.3fs without poison, %.3fs with poison", baseP99, p99)
	s.logLatencies("good runs without poison", baseIDs)
	s.logLatencies("good runs with poison", goodIDs)
	// Which of the two sets the tail: the runs an executor died under, or the queue itself.
	const lapsedSQL = `SELECT DISTINCT run_id::text FROM test_transitions WHERE run_id = ANY ($1::uuid[])
		AND old_status = 'RUNNING' AND new_status IN ('QUEUED', 'FAILED')`
	lapsed := s.lines(lapsedSQL, goodIDs)
	t.Logf("good runs with poison: %d of %d lost an attempt to a lapsed lease (an executor died under them)", len(lapsed), len(goodIDs))
	s.logLatencies("good runs with poison that lost an attempt", lapsed)
	s.logLatencies("good runs with poison that lost none", slices.DeleteFunc(slices.Clone(goodIDs), func(id string) bool {
		return slices.Contains(lapsed, id)
	}))
	var mixedStart, lastGoodStart time.Time
	if err := s.pool.QueryRow(context.Background(), `SELECT min(created_at), max(created_at) FROM workflow_runs WHERE id = ANY ($1::uuid[])`,
		goodIDs).Scan(&mixedStart, &lastGoodStart); err != nil {
		t.Fatalf("start times of the good runs: %v", err)
	}
	s.logT14Timeline(goodIDs, poisonIDs, exits, mixedStart)
	s.logT14Slots(baseIDs, goodIDs, kinds, byKind, len(execs)*8, baseP99, len(dead), mixedStart, lastGoodStart)
	// The tail itself: what the slowest good runs went through, each transition at its
	// time since the run's start, with the attempt it began and the pid that held it.
	for _, line := range s.lines(`SELECT format('slow good run %s, %s s: %s', r.id, round(extract(epoch FROM r.finished_at - r.created_at)::numeric, 3),
			string_agg(format('%s %s a%s%s', to_char(extract(epoch FROM c.at - r.created_at), 'FM990.000'), c.new_status, c.attempt,
			coalesce(' ' || nullif(split_part(split_part(c.lease_owner, '/', 2), '-', 1), ''), '')), ', ' ORDER BY c.id))
			FROM workflow_runs r JOIN test_transitions c ON c.run_id = r.id
			WHERE r.id = ANY ($1::uuid[]) AND r.finished_at IS NOT NULL
			GROUP BY r.id, r.created_at, r.finished_at ORDER BY r.finished_at - r.created_at DESC LIMIT 8`, goodIDs) {
		t.Log(line)
	}
	sum.Faults += fmt.Sprintf("; good-run p99 %.1f× the poison-free one", p99/baseP99)
	// What sets the tail (the timeline and the slow runs' histories above show it):
	//   - every run in a sandbox (the default): no good run loses an attempt, and the
	//     looping bodies' slots set the p99: each loop attempt holds its slot for the
	//     whole 1 s step timeout, over 40 % of the slot-seconds before the deadline. 1.4-1.7 ×
	//     at the chaos size; 2.0-2.4 × at the gate size, where the poison-free phase
	//     lasts less than one timeout;
	//   - sandboxes only for runs whose last attempt lapsed (-kagzi.t14-isolation=
	//     sandboxes): an os.Exit kills its executor on the culprit's first attempt, and
	//     the runs killed beside it (about a tenth of the good runs) are handed back to
	//     the back of the queue and set the p99: 2.3-2.6 × at the chaos size, 2.9-4.2 ×
	//     at the gate size. Handing them to sandboxes at once, or to a lane of their own
	//     ahead of the queue, made it worse (more sandbox processes started at once on
	//     two cores);
	//   - no sandboxes (-kagzi.t14-isolation=alone): 5.5-7.0 × and 12-16 ×: victims die
	//     again beside the culprit's second attempt, then wait behind its isolated
	//     attempts 3-5, each of which drains a whole executor.
	// Without os.Exit, at the gate size and with no sandboxes: loops alone 1.61-1.73 ×,
	// panics and errors 1.15-1.37 ×, the three together 1.65-2.05 × (-kagzi.t14-kinds).
	// The gate holds the engine to what it controls (nothing lost, no innocent run
	// dead-lettered, poison runs failed on their fifth attempt); the chaos tier, at
	// BATTERY.md's bracketed size, holds it to the p99 criterion as well. At the gate
	// size the poison-free phase lasts less than one step timeout, and the ratio
	// measures the loops' timeout more than the engine.
	if p99 > 2*baseP99 {
		msg := fmt.Sprintf("good-run completion p99 %.3fs with poison is more than twice the %.3fs without", p99, baseP99)
		if *chaos {
			t.Error(msg)
		} else {
			t.Log("NOT MET (the chaos tier fails on it): " + msg)
			sum.Faults += " (p99 target NOT MET)"
		}
	}
}

// t14CheckPoison checks that every poison run ended FAILED on its last allowed attempt,
// with every attempt claimed, and with the reason its last attempt ended with: its own failure,
// or the lapsed lease of the executor that held it, which must have died or been fenced.
func t14CheckPoison(t *testing.T, s *system, byKind map[string][]string, faulted []int, maxAttempts int) {
	t.Helper()
	leaseReason := fmt.Sprintf("lease expired on attempt %d of %d", maxAttempts, maxAttempts)
	own := map[string]string{
		chaoswf.PoisonPanic: "workflow panicked: " + chaoswf.PoisonPanicText,
		chaoswf.PoisonError: chaoswf.PoisonErrorText,
		chaoswf.PoisonLoop:  sdk.ErrStepTimeout.Error(),
		chaoswf.PoisonExit:  "", // its only end is the lapsed lease of its dead executor
	}
	for _, kind := range slices.Sorted(func(yield func(string) bool) {
		for k := range byKind {
			if !yield(k) {
				return
			}
		}
	}) {
		ids := byKind[kind]
		rows, err := s.pool.Query(context.Background(), `
			SELECT r.id::text, r.status, r.attempt, coalesce(r.error, ''),
			    (SELECT count(DISTINCT c.attempt) FROM test_transitions c WHERE c.run_id = r.id AND c.old_status = 'QUEUED' AND c.new_status = 'RUNNING'),
			    coalesce((SELECT c.lease_owner FROM test_transitions c WHERE c.run_id = r.id AND c.new_status = 'RUNNING'
			              ORDER BY c.id DESC LIMIT 1), '')
			FROM workflow_runs r WHERE r.id = ANY ($1::uuid[]) ORDER BY r.id`, ids)
		if err != nil {
			t.Fatalf("read %s runs: %v", kind, err)
		}
		var failed, ownReason, leaseLapsed, bad int
		for rows.Next() {
			var id, status, reason, owner string
			var attempt, claimed int
			if err := rows.Scan(&id, &status, &attempt, &reason, &claimed, &owner); err != nil {
				t.Fatalf("read %s runs: %v", kind, err)
			}
			ok := status == "FAILED" && attempt == maxAttempts && claimed == maxAttempts
			switch {
			case own[kind] != "" && strings.Contains(reason, own[kind]):
				ownReason++
			case strings.HasPrefix(reason, leaseReason) && slices.Contains(faulted, ownerPID(owner)):
				leaseLapsed++
			default:
				ok = false
			}
			if status == "FAILED" {
				failed++
			}
			if !ok {
				bad++
				if bad <= 5 {
					t.Errorf("%s run %s: status %s attempt %d, %d attempts claimed, last by %s, reason %q; want FAILED on attempt %d with attempts 1–%d claimed and its own reason or a dead or fenced holder's lapsed lease",
						kind, id, status, attempt, claimed, owner, firstLine(reason), maxAttempts, maxAttempts)
				}
			}
		}
		if err := rows.Err(); err != nil {
			t.Fatalf("read %s runs: %v", kind, err)
		}
		rows.Close()
		t.Logf("%s: %d runs FAILED; last attempt ended by its own failure %d, by a dead or fenced executor's lapsed lease %d",
			kind, failed, ownReason, leaseLapsed)
		expectZero(t, kind+" runs not FAILED as they should be", bad)
		expectEq(t, kind+" runs", failed, len(ids))
	}
}

// ownerPID is the pid in a worker id of one of the SDK's forms, name/pid-random (a named
// worker, as the battery's executors are) or hostname-pid-random; -1 when the id has
// another form. A sandbox's, "<executor id>/sandbox-pid", gives the sandbox's pid.
func ownerPID(owner string) int {
	if _, sandbox, ok := strings.Cut(owner, "/sandbox-"); ok {
		pid, err := strconv.Atoi(sandbox)
		if err != nil {
			return -1
		}
		return pid
	}
	if i := strings.LastIndexByte(owner, '/'); i >= 0 {
		owner = "name-" + owner[i+1:]
	}
	parts := strings.Split(owner, "-")
	if len(parts) < 3 {
		return -1
	}
	pid, err := strconv.Atoi(parts[len(parts)-2])
	if err != nil {
		return -1
	}
	return pid
}

// completionP99 is the 99th percentile, in seconds, of the runs' time from start to end
// by the database clock.
func (s *system) completionP99(ids []string) float64 {
	s.t.Helper()
	var p99 float64
	err := s.pool.QueryRow(context.Background(), `SELECT coalesce(percentile_disc(0.99) WITHIN GROUP
		(ORDER BY extract(epoch FROM finished_at - created_at)::float8), 0) FROM workflow_runs WHERE id = ANY ($1::uuid[])`, ids).Scan(&p99)
	if err != nil {
		s.t.Fatalf("completion p99: %v", err)
	}
	return p99
}

// lines runs a query returning one text column.
func (s *system) lines(sql string, args ...any) []string {
	s.t.Helper()
	rows, err := s.pool.Query(context.Background(), sql, args...)
	if err != nil {
		s.t.Fatalf("%s: %v", sql, err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		s.t.Fatalf("%s: %v", sql, err)
	}
	return out
}

// logLatencies logs percentiles of the runs' time from start to end.
func (s *system) logLatencies(what string, ids []string) {
	s.t.Helper()
	if len(ids) == 0 {
		s.t.Logf("%s: none", what)
		return
	}
	var p50, p90, p99, maxS float64
	err := s.pool.QueryRow(context.Background(), `WITH l AS (SELECT extract(epoch FROM finished_at - created_at)::float8 AS s
		FROM workflow_runs WHERE id = ANY ($1::uuid[]))
		SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY s), percentile_disc(0.9) WITHIN GROUP (ORDER BY s),
		       percentile_disc(0.99) WITHIN GROUP (ORDER BY s), max(s) FROM l`, ids).Scan(&p50, &p90, &p99, &maxS)
	if err != nil {
		s.t.Fatalf("latencies: %v", err)
	}
	s.t.Logf("%s: completion p50 %.3fs p90 %.3fs p99 %.3fs max %.3fs", what, p50, p90, p99, maxS)
}

// repeatsOf counts the step bodies of the given runs that repeat an earlier execution,
// and those of them whose earlier execution was by a process not in faulted.
func (s *system) repeatsOf(ids []string, faulted []int) (repeats, unexplained int) {
	s.t.Helper()
	if faulted == nil {
		faulted = []int{} // ANY (NULL) would explain nothing and count nothing
	}
	err := s.pool.QueryRow(context.Background(), `
		WITH e AS (
		    SELECT lag(pid) OVER w AS prev_pid FROM test_effects WHERE run_id = ANY ($1::uuid[])
		    WINDOW w AS (PARTITION BY run_id, step_key ORDER BY at, ctid)
		)
		SELECT count(*) FILTER (WHERE prev_pid IS NOT NULL),
		       count(*) FILTER (WHERE prev_pid IS NOT NULL AND NOT prev_pid = ANY ($2::int[])) FROM e`, ids, faulted).
		Scan(&repeats, &unexplained)
	if err != nil {
		s.t.Fatalf("count repeated bodies: %v", err)
	}
	return repeats, unexplained
}

// logT14Timeline logs, per 5 s since the mixed start, the claims of good and of poison
// runs, the good runs completed and the executor exits: where the time with poison went.
func (s *system) logT14Timeline(goodIDs, poisonIDs []string, exits []time.Time, start time.Time) {
	s.t.Helper()
	const bucket = 5.0
	type row struct{ goodClaims, poisonClaims, completed, exits int }
	var tl []row
	at := func(sec float64) *row {
		i := max(int(sec/bucket), 0)
		for len(tl) <= i {
			tl = append(tl, row{})
		}
		return &tl[i]
	}
	rows, err := s.pool.Query(context.Background(), `
		SELECT extract(epoch FROM c.at - $3)::float8, c.run_id = ANY ($1::uuid[]) FROM test_transitions c
		WHERE (c.run_id = ANY ($1::uuid[]) OR c.run_id = ANY ($2::uuid[])) AND c.new_status = 'RUNNING' AND c.old_status = 'QUEUED'
		UNION ALL
		SELECT extract(epoch FROM finished_at - $3)::float8, NULL FROM workflow_runs WHERE id = ANY ($1::uuid[])`,
		goodIDs, poisonIDs, start)
	if err != nil {
		s.t.Fatalf("timeline: %v", err)
	}
	for rows.Next() {
		var sec float64
		var good *bool
		if err := rows.Scan(&sec, &good); err != nil {
			s.t.Fatalf("timeline: %v", err)
		}
		switch r := at(sec); {
		case good == nil:
			r.completed++
		case *good:
			r.goodClaims++
		default:
			r.poisonClaims++
		}
	}
	if err := rows.Err(); err != nil {
		s.t.Fatalf("timeline: %v", err)
	}
	// The supervisor's clock against the database's: both are this machine's.
	for _, e := range exits {
		at(e.Sub(start).Seconds()).exits++
	}
	var b strings.Builder
	fmt.Fprintf(&b, "timeline of the mixed phase (per %.0f s): good claims, poison claims, good completed, executor exits", bucket)
	for i, r := range tl {
		fmt.Fprintf(&b, "\n  %3.0f s: %5d %5d %5d %4d", float64(i)*bucket, r.goodClaims, r.poisonClaims, r.completed, r.exits)
	}
	s.t.Log(b.String())
}

// logT14Slots logs where the executors' slots went in the window the p99 criterion
// allows the good runs (from the mixed start to the last good start plus twice the
// poison-free p99, the deadline of the last of them): the slot-seconds
// held by the attempts of good runs and of each poison kind, against the slots the
// executors have in it, and what the good runs of the poison-free phase held in all.
// An attempt holds its slot from its claim to the run's next transition; an os.Exit
// attempt's ends when the restarted executor hands it back, and its executor's other
// slots were lost meanwhile (restarts counts those deaths). When the poison's attempts
// and what the good runs need exceed what the window holds, a claim order that cannot
// tell poison from good runs does not meet the criterion.
func (s *system) logT14Slots(baseIDs, goodIDs, kinds []string, byKind map[string][]string, slots int, baseP99 float64, restarts int,
	start, lastStart time.Time) {
	s.t.Helper()
	end := lastStart.Add(time.Duration(2 * baseP99 * float64(time.Second)))
	window := end.Sub(start)
	var b strings.Builder
	fmt.Fprintf(&b, "slot-seconds held from the mixed start to the last good run's deadline (its start + 2 × the poison-free p99), %.3f s, of the %.1f that %d slots hold in it: good %.1f",
		window.Seconds(), float64(slots)*window.Seconds(), slots, s.slotSeconds(goodIDs, start, end))
	for _, kind := range kinds {
		fmt.Fprintf(&b, ", %s %.1f", kind, s.slotSeconds(byKind[kind], start, end))
	}
	fmt.Fprintf(&b, " (and %d executor restarts); the poison-free phase's good runs held %.1f in all",
		restarts, s.slotSeconds(baseIDs, time.Time{}, time.Now().Add(time.Hour)))
	s.t.Log(b.String())
}

// slotSeconds sums the time the runs' attempts held an executor's slot within [from, to):
// from each claim to the run's next transition (or to, while it still runs).
func (s *system) slotSeconds(ids []string, from, to time.Time) float64 {
	s.t.Helper()
	var sum float64
	err := s.pool.QueryRow(context.Background(), `
		WITH a AS (
		    SELECT new_status, at, coalesce(lead(at) OVER (PARTITION BY run_id ORDER BY id), $3) AS next_at
		    FROM test_transitions WHERE run_id = ANY ($1::uuid[]))
		SELECT coalesce(sum(extract(epoch FROM least(next_at, $3) - greatest(at, $2))), 0)::float8
		FROM a WHERE new_status = 'RUNNING' AND at < $3 AND next_at > $2`, ids, from, to).Scan(&sum)
	if err != nil {
		s.t.Fatalf("slot-seconds: %v", err)
	}
	return sum
}
