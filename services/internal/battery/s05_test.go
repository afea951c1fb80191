package battery

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

const (
	// s05MaxSteps is the bomb executor's Limits.MaxSteps (KAGZI_MAX_STEPS), far below the
	// SDK's default 10,000 so that each bomb reaches it in seconds.
	s05MaxSteps = 1000
	// s05Loop is the loop bound of the step, Sleep(0) and restart bombs: a run that
	// reached it would have recorded a thousand times the limit.
	s05Loop    = 1_000_000
	bombsNS    = "bombs"
	tenantNS   = "tenant"
	victimRate = 20 // victim starts per second
	// s05TreeRuns and s05Depth are the scheduler's Limits.MaxTreeRuns and MaxDepth
	// (KAGZI_MAX_TREE_RUNS, KAGZI_MAX_DEPTH) in the fan-out test: the tree limit below the
	// fan-out of 100, so that the root's own starts meet it, and the depth below the
	// bomb's 5, so that both limits are exercised.
	s05TreeRuns  = 50
	s05Depth     = 3
	s05Baseline  = 15 * time.Second
	bombDeadline = 3 * time.Minute
)

// bombRig is S05's system: bombs run in their own namespace on an executor with a small
// max_steps; a steady victim load of 3-step runs runs in a second namespace on its own
// executor. Both share the scheduler, the timer, PostgreSQL, NATS and the two cores.
type bombRig struct {
	*system
	bombs   *sdk.Client
	bomber  *testkit.Process
	victims *victimLoad
}

// schedulerEnv configures the scheduler (its tree limits).
func newBombRig(t *testing.T, schedulerEnv ...string) *bombRig {
	s := newSystem(t)
	s.scheduler("scheduler", schedulerEnv...)
	s.timer("timer", "KAGZI_STALE_AFTER=2s", "KAGZI_MAX_IDLE=1s")
	s.executor("exec-tenant", "KAGZI_NAMESPACE="+tenantNS, "KAGZI_CONCURRENCY=16")
	r := &bombRig{system: s,
		bombs: sdk.NewClient(s.nc, sdk.WithNamespace(bombsNS), sdk.WithRequestTimeout(2*time.Second)),
		bomber: s.executor("exec-bombs", "KAGZI_NAMESPACE="+bombsNS, "KAGZI_BOMBS=1",
			fmt.Sprintf("KAGZI_MAX_STEPS=%d", s05MaxSteps), "KAGZI_CONCURRENCY=8"),
	}
	waitLogLine(t, r.bomber, "chaosexec ready", 30*time.Second)
	r.victims = startVictimLoad(t, sdk.NewClient(s.nc, sdk.WithNamespace(tenantNS), sdk.WithRequestTimeout(2*time.Second)))
	return r
}

// victimLoad starts a 3-step run every 1/victimRate s, each on its own goroutine so that
// a slow start does not delay the next, and remembers when each was asked for and in
// which phase of the test.
type victimLoad struct {
	t      *testing.T
	phase  atomic.Int32
	errs   atomic.Int64
	stop   chan struct{}
	done   chan struct{}
	mu     sync.Mutex
	runs   []victimRun
	errMsg string
}

type victimRun struct {
	id     string
	issued time.Time
	phase  int32
}

func startVictimLoad(t *testing.T, c *sdk.Client) *victimLoad {
	v := &victimLoad{t: t, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(v.done)
		var wg sync.WaitGroup
		defer wg.Wait()
		tick := time.NewTicker(time.Second / victimRate)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-v.stop:
				return
			case <-tick.C:
			}
			phase := v.phase.Load()
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				issued := time.Now()
				id, err := c.StartByName(ctx, chaoswf.Name, chaoswf.Input{Seed: 5_000_000 + i, Steps: 3, MinMS: 5, MaxMS: 20})
				v.mu.Lock()
				defer v.mu.Unlock()
				if err != nil {
					v.errs.Add(1)
					v.errMsg = err.Error()
					return
				}
				v.runs = append(v.runs, victimRun{id: id, issued: issued, phase: phase})
			}()
		}
	}()
	t.Cleanup(v.halt)
	return v
}

