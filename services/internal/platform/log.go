package platform

import (
	"context"
	"fmt"
	"log/slog"
	"runtime"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// NewLogger builds the process's zap logger. JSON is for machines (the services in
// production); console is for people (kagzi dev, kagzi migrate).
func NewLogger(cfg LogConfig, out zapcore.WriteSyncer) (*zap.Logger, error) {
	var enc zapcore.Encoder
	switch cfg.Format {
	case "", "json":
		ec := zap.NewProductionEncoderConfig()
		ec.EncodeTime = zapcore.RFC3339NanoTimeEncoder
		enc = zapcore.NewJSONEncoder(ec)
	case "console":
		ec := zap.NewDevelopmentEncoderConfig()
		ec.EncodeTime = zapcore.TimeEncoderOfLayout("15:04:05.000")
		ec.CallerKey = "" // file:line of every line is noise for a person at a terminal
		enc = zapcore.NewConsoleEncoder(ec)
	default:
		return nil, fmt.Errorf("log format %q: want json or console", cfg.Format)
	}
	core := zapcore.NewCore(enc, out, zap.NewAtomicLevelAt(cfg.Level))
	return zap.New(core, zap.AddCaller(), zap.AddStacktrace(zapcore.DPanicLevel)), nil
}

// NewSlog gives the SDK, which takes a *slog.Logger so that users are not made to adopt
// zap, a logger that writes through l: one format, one level and one output per process.
func NewSlog(l *zap.Logger) *slog.Logger {
	return slog.New(&slogHandler{core: l.Core(), name: l.Name()})
}

// slogHandler is a slog.Handler over a zap core. slog groups become zap namespaces; a
// group is opened only when a record or WithAttrs puts something in it, as slog requires.
type slogHandler struct {
	core   zapcore.Core
	name   string
	groups []string // opened by WithGroup, not yet written as namespaces
}

func zapLevel(l slog.Level) zapcore.Level {
	switch {
	case l >= slog.LevelError:
		return zapcore.ErrorLevel
	case l >= slog.LevelWarn:
		return zapcore.WarnLevel
	case l >= slog.LevelInfo:
		return zapcore.InfoLevel
	default:
		return zapcore.DebugLevel
	}
}

func (h *slogHandler) Enabled(_ context.Context, l slog.Level) bool {
	return h.core.Enabled(zapLevel(l))
}

func (h *slogHandler) Handle(_ context.Context, r slog.Record) error {
	ent := zapcore.Entry{
		Level:      zapLevel(r.Level),
		Time:       r.Time,
		Message:    r.Message,
		LoggerName: h.name,
	}
	if r.PC != 0 {
		f, _ := runtime.CallersFrames([]uintptr{r.PC}).Next()
		ent.Caller = zapcore.NewEntryCaller(f.PC, f.File, f.Line, true)
	}
	ce := h.core.Check(ent, nil)
	if ce == nil {
		return nil
	}
	fields := make([]zapcore.Field, 0, r.NumAttrs()+len(h.groups))
	if r.NumAttrs() > 0 {
		for _, g := range h.groups {
			fields = append(fields, zap.Namespace(g))
		}
	}
	r.Attrs(func(a slog.Attr) bool {
		fields = appendAttr(fields, a)
		return true
	})
	ce.Write(fields...)
	return nil
}

func (h *slogHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	if len(attrs) == 0 {
		return h
	}
	fields := make([]zapcore.Field, 0, len(attrs)+len(h.groups))
	for _, g := range h.groups {
		fields = append(fields, zap.Namespace(g))
	}
	for _, a := range attrs {
		fields = appendAttr(fields, a)
	}
	return &slogHandler{core: h.core.With(fields), name: h.name}
}

func (h *slogHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	groups := make([]string, len(h.groups), len(h.groups)+1)
	copy(groups, h.groups)
	return &slogHandler{core: h.core, name: h.name, groups: append(groups, name)}
}

func appendAttr(fields []zapcore.Field, a slog.Attr) []zapcore.Field {
	a.Value = a.Value.Resolve()
	if a.Equal(slog.Attr{}) {
		return fields
	}
	v := a.Value
	switch v.Kind() {
	case slog.KindString:
		return append(fields, zap.String(a.Key, v.String()))
	case slog.KindInt64:
		return append(fields, zap.Int64(a.Key, v.Int64()))
	case slog.KindUint64:
		return append(fields, zap.Uint64(a.Key, v.Uint64()))
	case slog.KindFloat64:
		return append(fields, zap.Float64(a.Key, v.Float64()))
	case slog.KindBool:
		return append(fields, zap.Bool(a.Key, v.Bool()))
	case slog.KindDuration:
		return append(fields, zap.Duration(a.Key, v.Duration()))
	case slog.KindTime:
		return append(fields, zap.Time(a.Key, v.Time()))
	case slog.KindGroup:
		attrs := v.Group()
		if len(attrs) == 0 {
			return fields
		}
		if a.Key == "" { // slog inlines a group without a key
			for _, ga := range attrs {
				fields = appendAttr(fields, ga)
			}
			return fields
		}
		return append(fields, zap.Object(a.Key, groupMarshaler(attrs)))
	default:
		if err, ok := v.Any().(error); ok {
			return append(fields, zap.NamedError(a.Key, err))
		}
		return append(fields, zap.Any(a.Key, v.Any()))
	}
}

type groupMarshaler []slog.Attr

func (g groupMarshaler) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	var fields []zapcore.Field
	for _, a := range g {
		fields = appendAttr(fields, a)
	}
	for _, f := range fields {
		f.AddTo(enc)
	}
	return nil
}
