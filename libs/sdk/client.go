package sdk

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/wire"
)

// RunInfo is a run and its recorded steps, as Describe returns it.
type RunInfo = wire.RunInfo

// Client starts runs and reads their state over NATS. It needs no database access, so it
// can live in any service (or be written in any language: the wire format is JSON).
type Client struct {
	nc        *nats.Conn
	namespace string
	timeout   time.Duration
	limits    wire.Limits
	pl        payloads
	submits   submits
}

// ClientOption configures a Client.
type ClientOption func(*Client)

// WithNamespace sets the namespace runs are started in and read from (default "default").
func WithNamespace(ns string) ClientOption { return func(c *Client) { c.namespace = ns } }

// WithRequestTimeout bounds one request to the scheduler (default 10s). Start retries a
// timed-out request with the same request id, so a retry never makes a second run.
func WithRequestTimeout(d time.Duration) ClientOption { return func(c *Client) { c.timeout = d } }

// WithCodec seals inputs and opens outputs with the codec the workers use.
func WithCodec(c Codec) ClientOption { return func(cl *Client) { cl.pl = payloads{codec: c} } }

// NewClient returns a client on an open NATS connection.
func NewClient(nc *nats.Conn, opts ...ClientOption) *Client {
	c := &Client{nc: nc, namespace: wire.DefaultNamespace, timeout: 10 * time.Second, limits: wire.DefaultLimits()}
	for _, o := range opts {
		o(c)
	}
	return c
}

// StartOption configures one start.
type StartOption func(*wire.StartRequest)

// IdempotencyKey makes the start idempotent: starting again with the same key (and the
// same input) returns the run the first start made. The same key with another input is
// ErrIdempotencyConflict.
func IdempotencyKey(key string) StartOption {
	return func(r *wire.StartRequest) { r.IdempotencyKey = key }
}

// MaxAttempts bounds the run's attempts (default 5). An exhausted run ends FAILED.
func MaxAttempts(n int) StartOption { return func(r *wire.StartRequest) { r.MaxAttempts = n } }

// Run is a handle on a started run with a typed result.
type Run[O any] struct {
	ID     string
	client *Client
	// early listens for the run's done notice since before the run existed (Start makes
	// it); the first Result takes it.
	early atomic.Pointer[doneWatch]
}

// doneWatch is a subscription to one run's done notice.
type doneWatch struct {
	sub     *nats.Subscription
	notices chan *nats.Msg
}

// watchDone subscribes to the done notice of a run of this client's namespace.
func (c *Client) watchDone(runID string) (*doneWatch, error) {
	w := &doneWatch{notices: make(chan *nats.Msg, 1)}
	sub, err := c.nc.ChanSubscribe(wire.DoneSubject(c.namespace, runID), w.notices)
	if err != nil {
		return nil, err
	}
	_ = sub.AutoUnsubscribe(1) // a run ends once; the buffer holds its notice
	w.sub = sub
	return w, nil
}

// stop ends the subscription; a nil watch has none.
func (w *doneWatch) stop() {
	if w != nil {
		_ = w.sub.Unsubscribe()
	}
}

// Start starts a run of the workflow and returns once the scheduler has committed it.
//
// It listens for the run's done notice before it sends the start: the run cannot end
// unheard, so Result need not read the run first to learn whether it ended before
// Result listened (one round trip through a scheduler and the database fewer). The
// subscription ends with the notice, with Result, or when the Run is dropped.
func (d *WorkflowDef[I, O]) Start(ctx context.Context, c *Client, in I, opts ...StartOption) (*Run[O], error) {
	req, err := c.startRequest(ctx, d.name, in, opts)
	if err != nil {
		return nil, err
	}
	// Without a watch (the subscription failed), Result reads the run first, as Wait does.
	watch, _ := c.watchDone(req.RequestID)
	id, err := c.sendStart(ctx, d.name, req)
	if err != nil {
		watch.stop()
		return nil, err
	}
	r := &Run[O]{ID: id, client: c}
	switch {
	case watch == nil:
	case id != req.RequestID:
		watch.stop() // the idempotency key named an earlier run: not the one watched
	default:
		r.early.Store(watch)
		runtime.AddCleanup(r, (*doneWatch).stop, watch)
	}
	return r, nil
}