// halt stops the load and waits for the starts in flight; idempotent.
func (v *victimLoad) halt() {
	select {
	case <-v.stop:
	default:
		close(v.stop)
	}
	<-v.done
}

func (v *victimLoad) ids(phase int32) []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	var out []string
	for _, r := range v.runs {
		if phase < 0 || r.phase == phase {
			out = append(out, r.id)
		}
	}
	return out
}

// p99 is the 99th percentile (nearest rank) of the phase's completion latencies: from
// the moment the start was asked for to the run's finished_at, on the one clock of this
// machine. It includes the time a start waited for a busy scheduler. Runs not finished
// count as +Inf.
func (v *victimLoad) p99(s *system, phase int32) (time.Duration, int) {
	v.t.Helper()
	v.mu.Lock()
	runs := slices.Clone(v.runs)
	v.mu.Unlock()
	issued := map[string]time.Time{}
	var ids []string
	for _, r := range runs {
		if r.phase == phase {
			issued[r.id] = r.issued
			ids = append(ids, r.id)
		}
	}
	rows, err := s.pool.Query(context.Background(), `SELECT id::text, finished_at FROM workflow_runs
		WHERE id = ANY($1::uuid[]) AND status = 'COMPLETED'`, ids)
	if err != nil {
		v.t.Fatalf("read victim runs: %v", err)
	}
	defer rows.Close()
	var lat []time.Duration
	for rows.Next() {
		var id string
		var fin time.Time
		if err := rows.Scan(&id, &fin); err != nil {
			v.t.Fatalf("read victim runs: %v", err)
		}
		lat = append(lat, fin.Sub(issued[id]))
	}
	if err := rows.Err(); err != nil {
		v.t.Fatalf("read victim runs: %v", err)
	}
	for len(lat) < len(ids) {
		lat = append(lat, time.Duration(1<<63-1))
	}
	return quantile(lat, 0.99), len(ids)
}

// quantile is the q-quantile of ds by nearest rank; 0 for none.
func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	ds = slices.Clone(ds)
	slices.Sort(ds)
	i := int(float64(len(ds))*q+0.999999) - 1
	return ds[min(max(i, 0), len(ds)-1)]
}

// baseline runs the victim load alone for s05Baseline, then switches it to phase 1.
func (r *bombRig) baseline() {
	time.Sleep(s05Baseline)
	r.victims.phase.Store(1)
}

// finishVictims stops the load, waits for every victim run and checks the p99 of those
// started while bombs were live (phase 1; the test moves on to phase 2 when they are
// over) against the baseline's (phase 0).
func (r *bombRig) finishVictims(t *testing.T) (base, during time.Duration) {
	t.Helper()
	r.victims.halt()
	if n := r.victims.errs.Load(); n > 0 {
		t.Errorf("%d victim starts failed, the last with: %s", n, r.victims.errMsg)
	}
	all := r.victims.ids(-1)
	if _, ok := r.oracle.WaitCount(60*time.Second, len(all), `SELECT count(*) FROM workflow_runs
		WHERE id = ANY($1::uuid[]) AND status = 'COMPLETED'`, all); !ok {
		t.Errorf("victim runs not all COMPLETED 60 s after the load stopped")
	}
	base, nb := r.victims.p99(r.system, 0)
	during, nd := r.victims.p99(r.system, 1)
	t.Logf("victim p99: baseline %s (%d runs), during the bombs %s (%d runs)", base.Round(time.Millisecond), nb,
		during.Round(time.Millisecond), nd)
	if nb < 100 || nd < 100 {
		t.Errorf("too few victim runs for a p99 (%d baseline, %d during the bombs; want ≥ 100 each)", nb, nd)
	}
	if during > 2*base {
		t.Errorf("victim p99 during the bombs %s > 2 × baseline %s", during.Round(time.Millisecond), base.Round(time.Millisecond))
	}
	return base, during
}

