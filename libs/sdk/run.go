package sdk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kagzi/kagzi/libs/failpoint"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// unwind is the SDK's internal panic value: it carries a run out of the user's function
// when the run must stop there (suspended by a sleep, lease lost, or a terminal replay
// failure). It never crosses the package boundary: execute recovers it.
type unwind struct {
	reason unwindReason
	err    error
}

type unwindReason int

const (
	unwindSuspended  unwindReason = iota + 1 // run parked (SLEEPING); nothing more to do
	unwindLeaseLost                          // another executor owns the run now
	unwindTerminal                           // fail the run, no retry
	unwindHistoryEnd                         // Replay: the workflow needs a step the history lacks
)

// runContext is the Context of one claimed run on one executor.
type runContext struct {
	context.Context
	w      *Worker
	run    store.ClaimedRun
	def    Registration
	log    *slog.Logger
	cancel context.CancelFunc

	replayOnly bool           // Replay: never run a body, never write
	claimedAt  time.Time      // the worker's clock when the claim returned
	seq        int            // next step position
	seen       map[string]int // occurrences of each user key
	stateBytes int

	// pending is the last step result, its body run and its record not yet written. It
	// is written at the run's next durable act (a step body, a sleep, a failure), or with
	// the completion itself when the workflow returns right after that step: between the
	// body and that act only deterministic workflow code runs, which nothing outside the
	// run can observe, and a workflow that ends with a step commits once instead of twice.
	pending *store.StepInsertParams

	// leaseUntil is the monotonic deadline of the lease as last confirmed by the database
	// (send time of the confirming statement + lease). Past it the executor must assume
	// another one holds the run and start no step body: self-fencing without trusting
	// wall clocks. Like claimedAt it is a reading of the worker's clock, compared only
	// with other readings of that clock, never with time.Now: a test clock's offset
	// shifts the monotonic reading along with the wall one.
	mu         sync.Mutex
	leaseUntil time.Time
	lost       atomic.Bool
	// ending is set once the write that takes the run out of RUNNING (complete, fail,
	// park, release) may have been sent: a renewal that then misses the run has seen that
	// write, not another executor's claim, and a lost lease would show in the write itself.
	ending atomic.Bool
}

func (rc *runContext) RunID() string        { return rc.run.ID }
func (rc *runContext) Workflow() string     { return rc.run.Workflow }
func (rc *runContext) Attempt() int         { return rc.run.Attempt }
func (rc *runContext) Logger() *slog.Logger { return rc.log }

// Value answers parentRunCtx for the workflow's own context too: a start made outside a
// step (not recorded, so repeated on every replay) still joins the run's tree.
func (rc *runContext) Value(key any) any {
	if _, ok := key.(parentRunCtx); ok {
		return parentRun{id: rc.run.ID, namespace: rc.run.Namespace}
	}
	return rc.Context.Value(key)
}

func (rc *runContext) fenced() store.FencedParams {
	return rc.run.Fenced()
}

func (rc *runContext) confirmLease(sentAt time.Time) {
	rc.mu.Lock()
	if until := sentAt.Add(rc.w.cfg.Lease); until.After(rc.leaseUntil) {
		rc.leaseUntil = until
	}
	rc.mu.Unlock()
}

// leaseValid keeps a margin of a tenth of the lease: a step started just before the
// deadline would otherwise race the timer that hands the run to someone else.
func (rc *runContext) leaseValid() bool {
	if rc.lost.Load() {
		return false
	}
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.w.cfg.Clock.Now().Before(rc.leaseUntil.Add(-rc.w.cfg.Lease / 10))
}

func (rc *runContext) loseLease() {
	if rc.lost.CompareAndSwap(false, true) {
		rc.w.metrics.leaseLost.Add(1)
		rc.cancel()
	}
}

func (rc *runContext) nextKey(userKey string) (key string, seq int) {
	rc.seen[userKey]++
	key = occurrenceKey(userKey, rc.seen[userKey])
	seq = rc.seq
	rc.seq++
	return key, seq
}

// replayed returns the record at seq when there is one, checking that the workflow
// reached the same key and kind as the recorded history.
func (rc *runContext) replayed(key string, seq int, kind wire.StepKind) (store.Step, bool) {
	rec, ok := recordedAt(rc.run.Steps, seq)
	if !ok {
		return rec, false
	}
	if rec.Key != key || rec.Kind != kind {
		panic(unwind{reason: unwindTerminal, err: wire.Errorf(wire.ErrNonDeterminism,
			"step %d is %s %q in the recorded history but the workflow now reaches %s %q", seq, rec.Kind, rec.Key, kind, key)})
	}
	return rec, true
}

func (rc *runContext) checkNewStep(key string, seq int) {
	if err := wire.ValidateKey("step key", key); err != nil {
		panic(unwind{reason: unwindTerminal, err: err})
	}
	if seq >= rc.w.cfg.Limits.MaxSteps {
		panic(unwind{reason: unwindTerminal, err: wire.Errorf(wire.ErrLimitExceeded,
			"run reached %d steps, the most one run may record", rc.w.cfg.Limits.MaxSteps)})
	}
	if !rc.leaseValid() {
		panic(unwind{reason: unwindLeaseLost, err: wire.ErrLeaseLost})
	}
}

