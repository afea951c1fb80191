package battery

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/battery/chaoswf"
)

// T06 — the broker loses acknowledged messages. With the executors paused, Q runs are
// QUEUED and S sleepers wake, so S+Q doorbells sit in the task stream, every one of them
// acknowledged to its publisher. Then the broker loses them:
//
//	(a) the test deletes 20 % of them by sequence, as a broker that acked a write and
//	    then lost it would;
//	(b) nats-server is SIGKILLed, its store directory removed and the server restarted
//	    empty: every doorbell, stream and consumer is gone;
//	(c) nats-server is SIGKILLed and every message block file (.blk) of its store is
//	    truncated to a random length before the restart, as Jepsen did.
//
// The executors are resumed. Pass: all S+Q runs COMPLETED, each within T + 3 s of the
// fault (or of its wake time, if later), where T = 5 s is the reconcile threshold; the
// reconciler counted at least as many re-dispatches as doorbells were lost; no step
// result recorded twice and no body run twice; in (b) the task stream and consumer exist
// again within 5 s of the restart with no manual step, and the scheduler and timer rode
// the outage out (same pids).
func TestT06BrokerLosesMessages(t *testing.T) {
	t.Run("a-deleted-after-ack", func(t *testing.T) { t06(t, t06Delete) })
	t.Run("b-store-wiped", func(t *testing.T) { t06(t, t06Wipe) })
	t.Run("c-blocks-truncated", func(t *testing.T) { t06(t, t06Truncate) })
}

const t06StaleAfter = 5 * time.Second

type t06Fault int

const (
	t06Delete t06Fault = iota
	t06Wipe
	t06Truncate
)

