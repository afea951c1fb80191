package scheduler

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/failpoint"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/telemetry"
)

// Start results, the values of kagzi_starts_total{result}.
const (
	resultCreated  = "created"
	resultExisting = "existing"
	resultInvalid  = "invalid"
	resultTooLarge = "too_large"
	resultConflict = "conflict"
	resultDenied   = "denied"
	// resultLimited: a child start refused by Limits.MaxDepth or Limits.MaxTreeRuns.
	resultLimited = "limit_exceeded"
	// resultOverloaded and resultRateLimited: refused unprocessed because the
	// namespace's queue was full, or the namespace over its rate (wire code overloaded).
	resultOverloaded  = "overloaded"
	resultRateLimited = "rate_limited"
	resultError       = "error"
)

// decodeStrict parses exactly one JSON object into v: no unknown fields, nothing after
// it. Anything looser would let a typo in a field name silently change a start.
func decodeStrict(kind string, data []byte, v any) error {
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return wire.Errorf(wire.ErrInvalidArgument, "%s body must be a JSON object", kind)
	}
	// encoding/json turns bytes that are not UTF-8 into U+FFFD, so an idempotency key
	// would be stored as something other than what was sent; JSON must be UTF-8 anyway.
	if !utf8.Valid(trimmed) {
		return wire.Errorf(wire.ErrInvalidArgument, "%s body is not valid UTF-8", kind)
	}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return wire.Errorf(wire.ErrInvalidArgument, "%s body: %v", kind, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return wire.Errorf(wire.ErrInvalidArgument, "%s body has data after the JSON object", kind)
	}
	return nil
}

// parseStart validates a start completely before anything is written. The namespace and
// workflow come from the subject (prefix is the start or the submit prefix); a body may
// repeat the namespace but not name another. The returned params have a fresh run id and
// the caller's idempotency key, if any; the caller picks the fallback key, which depends
// on how the start arrived.
func (s *Scheduler) parseStart(prefix, subject string, body []byte) (store.RunInsertParams, wire.StartRequest, error) {
	var req wire.StartRequest
	namespace, workflow, err := wire.ParseStartSubject(prefix, subject)
	if err != nil {
		return store.RunInsertParams{}, req, err
	}
	if err := decodeStrict("start request", body, &req); err != nil {
		return store.RunInsertParams{}, req, err
	}
	if req.Namespace, err = wire.RequestNamespace(namespace, req.Namespace); err != nil {
		return store.RunInsertParams{}, req, err
	}
	if req.IdempotencyKey != "" {
		if err := wire.ValidateKey("idempotency key", req.IdempotencyKey); err != nil {
			return store.RunInsertParams{}, req, err
		}
	}
	if req.RequestID != "" {
		if err := wire.ValidateKey("request id", req.RequestID); err != nil {
			return store.RunInsertParams{}, req, err
		}
	}
	if req.Version != "" {
		if err := wire.ValidateKey("version", req.Version); err != nil {
			return store.RunInsertParams{}, req, err
		}
	}
	if req.Parent != "" && !wire.ValidRunID(req.Parent) {
		return store.RunInsertParams{}, req, wire.Errorf(wire.ErrInvalidArgument, "parent %q is not a run id", req.Parent)
	}
	maxAttempts := req.MaxAttempts
	switch {
	case maxAttempts == 0:
		maxAttempts = s.cfg.DefaultMaxAttempts
	case maxAttempts < 1 || maxAttempts > maxAttemptsCeiling:
		return store.RunInsertParams{}, req, wire.Errorf(wire.ErrInvalidArgument,
			"max_attempts is %d, must be within 1..%d", maxAttempts, maxAttemptsCeiling)
	}
	input := []byte("null")
	if len(req.Input) > 0 {
		// Compacted so that a retry whose JSON differs only in whitespace is the same
		// input to the idempotency check. The decoder has already proved it valid JSON.
		var buf bytes.Buffer
		if err := json.Compact(&buf, req.Input); err != nil {
			return store.RunInsertParams{}, req, wire.Errorf(wire.ErrInvalidArgument, "input is not valid JSON: %v", err)
		}
		input = buf.Bytes()
	}
	if len(input) > s.cfg.Limits.MaxInputBytes {
		return store.RunInsertParams{}, req, wire.Errorf(wire.ErrPayloadTooLarge,
			"input is %d bytes, over the limit of %d", len(input), s.cfg.Limits.MaxInputBytes)
	}
	// A request id that is a canonical UUID becomes the run's id: a client sealing the
	// input with a codec binds it to that id before the run exists.
	id := wire.NewRunID()
	if wire.ValidRunID(req.RequestID) {
		id = req.RequestID
	}
	return store.RunInsertParams{
		ID:             id,
		Namespace:      req.Namespace,
		Workflow:       workflow,
		Version:        req.Version,
		Input:          input,
		IdempotencyKey: req.IdempotencyKey,
		MaxAttempts:    maxAttempts,
	}, req, nil
}

