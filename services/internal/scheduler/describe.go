package scheduler

import (
	"context"
	"encoding/json"
	"errors"

	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/telemetry"
)

// handleDescribe serves kagzi.api.<namespace>.describe: one run of that namespace and
// its steps, read from PostgreSQL.
func (s *Scheduler) handleDescribe(ctx context.Context, msg *nats.Msg) {
	req, err := parseDescribe(msg)
	if err != nil {
		s.m.Describes.WithLabelValues(resultOf(err)).Inc()
		s.logRejected("describe rejected", msg.Subject, err)
		s.reply(msg, wire.DescribeReply{Error: wire.ToError(err)})
		return
	}
	run, err := s.st.RunGet(ctx, req.Namespace, req.RunID)
	if errors.Is(err, wire.ErrRunNotFound) && req.SubmitSeq != 0 {
		waiting, werr := s.submitWaiting(ctx, req)
		if werr != nil {
			s.m.Describes.WithLabelValues(resultError).Inc()
			s.log.Warn("read a submitted start for a describe", telemetry.RunID(req.RunID), zap.Error(werr))
			s.reply(msg, wire.DescribeReply{Error: wire.ToError(
				wire.Errorf(wire.ErrUnavailable, "whether run %s is submitted could not be read; retry", req.RunID))})
			return
		}
		if waiting {
			s.m.Describes.WithLabelValues("pending").Inc()
			s.reply(msg, wire.DescribeReply{Pending: true})
			return
		}
		// A scheduler commits a submitted start before it takes it out of the stream:
		// gone from there now, it may have been committed since the read.
		run, err = s.st.RunGet(ctx, req.Namespace, req.RunID)
	}
	switch {
	case errors.Is(err, wire.ErrRunNotFound):
		s.m.Describes.WithLabelValues("not_found").Inc()
		s.reply(msg, wire.DescribeReply{Error: wire.ToError(err)})
	case err != nil:
		s.m.Describes.WithLabelValues(resultError).Inc()
		s.log.Error("describe run", telemetry.RunID(req.RunID), telemetry.Namespace(req.Namespace), zap.Error(err))
		s.reply(msg, wire.DescribeReply{Error: wire.ToError(
			wire.Errorf(wire.ErrUnavailable, "run %s could not be read; retry", req.RunID))})
	default:
		s.m.Describes.WithLabelValues("ok").Inc()
		s.reply(msg, wire.DescribeReply{Run: &run})
	}
}

// submitWaiting says whether the submit stream still holds, at req.SubmitSeq, a start of
// req's namespace whose run would be req.RunID: the run is not committed yet but will be
// (or will be refused, and the start then leaves the stream). A start of another
// namespace says nothing, so that a describe never tells one tenant of another's starts.
func (s *Scheduler) submitWaiting(ctx context.Context, req wire.DescribeRequest) (bool, error) {
	subject, body, ok, err := s.b.SubmittedStart(ctx, req.SubmitSeq)
	if err != nil || !ok {
		return false, err
	}
	namespace, _, err := wire.ParseStartSubject(wire.SubmitSubjectPrefix, subject)
	if err != nil || namespace != req.Namespace {
		return false, nil
	}
	var start struct {
		RequestID string `json:"request_id"`
	}
	return json.Unmarshal(body, &start) == nil && start.RequestID == req.RunID, nil
}

// parseDescribe reads a describe request; its namespace is the subject's.
func parseDescribe(msg *nats.Msg) (wire.DescribeRequest, error) {
	var req wire.DescribeRequest
	namespace, op, err := wire.ParseAPISubject(msg.Subject)
	if err != nil {
		return req, err
	}
	if op != wire.DescribeOp {
		return req, wire.Errorf(wire.ErrInvalidArgument, "unknown API operation %q", op)
	}
	if err := decodeStrict("describe request", msg.Data, &req); err != nil {
		return req, err
	}
	req.Namespace, err = wire.RequestNamespace(namespace, req.Namespace)
	return req, err
}