// step is the core of Step: replay a record, or run the body and record its result
// under the fence before returning it.
func (rc *runContext) step(userKey string, kind wire.StepKind, timeout time.Duration, body func(context.Context) ([]byte, error)) ([]byte, error) {
	key, seq := rc.nextKey(userKey)
	if rec, ok := rc.replayed(key, seq, kind); ok {
		if rec.Status == "FAILED" {
			return nil, Terminal(fmt.Errorf("step %q failed: %s", key, rec.Error))
		}
		plain, err := rc.w.pl.open(rec.Output, adStep(rc.run.ID, key))
		if err != nil {
			// A record that fails to decode was tampered with or moved: stop rather than
			// replay it, and never run the body in its place.
			panic(unwind{reason: unwindTerminal, err: fmt.Errorf("replay step %q: %w", key, err)})
		}
		return plain, nil
	}
	if rc.replayOnly {
		panic(unwind{reason: unwindHistoryEnd})
	}
	rc.flushPending()
	rc.checkNewStep(key, seq)

	plain, err := rc.runBody(key, timeout, body)
	if err != nil {
		return nil, err
	}
	if len(plain) > rc.w.cfg.Limits.MaxStepOutputBytes {
		panic(unwind{reason: unwindTerminal, err: wire.Errorf(wire.ErrPayloadTooLarge,
			"output of step %q is %d bytes, over the limit of %d", key, len(plain), rc.w.cfg.Limits.MaxStepOutputBytes)})
	}
	out, err := rc.w.pl.seal(plain, adStep(rc.run.ID, key))
	if err != nil {
		panic(unwind{reason: unwindTerminal, err: err})
	}
	if rc.stateBytes+len(out) > rc.w.cfg.Limits.MaxRunStateBytes {
		panic(unwind{reason: unwindTerminal, err: wire.Errorf(wire.ErrPayloadTooLarge,
			"run state would reach %d bytes, over the limit of %d", rc.stateBytes+len(out), rc.w.cfg.Limits.MaxRunStateBytes)})
	}
	rc.pending = &store.StepInsertParams{FencedParams: rc.fenced(), Key: key, Seq: seq,
		Kind: kind, Output: out, Attempt: rc.run.Attempt}
	rc.stateBytes += len(out)
	return plain, nil
}

// flushPending writes the pending step record, if any, before the run goes on to a
// durable act; a write that cannot be made stops the run here.
func (rc *runContext) flushPending() {
	if err := rc.writePending(); err != nil {
		rc.stopOnWriteError(err)
	}
}

// writePending writes the pending step record, if any, under the fence.
func (rc *runContext) writePending() error {
	p := rc.pending
	if p == nil {
		return nil
	}
	rc.pending = nil
	err := rc.w.retryWrite(rc, func(context.Context) error {
		if err := failpoint.Inject(failpoint.StepAfterBodyBeforeCommit); err != nil {
			return err
		}
		err, ok := rc.w.steps.Do(*p)
		if !ok {
			return errWorkerStopped
		}
		if errors.Is(err, store.ErrStepExists) {
			// Only the fence holder can insert, so an existing row is our own write from
			// an attempt whose commit was acknowledged ambiguously.
			return nil
		}
		if err == nil {
			err = failpoint.Inject(failpoint.StepAfterCommit)
		}
		return err
	})
	if err == nil {
		rc.w.metrics.stepsRecorded.Add(1)
	}
	return err
}

// runBody calls a step body with the step's idempotency key in its context, turning a
// panic in user code into an error. With a timeout the body runs on its own goroutine:
// a body that ignores its context (an infinite loop) is abandoned when time is up, and
// its result, should it ever come, is dropped.
func (rc *runContext) runBody(key string, timeout time.Duration, body func(context.Context) ([]byte, error)) ([]byte, error) {
	if timeout <= 0 {
		timeout = rc.w.cfg.StepTimeout
	}
	ctx := context.WithValue(rc.Context, stepKeyCtx{}, rc.run.ID+"/"+key)
	ctx = context.WithValue(ctx, parentRunCtx{}, parentRun{id: rc.run.ID, namespace: rc.run.Namespace})
	if timeout <= 0 {
		return callBody(ctx, key, body)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	type result struct {
		out []byte
		err error
	}
	done := make(chan result, 1)
	// Whichever of the body's return and the timeout settles first wins: a body that
	// returns as time runs out keeps its result, and only a body really left running
	// counts as abandoned, until it returns.
	const running, returned, abandoned = 0, 1, 2
	var state atomic.Int32
	go func() {
		out, err := callBody(ctx, key, body)
		done <- result{out, err}
		if !state.CompareAndSwap(running, returned) {
			rc.w.metrics.abandoned.Add(-1)
		}
	}()
	select {
	case r := <-done:
		return r.out, r.err
	case <-ctx.Done():
		// Counted before it is settled, so the body's own count down never comes first.
		rc.w.metrics.abandoned.Add(1)
		if !state.CompareAndSwap(running, abandoned) {
			rc.w.metrics.abandoned.Add(-1)
			r := <-done
			return r.out, r.err
		}
		rc.w.metrics.stepTimeouts.Add(1)
		return nil, fmt.Errorf("step %q: %w after %s", key, ErrStepTimeout, timeout)
	}
}

func callBody(ctx context.Context, key string, body func(context.Context) ([]byte, error)) (out []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			if u, ok := r.(unwind); ok {
				panic(u) // an SDK call inside a body unwinding: let it through
			}
			err = fmt.Errorf("step %q panicked: %v\n%s", key, r, debug.Stack())
		}
	}()
	return body(ctx)
}