// S05 — workflow bombs: a loop of 1,000,000 Steps, a loop of 1,000,000 Sleep(0)s (each
// sleep is recorded like a step) and a run that starts itself again, by the idempotency
// key it was started with, from each of 1,000,000 steps (each start must return the run
// itself). The bomb executor runs with max_steps = 1,000. Beside them a second namespace
// takes 20 runs/s on its own executor; its completion p99 is measured alone for 15 s
// first (the baseline), then while bombs go off: the three are set off together, again
// and again as soon as the last of a wave is over, until bombs have been going for
// s05Bombing (so that at least 200 victim runs start while a bomb is live).
//
// Pass: each bomb FAILED on its first attempt with a limit error; steps recorded (step
// and sleep records) = max_steps exactly; the step and restart bombs ran exactly
// max_steps bodies, no step twice; every restart named the run itself and no run exists
// in the bombs' namespace but the bombs; the victims all COMPLETED, and those started
// while bombs were live kept their p99 ≤ 2 × baseline.
//
// The fan-out bomb, which needs more than a step limit, is TestS05FanOutBomb.
func TestS05WorkflowBombs(t *testing.T) {
	if !*chaos {
		t.Skip("chaos tier: BATTERY.md runs S05 in make chaos (-args -kagzi.chaos)")
	}
	const s05Bombing = 10 * time.Second
	sum := newSummary(t, fmt.Sprintf("waves of bombs of %d Steps, %d Sleep(0)s and %d self-restarts by key for %s, max_steps %d; victims %d/s in a second namespace",
		s05Loop, s05Loop, s05Loop, s05Bombing, s05MaxSteps, victimRate))
	r := newBombRig(t)
	r.baseline()

	type bomb struct {
		name, key string
		in        chaoswf.BombInput
		id        string
	}
	var bombs []*bomb
	var waveTimes []string
	began := time.Now()
	for wave := 1; time.Since(began) < s05Bombing; wave++ {
		waveBegan := time.Now()
		restartKey := fmt.Sprintf("s05-restart-%d", wave)
		batch := []*bomb{
			{name: "steps", key: fmt.Sprintf("s05-steps-%d", wave), in: chaoswf.BombInput{Kind: chaoswf.BombSteps, N: s05Loop}},
			{name: "sleep0", key: fmt.Sprintf("s05-sleep0-%d", wave), in: chaoswf.BombInput{Kind: chaoswf.BombSleep0, N: s05Loop}},
			// Its input names the key it was started with: the one it restarts itself by.
			{name: "restart", key: restartKey, in: chaoswf.BombInput{Kind: chaoswf.BombRestart, N: s05Loop, Key: restartKey}},
		}
		var ids []string
		for _, b := range batch {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			var err error
			b.id, err = r.bombs.StartByName(ctx, chaoswf.BombName, b.in, sdk.IdempotencyKey(b.key))
			cancel()
			if err != nil {
				t.Fatalf("start the %s bomb of wave %d: %v", b.name, wave, err)
			}
			ids = append(ids, b.id)
		}
		bombs = append(bombs, batch...)
		if _, ok := r.oracle.WaitCount(bombDeadline, 0, `SELECT count(*) FROM workflow_runs
			WHERE id = ANY($1::uuid[]) AND status NOT IN ('COMPLETED','FAILED','CANCELLED')`, ids); !ok {
			t.Fatalf("the bombs of wave %d not all over within %s", wave, bombDeadline)
		}
		waveTimes = append(waveTimes, time.Since(waveBegan).Round(100*time.Millisecond).String())
	}
	r.victims.phase.Store(2)
	bombsFor := time.Since(began)
	t.Logf("%d waves of 3 bombs in %s (%s)", len(waveTimes), bombsFor.Round(time.Millisecond), strings.Join(waveTimes, ", "))
	base, during := r.finishVictims(t)

	failedAt := map[string]int{}
	for _, b := range bombs {
		var status, errText string
		var attempt, steps, bodies, distinctBodies int
		err := r.pool.QueryRow(context.Background(), `SELECT status, coalesce(error, ''), attempt,
			(SELECT count(*) FROM step_runs WHERE run_id = r.id),
			(SELECT count(*) FROM test_effects WHERE run_id = r.id),
			(SELECT count(DISTINCT step_key) FROM test_effects WHERE run_id = r.id)
			FROM workflow_runs r WHERE id = $1`, b.id).Scan(&status, &errText, &attempt, &steps, &bodies, &distinctBodies)
		if err != nil {
			t.Fatalf("read the %s bomb: %v", b.key, err)
		}
		limited := status == "FAILED" && strings.Contains(errText, sdk.ErrLimitExceeded.Error())
		if !limited {
			t.Errorf("%s bomb ended %s with %q, want FAILED with a limit error (%q)", b.key, status, errText, sdk.ErrLimitExceeded)
		}
		if b.key == bombs[0].key || !limited {
			t.Logf("%s bomb %s: %s attempt %d, %d steps recorded, %d bodies; error %q", b.key, b.id, status, attempt, steps,
				bodies, errText)
		}
		if limited && steps == s05MaxSteps {
			failedAt[b.name]++
		}
		expectEq(t, b.key+" bomb's attempt (a limit is terminal)", attempt, 1)
		expectEq(t, b.key+" bomb's steps recorded", steps, s05MaxSteps)
		wantBodies := s05MaxSteps
		if b.in.Kind == chaoswf.BombSleep0 {
			wantBodies = 0 // a sleep has no body
		}
		expectEq(t, b.key+" bomb's step bodies run", bodies, wantBodies)
		expectEq(t, b.key+" bomb's distinct steps run", distinctBodies, wantBodies)
		if b.in.Kind == chaoswf.BombRestart {
			expectEq(t, b.key+" steps whose start named the run itself", r.oracle.Count(`SELECT count(*) FROM step_runs
				WHERE run_id = $1 AND convert_from(output, 'UTF8') = to_json(run_id::text)::text`, b.id), s05MaxSteps)
		}
	}
	expectEq(t, "runs in the bombs' namespace (the restarts made none)", r.oracle.Count(
		`SELECT count(*) FROM workflow_runs WHERE namespace = $1`, bombsNS), len(bombs))

	victims := r.victims.ids(-1)
	waves := len(waveTimes)
	tl := r.oracle.Tally(r.faultedPIDs())
	sum.fill(tl, r.oracle.NotCompleted(victims), 3*len(victims)+2*waves*s05MaxSteps)
	sum.Faults = fmt.Sprintf("%d waves; FAILED at max_steps: steps %d/%d, sleep0 %d/%d, restart %d/%d; victim p99 %s vs baseline %s",
		waves, failedAt["steps"], waves, failedAt["sleep0"], waves, failedAt["restart"], waves,
		during.Round(time.Millisecond), base.Round(time.Millisecond))
	t.Logf("tally: %+v", tl)
	expectEq(t, "runs COMPLETED (the victims)", tl.Completed, len(victims))
	expectEq(t, "runs FAILED (the bombs)", tl.Failed, len(bombs))
	expectEq(t, "step results recorded", tl.StepResults, 3*len(victims)+2*waves*s05MaxSteps)
	expectZero(t, "repeated step bodies", tl.DupBodies)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "stuck runs", tl.Active)
	r.checkNoPanics()
}