// Result waits for the run to finish and returns its output; a run that ended FAILED or
// CANCELLED gives a *RunFailedError.
func (r *Run[O]) Result(ctx context.Context) (O, error) {
	var out O
	info, err := r.client.wait(ctx, r.ID, true, r.early.Swap(nil))
	if err != nil {
		return out, err
	}
	if info.Status != wire.StatusCompleted {
		return out, &RunFailedError{RunID: info.ID, Status: info.Status, Attempt: info.Attempt, Message: info.Error}
	}
	if r.client.pl.enabled() && bytes.HasPrefix(info.Output, []byte(`"`+envelopePrefix)) {
		return out, fmt.Errorf("output of run %s: %w", r.ID, ErrCodec) // Describe could not open it
	}
	if err := json.Unmarshal(info.Output, &out); err != nil {
		return out, fmt.Errorf("decode output of run %s: %w", r.ID, err)
	}
	return out, nil
}

// Describe reads the run and its steps.
func (r *Run[O]) Describe(ctx context.Context) (*RunInfo, error) { return r.client.Describe(ctx, r.ID) }

// StartByName starts a run of the named workflow with any JSON-encodable input. It
// returns the run id once the run row is committed. A request that times out is retried
// with the same request id until ctx ends, so at most one run is made.
func (c *Client) StartByName(ctx context.Context, workflow string, input any, opts ...StartOption) (string, error) {
	req, err := c.startRequest(ctx, workflow, input, opts)
	if err != nil {
		return "", err
	}
	return c.sendStart(ctx, workflow, req)
}

// sendStart sends a built start request to a scheduler and returns the run's id.
func (c *Client) sendStart(ctx context.Context, workflow string, req wire.StartRequest) (string, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return "", fmt.Errorf("encode start request: %w", err)
	}
	var reply wire.StartReply
	if err := c.request(ctx, wire.StartSubject(req.Namespace, workflow), body, &reply); err != nil {
		return "", fmt.Errorf("start %s: %w", workflow, err)
	}
	if reply.Error != nil {
		return "", fmt.Errorf("start %s: %w", workflow, reply.Error)
	}
	return reply.RunID, nil
}

// startRequest validates a start and builds its request, sealing the input when the
// client has a codec. A start made with the context of a run in the client's namespace
// (a step body's, typically) names that run as its parent: the scheduler refuses it with
// ErrLimitExceeded when the run's tree is too deep or holds too many unfinished runs. A
// start into another namespace begins a tree of its own there.
func (c *Client) startRequest(ctx context.Context, workflow string, input any, opts []StartOption) (wire.StartRequest, error) {
	if err := wire.ValidateName("workflow", workflow); err != nil {
		return wire.StartRequest{}, err
	}
	// The namespace becomes a subject token: a name outside the safe alphabet must not
	// reach NATS.
	if err := wire.ValidateName("namespace", c.namespace); err != nil {
		return wire.StartRequest{}, err
	}
	data, err := json.Marshal(input)
	if err != nil {
		return wire.StartRequest{}, wire.Errorf(wire.ErrInvalidArgument, "encode input: %v", err)
	}
	if len(data) > c.limits.MaxInputBytes {
		return wire.StartRequest{}, wire.Errorf(wire.ErrPayloadTooLarge, "input is %d bytes, over the limit of %d", len(data), c.limits.MaxInputBytes)
	}
	// The request id is a UUIDv7 and becomes the run's id, so the input can be sealed
	// to the run before it exists.
	req := wire.StartRequest{Namespace: c.namespace, RequestID: wire.NewRunID()}
	if p, ok := parentOf(ctx); ok && p.namespace == c.namespace {
		req.Parent = p.id
	}
	for _, o := range opts {
		o(&req)
	}
	if req.IdempotencyKey != "" {
		// Before encoding: encoding/json would turn bytes that are not UTF-8 into U+FFFD,
		// and the run would be keyed by something other than what the caller passed.
		if err := wire.ValidateKey("idempotency key", req.IdempotencyKey); err != nil {
			return wire.StartRequest{}, err
		}
	}
	if req.Input, err = c.pl.seal(data, adInput(req.RequestID)); err != nil {
		return wire.StartRequest{}, err
	}
	return req, nil
}

