package store_test

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
)

// The statements that name their runs by an array of ids read them by the primary key
// even when the table's statistics were taken while it was small and it has grown since
// (see byPrimaryKey in batch.go): a new deployment's first burst, 20,000 runs queued and
// 5,000 running. Both plans a prepared statement may run are checked, the custom and the
// generic.
func TestBatchStatementsReadByPrimaryKey(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, testkit.NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	exec := func(sql string, args ...any) {
		t.Helper()
		if _, err := conn.Exec(ctx, sql, args...); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	const seed = `INSERT INTO workflow_runs (id, namespace, workflow, status, input, idempotency_key, lease_owner, lease_expires_at)
SELECT gen_random_uuid(), 'default', 'wf', $1, '{}', gen_random_uuid()::text, CASE WHEN $1 = 'RUNNING' THEN 'exec' END,
    CASE WHEN $1 = 'RUNNING' THEN now() + interval '1 hour' END
FROM generate_series(1, $2::int)`
	exec(`ALTER TABLE workflow_runs SET (autovacuum_enabled = false)`)
	exec(seed, "QUEUED", 1)
	exec(seed, "RUNNING", 1)
	exec(`ANALYZE workflow_runs`)
	exec(seed, "QUEUED", 20000)
	exec(seed, "RUNNING", 5000)

	var queued, running string
	if err := conn.QueryRow(ctx, `SELECT (SELECT id::text FROM workflow_runs WHERE status = 'QUEUED' OFFSET 10000 LIMIT 1),
		(SELECT id::text FROM workflow_runs WHERE status = 'RUNNING' OFFSET 2500 LIMIT 1)`).Scan(&queued, &running); err != nil {
		t.Fatal(err)
	}
	held := []store.StepInsertParams{{FencedParams: store.FencedParams{RunID: running, Fence: 0, Owner: "exec"}, Key: "s", Kind: wire.StepKindStep, Output: []byte(`1`)}}
	statements := []struct {
		name string
		sql  string
		args []any
	}{
		{"claim", store.RunsClaimSQL, []any{[]string{queued}, []int64{1}, []string{"wf"}, "exec", int64(time.Minute / time.Microsecond), "default"}},
		{"step batch", store.StepsInsertSQL, store.StepsInsertArgs(held)},
		{"completion batch", store.RunsCompleteSQL, []any{[]string{running}, []int64{0}, [][]byte{[]byte(`1`)}, []string{"exec"}}},
		{"lease extension", store.RunsExtendLeasesSQL, []any{[]string{running}, []int64{0}, "exec", int64(time.Minute / time.Microsecond)}},
	}
	for _, mode := range []string{"force_custom_plan", "force_generic_plan"} {
		exec(`SELECT set_config('plan_cache_mode', $1, false)`, mode)
		for i, st := range statements {
			name := fmt.Sprintf("p%d_%s", i, strings.TrimSuffix(mode, "_plan"))
			if _, err := conn.Prepare(ctx, name, st.sql); err != nil {
				t.Fatalf("prepare %s: %v", st.name, err)
			}
			// EXPLAIN EXECUTE plans the prepared statement as a run of it would (under
			// plan_cache_mode), without running it. It takes literals only.
			literals := make([]string, len(st.args))
			for j, a := range st.args {
				literals[j] = literal(t, a)
			}
			var plan []byte
			err := conn.QueryRow(ctx, `EXPLAIN (FORMAT JSON) EXECUTE `+name+`(`+strings.Join(literals, ", ")+`)`).Scan(&plan)
			if err != nil {
				t.Fatalf("explain %s: %v", st.name, err)
			}
			if bad := runScans(t, plan); len(bad) > 0 {
				t.Errorf("%s (%s) reads workflow_runs by %v, want the primary key only; plan:\n%s", st.name, mode, bad, plan)
			}
		}
	}
}

// runScans lists every way a plan reads workflow_runs other than by its primary key.
func runScans(t *testing.T, plan []byte) []string {
	t.Helper()
	var doc []struct {
		Plan map[string]any `json:"Plan"`
	}
	if err := json.Unmarshal(plan, &doc); err != nil || len(doc) != 1 {
		t.Fatalf("decode plan: %v\n%s", err, plan)
	}
	var bad []string
	var walk func(n map[string]any)
	walk = func(n map[string]any) {
		node, _ := n["Node Type"].(string)
		index, _ := n["Index Name"].(string)
		relation, _ := n["Relation Name"].(string)
		switch {
		case strings.HasPrefix(index, "workflow_runs") && index != "workflow_runs_pkey":
			bad = append(bad, node+" on "+index)
		case relation == "workflow_runs" && node == "Seq Scan":
			bad = append(bad, node)
		}
		children, _ := n["Plans"].([]any)
		for _, c := range children {
			if m, ok := c.(map[string]any); ok {
				walk(m)
			}
		}
	}
	walk(doc[0].Plan)
	return bad
}

// literal spells an argument as an SQL literal of unknown type, which EXECUTE casts to
// the prepared statement's parameter type.
func literal(t *testing.T, v any) string {
	t.Helper()
	quote := func(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
	array := func(elems []string) string {
		for i, e := range elems {
			elems[i] = `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(e) + `"`
		}
		return quote("{" + strings.Join(elems, ",") + "}")
	}
	switch v := v.(type) {
	case string:
		return quote(v)
	case int64:
		return strconv.FormatInt(v, 10)
	case []string:
		return array(slices.Clone(v))
	case []int64:
		elems := make([]string, len(v))
		for i, n := range v {
			elems[i] = strconv.FormatInt(n, 10)
		}
		return array(elems)
	case []int32:
		elems := make([]string, len(v))
		for i, n := range v {
			elems[i] = strconv.FormatInt(int64(n), 10)
		}
		return array(elems)
	case [][]byte:
		elems := make([]string, len(v))
		for i, b := range v {
			elems[i] = `\x` + hex.EncodeToString(b)
		}
		return array(elems)
	}
	t.Fatalf("no literal for %T", v)
	return ""
}
