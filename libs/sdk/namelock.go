package sdk

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kagzi/kagzi/libs/store"
)

// nameLock holds a named worker's advisory lock (store.WorkerNameTryLock) on a connection
// taken from the worker's pool for the life of the worker, and takes it again, with
// backoff, when that connection drops. From the pool, so that an executor never holds more
// sessions than its configured pool size (T20 counts them against it). The first time it holds the lock it hands back the runs earlier
// incarnations of the name held: a killed process's session, and its lock, end with it,
// so while the lock is ours none of them is alive, and their runs need not wait for
// their leases to lapse.
type nameLock struct {
	w      *Worker
	conn   *pgxpool.Conn // nil while disconnected; owned by run once it started
	held   bool          // conn holds the lock
	warned bool          // the lock was found taken, and said so; not said again until held
	// recovered: the predecessors' runs were handed back (once per worker).
	recovered bool
	cancel    context.CancelFunc
	done      chan struct{}
}

// nameLockPing is how often the held connection is checked: a lock lost with its
// connection is taken again this long after at most.
const nameLockPing = 5 * time.Second

// nameLockPoll is how often a lock another session holds is tried again.
const nameLockPoll = time.Second

// predecessorBatch bounds one statement handing back predecessors' runs.
const predecessorBatch = 256

// startNameLock tries the lock once within ctx, handing back the predecessors' runs if
// it got it, then keeps the lock (or goes on trying for it) in the background.
func (w *Worker) startNameLock(ctx context.Context) *nameLock {
	n := &nameLock{w: w, done: make(chan struct{})}
	n.attempt(ctx)
	bg, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	go n.run(bg)
	return n
}

// stop releases the lock (its session ends) and waits for the background loop. Nil-safe.
func (n *nameLock) stop() {
	if n == nil {
		return
	}
	n.cancel()
	<-n.done
}

func (n *nameLock) run(ctx context.Context) {
	defer close(n.done)
	defer n.disconnect()
	b := newBackoff(100*time.Millisecond, 10*time.Second)
	tick := time.NewTicker(nameLockPing)
	defer tick.Stop()
	for ctx.Err() == nil {
		if !n.held {
			switch n.attempt(ctx) {
			case lockFailed:
				b.wait(ctx)
				continue
			case lockTaken:
				// Polled, not waited for in one statement: the runtime role's
				// lock_timeout and statement_timeout would cut such a wait short.
				sleepCtx(ctx, nameLockPoll)
				continue
			}
			b.reset()
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if !n.recovered {
			n.recover(ctx)
		}
		pctx, cancel := context.WithTimeout(ctx, nameLockPing)
		err := n.conn.Ping(pctx)
		cancel()
		if err != nil && ctx.Err() == nil {
			n.w.log.Warn("worker name lock: connection lost; taking the lock again", "name", n.w.cfg.Name, "error", err)
			n.disconnect()
		}
	}
}

type lockState int

const (
	lockHeld   lockState = iota
	lockTaken            // another session holds it
	lockFailed           // no answer: connection or query failed
)

// attempt connects if need be and tries the lock once. The first time the lock is held
// it hands back the predecessors' runs.
func (n *nameLock) attempt(ctx context.Context) lockState {
	w := n.w
	if n.conn == nil {
		conn, err := w.cfg.Pool.Acquire(ctx)
		if err != nil {
			if ctx.Err() == nil {
				w.log.Warn("worker name lock: connect", "name", w.cfg.Name, "error", err)
			}
			return lockFailed
		}
		n.conn = conn
	}
	ok, err := store.New(n.conn).WorkerNameTryLock(ctx, w.cfg.Namespace, w.cfg.Name)
	if err != nil {
		if ctx.Err() == nil {
			w.log.Warn("worker name lock", "name", w.cfg.Name, "error", err)
		}
		n.disconnect()
		return lockFailed
	}
	if !ok {
		if !n.warned {
			n.warned = true
			w.log.Warn("worker name held by another session: an earlier incarnation not gone yet, or another live executor "+
				"with the same name (two must never share one); runs of earlier incarnations wait for their leases until it is free",
				"name", w.cfg.Name)
		}
		return lockTaken
	}
	n.held = true
	if n.warned {
		w.log.Info("worker name lock taken", "name", w.cfg.Name)
		n.warned = false
	}
	if !n.recovered {
		n.recover(ctx)
	}
	return lockHeld
}

// sleepCtx waits d; false when ctx ended first.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (n *nameLock) disconnect() {
	if n.conn == nil {
		return
	}
	// Closed before it goes back, so the pool drops it rather than hand a session that
	// holds the lock to other work.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = n.conn.Conn().Close(ctx)
	n.conn.Release()
	n.conn, n.held = nil, false
}

// recover ends the attempts of the runs earlier incarnations hold, as the timer's lease
// sweep would end them once their leases lapsed, and announces the outcome as it does:
// a doorbell for each run re-queued, a done notice for each run that spent its last
// attempt. On an error it is tried again at the next check; the lease sweep remains the
// safety net.
func (n *nameLock) recover(ctx context.Context) {
	w := n.w
	requeued, failed, err := w.endAttempts(ctx, func(ctx context.Context) ([]store.LeaseExpiry, error) {
		return w.store.RunsExpirePredecessorLeases(ctx, store.PredecessorLeasesParams{
			Namespace: w.cfg.Namespace, Name: w.cfg.Name, Self: w.cfg.ID, Limit: predecessorBatch})
	})
	if err != nil {
		if ctx.Err() == nil {
			w.log.Warn("hand back runs of earlier incarnations", "name", w.cfg.Name, "error", err)
		}
		return
	}
	n.recovered = true
	if requeued+failed > 0 {
		w.log.Info("runs of earlier incarnations handed back", "name", w.cfg.Name, "requeued", requeued, "failed", failed)
	}
}
