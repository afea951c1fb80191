package wire

import (
	"unicode/utf8"
)

// Limits bound what a run may hold. They are checked before anything is written, and a
// value over a limit is a terminal error, never retried.
type Limits struct {
	MaxInputBytes      int // a start's input
	MaxStepOutputBytes int // one step's recorded output
	MaxRunStateBytes   int // input plus every recorded output of one run
	MaxSteps           int // recorded steps (and sleeps) of one run
	// MaxDepth bounds how deep a tree of runs started from steps grows: a root run has
	// depth 0, a run its step starts depth 1, and so on.
	MaxDepth int
	// MaxTreeRuns bounds the unfinished runs (QUEUED, RUNNING, SLEEPING, WAITING) of one
	// tree below its root: a start that would exceed it is refused.
	MaxTreeRuns int
}

// DefaultLimits are the limits used when none are configured.
func DefaultLimits() Limits {
	return Limits{
		MaxInputBytes:      512 << 10,
		MaxStepOutputBytes: 2 << 20,
		MaxRunStateBytes:   32 << 20,
		MaxSteps:           10_000,
		MaxDepth:           10,
		MaxTreeRuns:        10_000,
	}
}

// OrDefaults is l with every field that is zero or less taken from DefaultLimits, so a
// caller may set one limit and keep the rest.
func (l Limits) OrDefaults() Limits {
	d := DefaultLimits()
	for _, f := range []struct{ v, d *int }{
		{&l.MaxInputBytes, &d.MaxInputBytes}, {&l.MaxStepOutputBytes, &d.MaxStepOutputBytes},
		{&l.MaxRunStateBytes, &d.MaxRunStateBytes}, {&l.MaxSteps, &d.MaxSteps},
		{&l.MaxDepth, &d.MaxDepth}, {&l.MaxTreeRuns, &d.MaxTreeRuns},
	} {
		if *f.v <= 0 {
			*f.v = *f.d
		}
	}
	return l
}

// MaxNameBytes bounds workflow names, namespaces, step keys and idempotency keys.
const MaxNameBytes = 255

// ValidateName checks a name that becomes a NATS subject token (workflow, namespace):
// 1–255 bytes of ASCII letters, digits, '_' and '-'. Anything else ('.', '*', '>',
// whitespace, control bytes) could change the meaning of a subject.
func ValidateName(kind, name string) error {
	if name == "" {
		return Errorf(ErrInvalidArgument, "%s name is empty", kind)
	}
	if len(name) > MaxNameBytes {
		return Errorf(ErrInvalidArgument, "%s name is %d bytes, over the limit of %d", kind, len(name), MaxNameBytes)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-') {
			return Errorf(ErrInvalidArgument, "%s name %q has a byte outside [A-Za-z0-9_-] at offset %d", kind, name, i)
		}
	}
	return nil
}

// ValidateKey checks a free-form key stored as text (step key, idempotency key): non-empty,
// at most 255 bytes, valid UTF-8 without NUL (PostgreSQL text cannot hold either).
func ValidateKey(kind, key string) error {
	if key == "" {
		return Errorf(ErrInvalidArgument, "%s is empty", kind)
	}
	if len(key) > MaxNameBytes {
		return Errorf(ErrInvalidArgument, "%s is %d bytes, over the limit of %d", kind, len(key), MaxNameBytes)
	}
	if !utf8.ValidString(key) {
		return Errorf(ErrInvalidArgument, "%s is not valid UTF-8", kind)
	}
	for i := 0; i < len(key); i++ {
		if key[i] == 0 {
			return Errorf(ErrInvalidArgument, "%s contains a NUL byte", kind)
		}
	}
	return nil
}