// stopOnWriteError ends the run's execution on this executor after a write that could not
// be made: a fenced refusal means someone else owns the run; any other error (database
// unreachable past the lease) leaves the run to the lease sweep.
func (rc *runContext) stopOnWriteError(err error) {
	if errors.Is(err, wire.ErrLeaseLost) {
		rc.w.metrics.fencedRejected.Add(1)
	}
	rc.loseLease()
	panic(unwind{reason: unwindLeaseLost, err: err})
}

func (rc *runContext) Sleep(key string, d time.Duration) error {
	return rc.sleep(key, d, nil)
}

func (rc *runContext) SleepUntil(key string, t time.Time) error {
	return rc.sleep(key, 0, &t)
}

func (rc *runContext) sleep(userKey string, d time.Duration, until *time.Time) error {
	key, seq := rc.nextKey(userKey)
	if rec, ok := rc.replayed(key, seq, wire.StepKindSleep); ok {
		// rc.run.DBNow is the database clock at the claim: the same clock that set wake_at.
		if rec.WakeAt == nil || !rec.WakeAt.After(rc.run.DBNow) {
			return nil
		}
		// Claimed before the wake time (woken ahead of it and held until it, a crash
		// during a local sleep, or a stray doorbell).
		if remaining := rec.WakeAt.Sub(rc.run.DBNow) - rc.w.cfg.Clock.Now().Sub(rc.claimedAt); remaining <= 0 || rc.local(remaining) {
			rc.waitLocally(remaining)
			return nil
		}
		rc.park(key, seq, 0, rec.WakeAt)
	}
	if rc.replayOnly {
		panic(unwind{reason: unwindHistoryEnd})
	}
	rc.flushPending()
	rc.checkNewStep(key, seq)
	remaining := d
	if until != nil {
		remaining = until.Sub(rc.run.DBNow) - rc.w.cfg.Clock.Now().Sub(rc.claimedAt)
	}
	if rc.local(remaining) {
		var wakeAt, dbNow time.Time
		err := rc.w.retryWrite(rc, func(ctx context.Context) error {
			var err error
			wakeAt, dbNow, err = rc.w.store.StepSleepInsert(ctx, store.RunSleepParams{FencedParams: rc.fenced(),
				StepKey: key, Seq: seq, Duration: max(d, 0), Until: until})
			return err
		})
		if err != nil {
			rc.stopOnWriteError(err)
		}
		rc.waitLocally(wakeAt.Sub(dbNow))
		return nil
	}
	rc.park(key, seq, d, until)
	return nil
}

// local says whether a sleep of d is waited out in process.
func (rc *runContext) local(d time.Duration) bool {
	return rc.w.cfg.LocalSleepMax > 0 && d <= rc.w.cfg.LocalSleepMax
}

// waitLocally waits d on this executor's monotonic clock, counted from after the
// sleep's record committed, so the run goes on no earlier than its recorded wake time.
// A run whose lease is lost meanwhile stops here.
func (rc *runContext) waitLocally(d time.Duration) {
	if d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-rc.Done():
			panic(unwind{reason: unwindLeaseLost, err: wire.ErrLeaseLost})
		}
	}
	if !rc.leaseValid() {
		panic(unwind{reason: unwindLeaseLost, err: wire.ErrLeaseLost})
	}
}

// park records the sleep and the SLEEPING status in one fenced statement, then unwinds:
// the timer will queue the run again at its wake time.
func (rc *runContext) park(key string, seq int, d time.Duration, until *time.Time) {
	var wakeAt time.Time // set once the sleep committed; a failed retry must not reset it
	rc.ending.Store(true)
	err := rc.w.retryWrite(rc, func(ctx context.Context) error {
		at, err := rc.w.store.RunSleep(ctx, store.RunSleepParams{FencedParams: rc.fenced(), StepKey: key, Seq: seq,
			Duration: d, Until: until})
		if err != nil {
			return err
		}
		wakeAt = at
		if err := failpoint.Inject(failpoint.SleepAfterCommitBeforeRelease); err != nil {
			// The sleep is recorded; an ambiguous answer must not park the run twice.
			until, d = &wakeAt, 0
			return err
		}
		return nil
	})
	if errors.Is(err, wire.ErrLeaseLost) && !wakeAt.IsZero() {
		err = nil // our own committed sleep, seen again after an ambiguous answer
	}
	if err != nil {
		rc.stopOnWriteError(err)
	}
	rc.w.bus.PublishTimerHint(wakeAt)
	panic(unwind{reason: unwindSuspended})
}
