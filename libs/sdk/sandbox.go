package sdk

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
)

// A sandbox is a child process that runs, one at a time, the runs its executor must not
// run beside others (WorkerConfig.Sandboxes), or every run (SandboxEveryRun): a run
// whose step kills its process (os.Exit, a fatal runtime error) then kills only its
// sandbox. The executor sees the sandbox's pipe close the moment it dies, and ends the
// run's attempt at once, as the lapsed lease would a lease later. A sandbox that
// finished its run waits for the next, unless it abandoned a step body (it retires).
//
// It is the executor's own program started again, with the same arguments and
// environment, sandboxEnv set to the worker's namespace and sandboxParentEnv to its id,
// of which the sandbox's own id is an extension ("<id>/sandbox-<pid>": a successor's
// hand-back, by name, takes the runs of dead sandboxes too, and never those of its
// own). Its main reaches the worker's Start as the executor's did, and there Start
// serves the runs it is handed on fd 3, answering on fd 4, one JSON object per line,
// and ends the process when fd 3 closes (the executor stops or died). This is the
// re-exec idiom of Go programs that need a child of their own code (moby's reexec),
// since Go cannot fork.
const sandboxEnv, sandboxParentEnv = "KAGZI_SANDBOX", "KAGZI_SANDBOX_PARENT"

// sandboxStartTimeout bounds a sandbox's start, from exec to its ready line: its main
// connects to PostgreSQL and NATS first.
const sandboxStartTimeout = 30 * time.Second

// sandboxRequest hands a sandbox one doorbell to claim and run.
type sandboxRequest struct {
	Workflow string    `json:"workflow"`
	Task     wire.Task `json:"task"`
}

// sandboxReply is one line from a sandbox: ready once at start, then per request the
// claim's outcome and, when claimed, done when the run stopped.
type sandboxReply struct {
	Ready bool   `json:"ready,omitempty"`
	ID    string `json:"id,omitempty"`    // ready: the sandbox's worker id, its runs' lease owner
	Claim string `json:"claim,omitempty"` // claimOK, claimNoop or claimFailed
	Error string `json:"error,omitempty"`
	Done  bool   `json:"done,omitempty"`
	// Retire, with done: a step body the sandbox abandoned at its timeout still runs,
	// and the sandbox ends itself instead of taking the next run.
	Retire bool `json:"retire,omitempty"`
}

const (
	claimOK     = "ok"
	claimNoop   = "noop"
	claimFailed = "error"
)

// errSandboxGone: the sandbox's pipe closed before it answered; it died or is dying.
var errSandboxGone = errors.New("sandbox process gone")

type sandbox struct {
	cmd     *exec.Cmd
	id      string
	toChild *os.File
	enc     *json.Encoder
	replies chan sandboxReply // closed when the sandbox's end of fd 4 closes
	exited  chan struct{}     // closed once the process has been reaped
	waitErr error             // the process's exit, once exited is closed
}

func (sb *sandbox) pid() int { return sb.cmd.Process.Pid }

func (sb *sandbox) next() (sandboxReply, error) {
	rep, ok := <-sb.replies
	if !ok {
		return rep, errSandboxGone
	}
	return rep, nil
}

// kill ends the process and waits until it is reaped: only then are its leases sure to
// be worth nothing.
func (sb *sandbox) kill() {
	_ = sb.cmd.Process.Kill()
	<-sb.exited
}

// sandboxPool starts sandboxes as runs need them, at most its size at once, and keeps those
// that finished their run for the next one.
type sandboxPool struct {
	free chan struct{} // a token per sandbox that may be in use or started
	env  []string      // what a sandbox's environment adds to this process's

	mu      sync.Mutex
	live    map[*sandbox]struct{} // started and not discarded, idle or running a run
	idle    []*sandbox
	stopped bool
}

// newSandboxPool makes a pool of n sandboxes of the worker id in namespace; extraEnv is
// added to their environment (tests: how a test binary's sandbox finds the test's
// database).
func newSandboxPool(n int, namespace, id string, extraEnv []string) *sandboxPool {
	env := append([]string{sandboxEnv + "=" + namespace, sandboxParentEnv + "=" + id}, extraEnv...)
	p := &sandboxPool{free: make(chan struct{}, n), env: env, live: map[*sandbox]struct{}{}}
	for range n {
		p.free <- struct{}{}
	}
	return p
}

