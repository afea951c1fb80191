package store

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Worker is an executor's announcement of itself.
type Worker struct {
	ID        string
	Namespace string
	Workflows []string
	Hostname  string
	PID       int
}

const workerHeartbeatSQL = `
INSERT INTO workers (id, namespace, workflows, hostname, pid)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE SET workflows = EXCLUDED.workflows, heartbeat_at = now()`

// WorkerHeartbeat registers the worker or renews its heartbeat.
func (s *Store) WorkerHeartbeat(ctx context.Context, w Worker) error {
	if _, err := s.db.Exec(ctx, workerHeartbeatSQL, w.ID, w.Namespace, w.Workflows, w.Hostname, w.PID); err != nil {
		return fmt.Errorf("heartbeat worker %s: %w", w.ID, err)
	}
	return nil
}

// WorkerDelete removes a worker that stopped cleanly.
func (s *Store) WorkerDelete(ctx context.Context, id string) error {
	if _, err := s.db.Exec(ctx, `DELETE FROM workers WHERE id = $1`, id); err != nil {
		return fmt.Errorf("delete worker %s: %w", id, err)
	}
	return nil
}

// Uses workers_heartbeat.
const workersPruneSQL = `DELETE FROM workers WHERE heartbeat_at < now() - $1::bigint * interval '1 microsecond'`

// WorkersPrune forgets workers silent for longer than olderThan.
func (s *Store) WorkersPrune(ctx context.Context, olderThan time.Duration) (int64, error) {
	tag, err := s.db.Exec(ctx, workersPruneSQL, micros(olderThan))
	if err != nil {
		return 0, fmt.Errorf("prune workers: %w", err)
	}
	return tag.RowsAffected(), nil
}

// Served is a workflow some live worker serves.
type Served struct {
	Namespace string
	Workflow  string
}

// Uses workers_heartbeat.
const workflowsServedSQL = `
SELECT DISTINCT namespace, unnest(workflows) FROM workers
WHERE heartbeat_at > now() - $1::bigint * interval '1 microsecond'`

// WorkflowsServed lists the workflows that workers heartbeating within liveWithin serve.
func (s *Store) WorkflowsServed(ctx context.Context, liveWithin time.Duration) ([]Served, error) {
	rows, err := s.db.Query(ctx, workflowsServedSQL, micros(liveWithin))
	if err != nil {
		return nil, fmt.Errorf("list served workflows: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Served, error) {
		var sv Served
		err := row.Scan(&sv.Namespace, &sv.Workflow)
		return sv, err
	})
	if err != nil {
		return nil, fmt.Errorf("list served workflows: %w", err)
	}
	return out, nil
}

// workerNameLockClass is the first key of the advisory locks on workers' stable names
// (the two-int4 form, apart from the bigint keys of migrations and run trees).
const workerNameLockClass = 0x4b5a4e4d // "KZNM"

const workerNameTryLockSQL = `SELECT pg_try_advisory_lock($1::int4, hashtext($2 || '/' || $3))`

// WorkerNameTryLock takes the session-level advisory lock on a worker's stable name in a
// namespace, without waiting; false: another session holds it. Run it on one connection
// held for the life of the worker (a *pgx.Conn or an acquired *pgxpool.Conn, never the
// pool itself): the lock lasts as long as that session, and a killed process's session
// ends with it, so holding the lock proves that no earlier incarnation is alive.
func (s *Store) WorkerNameTryLock(ctx context.Context, namespace, name string) (bool, error) {
	var ok bool
	if err := s.db.QueryRow(ctx, workerNameTryLockSQL, workerNameLockClass, namespace, name).Scan(&ok); err != nil {
		return false, fmt.Errorf("lock worker name %s/%s: %w", namespace, name, err)
	}
	return ok, nil
}
