package store

// The batch statements that name their runs by an array of ids, for the plan test
// (TestBatchStatementsReadByPrimaryKey).
const (
	RunsClaimSQL        = runsClaimSQL
	StepsInsertSQL      = stepsInsertSQL
	RunsCompleteSQL     = runsCompleteSQL
	RunsExtendLeasesSQL = runsExtendLeasesSQL
)

// StepsInsertArgs is stepsInsertArgs.
func StepsInsertArgs(ps []StepInsertParams) []any { return stepsInsertArgs(ps) }
