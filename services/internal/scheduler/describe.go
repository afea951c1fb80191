package scheduler

import (
	"context"
	"errors"

	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/telemetry"
)

// handleDescribe serves kagzi.api.describe: one run and its steps, read from PostgreSQL.
func (s *Scheduler) handleDescribe(ctx context.Context, msg *nats.Msg) {
	var req wire.DescribeRequest
	if err := decodeStrict("describe request", msg.Data, &req); err != nil {
		s.m.Describes.WithLabelValues(resultInvalid).Inc()
		s.reply(msg, wire.DescribeReply{Error: wire.ToError(err)})
		return
	}
	if req.Namespace == "" {
		req.Namespace = s.cfg.DefaultNamespace
	}
	if err := wire.ValidateName("namespace", req.Namespace); err != nil {
		s.m.Describes.WithLabelValues(resultInvalid).Inc()
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