// resultOf names the outcome of a failed start for the metric.
func resultOf(err error) string {
	switch {
	case errors.Is(err, wire.ErrPayloadTooLarge):
		return resultTooLarge
	case errors.Is(err, wire.ErrIdempotencyConflict):
		return resultConflict
	case errors.Is(err, wire.ErrInvalidArgument):
		return resultInvalid
	case errors.Is(err, wire.ErrPermissionDenied):
		return resultDenied
	case errors.Is(err, wire.ErrLimitExceeded):
		return resultLimited
	case errors.Is(err, wire.ErrRunNotFound):
		return resultInvalid // the parent named is not in the namespace
	default:
		return resultError
	}
}

// insert commits the run. A store failure that is not one of ours (PostgreSQL down, a
// timeout) is logged here with its detail and returned as ErrUnavailable, so callers see
// a retryable code and no SQL. A start from a step of a run (parent set) joins its
// parent's tree and is checked against the tree's limits; it skips the group commit,
// which has no use for lineage.
func (s *Scheduler) insert(ctx context.Context, p store.RunInsertParams, parent wire.RunID) (store.RunInsertResult, error) {
	var res store.RunInsertResult
	var err error
	if parent != "" {
		res, err = s.st.RunInsertChild(ctx, store.RunInsertChildParams{RunInsertParams: p, Parent: parent,
			MaxDepth: s.cfg.Limits.MaxDepth, MaxTreeRuns: s.cfg.Limits.MaxTreeRuns})
	} else {
		r, ok := s.inserts.Do(p)
		res, err = r.RunInsertResult, r.Err
		if !ok {
			err = errors.New("scheduler stopping")
		}
	}
	if err == nil {
		err = failpoint.Inject(failpoint.StartAfterInsert)
	}
	if err == nil || errors.Is(err, wire.ErrIdempotencyConflict) || errors.Is(err, wire.ErrLimitExceeded) ||
		errors.Is(err, wire.ErrRunNotFound) {
		return res, err
	}
	s.log.Error("insert run", telemetry.RunID(p.ID), telemetry.Workflow(p.Workflow), telemetry.Namespace(p.Namespace), zap.Error(err))
	return res, wire.Errorf(wire.ErrUnavailable, "the start could not be recorded; retry it with the same idempotency key or request id")
}

// announce publishes the doorbell of a QUEUED run. Existing runs are announced too: a
// retried start may be the only sign that the first doorbell was lost, and a repeat of
// the same dispatch is dropped by the stream's de-duplication or claims nothing.
func (s *Scheduler) announce(ctx context.Context, res store.RunInsertResult) {
	if res.Status != wire.StatusQueued {
		return
	}
	err := s.b.PublishTasks(ctx, []bus.Doorbell{{
		Namespace: res.Namespace, Workflow: res.Workflow,
		Task: wire.Task{RunID: res.RunID, DispatchSeq: res.DispatchSeq},
	}})
	if err != nil {
		s.m.PublishFailures.Inc()
		s.log.Warn("publish task doorbell; the reconciler will relay it",
			telemetry.RunID(res.RunID), telemetry.Workflow(res.Workflow), telemetry.Namespace(res.Namespace), zap.Error(err))
	}
}

