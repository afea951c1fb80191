package wire

import "strconv"

// Subjects and stream names. Every token built from a name passes ValidateName first, so
// no subject ever holds a raw '.', '*', '>' or whitespace from user input.
const (
	// StartSubjectPrefix + workflow: request-reply starts, served by the schedulers'
	// queue group and answered only after the run row is committed.
	StartSubjectPrefix = "kagzi.start."
	// SubmitSubjectPrefix + workflow: fire-and-forget starts published with JetStream;
	// the submit stream holds them until a scheduler has committed them.
	SubmitSubjectPrefix = "kagzi.submit."
	// TaskSubjectPrefix + namespace + "." + workflow: task doorbells.
	TaskSubjectPrefix = "kagzi.task."
	// RunSubjectPrefix + run id + ".done": completion notices (core NATS).
	RunSubjectPrefix = "kagzi.run."
	// DescribeSubject: request-reply read of a run and its steps, served by schedulers.
	DescribeSubject = "kagzi.api.describe"
	// TimerHintSubject: executors tell timers of a new, possibly sooner, wake time.
	TimerHintSubject = "kagzi.timer.hint"

	SubmitStream = "KAGZI_SUBMIT"
	TaskStream   = "KAGZI_TASKS"

	// SchedulerQueueGroup is the queue group (and durable consumer) of the schedulers.
	SchedulerQueueGroup = "kagzi-scheduler"
)

// StartSubject is the request-reply start subject of a workflow.
func StartSubject(workflow string) string { return StartSubjectPrefix + workflow }

// SubmitSubject is the JetStream start subject of a workflow.
func SubmitSubject(workflow string) string { return SubmitSubjectPrefix + workflow }

// TaskSubject is the subject of a workflow's task doorbells.
func TaskSubject(namespace, workflow string) string {
	return TaskSubjectPrefix + namespace + "." + workflow
}

// DoneSubject is where a run's completion is announced.
func DoneSubject(runID RunID) string { return RunSubjectPrefix + runID + ".done" }

// TaskConsumer is the durable consumer shared by every executor serving a workflow.
func TaskConsumer(namespace, workflow string) string {
	return "exec_" + namespace + "_" + workflow
}

// MsgID is the JetStream de-duplication id of a dispatch. It names the dispatch, not
// the run, so the duplicate window never swallows a legitimate re-dispatch.
func MsgID(runID RunID, dispatchSeq int64) string {
	return runID + ":" + strconv.FormatInt(dispatchSeq, 10)
}

// ResendMsgID is the de-duplication id of the resend-th announcement of a dispatch
// after its first (the reconciler's relay): distinct from the first, and from other
// resends, so the window does not swallow a relay of a doorbell the broker lost.
func ResendMsgID(runID RunID, dispatchSeq, resend int64) string {
	if resend == 0 {
		return MsgID(runID, dispatchSeq)
	}
	return MsgID(runID, dispatchSeq) + ":r" + strconv.FormatInt(resend, 10)
}