// get returns an idle sandbox, or starts one; it waits for one to be free until ctx
// ends.
func (p *sandboxPool) get(ctx context.Context) (*sandbox, error) {
	select {
	case <-p.free:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	p.mu.Lock()
	for len(p.idle) > 0 {
		sb := p.idle[len(p.idle)-1]
		p.idle = p.idle[:len(p.idle)-1]
		select {
		case <-sb.exited: // killed while idle: its pipe is closed, it holds no run
			delete(p.live, sb)
			continue
		default:
		}
		p.mu.Unlock()
		return sb, nil
	}
	stopped := p.stopped
	p.mu.Unlock()
	if stopped {
		p.free <- struct{}{}
		return nil, errWorkerStopped
	}
	sb, err := p.start()
	if err != nil {
		p.free <- struct{}{}
		return nil, err
	}
	p.mu.Lock()
	p.live[sb] = struct{}{}
	p.mu.Unlock()
	return sb, nil
}

// put gives back a sandbox whose run stopped, for the next run.
func (p *sandboxPool) put(sb *sandbox) {
	p.mu.Lock()
	if p.stopped {
		_ = sb.toChild.Close()
		delete(p.live, sb)
	} else {
		p.idle = append(p.idle, sb)
	}
	p.mu.Unlock()
	p.free <- struct{}{}
}

func (p *sandboxPool) isStopped() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stopped
}

// retire lets a sandbox that ends itself go: its place is freed once it is reaped, so
// that the processes never outnumber the pool.
func (p *sandboxPool) retire(sb *sandbox) {
	_ = sb.toChild.Close()
	go func() {
		<-sb.exited
		p.discard(sb)
	}()
}

// discard frees the place of a sandbox that is gone.
func (p *sandboxPool) discard(sb *sandbox) {
	p.mu.Lock()
	delete(p.live, sb)
	p.mu.Unlock()
	p.free <- struct{}{}
}

// stop closes every sandbox's fd 3 and lets no new one start. An idle sandbox ends at
// once; one running a run lets it finish, or hands it back, within its ShutdownGrace
// (see serveSandbox), as this worker does with its own.
func (p *sandboxPool) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopped = true
	for sb := range p.live {
		_ = sb.toChild.Close()
	}
	p.idle = nil
}

func (p *sandboxPool) start() (*sandbox, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("start sandbox: find the program: %w", err)
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("start sandbox: %w", err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, fmt.Errorf("start sandbox: %w", err)
	}
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Env = append(os.Environ(), p.env...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{inR, outW} // fd 3 and fd 4
	cmd.SysProcAttr = sandboxProcAttr()
	err = cmd.Start()
	inR.Close() // the child's ends, now its own
	outW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		return nil, fmt.Errorf("start sandbox %s: %w", exe, err)
	}
	sb := &sandbox{cmd: cmd, toChild: inW, enc: json.NewEncoder(inW),
		replies: make(chan sandboxReply, 2), exited: make(chan struct{})}
	go func() {
		defer close(sb.replies)
		defer outR.Close()
		dec := json.NewDecoder(outR)
		for {
			var rep sandboxReply
			if dec.Decode(&rep) != nil {
				return
			}
			sb.replies <- rep
		}
	}()
	go func() {
		sb.waitErr = cmd.Wait()
		_ = inW.Close()
		close(sb.exited)
	}()
	t := time.NewTimer(sandboxStartTimeout)
	defer t.Stop()
	select {
	case rep, ok := <-sb.replies:
		switch {
		case !ok:
			err = errSandboxGone
		case !rep.Ready || rep.ID == "":
			err = fmt.Errorf("first line %+v is not a ready line", rep)
		}
		sb.id = rep.ID
	case <-t.C:
		err = fmt.Errorf("not ready after %s", sandboxStartTimeout)
	}
	if err != nil {
		sb.kill()
		return nil, fmt.Errorf("start sandbox %s (pid %d): %w (does its main reach Worker.Start?); exit: %v", exe, sb.pid(), err, sb.waitErr)
	}
	return sb, nil
}