// handleStart serves kagzi.start.<namespace>.<workflow>: validate, commit, reply, then
// announce.
func (s *Scheduler) handleStart(ctx context.Context, msg *nats.Msg) {
	began := time.Now()
	p, req, err := s.parseStart(wire.StartSubjectPrefix, msg.Subject, msg.Data)
	if err != nil {
		s.m.Starts.WithLabelValues(resultOf(err)).Inc()
		s.logRejected("start rejected", msg.Subject, err)
		s.reply(msg, wire.StartReply{Error: wire.ToError(err)})
		return
	}
	if p.IdempotencyKey == "" {
		switch {
		case req.RequestID != "":
			p.IdempotencyKey = "request:" + req.RequestID
		default:
			p.IdempotencyKey = "run:" + p.ID
		}
	}
	res, err := s.insert(ctx, p, req.Parent)
	if err != nil {
		// An idempotency conflict names the other run only in its message: the caller
		// must not take it for its own.
		s.m.Starts.WithLabelValues(resultOf(err)).Inc()
		s.reply(msg, wire.StartReply{Error: wire.ToError(err)})
		return
	}
	s.reply(msg, wire.StartReply{RunID: res.RunID, Existing: res.Existing})
	s.m.StartSeconds.WithLabelValues("request").Observe(time.Since(began).Seconds())
	if res.Existing {
		s.m.Starts.WithLabelValues(resultExisting).Inc()
	} else {
		s.m.Starts.WithLabelValues(resultCreated).Inc()
		s.log.Debug("run started", telemetry.RunID(res.RunID), telemetry.Workflow(res.Workflow), telemetry.Namespace(res.Namespace))
	}
	s.announce(ctx, res)
}

// logRejected logs a refused request: a namespace mismatch at warn, since it is a
// client trying to reach past its subject (or a misconfigured one), bad input at debug.
func (s *Scheduler) logRejected(what, subject string, err error) {
	level := zap.DebugLevel
	if errors.Is(err, wire.ErrPermissionDenied) {
		level = zap.WarnLevel
	}
	s.log.Log(level, what, zap.String("subject", subject), zap.Error(err))
}

func (s *Scheduler) reply(msg *nats.Msg, v any) {
	if msg.Reply == "" {
		return // published without a reply inbox: nobody is waiting
	}
	data, err := json.Marshal(v)
	if err != nil {
		s.log.Error("encode reply", zap.Error(err))
		return
	}
	if err := msg.Respond(data); err != nil {
		s.log.Warn("send reply", zap.String("subject", msg.Subject), zap.Error(err))
	}
}

// consumeSubmits pulls the submit stream for as long as the scheduler runs, re-creating
// the consumer (and the streams) whenever the iterator fails: a deleted consumer, a lost
// stream or missed heartbeats all end here.
func (s *Scheduler) consumeSubmits() {
	defer s.wg.Done()
	inflight := make(chan struct{}, submitInFlight)
	// Handlers run on their own goroutines; fill the semaphore on the way out so none
	// outlives this function.
	defer func() {
		for range submitInFlight {
			inflight <- struct{}{}
		}
	}()
	failures := 0
	for !s.stopRequested() {
		it, err := s.openSubmits()
		if err != nil {
			failures++
			s.m.EnsureFailures.Inc()
			s.log.Warn("open submit stream consumer", zap.Error(err), zap.Duration("retry_in", backoff(failures)))
			if !s.sleep(backoff(failures)) {
				return
			}
			continue
		}
		if it == nil {
			return // Stop came first
		}
		for {
			msg, err := it.Next()
			if err != nil {
				it.Stop()
				if !s.stopRequested() {
					failures++
					s.log.Warn("submit stream consumer stopped; reopening", zap.Error(err))
					s.sleep(backoff(failures))
				}
				break
			}
			failures = 0
			inflight <- struct{}{}
			go func() {
				defer func() { <-inflight }()
				ctx, cancel := context.WithTimeout(s.runCtx, opTimeout)
				defer cancel()
				s.handleSubmit(ctx, msg)
			}()
		}
	}
}

// openSubmits ensures the consumer (and, when that fails, the streams) and starts a pull
// iterator. It returns nil, nil when Stop has begun, so Stop never misses an iterator.
func (s *Scheduler) openSubmits() (jetstream.MessagesContext, error) {
	ctx, cancel := context.WithTimeout(s.runCtx, opTimeout)
	defer cancel()
	cons, err := s.b.EnsureSubmitConsumer(ctx, s.cfg.SubmitConsumer)
	if err != nil {
		if serr := s.b.EnsureStreams(ctx); serr != nil {
			return nil, errors.Join(err, serr)
		}
		if cons, err = s.b.EnsureSubmitConsumer(ctx, s.cfg.SubmitConsumer); err != nil {
			return nil, err
		}
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(submitBatch), jetstream.WithMessagesErrOnMissingHeartbeat(true))
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == 2 {
		it.Stop()
		return nil, nil
	}
	s.submits = it
	return it, nil
}

