package wire

// Status is the state of a workflow run, as stored in workflow_runs.status.
type Status string

// Run statuses. QUEUED, RUNNING, SLEEPING and WAITING are live; the rest are terminal
// and never change again.
const (
	StatusQueued    Status = "QUEUED"
	StatusRunning   Status = "RUNNING"
	StatusSleeping  Status = "SLEEPING"
	StatusWaiting   Status = "WAITING"
	StatusCompleted Status = "COMPLETED"
	StatusFailed    Status = "FAILED"
	StatusCancelled Status = "CANCELLED"
)

// Terminal reports whether a run in this status is finished for good.
func (s Status) Terminal() bool {
	return s == StatusCompleted || s == StatusFailed || s == StatusCancelled
}

// StepKind says what a step_runs row records.
type StepKind string

// Step kinds.
const (
	StepKindStep  StepKind = "step"
	StepKindSleep StepKind = "sleep"
	StepKindEvent StepKind = "event"
	StepKindChild StepKind = "child"
)