// runInSandbox answers a doorbell by handing it to a sandbox: a run that must run alone,
// or any run with SandboxEveryRun. Not handled: no sandbox could be started, and the
// caller runs it here (alone, if it must).
func (w *Worker) runInSandbox(def Registration, msg jetstream.Msg, task wire.Task) (handled bool) {
	// Kept in progress while a sandbox is found and claims it.
	stopKeeping := keepInProgress(msg, w.cfg.Consumer.AckWait/3)
	ctx, cancel := context.WithTimeout(context.Background(), w.cfg.Lease)
	sb, err := w.sandboxes.get(ctx)
	cancel()
	if err != nil {
		stopKeeping()
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, errWorkerStopped) {
			// Every sandbox stayed busy: another executor may have one free. A message
			// given back is redelivered ahead of the queue.
			_ = msg.Nak()
			return true
		}
		w.log.Warn("no sandbox; the run runs alone here instead", "run_id", task.RunID, "error", err)
		return false
	}
	err = sb.enc.Encode(sandboxRequest{Workflow: def.Name(), Task: task})
	var rep sandboxReply
	if err == nil {
		rep, err = sb.next()
	}
	stopKeeping()
	if err != nil {
		// Gone before it answered: its claim may have taken, and is ended below; the
		// doorbell, given back, then claims nothing, or claims the run if it had not.
		_ = msg.Nak()
		w.sandboxGone(sb, task.RunID)
		return true
	}
	switch rep.Claim {
	case claimOK:
		_ = msg.Ack()
		w.metrics.claimed.Add(1)
		w.metrics.sandboxed.Add(1)
	case claimNoop:
		w.metrics.claimNoops.Add(1)
		_ = msg.Ack()
		w.sandboxes.put(sb)
		return true
	default:
		w.log.Warn("claim run in a sandbox", "run_id", task.RunID, "sandbox_pid", sb.pid(), "error", rep.Error)
		_ = msg.NakWithDelay(time.Second)
		w.sandboxes.put(sb)
		return true
	}
	if rep, err = sb.next(); err != nil || !rep.Done {
		w.sandboxGone(sb, task.RunID)
		return true
	}
	if rep.Retire {
		w.metrics.sandboxesRetired.Add(1)
		w.log.Info("sandbox retired: a step body it abandoned at its timeout still runs", "run_id", task.RunID, "sandbox_pid", sb.pid())
		w.sandboxes.retire(sb)
		return true
	}
	w.sandboxes.put(sb)
	return true
}

// sandboxGone reaps a sandbox whose pipe closed (or that broke the protocol: it is
// killed) and ends the attempts of the runs it held, as their lapsed leases would.
func (w *Worker) sandboxGone(sb *sandbox, runID wire.RunID) {
	sb.kill()
	defer w.sandboxes.discard(sb)
	if !w.sandboxes.isStopped() || sb.waitErr != nil {
		w.metrics.sandboxesLost.Add(1)
		w.log.Warn("sandbox exited while it ran a run; its attempt ends now", "run_id", runID,
			"sandbox_pid", sb.pid(), "sandbox_id", sb.id, "exit", fmt.Sprint(sb.waitErr))
	}
	_, _, err := w.endAttempts(context.Background(), func(ctx context.Context) ([]store.LeaseExpiry, error) {
		return w.store.RunsExpireOwnerLeases(ctx, w.cfg.Namespace, sb.id, predecessorBatch)
	})
	if err != nil {
		// The lease sweep ends them a lease later.
		w.log.Warn("end the attempts of a dead sandbox's runs; their leases will lapse", "sandbox_id", sb.id, "error", err)
	}
}

// endAttempts ends the attempts of the runs a dead holder held, a batch of at most
// predecessorBatch at a time (expire ends one), and announces each batch. An error: a
// batch failed, and the lease sweep ends the rest a lease later.
func (w *Worker) endAttempts(ctx context.Context, expire func(context.Context) ([]store.LeaseExpiry, error)) (requeued, failed int, err error) {
	for {
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		es, err := expire(qctx)
		cancel()
		if err != nil {
			return requeued, failed, err
		}
		r, f := w.announceExpiries(ctx, es)
		requeued, failed = requeued+r, failed+f
		if len(es) < predecessorBatch {
			return requeued, failed, nil
		}
	}
}

