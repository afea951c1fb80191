// Package failpoint names the places where fault tests crash, stall or fail Kagzi on
// purpose. In a normal build Inject compiles to a no-op; built with the tag
// kagzi_failpoints it obeys KAGZI_FAILPOINTS, a comma-separated list of
//
//	name=action[*count]
//
// where action is exit (os.Exit(137), no deferred cleanup, like a kill -9 at that exact
// line), sleep(ms), error or commit_then_error (both: the caller reports a failure after
// its write committed, the ambiguous commit of Temporal's ExecuteAndTimeout), and count
// bounds how many times it fires in this process (default: every time). A percentage
// form name=action%P fires with probability P/100.
//
// It imports only the standard library.
package failpoint

import "errors"

// ErrInjected is returned by Inject for the error and commit_then_error actions.
var ErrInjected = errors.New("failpoint: injected error")

// The named points. A test arms them by name; keeping them here makes the list greppable.
const (
	StartAfterInsert              = "start.after_insert"
	ClaimBeforeClaim              = "claim.before_claim"
	ClaimAfterCommitBeforeAck     = "claim.after_commit_before_ack"
	StepAfterBodyBeforeCommit     = "step.after_body_before_commit"
	StepAfterCommit               = "step.after_commit"
	SleepAfterCommitBeforeRelease = "sleep.after_commit_before_release"
	CompleteAfterCommitBeforeNote = "complete.after_commit_before_notify"
	TimerAfterCommitBeforePublish = "timer.after_commit_before_publish"
	ReconcileAfterCommitBeforePub = "reconcile.after_commit_before_publish"
)