// S05 (fan-out) — children fan-out 100 × depth 5. The SDK has no child-workflow API, so
// a "child" is a run a step starts through the client, with an idempotency key derived
// from its parent's (replays name the same children). The client names the run whose
// step makes the start as the child's parent, and the scheduler bounds the tree: it
// refuses, with a limit error that fails the asking run at once, a child deeper than
// max_depth (s05Depth) or one that would make more than max_tree_runs (s05TreeRuns)
// unfinished runs below the root. Unbounded, 100 × depth 5 would make 100^5 leaves.
// Bounded, a tree dies out in seconds (each of its runs ends at its first refused
// start), so bombs are set off in waves, each as soon as the last tree has died out,
// until they have been going for 10 s: the victims' p99 needs ≥ 100 runs beside them.
//
// Pass: each root FAILED on its first attempt with a limit error; pending children (the
// unfinished runs of the bombs' namespace but the root, sampled every 100 ms) never over
// max_tree_runs, and none left once the tree has died out; every child recorded below
// its root, none deeper than max_depth; the victims all COMPLETED and kept their
// p99 ≤ 2 × baseline.
//
// Should the bound regress, the test is its own circuit breaker: once more runs are
// pending than the limit it fails, lets the bomb go on only until the victims have had
// 10 s beside it or 10 × the limit is pending, and then SIGKILLs the bomb's executor, so
// that an engine with no bound does not take the machine down.
func TestS05FanOutBomb(t *testing.T) {
	if !*chaos {
		t.Skip("chaos tier: BATTERY.md runs S05 in make chaos (-args -kagzi.chaos)")
	}
	const (
		fanout = 100
		depth  = 5
		watch  = 60 * time.Second // for one tree to die out
		beside = 10 * time.Second // the victims' time beside live bombs
	)
	sum := newSummary(t, fmt.Sprintf("waves of fan-out %d × depth %d through Start from steps for %s, max_tree_runs %d, max_depth %d; victims %d/s in a second namespace",
		fanout, depth, beside, s05TreeRuns, s05Depth, victimRate))
	r := newBombRig(t, fmt.Sprintf("KAGZI_MAX_TREE_RUNS=%d", s05TreeRuns), fmt.Sprintf("KAGZI_MAX_DEPTH=%d", s05Depth))
	r.baseline()

	var roots, waveTimes []string
	var maxPending, samples int
	var overAfter time.Duration // when pending first exceeded the limit; 0: never
	stopped := false
	began := time.Now()
	for wave := 1; !stopped && time.Since(began) < beside; wave++ {
		waveBegan := time.Now()
		key := fmt.Sprintf("s05-fan-%d", wave)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		root, err := r.bombs.StartByName(ctx, chaoswf.BombName,
			chaoswf.BombInput{Kind: chaoswf.BombFanout, Key: key, Fanout: fanout, Depth: depth}, sdk.IdempotencyKey(key))
		cancel()
		if err != nil {
			t.Fatalf("start the fan-out bomb of wave %d: %v", wave, err)
		}
		roots = append(roots, root)
		var runs, pending int
		var rootStatus string
		drained := false
		for time.Since(waveBegan) < watch {
			err := r.pool.QueryRow(context.Background(), `SELECT count(*),
				count(*) FILTER (WHERE status IN ('QUEUED','RUNNING','SLEEPING','WAITING') AND id <> $2),
				(SELECT status FROM workflow_runs WHERE id = $2)
				FROM workflow_runs WHERE namespace = $1`, bombsNS, root).Scan(&runs, &pending, &rootStatus)
			if err != nil {
				t.Fatalf("watch the fan-out: %v", err)
			}
			samples++
			maxPending = max(maxPending, pending)
			if pending > s05TreeRuns && overAfter == 0 {
				overAfter = time.Since(began)
				t.Errorf("fan-out bomb of wave %d: %d children pending %s after the start (%d runs made, root %s): over the limit of %d",
					wave, pending, time.Since(waveBegan).Round(time.Millisecond), runs, rootStatus, s05TreeRuns)
			}
			if overAfter > 0 && (time.Since(began) >= beside || pending > 10*s05TreeRuns) {
				r.kill(r.bomber)
				stopped = true
				break
			}
			if (rootStatus == "FAILED" || rootStatus == "COMPLETED") && pending == 0 {
				drained = true
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if !drained && !stopped {
			t.Errorf("fan-out tree of wave %d still has %d runs pending %s after its start (root %s); stopping its executor",
				wave, pending, watch, rootStatus)
			r.kill(r.bomber)
			stopped = true
		}
		waveTimes = append(waveTimes, time.Since(waveBegan).Round(100*time.Millisecond).String())
	}
	bombsFor := time.Since(began)
	r.victims.phase.Store(2)
	t.Logf("%d waves of fan-out bombs in %s (%s), at most %d pending at once over %d samples", len(waveTimes),
		bombsFor.Round(time.Millisecond), strings.Join(waveTimes, ", "), maxPending, samples)
	base, during := r.finishVictims(t)

	children, failedByLimit := 0, 0
	for i, root := range roots {
		var status, errText string
		var attempt, made, below, deepest, refused int
		if err := r.pool.QueryRow(context.Background(), `SELECT r.status, coalesce(r.error, ''), r.attempt,
			count(c.id), count(c.id) FILTER (WHERE c.parent_id IS NOT NULL), coalesce(max(c.depth), 0),
			count(c.id) FILTER (WHERE c.status = 'FAILED' AND c.error LIKE '%' || $2 || '%')
			FROM workflow_runs r LEFT JOIN workflow_runs c ON c.root_id = r.id
			WHERE r.id = $1 GROUP BY r.id`, root, sdk.ErrLimitExceeded.Error()).
			Scan(&status, &errText, &attempt, &made, &below, &deepest, &refused); err != nil {
			t.Fatalf("read the fan-out tree of wave %d: %v", i+1, err)
		}
		children += made
		limited := status == "FAILED" && strings.Contains(errText, sdk.ErrLimitExceeded.Error())
		if limited {
			failedByLimit++
		}
		if i == 0 || !limited {
			t.Logf("wave %d: fan-out root %s %s on attempt %d with %q; %d children (%d FAILED by a limit, deepest at %d)",
				i+1, root, status, attempt, errText, made, refused, deepest)
		}
		if !limited {
			t.Errorf("fan-out root of wave %d ended %s with %q, want FAILED with a limit error", i+1, status, errText)
		}
		expectEq(t, fmt.Sprintf("wave %d root's attempt (a limit is terminal)", i+1), attempt, 1)
		expectEq(t, fmt.Sprintf("wave %d children with a parent", i+1), below, made)
		if deepest > s05Depth {
			t.Errorf("wave %d: a child at depth %d, deeper than max_depth %d", i+1, deepest, s05Depth)
		}
	}
	expectEq(t, "runs in the bombs' namespace (roots and the children below them)", r.oracle.Count(
		`SELECT count(*) FROM workflow_runs WHERE namespace = $1`, bombsNS), len(roots)+children)

	victims := r.victims.ids(-1)
	tl := r.oracle.Tally(r.faultedPIDs())
	sum.fill(tl, r.oracle.NotCompleted(victims), tl.StepResults)
	sum.Runs = len(victims) + len(roots) + children
	if stopped {
		sum.Stuck = 0 // the bomb's runs are left where the breaker stopped them; the victims were checked above
	}
	sum.Faults = fmt.Sprintf("%d waves, roots FAILED by a limit %d/%d, %d children in %s (max %d pending; max_tree_runs %d, max_depth %d); victim p99 %s vs baseline %s",
		len(roots), failedByLimit, len(roots), children, bombsFor.Round(time.Second), maxPending, s05TreeRuns, s05Depth,
		during.Round(time.Millisecond), base.Round(time.Millisecond))
	expectZero(t, "victim runs not COMPLETED", r.oracle.NotCompleted(victims))
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	if !stopped {
		expectZero(t, "stuck runs", tl.Active)
	}
	r.checkNoPanics()
}