// Submit starts a run without waiting for a scheduler: the start is published to the
// submit stream, which holds it until a scheduler has committed it (so it works while no
// scheduler is up), and Submit returns once JetStream has stored it; while no stream
// takes it (no Kagzi service has made one yet), it waits, until ctx ends. The returned id is
// the id the new run gets, and this client's Wait and Result wait for it even before a
// scheduler has committed it. With an idempotency key that an earlier start already used,
// no run is made and that id names nothing (Wait then ends with ErrRunNotFound once a
// scheduler has taken the start): use Start to learn the existing run's id.
func (d *WorkflowDef[I, O]) Submit(ctx context.Context, c *Client, in I, opts ...StartOption) (*Run[O], error) {
	id, err := c.SubmitByName(ctx, d.name, in, opts...)
	if err != nil {
		return nil, err
	}
	return &Run[O]{ID: id, client: c}, nil
}

// submitRetryWait spaces the publishes of a submit that found no stream to take it.
const submitRetryWait = 100 * time.Millisecond

// SubmitByName is Submit for a workflow known by name.
func (c *Client) SubmitByName(ctx context.Context, workflow string, input any, opts ...StartOption) (string, error) {
	req, err := c.startRequest(ctx, workflow, input, opts)
	if err != nil {
		return "", err
	}
	body, err := json.Marshal(req)
	if err != nil {
		return "", fmt.Errorf("encode start request: %w", err)
	}
	js, err := jetstream.New(c.nc)
	if err != nil {
		return "", fmt.Errorf("submit %s: %w", workflow, err)
	}
	// The request id doubles as the JetStream de-duplication id, so a retried publish
	// is stored once.
	// Until a service has made the submit stream (none started yet, or a broker that
	// lost it and waits for one to make it again) nobody answers the publish: it is
	// tried again until ctx ends, as Start waits for a scheduler.
	var ack *jetstream.PubAck
	for {
		ack, err = js.Publish(ctx, wire.SubmitSubject(req.Namespace, workflow), body, jetstream.WithMsgID(req.RequestID))
		if !errors.Is(err, jetstream.ErrNoStreamResponse) || !sleepCtx(ctx, submitRetryWait) {
			break
		}
	}
	if err != nil {
		return "", fmt.Errorf("submit %s: %w: %v", workflow, wire.ErrUnavailable, err)
	}
	if !ack.Duplicate {
		c.submits.add(req.RequestID, ack.Sequence)
	}
	return req.RequestID, nil
}

// Describe reads a run and its steps. ErrRunNotFound when the namespace has no such run,
// or none yet: a run this client submitted whose start no scheduler has committed is
// not found either, and says so (Wait waits for it).
func (c *Client) Describe(ctx context.Context, runID string) (*RunInfo, error) {
	info, pending, err := c.describe(ctx, runID)
	if pending {
		return nil, wire.Errorf(wire.ErrRunNotFound, "run %s is submitted and not committed yet", runID)
	}
	return info, err
}