// handleSubmit commits one start from the submit stream and acks it only after the
// commit. Bad input is terminated at once (it can never succeed); a store failure is
// redelivered.
func (s *Scheduler) handleSubmit(ctx context.Context, msg jetstream.Msg) {
	began := time.Now()
	p, req, err := s.parseStart(wire.SubmitSubjectPrefix, msg.Subject(), msg.Data())
	if err != nil {
		s.terminate(msg, err)
		return
	}
	if p.IdempotencyKey == "" {
		p.IdempotencyKey, err = submitKey(req, msg)
		if err != nil {
			s.terminate(msg, err)
			return
		}
	}
	res, err := s.insert(ctx, p, req.Parent)
	switch {
	case errors.Is(err, wire.ErrLimitExceeded), errors.Is(err, wire.ErrRunNotFound):
		// Refused like bad input: the parent's step learns nothing (it submitted), and
		// a redelivery would be refused again.
		s.terminate(msg, err)
		return
	case errors.Is(err, wire.ErrIdempotencyConflict):
		// Not poison, but it can never succeed either; nobody waits for an answer.
		s.m.Starts.WithLabelValues(resultConflict).Inc()
		s.log.Warn("submitted start conflicts with an existing run; dropped",
			telemetry.Workflow(p.Workflow), telemetry.Namespace(p.Namespace), zap.Error(err))
		if err := msg.Term(); err != nil {
			s.log.Warn("terminate submit message", zap.Error(err))
		}
		return
	case err != nil:
		s.m.Starts.WithLabelValues(resultError).Inc()
		if err := msg.NakWithDelay(time.Second); err != nil {
			s.log.Warn("nak submit message", zap.Error(err))
		}
		return
	}
	s.announce(ctx, res)
	if err := msg.Ack(); err != nil {
		// Redelivery finds the run by its key and acks again.
		s.log.Warn("ack submit message", telemetry.RunID(res.RunID), zap.Error(err))
	}
	s.m.StartSeconds.WithLabelValues("submit").Observe(time.Since(began).Seconds())
	if res.Existing {
		s.m.Starts.WithLabelValues(resultExisting).Inc()
	} else {
		s.m.Starts.WithLabelValues(resultCreated).Inc()
		s.log.Debug("run started from submit stream", telemetry.RunID(res.RunID), telemetry.Workflow(res.Workflow), telemetry.Namespace(res.Namespace))
	}
}

// submitKey names a keyless submitted start so that its redeliveries make one run: the
// request id, else the publisher's Nats-Msg-Id, else the message's place in the stream.
// The stream sequence is qualified by the message's store time because a stream that was
// lost and re-created numbers from 1 again.
func submitKey(req wire.StartRequest, msg jetstream.Msg) (string, error) {
	if req.RequestID != "" {
		return "request:" + req.RequestID, nil
	}
	if id := msg.Headers().Get(nats.MsgIdHdr); id != "" {
		key := "msgid:" + id
		if err := wire.ValidateKey("Nats-Msg-Id", key); err != nil {
			return "", err
		}
		return key, nil
	}
	meta, err := msg.Metadata()
	if err != nil {
		return "", wire.Errorf(wire.ErrInvalidArgument, "submit message has no stream metadata: %v", err)
	}
	return "stream:" + strconv.FormatUint(meta.Sequence.Stream, 10) + "@" + strconv.FormatInt(meta.Timestamp.UnixNano(), 10), nil
}

// terminate ends a message that can never be processed: it is not redelivered.
func (s *Scheduler) terminate(msg jetstream.Msg, cause error) {
	s.m.Starts.WithLabelValues(resultOf(cause)).Inc()
	s.m.Poison.WithLabelValues("submit").Inc()
	s.log.Warn("poison submit message terminated", zap.String("subject", msg.Subject()), zap.Error(cause))
	if err := msg.TermWithReason(cause.Error()); err != nil {
		s.log.Warn("terminate submit message", zap.Error(err))
	}
}
