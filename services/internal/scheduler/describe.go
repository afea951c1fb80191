package scheduler

import (
	"context"
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