// describe is Describe; pending (with a nil info and error) when the run is this
// client's submit that waits in the submit stream.
func (c *Client) describe(ctx context.Context, runID string) (info *RunInfo, pending bool, err error) {
	if err := wire.ValidateName("namespace", c.namespace); err != nil {
		return nil, false, fmt.Errorf("describe run %s: %w", runID, err)
	}
	body, _ := json.Marshal(wire.DescribeRequest{Namespace: c.namespace, RunID: runID, SubmitSeq: c.submits.get(runID)})
	var reply wire.DescribeReply
	if err := c.request(ctx, wire.DescribeSubject(c.namespace), body, &reply); err != nil {
		return nil, false, fmt.Errorf("describe run %s: %w", runID, err)
	}
	if reply.Pending {
		return nil, true, nil
	}
	c.submits.forget(runID) // committed, or never will be
	if reply.Error != nil {
		return nil, false, fmt.Errorf("describe run %s: %w", runID, reply.Error)
	}
	c.openRun(reply.Run)
	return reply.Run, false, nil
}

// openRun decodes a run's sealed payloads in place. A payload that fails to decode is
// left sealed; Result reports it when it decodes the output.
func (c *Client) openRun(r *RunInfo) {
	if !c.pl.enabled() || r == nil {
		return
	}
	r.Input = c.openPayload(r.Input, adInput(r.ID))
	c.openOutcome(r)
	for i := range r.Steps {
		if r.Steps[i].Kind == wire.StepKindStep {
			r.Steps[i].Output = c.openPayload(r.Steps[i].Output, adStep(r.ID, r.Steps[i].Key))
		}
	}
}

// openOutcome decodes a run's sealed output and error in place.
func (c *Client) openOutcome(r *RunInfo) {
	if !c.pl.enabled() {
		return
	}
	r.Output = c.openPayload(r.Output, adOutput(r.ID))
	r.Error = c.pl.openText(r.Error, adError(r.ID))
}

// openPayload decodes a sealed payload, or returns it as it is when it does not decode.
func (c *Client) openPayload(b []byte, ad []byte) []byte {
	if len(b) == 0 {
		return b
	}
	if plain, err := c.pl.open(b, ad); err == nil {
		return plain
	}
	return b
}

// Wait blocks until the run is finished and returns it. It listens for the run's
// completion notice and reads the run when one arrives; a missed notice costs at most
// the slow re-check interval (a few seconds), never a hot poll. A run this client
// submitted is waited for while its start waits for a scheduler; any other run that does
// not exist is ErrRunNotFound.
func (c *Client) Wait(ctx context.Context, runID string) (*RunInfo, error) {
	return c.wait(ctx, runID, false, nil)
}

// wait is Wait; outcomeOnly takes the outcome a done notice carries instead of reading
// the run again (Result needs nothing else), sparing a round trip through a scheduler
// and the database on the way from the last commit to the caller. early, when set, has
// listened since before the run existed: no notice can have been missed, so the run is
// read only if none comes by the first re-check.
func (c *Client) wait(ctx context.Context, runID string, outcomeOnly bool, early *doneWatch) (*RunInfo, error) {
	if err := wire.ValidateName("namespace", c.namespace); err != nil {
		return nil, fmt.Errorf("wait for run %s: %w", runID, err)
	}
	// The id becomes a subject token too: one that is not a UUID could be a wildcard.
	if !wire.ValidRunID(runID) {
		return nil, wire.Errorf(wire.ErrInvalidArgument, "run id %q is not a UUID", runID)
	}
	watch := early
	if watch == nil {
		var err error
		if watch, err = c.watchDone(runID); err != nil {
			return nil, fmt.Errorf("wait for run %s: %w", runID, err)
		}
	}
	defer watch.stop()
	recheck := 500 * time.Millisecond
	for read := early == nil; ; read = true {
		// Unread, or pending (submitted, not committed yet): waited for as a run in
		// flight, whose done notice or next reading ends the wait.
		info := &RunInfo{ID: runID, Namespace: c.namespace}
		if read {
			got, pending, err := c.describe(ctx, runID)
			if err != nil {
				return nil, err
			}
			if !pending {
				info = got
			}
		}
		if info.Status.Terminal() {
			return info, nil
		}
		t := time.NewTimer(recheck)
		select {
		case m := <-watch.notices:
			if done, ok := outcome(m, info); ok && outcomeOnly {
				t.Stop()
				c.openOutcome(done)
				return done, nil
			}
		case <-t.C:
			recheck = min(recheck*2, 5*time.Second)
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("wait for run %s: %w", runID, ctx.Err())
		}
		t.Stop()
	}
}

