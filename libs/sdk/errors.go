package sdk

import (
	"errors"
	"fmt"

	"github.com/kagzi/kagzi/libs/wire"
)

// Errors callers act on. They match errors that crossed NATS too.
var (
	ErrRunNotFound         = wire.ErrRunNotFound
	ErrPayloadTooLarge     = wire.ErrPayloadTooLarge
	ErrIdempotencyConflict = wire.ErrIdempotencyConflict
	ErrInvalidArgument     = wire.ErrInvalidArgument
	ErrNonDeterminism      = wire.ErrNonDeterminism
	ErrLimitExceeded       = wire.ErrLimitExceeded
	ErrLeaseLost           = wire.ErrLeaseLost
	// ErrStepTimeout is the error of a step whose body outlived its StepTimeout.
	ErrStepTimeout = errors.New("step timed out")
)

type terminalError struct{ err error }

func (e *terminalError) Error() string { return e.err.Error() }
func (e *terminalError) Unwrap() error { return e.err }

// Terminal marks an error as final: a workflow that returns it ends FAILED at once
// instead of being retried.
func Terminal(err error) error {
	if err == nil {
		return nil
	}
	return &terminalError{err: err}
}

// IsTerminal reports whether err was marked with Terminal (or is a limit or
// non-determinism error, which no retry can fix).
func IsTerminal(err error) bool {
	var t *terminalError
	return errors.As(err, &t) || errors.Is(err, wire.ErrPayloadTooLarge) ||
		errors.Is(err, wire.ErrLimitExceeded) || errors.Is(err, wire.ErrNonDeterminism)
}

// RunFailedError is what Result returns for a run that ended FAILED or CANCELLED.
type RunFailedError struct {
	RunID   string
	Status  wire.Status
	Attempt int
	Message string
}

func (e *RunFailedError) Error() string {
	return fmt.Sprintf("run %s %s after %d attempt(s): %s", e.RunID, e.Status, e.Attempt, e.Message)
}
