package store

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/kagzi/kagzi/libs/wire"
)

// RunInsertChildParams describes a run started from a step of its parent.
type RunInsertChildParams struct {
	RunInsertParams
	Parent wire.RunID // must be a run of the same namespace
	// MaxDepth and MaxTreeRuns are wire.Limits': the child's depth below the root, and
	// the unfinished runs below the root the tree may hold once the child is in.
	MaxDepth    int
	MaxTreeRuns int
}

// Children of one tree are inserted one after the other: the count of the tree's
// unfinished runs is only a bound if no other insert of the tree can slip in between the
// count and the insert, and READ COMMITTED shows a statement nothing that committed after
// it began. The lock is taken in the batch's implicit transaction and released at its
// commit; the insert that follows takes a new snapshot, so it sees every child committed
// before it got the lock. Primary-key lookup.
const runChildLockSQL = `
SELECT pg_advisory_xact_lock(hashtextextended(coalesce(root_id, id)::text, 0))
FROM workflow_runs WHERE id = $1 AND namespace = $2`

// One statement: the parent (primary key), the key's existing run
// (workflow_runs_idempotency), the tree's unfinished runs counted up to the limit
// (workflow_runs_tree_unfinished) and the insert, which happens only when the key is free,
// the parent exists and both limits hold.
const runInsertChildSQL = `
WITH parent AS (
    SELECT id, coalesce(root_id, id) AS root, depth + 1 AS depth
    FROM workflow_runs WHERE id = $8 AND namespace = $2
), existing AS (
    SELECT id, input, status, dispatch_seq FROM workflow_runs
    WHERE namespace = $2 AND workflow = $3 AND idempotency_key = $6
), pending AS (
    SELECT count(*) AS n FROM (
        SELECT 1 FROM workflow_runs r JOIN parent p ON r.root_id = p.root
        WHERE r.status IN ('QUEUED', 'RUNNING', 'SLEEPING', 'WAITING')
        LIMIT $10) t
), ins AS (
    INSERT INTO workflow_runs (id, namespace, workflow, version, status, input, idempotency_key, max_attempts,
        parent_id, root_id, depth)
    SELECT $1, $2, $3, $4, 'QUEUED', $5, $6, $7, p.id, p.root, p.depth
    FROM parent p, pending
    WHERE NOT EXISTS (SELECT 1 FROM existing) AND p.depth <= $9 AND pending.n < $10
    ON CONFLICT (namespace, workflow, idempotency_key) DO NOTHING
    RETURNING dispatch_seq
)
SELECT (SELECT dispatch_seq FROM ins), p.depth, pending.n, e.id::text, e.input, e.status, e.dispatch_seq
FROM pending
LEFT JOIN parent p ON true
LEFT JOIN existing e ON true`

// RunInsertChild creates a QUEUED run below Parent: its root is the parent's root (or the
// parent itself) and its depth the parent's plus one. With RunInsert's idempotency: a key
// that already names a run returns that run, whatever the limits say now, and with
// another input is wire.ErrIdempotencyConflict. A parent missing from the namespace is
// wire.ErrRunNotFound; a child deeper than MaxDepth, or one that would make more than
// MaxTreeRuns unfinished runs below the root, is wire.ErrLimitExceeded.
func (s *Store) RunInsertChild(ctx context.Context, p RunInsertChildParams) (RunInsertResult, error) {
	if p.MaxAttempts <= 0 {
		p.MaxAttempts = 5
	}
	if p.MaxDepth <= 0 || p.MaxTreeRuns <= 0 {
		return RunInsertResult{}, fmt.Errorf("insert child run %s: limits max depth %d, max tree runs %d: want positive",
			p.ID, p.MaxDepth, p.MaxTreeRuns)
	}
	res := RunInsertResult{Dispatch: Dispatch{RunID: p.ID, Namespace: p.Namespace, Workflow: p.Workflow}, Status: wire.StatusQueued}
	b := &pgx.Batch{}
	b.Queue(runChildLockSQL, p.Parent, p.Namespace)
	b.Queue(runInsertChildSQL, p.ID, p.Namespace, p.Workflow, p.Version, p.Input, p.IdempotencyKey, p.MaxAttempts,
		p.Parent, p.MaxDepth, p.MaxTreeRuns)
	br := s.db.SendBatch(ctx, b)
	var (
		seq, existingSeq        *int64
		depth                   *int
		pending                 int
		existingID              *string
		existingInput           []byte
		existingStatus          *wire.Status
		lockErr, insErr, endErr error
	)
	if _, lockErr = br.Exec(); lockErr == nil {
		insErr = br.QueryRow().Scan(&seq, &depth, &pending, &existingID, &existingInput, &existingStatus, &existingSeq)
	}
	endErr = br.Close()
	if err := errors.Join(lockErr, insErr, endErr); err != nil {
		if isUniqueViolation(err) {
			// Not the idempotency key (that one is the arbiter): the run id is taken.
			return RunInsertResult{}, wire.Errorf(wire.ErrIdempotencyConflict, "run id %s is already taken", p.ID)
		}
		return RunInsertResult{}, fmt.Errorf("insert child run %s of %s: %w", p.ID, p.Parent, err)
	}
	switch {
	case seq != nil:
		res.DispatchSeq = *seq
		return res, nil
	case existingID != nil:
		res.RunID, res.Status, res.DispatchSeq, res.Existing = *existingID, *existingStatus, *existingSeq, true
		return res, sameInput(p.RunInsertParams, res.RunID, existingInput)
	case depth == nil:
		return RunInsertResult{}, wire.Errorf(wire.ErrRunNotFound, "parent run %s is not in namespace %q", p.Parent, p.Namespace)
	case *depth > p.MaxDepth:
		return RunInsertResult{}, wire.Errorf(wire.ErrLimitExceeded, "a child of run %s would be at depth %d, over the limit of %d",
			p.Parent, *depth, p.MaxDepth)
	case pending >= p.MaxTreeRuns:
		return RunInsertResult{}, wire.Errorf(wire.ErrLimitExceeded, "the tree of run %s already has %d unfinished runs, the limit",
			p.Parent, pending)
	}
	// The key was taken by a start that committed after this statement's snapshot: read
	// it as RunInsert does.
	return s.existingRun(ctx, p.RunInsertParams, res)
}
