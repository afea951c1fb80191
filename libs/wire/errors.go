package wire

import (
	"errors"
	"fmt"
)

// Sentinel errors that callers act on. Errors crossing NATS keep their meaning through
// Code, so errors.Is works on both sides of the wire.
var (
	ErrInvalidArgument     = errors.New("invalid argument")
	ErrPayloadTooLarge     = errors.New("payload too large")
	ErrRunNotFound         = errors.New("run not found")
	ErrLeaseLost           = errors.New("lease lost")
	ErrIdempotencyConflict = errors.New("idempotency key reused with a different input")
	ErrUnknownWorkflow     = errors.New("unknown workflow")
	ErrNonDeterminism      = errors.New("nondeterminism")
	ErrLimitExceeded       = errors.New("limit exceeded")
	ErrUnavailable         = errors.New("unavailable")
	// ErrPermissionDenied: the caller may not do this, e.g. a request whose body names
	// another namespace than the subject its identity was allowed to publish on.
	ErrPermissionDenied = errors.New("permission denied")
	// ErrOverloaded: the server refused the request unprocessed because its queue was
	// full. Nothing was done; retry with the same request id after a backoff.
	ErrOverloaded   = errors.New("overloaded")
	ErrSchemaTooOld = errors.New("database schema is older than this binary")
)

// Code names an error class on the wire.
type Code string

// Wire error codes, one per sentinel, plus CodeInternal for everything else.
const (
	CodeInvalidArgument     Code = "invalid_argument"
	CodePayloadTooLarge     Code = "payload_too_large"
	CodeNotFound            Code = "not_found"
	CodeIdempotencyConflict Code = "idempotency_conflict"
	CodeUnknownWorkflow     Code = "unknown_workflow"
	CodeNonDeterminism      Code = "nondeterminism"
	CodeLimitExceeded       Code = "limit_exceeded"
	CodeUnavailable         Code = "unavailable"
	CodePermissionDenied    Code = "permission_denied"
	CodeOverloaded          Code = "overloaded"
	CodeInternal            Code = "internal"
)

var codeSentinels = []struct {
	code Code
	err  error
}{
	{CodeInvalidArgument, ErrInvalidArgument},
	{CodePayloadTooLarge, ErrPayloadTooLarge},
	{CodeNotFound, ErrRunNotFound},
	{CodeIdempotencyConflict, ErrIdempotencyConflict},
	{CodeUnknownWorkflow, ErrUnknownWorkflow},
	{CodeNonDeterminism, ErrNonDeterminism},
	{CodeLimitExceeded, ErrLimitExceeded},
	{CodeUnavailable, ErrUnavailable},
	{CodePermissionDenied, ErrPermissionDenied},
	{CodeOverloaded, ErrOverloaded},
}

// Error is an error as it travels in a reply: a stable code and a human message.
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return e.Message }

// Unwrap maps the code back to its sentinel so errors.Is(err, ErrPayloadTooLarge) holds
// for an error that came over the wire.
func (e *Error) Unwrap() error {
	for _, cs := range codeSentinels {
		if cs.code == e.Code {
			return cs.err
		}
	}
	return nil
}

// ToError turns any error into its wire form; nil stays nil.
func ToError(err error) *Error {
	if err == nil {
		return nil
	}
	var we *Error
	if errors.As(err, &we) {
		return &Error{Code: we.Code, Message: err.Error()}
	}
	for _, cs := range codeSentinels {
		if errors.Is(err, cs.err) {
			return &Error{Code: cs.code, Message: err.Error()}
		}
	}
	return &Error{Code: CodeInternal, Message: err.Error()}
}

// Errorf wraps a sentinel with context, in the form every package uses for bad input.
func Errorf(sentinel error, format string, args ...any) error {
	return fmt.Errorf("%w: %s", sentinel, fmt.Sprintf(format, args...))
}