// announceExpiries announces attempts ended for a dead holder as the lease sweep
// announces them: a doorbell for each run re-queued, a done notice for each run that
// spent its last attempt.
func (w *Worker) announceExpiries(ctx context.Context, es []store.LeaseExpiry) (requeued, failed int) {
	bells := make([]bus.Doorbell, 0, len(es))
	for _, e := range es {
		if e.Status == wire.StatusFailed {
			failed++
			w.log.Warn("run of a dead holder was on its last attempt; run failed", "run_id", e.RunID, "workflow", e.Workflow)
			w.bus.PublishDone(e.Namespace, e.RunID, wire.StatusFailed, nil)
			continue
		}
		bells = append(bells, bus.Doorbell{Namespace: e.Namespace, Workflow: e.Workflow,
			Task: wire.Task{RunID: e.RunID, DispatchSeq: e.DispatchSeq, Lapses: e.Lapses}})
	}
	if len(bells) > 0 {
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		// Not fatal: the runs are QUEUED, and the reconciler relays a lost doorbell.
		if err := w.bus.PublishTasks(pctx, bells); err != nil {
			w.log.Warn("publish doorbells of runs re-queued; the reconciler will relay them", "count", len(bells), "error", err)
		}
	}
	return len(bells), failed
}

// InSandbox reports whether this process is a sandbox of an executor's worker
// (WorkerConfig.Sandboxes). A sandbox runs one run at a time: its main may give it
// smaller database pools, and must skip what two processes cannot share.
func InSandbox() bool {
	_, _, ok := inSandbox()
	return ok
}

// inSandbox says whether this process is a sandbox of a worker in namespace, and of
// which worker.
func inSandbox() (namespace, parent string, ok bool) {
	namespace, ok = os.LookupEnv(sandboxEnv)
	return namespace, os.Getenv(sandboxParentEnv), ok
}

// serveSandbox is Start in a sandbox process: it claims and runs, one at a time, the
// doorbells its executor hands it on fd 3, answering on fd 4, and ends the process when
// fd 3 closes. It returns only if it cannot begin.
func (w *Worker) serveSandbox() error {
	in, out := os.NewFile(3, "kagzi-sandbox-requests"), os.NewFile(4, "kagzi-sandbox-replies")
	if in == nil || out == nil {
		return fmt.Errorf("start sandbox worker: %s is set but fd 3 and 4 are not open", sandboxEnv)
	}
	w.cfg.ID = fmt.Sprintf("%s/sandbox-%d", w.cfg.ID, os.Getpid())
	w.log = w.cfg.Logger.With("worker_id", w.cfg.ID, "namespace", w.cfg.Namespace)
	w.startBatchers()
	hbCtx, cancelHeartbeat := context.WithCancel(context.Background())
	// No fetch loops to cancel: Stop, as it does for an executor, gives a run in
	// progress ShutdownGrace, hands it back after, and closes the batchers.
	w.cancelFetch, w.cancelHeartbeat = func() {}, cancelHeartbeat
	w.heartbeats.Add(1)
	go w.heartbeat(hbCtx)
	enc := json.NewEncoder(out)
	if err := enc.Encode(sandboxReply{Ready: true, ID: w.cfg.ID}); err != nil {
		_ = w.Stop(context.Background())
		return fmt.Errorf("start sandbox worker: %w", err)
	}
	w.log.Info("sandbox ready", "pid", os.Getpid())
	reqs := make(chan sandboxRequest)
	go func() {
		defer close(reqs)
		dec := json.NewDecoder(in)
		for {
			var req sandboxRequest
			if dec.Decode(&req) != nil {
				return
			}
			reqs <- req
		}
	}()
	exit := func() {
		_ = w.Stop(context.Background())
		os.Exit(0)
	}
	for req := range reqs {
		def, ok := w.defs[req.Workflow]
		if !ok {
			_ = enc.Encode(sandboxReply{Claim: claimFailed, Error: fmt.Sprintf("workflow %q not registered in the sandbox", req.Workflow)})
			continue
		}
		run, ok, claimSent, err := w.claimTask(def, req.Task)
		switch {
		case err != nil:
			_ = enc.Encode(sandboxReply{Claim: claimFailed, Error: err.Error()})
			continue
		case !ok:
			_ = enc.Encode(sandboxReply{Claim: claimNoop})
			continue
		}
		if err := enc.Encode(sandboxReply{Claim: claimOK}); err != nil {
			exit() // the executor is gone: the run's lease lapses, or its successor ends it
		}
		done := make(chan struct{})
		w.runs.Add(1)
		go func() {
			defer w.runs.Done()
			defer close(done)
			w.execute(def, run, claimSent, func() {})
		}()
		select {
		case <-done:
		case <-reqs:
			exit() // fd 3 closed mid-run: the executor stops (or died)
		}
		// Only ending the process stops a body that ignores its context.
		retire := w.metrics.abandoned.Load() > 0
		if err := enc.Encode(sandboxReply{Done: true, Retire: retire}); err != nil || retire {
			exit()
		}
	}
	exit()
	return nil
}
