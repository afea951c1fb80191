package battery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// T18 — idempotent starts under concurrency. C clients, each on its own NATS connection,
// send the same K starts (same idempotency keys, same inputs) at once to two scheduler
// replicas: for each key half the clients start it by request-reply (Client.Start), half
// by publishing it to the submit stream (Client.Submit). One call in ten is first made
// with a deadline of a few milliseconds, which it usually misses after its request left,
// and is then made again, as a client whose call timed out would. When a client is done,
// it re-sends one of M keys with a different input: by request-reply (M clients) and by
// submit (M others), after a start with the original input has confirmed the run exists.
//
// Pass: exactly K runs, one per key, each holding its original input; every request-reply
// answer for a key names that key's run; a submit's id names the run only if that submit
// made it (it is the id the run would get), and no run at all otherwise; the M
// request-reply re-sends get the typed conflict error, M/M. A conflicting submit has
// nobody to answer: the scheduler terminates the message (it can never succeed), logs it
// and counts it as kagzi_starts_total{result="conflict"}. The test checks it changed
// nothing, that both schedulers together counted 2·M conflicts (M of each kind), that M
// conflicting submits were logged, and that the submit stream's consumer ends with
// nothing pending or unacknowledged.
//
// No executor runs: the runs stay QUEUED, which is all a start decides.
func TestT18IdempotentStarts(t *testing.T) {
	const clients, keys, mismatched = 50, 500, 20 // BATTERY.md gives T18 one size
	sum := newSummary(t, fmt.Sprintf("%d clients × the same %d keyed starts (half request-reply, half submit; 1 in 10 first sent with a ms deadline, then again), 2 schedulers; %d keys re-sent with another input each way",
		clients, keys, mismatched))
	s := newSystem(t)
	metrics := []string{freeAddr(t), freeAddr(t)}
	var scheds []string
	for i, addr := range metrics {
		name := fmt.Sprintf("scheduler-%d", i+1)
		s.scheduler(name, "KAGZI_HTTP_ADDR="+addr)
		scheds = append(scheds, name)
	}
	original := func(k int) chaoswf.Input { return chaoswf.Input{Seed: 18000 + k, Steps: 3, MinMS: 5, MaxMS: 20} }
	other := func(k int) chaoswf.Input { return chaoswf.Input{Seed: 918000 + k, Steps: 3, MinMS: 5, MaxMS: 20} }
	key := func(k int) string { return fmt.Sprintf("t18-%03d", k) }
	// Spread over the key space, so their originals are sent by both paths.
	mismatchKey := func(i int) int { return i * (keys / mismatched) }

	type answers struct {
		mu        sync.Mutex
		started   [][]string // per key, the ids request-reply calls were answered with
		submitted [][]string // per key, the ids of submits JetStream stored
	}
	ans := &answers{started: make([][]string, keys), submitted: make([][]string, keys)}
	var shortCalls, shortFailed, otherErrs atomic.Int64
	conflictErrs := make([]error, mismatched)
	submittedConflicts := make([]string, mismatched)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// call makes one start the way the clients here do: one in ten (when hurry) first
	// with a deadline of 1–3 ms, then with a real one until it is answered. Only a
	// conflict is final.
	call := func(c, k int, hurry bool, f func(ctx context.Context) (string, error)) (string, error) {
		if hurry && (7*c+k)%10 == 0 {
			shortCalls.Add(1)
			sctx, scancel := context.WithTimeout(ctx, time.Duration(1+(c+k)%3)*time.Millisecond)
			id, err := f(sctx)
			scancel()
			if err == nil {
				return id, nil
			}
			shortFailed.Add(1)
		}
		for {
			cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
			id, err := f(cctx)
			ccancel()
			if err == nil || errors.Is(err, sdk.ErrIdempotencyConflict) || ctx.Err() != nil {
				return id, err
			}
			otherErrs.Add(1)
			t.Logf("client %d key %d: %v; sending again", c, k, err)
		}
	}

	began := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, clients*keys+2*mismatched)
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nc, err := bus.Connect(bus.ConnOptions{URL: s.nats.URL(), Name: fmt.Sprintf("t18-client-%d", c)})
			if err != nil {
				errs <- fmt.Errorf("client %d: %w", c, err)
				return
			}
			defer nc.Close()
			cl := sdk.NewClient(nc, sdk.WithRequestTimeout(2*time.Second))
			// Each conflicting start must reach a scheduler exactly once, so that the
			// conflicts counted can be compared exactly: it is sent without a ms deadline
			// and with a request timeout no answer under this load comes near (a request
			// that times out is sent again by the client).
			patient := sdk.NewClient(nc, sdk.WithRequestTimeout(30*time.Second))
			start := func(cl *sdk.Client, k int, in chaoswf.Input) func(context.Context) (string, error) {
				return func(ctx context.Context) (string, error) {
					return cl.StartByName(ctx, chaoswf.Name, in, sdk.IdempotencyKey(key(k)))
				}
			}
			submit := func(cl *sdk.Client, k int, in chaoswf.Input) func(context.Context) (string, error) {
				return func(ctx context.Context) (string, error) {
					return cl.SubmitByName(ctx, chaoswf.Name, in, sdk.IdempotencyKey(key(k)))
				}
			}
			record := func(into [][]string, k int, id string, err error) {
				if err != nil {
					errs <- fmt.Errorf("client %d key %d: %w", c, k, err)
					return
				}
				ans.mu.Lock()
				into[k] = append(into[k], id)
				ans.mu.Unlock()
			}
			// Each client walks the keys from its own offset, so every key is wanted by
			// many clients at once all through the test.
			for j := range keys {
				k := (j + c*keys/clients) % keys
				if (c+k)%2 == 0 {
					id, err := call(c, k, true, start(cl, k, original(k)))
					record(ans.started, k, id, err)
				} else {
					id, err := call(c, k, true, submit(cl, k, original(k)))
					record(ans.submitted, k, id, err)
				}
			}
			if i := c % (clients / 2); i < mismatched {
				k := mismatchKey(i)
				// The run must exist before its key is reused, or the re-send would make it.
				id, err := call(c, k, true, start(cl, k, original(k)))
				record(ans.started, k, id, err)
				if c < clients/2 {
					_, conflictErrs[i] = call(c, k, false, start(patient, k, other(k)))
				} else {
					submittedConflicts[i], err = call(c, k, false, submit(patient, k, other(k)))
					if err != nil {
						errs <- fmt.Errorf("client %d: conflicting submit of key %d: %w", c, k, err)
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("start: %v", err)
	}
	sent := time.Since(began)

	// Submits are answered by JetStream: the schedulers may still be working through them.
	var pending, ackPending uint64
	drained := false
	for end := time.Now().Add(30 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		c, err := s.js.Consumer(ctx, wire.SubmitStream, wire.SchedulerQueueGroup)
		if err != nil {
			t.Fatalf("submit consumer: %v", err)
		}
		info, err := c.Info(ctx)
		if err != nil {
			t.Fatalf("submit consumer: %v", err)
		}
		pending, ackPending = info.NumPending, uint64(info.NumAckPending)
		if drained = pending == 0 && ackPending == 0; drained {
			break
		}
	}
	if !drained {
		t.Errorf("submit consumer not drained: %d pending, %d awaiting an ack", pending, ackPending)
	}
	t.Logf("all calls answered after %.1fs, submits processed after %.1fs; %d calls first sent with a ms deadline, %d of them missed it; %d other errors",
		sent.Seconds(), time.Since(began).Seconds(), shortCalls.Load(), shortFailed.Load(), otherErrs.Load())
	if shortFailed.Load() == 0 {
		t.Errorf("no call missed its ms deadline: the forced timeouts never happened")
	}

	// One run per key, holding the original input.
	rows, err := s.pool.Query(ctx, `SELECT idempotency_key, id::text, input, status FROM workflow_runs`)
	if err != nil {
		t.Fatalf("read runs: %v", err)
	}
	runOf := map[string]string{}
	runs, dupKeys, wrongInput, notQueued := 0, 0, 0, 0
	for rows.Next() {
		var k, id, status string
		var input []byte
		if err := rows.Scan(&k, &id, &input, &status); err != nil {
			t.Fatalf("read runs: %v", err)
		}
		runs++
		if _, dup := runOf[k]; dup {
			dupKeys++
		}
		runOf[k] = id
		var in chaoswf.Input
		var n int
		if _, err := fmt.Sscanf(k, "t18-%d", &n); err != nil || json.Unmarshal(input, &in) != nil || in != original(n) {
			wrongInput++
			t.Logf("run %s of key %q holds input %s", id, k, input)
		}
		if status != string(wire.StatusQueued) {
			notQueued++
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("read runs: %v", err)
	}
	expectEq(t, "runs", runs, keys)
	expectZero(t, "keys with more than one run", dupKeys)
	expectZero(t, "runs whose input is not their key's original", wrongInput)
	expectZero(t, "runs not QUEUED (nothing executes them)", notQueued)

	// Every answer for a key names its run; a submit's id names it only if it made it.
	answered, wrongAnswers, submits, madeBySubmit, strayIDs := 0, 0, 0, 0, 0
	var submitIDs []string
	for k := range keys {
		run := runOf[key(k)]
		for _, id := range ans.started[k] {
			answered++
			if id != run {
				wrongAnswers++
				if wrongAnswers <= 5 {
					t.Logf("key %d: answered %s, the run is %s", k, id, run)
				}
			}
		}
		made := 0
		for _, id := range ans.submitted[k] {
			submits++
			if id == run {
				made++
			} else {
				submitIDs = append(submitIDs, id)
			}
		}
		if made > 1 {
			t.Errorf("key %d: %d submits claim to have made its run", k, made)
		}
		madeBySubmit += made
	}
	for _, id := range submittedConflicts {
		if id != "" {
			submitIDs = append(submitIDs, id)
		}
	}
	strayIDs = s.oracle.Count(`SELECT count(*) FROM workflow_runs WHERE id = ANY ($1::uuid[])`, submitIDs)
	t.Logf("%d request-reply answers, %d stored submits (%d of them made their key's run)", answered, submits, madeBySubmit)
	expectEq(t, "request-reply answers", answered, clients*keys/2+mismatched*2)
	expectEq(t, "stored submits", submits, clients*keys/2)
	expectZero(t, "request-reply answers naming another run than their key's", wrongAnswers)
	expectZero(t, "runs named by a submit that did not make them", strayIDs)

	// The conflicts: typed over request-reply; over the submit stream, dropped and counted.
	typed := 0
	for i, err := range conflictErrs {
		if errors.Is(err, sdk.ErrIdempotencyConflict) {
			typed++
		} else {
			t.Logf("key %d re-sent with another input: %v", mismatchKey(i), err)
		}
	}
	expectEq(t, "request-reply re-sends with another input answered ErrIdempotencyConflict", typed, mismatched)
	conflicts := 0.0
	for _, addr := range metrics {
		v, err := scrapeMetric(addr, `kagzi_starts_total{result="conflict"}`)
		if err != nil {
			t.Errorf("scrape a scheduler: %v", err)
		}
		conflicts += v
	}
	logged := 0
	for _, p := range s.procs {
		logged += strings.Count(p.Log(), "submitted start conflicts with an existing run; dropped")
	}
	t.Logf("schedulers %v counted %v conflicts and logged %d dropped submits", scheds, conflicts, logged)
	expectEq(t, `kagzi_starts_total{result="conflict"} over both schedulers`, int(conflicts), 2*mismatched)
	expectEq(t, "conflicting submits logged as dropped", logged, mismatched)

	sum.Runs, sum.Stuck = runs, 0
	sum.DupResults = dupKeys
	sum.Faults = fmt.Sprintf("%d starts (%d sent with a ms deadline, %d missed it and were sent again); %d+%d conflicting re-sends",
		clients*keys, shortCalls.Load(), shortFailed.Load(), mismatched, mismatched)
	s.checkNoPanics()
}