func t06(t *testing.T, fault t06Fault) {
	queued, sleepers := 300, 200 // BATTERY.md gives T06 one size
	sum := newSummary(t, fmt.Sprintf("%d QUEUED + %d woken sleepers (3 s) held in the stream, T=5 s, sweep ≤ 1 s", queued, sleepers))
	s := newSystem(t)
	sched := s.scheduler("scheduler")
	metrics := freeAddr(t)
	tmr := s.timer("timer", "KAGZI_STALE_AFTER=5s", "KAGZI_MAX_IDLE=1s", "KAGZI_HTTP_ADDR="+metrics)
	execs := []*testkit.Process{
		s.executor("exec-a", "KAGZI_CONCURRENCY=32", "KAGZI_LEASE=5s"),
		s.executor("exec-b", "KAGZI_CONCURRENCY=32", "KAGZI_LEASE=5s"),
	}
	schedPID, tmrPID := sched.PID(), tmr.PID()

	sleeperIDs := s.startRuns(inputs(sleepers, func(i int) chaoswf.Input {
		return chaoswf.Input{Seed: 6000 + i, Steps: 2, MinMS: 5, MaxMS: 20, SleepAfter: 1, SleepMS: 3000}
	}))
	if got, ok := s.oracle.WaitCount(30*time.Second, sleepers, `SELECT count(*) FROM workflow_runs WHERE status = 'SLEEPING'`); !ok {
		t.Fatalf("%d of %d sleepers asleep", got, sleepers)
	}
	// Paused: a graceful stop also withdraws the executors' worker rows, so the
	// reconciler leaves the runs alone until they are back.
	for _, p := range execs {
		p.Stop(10 * time.Second)
	}
	queuedIDs := s.startRuns(inputs(queued, func(i int) chaoswf.Input {
		return chaoswf.Input{Seed: 6500 + i, Steps: 3, MinMS: 5, MaxMS: 20}
	}))
	total := queued + sleepers
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if got, ok := s.oracle.WaitCount(30*time.Second, total, `SELECT count(*) FROM workflow_runs WHERE status = 'QUEUED'`); !ok {
		t.Fatalf("%d of %d runs QUEUED", got, total)
	}
	st := s.waitStreamMsgs(total, 10*time.Second)

	var dropped int
	var faultAt time.Time
	var restarted time.Time
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 6))
	switch fault {
	case t06Wipe, t06Truncate:
		s.nats.Kill()
		if fault == t06Wipe {
			if err := os.RemoveAll(s.nats.StoreDir); err != nil {
				t.Fatal(err)
			}
		} else {
			n, err := truncateBlocks(s.nats.StoreDir, rng)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("truncated %d message block files", n)
		}
		s.nats.Start()
		s.nats.WaitReady(t)
		restarted = time.Now()
		faultAt = s.dbNow()
		dropped = total
		if fault == t06Truncate {
			// What survived the truncation is still in the stream, if the stream did;
			// the test's own connection may take a moment to come back.
			for end := time.Now().Add(5 * time.Second); ; time.Sleep(25 * time.Millisecond) {
				info, err := st.Info(ctx)
				if err == nil {
					dropped = total - int(info.State.Msgs)
					break
				}
				if errors.Is(err, jetstream.ErrStreamNotFound) || time.Now().After(end) {
					t.Logf("task stream after the restart: %v", err)
					break
				}
			}
			sum.Faults = fmt.Sprintf("nats-server SIGKILL + .blk files truncated (%d of %d doorbells lost)", dropped, total)
		} else {
			sum.Faults = fmt.Sprintf("nats-server SIGKILL + store wiped (%d doorbells, streams, consumers lost)", dropped)
		}
	default:
		info := st.CachedInfo()
		for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
			if rng.IntN(5) != 0 {
				continue
			}
			if err := st.DeleteMsg(ctx, seq); err != nil {
				t.Fatalf("delete doorbell %d: %v", seq, err)
			}
			dropped++
		}
		faultAt = s.dbNow()
		sum.Faults = fmt.Sprintf("%d of %d acked doorbells deleted", dropped, total)
	}
	t.Logf("fault: %s", sum.Faults)
	for _, p := range execs {
		p.Start()
	}
	if fault != t06Delete {
		// Nobody recreates anything by hand: the resumed executors and the services'
		// own checks must.
		for {
			stream, err := s.js.Stream(ctx, wire.TaskStream)
			if err == nil {
				_, err = s.taskConsumer(ctx)
			}
			if err == nil && stream != nil {
				t.Logf("task stream and consumer back %.2fs after the restart", time.Since(restarted).Seconds())
				break
			}
			if time.Since(restarted) > 5*time.Second {
				t.Errorf("task stream or consumer still missing 5 s after the restart: %v", err)
				break
			}
			time.Sleep(25 * time.Millisecond)
		}
	}

	s.waitCompleted(total, 30*time.Second)
	late := s.oracle.Count(`SELECT count(*) FROM workflow_runs r WHERE r.status <> 'COMPLETED'
		OR r.finished_at > greatest($1::timestamptz, (SELECT wake_at FROM step_runs s WHERE s.run_id = r.id AND s.kind = 'sleep'))
		                   + $2::bigint * interval '1 microsecond'`, faultAt, (t06StaleAfter + 3*time.Second).Microseconds())
	var worst float64
	_ = s.pool.QueryRow(ctx, `SELECT coalesce(max(extract(epoch FROM r.finished_at - greatest($1::timestamptz,
		(SELECT wake_at FROM step_runs s WHERE s.run_id = r.id AND s.kind = 'sleep')))), 0)::float8 FROM workflow_runs r`, faultAt).Scan(&worst)
	t.Logf("slowest run completed %.2fs after the fault or its wake time", worst)
	expectZero(t, "runs not COMPLETED within T + 3 s of the fault or their wake time", late)

	redispatched, err := scrapeMetric(metrics, "kagzi_reconcile_redispatch_total")
	if err != nil {
		t.Errorf("scrape the timer: %v", err)
	}
	t.Logf("kagzi_reconcile_redispatch_total %v for %d lost doorbells", redispatched, dropped)
	if int(redispatched) < dropped {
		t.Errorf("kagzi_reconcile_redispatch_total = %v, fewer than the %d doorbells lost", redispatched, dropped)
	}
	if sched.Exited() || sched.PID() != schedPID {
		t.Errorf("the scheduler did not ride out the broker fault (pid %d → %d, exited %v)", schedPID, sched.PID(), sched.Exited())
	}
	if tmr.Exited() || tmr.PID() != tmrPID {
		t.Errorf("the timer did not ride out the broker fault (pid %d → %d, exited %v)", tmrPID, tmr.PID(), tmr.Exited())
	}

	tl := s.oracle.Tally(s.faultedPIDs())
	sum.fill(tl, s.oracle.NotCompleted(append(sleeperIDs, queuedIDs...)), 3*queued+2*sleepers)
	t.Logf("tally: %+v", tl)
	expectEq(t, "runs COMPLETED", tl.Completed, total)
	expectEq(t, "step results recorded", tl.StepResults, 3*queued+2*sleepers)
	// A body may repeat only where an executor was fenced (its lease lapsed on a loaded
	// machine); the results stay single either way.
	expectZero(t, "repeated step bodies no fenced executor explains", tl.Unattributed)
	expectEq(t, "entries into COMPLETED", tl.CompletedEntries, total)
	expectZero(t, "transitions out of a terminal status", tl.TerminalExits)
	expectZero(t, "runs whose output differs from a fault-free run's", s.wrongOutputs())
	s.checkNoPanics()
}

// truncateBlocks cuts every JetStream message block file under dir to a random length,
// the torn writes of a machine that lost power, and returns how many it cut.
func truncateBlocks(dir string, rng *rand.Rand) (int, error) {
	n := 0
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || filepath.Ext(path) != ".blk" {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if err := os.Truncate(path, rng.Int64N(info.Size()+1)); err != nil {
			return fmt.Errorf("truncate %s: %w", path, err)
		}
		n++
		return nil
	})
	return n, err
}