// outcome is the run as its done notice reports it, built on what the last read said
// of it: ok only when the notice names this run, a terminal status and the outcome.
func outcome(m *nats.Msg, last *RunInfo) (*RunInfo, bool) {
	var done wire.RunDone
	if err := json.Unmarshal(m.Data, &done); err != nil || done.Result == nil || done.RunID != last.ID || !done.Status.Terminal() {
		return nil, false
	}
	info := *last
	info.Status, info.Attempt = done.Status, done.Result.Attempt
	info.Output, info.Error = done.Result.Output, done.Result.Error
	info.Steps = nil
	return &info, true
}

// Backoff after an overloaded answer: longer than after no answer, since the scheduler
// is up and busy, and jittered, so that the clients it refused together do not return
// together.
const (
	overloadBackoff    = 100 * time.Millisecond
	overloadBackoffMax = 2 * time.Second
)

// request sends a request and decodes the reply, retrying until ctx ends while no
// scheduler answers (none up yet, or one restarting) and while the scheduler answers
// overloaded (it refused the request unprocessed). Every retry sends the same body, so
// a retried start makes at most one run.
func (c *Client) request(ctx context.Context, subject string, body []byte, reply any) error {
	wait, shedWait := 50*time.Millisecond, overloadBackoff
	// uncertain: an attempt may have been processed without its answer reaching us, so
	// giving up must not claim that nothing was done.
	uncertain := false
	for {
		rctx, cancel := context.WithTimeout(ctx, c.timeout)
		msg, err := c.nc.RequestWithContext(rctx, subject, body)
		cancel()
		var delay time.Duration
		switch {
		case err == nil:
			werr, derr := decodeReply(msg.Data, reply)
			if derr != nil {
				return fmt.Errorf("decode reply: %w", derr)
			}
			if werr == nil || werr.Code != wire.CodeOverloaded {
				return nil
			}
			err = werr
			delay = shedWait/2 + rand.N(shedWait/2+1)
			shedWait = min(shedWait*2, overloadBackoffMax)
		case errors.Is(err, nats.ErrNoResponders):
			delay, wait = wait, min(wait*2, time.Second)
		case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
			errors.Is(err, nats.ErrDisconnected) || errors.Is(err, nats.ErrConnectionReconnecting):
			uncertain = true
			delay, wait = wait, min(wait*2, time.Second)
		default:
			if ctx.Err() != nil {
				return giveUp(ctx, err, uncertain)
			}
			return fmt.Errorf("%w: %v", wire.ErrUnavailable, err)
		}
		if ctx.Err() != nil {
			return giveUp(ctx, err, uncertain)
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return giveUp(ctx, err, uncertain)
		}
	}
}

// giveUp is the error of a request whose ctx ended while retrying. When every attempt
// that reached a scheduler was refused as overloaded, nothing was done, and the error
// says so: errors.Is(err, wire.ErrOverloaded).
func giveUp(ctx context.Context, last error, uncertain bool) error {
	if !uncertain && errors.Is(last, wire.ErrOverloaded) {
		return fmt.Errorf("%w (last error: %w)", ctx.Err(), last)
	}
	return fmt.Errorf("%w (last error: %v)", ctx.Err(), last)
}

// decodeReply decodes a start or describe reply into reply, cleared first (a retry
// decodes into the value the refused answer filled), and returns the error it carries.
func decodeReply(data []byte, reply any) (*wire.Error, error) {
	switch r := reply.(type) {
	case *wire.StartReply:
		*r = wire.StartReply{}
		err := json.Unmarshal(data, r)
		return r.Error, err
	case *wire.DescribeReply:
		*r = wire.DescribeReply{}
		err := json.Unmarshal(data, r)
		return r.Error, err
	default:
		return nil, json.Unmarshal(data, reply)
	}
}
