package wire

import (
	"strconv"
	"strings"
)

// Subjects and stream names. Every token built from a name passes ValidateName first, so
// no subject ever holds a raw '.', '*', '>' or whitespace from user input.
//
// Every subject a client uses names its namespace in a fixed token, so NATS permissions
// can confine a client identity to one namespace: kagzi.start.<ns>.>, kagzi.submit.<ns>.>,
// kagzi.api.<ns>.> to publish and kagzi.run.<ns>.*.done to subscribe. The scheduler
// refuses a request whose body names another namespace than its subject
// (ErrPermissionDenied), so a body cannot reach past what the subject was allowed.
const (
	// StartSubjectPrefix + namespace + "." + workflow: request-reply starts, served by
	// the schedulers' queue group and answered only after the run row is committed.
	StartSubjectPrefix = "kagzi.start."
	// SubmitSubjectPrefix + namespace + "." + workflow: fire-and-forget starts published
	// with JetStream; the submit stream holds them until a scheduler has committed them.
	SubmitSubjectPrefix = "kagzi.submit."
	// TaskSubjectPrefix + namespace + "." + workflow: task doorbells.
	TaskSubjectPrefix = "kagzi.task."
	// RunSubjectPrefix + namespace + "." + run id + ".done": completion notices (core
	// NATS). They carry the run's outcome, hence the namespace.
	RunSubjectPrefix = "kagzi.run."
	// APISubjectPrefix + namespace + "." + operation: request-reply reads served by the
	// schedulers (DescribeOp).
	APISubjectPrefix = "kagzi.api."
	// DescribeOp is the API operation that reads a run and its steps.
	DescribeOp = "describe"
	// TimerHintSubject: executors tell timers of a new, possibly sooner, wake time.
	TimerHintSubject = "kagzi.timer.hint"

	// StartSubjects, DescribeSubjects and DoneSubjects match the subjects of every
	// namespace: what the schedulers subscribe to, and what an all-namespace identity
	// is allowed.
	StartSubjects    = StartSubjectPrefix + "*.*"
	DescribeSubjects = APISubjectPrefix + "*." + DescribeOp
	DoneSubjects     = RunSubjectPrefix + "*.*.done"

	SubmitStream = "KAGZI_SUBMIT"
	TaskStream   = "KAGZI_TASKS"

	// SchedulerQueueGroup is the queue group (and durable consumer) of the schedulers.
	SchedulerQueueGroup = "kagzi-scheduler"
)

// StartSubject is the request-reply start subject of a workflow in a namespace.
func StartSubject(namespace, workflow string) string {
	return StartSubjectPrefix + namespace + "." + workflow
}

// SubmitSubject is the JetStream start subject of a workflow in a namespace.
func SubmitSubject(namespace, workflow string) string {
	return SubmitSubjectPrefix + namespace + "." + workflow
}

// TaskSubject is the subject of a workflow's task doorbells.
func TaskSubject(namespace, workflow string) string {
	return TaskSubjectPrefix + namespace + "." + workflow
}

// DescribeSubject is where a namespace's runs are described.
func DescribeSubject(namespace string) string {
	return APISubjectPrefix + namespace + "." + DescribeOp
}

// DoneSubject is where a run's completion is announced.
func DoneSubject(namespace string, runID RunID) string {
	return RunSubjectPrefix + namespace + "." + runID + ".done"
}

// ParseStartSubject returns the namespace and workflow of a start or submit subject
// (prefix is StartSubjectPrefix or SubmitSubjectPrefix), both validated.
func ParseStartSubject(prefix, subject string) (namespace, workflow string, err error) {
	rest, ok := strings.CutPrefix(subject, prefix)
	if !ok {
		return "", "", Errorf(ErrInvalidArgument, "subject %q does not start with %q", subject, prefix)
	}
	namespace, workflow, ok = strings.Cut(rest, ".")
	if !ok {
		return "", "", Errorf(ErrInvalidArgument, "subject %q names no namespace: want %s<namespace>.<workflow>", subject, prefix)
	}
	if err := ValidateName("namespace", namespace); err != nil {
		return "", "", err
	}
	if err := ValidateName("workflow", workflow); err != nil {
		return "", "", err
	}
	return namespace, workflow, nil
}

// ParseAPISubject returns the namespace and operation of an API subject, the namespace
// validated.
func ParseAPISubject(subject string) (namespace, op string, err error) {
	rest, ok := strings.CutPrefix(subject, APISubjectPrefix)
	if !ok {
		return "", "", Errorf(ErrInvalidArgument, "subject %q does not start with %q", subject, APISubjectPrefix)
	}
	namespace, op, ok = strings.Cut(rest, ".")
	if !ok {
		return "", "", Errorf(ErrInvalidArgument, "subject %q names no namespace: want %s<namespace>.<operation>", subject, APISubjectPrefix)
	}
	if err := ValidateName("namespace", namespace); err != nil {
		return "", "", err
	}
	return namespace, op, nil
}

// RequestNamespace settles the namespace of a request from its subject's and its body's:
// a body that names none takes the subject's, and a body that names another is refused,
// since NATS permissions (which see only the subject) are what confine a client.
func RequestNamespace(subjectNS, bodyNS string) (string, error) {
	if bodyNS == "" || bodyNS == subjectNS {
		return subjectNS, nil
	}
	return "", Errorf(ErrPermissionDenied, "the request names namespace %q but was sent on a subject of namespace %q", bodyNS, subjectNS)
}

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
