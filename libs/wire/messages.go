package wire

import (
	"encoding/json"
	"time"
)

// DefaultNamespace is used when a request names none.
const DefaultNamespace = "default"

// StartRequest asks a scheduler to start a run. It is the JSON body on
// kagzi.start.<namespace>.<workflow> (request-reply) and kagzi.submit.<namespace>.<workflow>
// (JetStream).
type StartRequest struct {
	// Namespace, when set, must be the subject's (else permission_denied); empty takes it.
	Namespace string          `json:"namespace,omitempty"`
	Input     json.RawMessage `json:"input"` // any JSON value; null when absent
	// IdempotencyKey makes the start idempotent: a second start with the same key and
	// input returns the first run; with another input it fails with idempotency_conflict.
	IdempotencyKey string `json:"idempotency_key,omitempty"`
	// RequestID identifies this request so that a retried or redelivered request
	// creates one run. When it is a canonical lower-case UUID it also becomes the run's
	// id (the Go client sends a UUIDv7), so a client can bind a sealed input to the run.
	RequestID   string `json:"request_id,omitempty"`
	Version     string `json:"version,omitempty"`
	MaxAttempts int    `json:"max_attempts,omitempty"` // default 5
	// Parent, when set, is the run (in the same namespace) whose step asks for this
	// start: the new run joins its parent's tree, and the start is refused with
	// limit_exceeded beyond Limits.MaxDepth or Limits.MaxTreeRuns. The Go client sets it
	// for starts made from a step.
	Parent RunID `json:"parent,omitempty"`
}

// StartReply answers a request-reply start: the run id, or an error and no run.
type StartReply struct {
	RunID    RunID  `json:"run_id,omitempty"`
	Existing bool   `json:"existing,omitempty"` // the key already named this run
	Error    *Error `json:"error,omitempty"`
}

// Task is a doorbell: it carries ids only. PostgreSQL says what to do.
type Task struct {
	RunID       RunID `json:"run_id"`
	DispatchSeq int64 `json:"dispatch_seq"`
	// Lapses is how many attempts in a row before this dispatch ended with the run's
	// lease lapsing: an executor runs a repeat offender alone, and can make room for it
	// before claiming it. A hint only; the claim returns the count that holds.
	Lapses int `json:"lapses,omitempty"`
}

// RunDone announces that a run reached a terminal status.
type RunDone struct {
	RunID  RunID  `json:"run_id"`
	Status Status `json:"status"`
	// Result, when present, is the run's outcome as a read would give it, so a waiter
	// needs no round trip to the database. It is left out when the output is large, or
	// when the publisher does not have it at hand; the waiter then reads the run.
	Result *RunResult `json:"result,omitempty"`
}

// RunResult is a finished run's outcome: its output (COMPLETED) or error (FAILED), as
// stored, so sealed payloads stay sealed on the wire.
type RunResult struct {
	Attempt int             `json:"attempt"`
	Output  json.RawMessage `json:"output,omitempty"`
	Error   string          `json:"error,omitempty"`
}

// DoneInlineMax bounds the output a done notice carries.
const DoneInlineMax = 16 << 10

// TimerHint tells timers that a run will need them at WakeAt.
type TimerHint struct {
	WakeAt time.Time `json:"wake_at"`
}

// DescribeRequest reads one run. It is the JSON body on kagzi.api.<namespace>.describe.
type DescribeRequest struct {
	// Namespace, when set, must be the subject's (else permission_denied); empty takes it.
	Namespace string `json:"namespace,omitempty"`
	RunID     RunID  `json:"run_id"`
	// SubmitSeq, when set, is the submit stream's sequence of the start that names
	// RunID (its publish acknowledgement's): a run not committed yet is then answered
	// Pending while that start still waits in the stream.
	SubmitSeq uint64 `json:"submit_seq,omitempty"`
}

// DescribeReply carries a run and its steps, or an error.
type DescribeReply struct {
	Run   *RunInfo `json:"run,omitempty"`
	Error *Error   `json:"error,omitempty"`
	// Pending: no such run yet, but its submitted start (DescribeRequest.SubmitSeq) is
	// still in the submit stream, waiting for a scheduler to commit it.
	Pending bool `json:"pending,omitempty"`
}

// RunInfo is a run as callers see it.
type RunInfo struct {
	ID             RunID           `json:"id"`
	Namespace      string          `json:"namespace"`
	Workflow       string          `json:"workflow"`
	Version        string          `json:"version,omitempty"`
	Status         Status          `json:"status"`
	Input          json.RawMessage `json:"input,omitempty"`
	Output         json.RawMessage `json:"output,omitempty"`
	Error          string          `json:"error,omitempty"`
	IdempotencyKey string          `json:"idempotency_key,omitempty"`
	Attempt        int             `json:"attempt"`
	MaxAttempts    int             `json:"max_attempts"`
	WakeAt         *time.Time      `json:"wake_at,omitempty"`
	CreatedAt      time.Time       `json:"created_at"`
	UpdatedAt      time.Time       `json:"updated_at"`
	StartedAt      *time.Time      `json:"started_at,omitempty"`
	FinishedAt     *time.Time      `json:"finished_at,omitempty"`
	Steps          []StepInfo      `json:"steps,omitempty"`
}

// StepInfo is one recorded step.
type StepInfo struct {
	Key       string          `json:"key"`
	Seq       int             `json:"seq"`
	Kind      StepKind        `json:"kind"`
	Status    string          `json:"status"`
	Output    json.RawMessage `json:"output,omitempty"`
	Error     string          `json:"error,omitempty"`
	WakeAt    *time.Time      `json:"wake_at,omitempty"`
	CreatedAt time.Time       `json:"created_at"`
}
