package bench

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kagzi/kagzi/services/internal/benchwf"
)

// Percentiles of a sample, in milliseconds.
type Percentiles struct {
	Count int     `json:"count"`
	P50   float64 `json:"p50_ms"`
	P95   float64 `json:"p95_ms"`
	P99   float64 `json:"p99_ms"`
	Min   float64 `json:"min_ms"`
	Max   float64 `json:"max_ms"`
}

// percentiles uses the nearest-rank method: every figure is a value that was observed.
func percentiles(ms []float64) Percentiles {
	if len(ms) == 0 {
		return Percentiles{}
	}
	s := slices.Clone(ms)
	slices.Sort(s)
	rank := func(p float64) float64 {
		i := int(math.Ceil(p*float64(len(s)))) - 1
		return s[max(0, min(i, len(s)-1))]
	}
	return Percentiles{Count: len(s), P50: rank(0.50), P95: rank(0.95), P99: rank(0.99), Min: s[0], Max: s[len(s)-1]}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// queryFloats reads one float column.
func queryFloats(ctx context.Context, s *system, sql string, args ...any) ([]float64, error) {
	rows, err := s.pool.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[float64])
}

// redispatched counts the runs of workflow whose dispatch the timer's reconciler relayed
// because they sat QUEUED longer than KAGZI_STALE_AFTER, usually behind a backlog rather
// than because a doorbell was lost.
func (s *system) redispatched(ctx context.Context, workflow string, ids []string) (int, error) {
	var n int
	err := s.pool.QueryRow(ctx, `SELECT count(*) FROM workflow_runs WHERE workflow = $1 AND relays > 0 AND ($2::uuid[] IS NULL OR id = ANY ($2))`,
		workflow, ids).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("count re-dispatched runs: %w", err)
	}
	return n, nil
}

// xacts is the number of transactions PostgreSQL has counted for the scenario's
// database. It is read from the maintenance database so the probe itself is not
// counted. A transaction reaches the view within statsFlushLag.
func (s *system) xacts(ctx context.Context) (int64, error) {
	conn, err := adminConn(ctx, s.b.cfg.DatabaseURL)
	if err != nil {
		return 0, err
	}
	defer conn.Close(ctx)
	var n int64
	err = conn.QueryRow(ctx, `SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1`, s.dbName).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("read pg_stat_database: %w", err)
	}
	return n, nil
}

// ---------------------------------------------------------------------------------------
// The reference: what PostgreSQL itself can commit on this machine.

// Reference is the commit rate of a one-row INSERT, each in its own transaction, from 1
// and from 8 connections (what pgbench measures with such a script).
type Reference struct {
	OneClient    float64 `json:"commits_per_s_1_client"`
	OneClientMS  float64 `json:"commit_ms_1_client"`
	EightClients float64 `json:"commits_per_s_8_clients"`
	Window       Seconds `json:"window_s"`
}

// The reference's commit: a one-row INSERT into a table of its own, each in its own
// transaction.
const (
	scratchTableSQL  = `CREATE TABLE kagzi_bench_scratch (id bigint NOT NULL, at timestamptz NOT NULL DEFAULT now())`
	scratchInsertSQL = `INSERT INTO kagzi_bench_scratch (id) VALUES ($1)`
)

func (b *bencher) reference(ctx context.Context) (*Reference, error) {
	b.settle(ctx)
	name, dbURL, err := b.createDatabase(ctx, "ref")
	if err != nil {
		return nil, err
	}
	defer func() {
		if !b.cfg.Keep {
			if err := b.dropDatabase(name); err != nil {
				b.progress("warning: %v", err)
			}
		}
	}()
	setup, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", name, err)
	}
	_, err = setup.Exec(ctx, scratchTableSQL)
	setup.Close(ctx)
	if err != nil {
		return nil, fmt.Errorf("create scratch table: %w", err)
	}
	one, err := commitRate(ctx, dbURL, 1, b.cfg.RefDuration)
	if err != nil {
		return nil, err
	}
	eight, err := commitRate(ctx, dbURL, 8, b.cfg.RefDuration)
	if err != nil {
		return nil, err
	}
	r := &Reference{OneClient: one, EightClients: eight, Window: secs(b.cfg.RefDuration)}
	if one > 0 {
		r.OneClientMS = 1000 / one
	}
	b.progress("reference: %.0f commits/s from 1 client (%.3f ms), %.0f from 8", r.OneClient, r.OneClientMS, r.EightClients)
	return r, nil
}

// besideCommits times one-row autocommit INSERTs made between a scenario's runs, never
// during one, on a connection held for them: the reference's commit, measured in the
// same minutes as the runs it is compared with.
type besideCommits struct {
	conn *pgxpool.Conn
	ms   []float64
	took time.Duration // spent committing, to leave out of the scenario's rate
}

func newBesideCommits(ctx context.Context, pool *pgxpool.Pool) (*besideCommits, error) {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("reference beside the runs: %w", err)
	}
	if _, err := conn.Exec(ctx, scratchTableSQL); err != nil {
		conn.Release()
		return nil, fmt.Errorf("reference beside the runs: create scratch table: %w", err)
	}
	return &besideCommits{conn: conn}, nil
}

func (c *besideCommits) commit(ctx context.Context) error {
	t0 := time.Now()
	if _, err := c.conn.Exec(ctx, scratchInsertSQL, int64(len(c.ms))); err != nil {
		return fmt.Errorf("reference beside the runs: %w", err)
	}
	d := time.Since(t0)
	c.ms, c.took = append(c.ms, ms(d)), c.took+d
	return nil
}

func (c *besideCommits) close() { c.conn.Release() }

// commitRate runs autocommit one-row INSERTs from clients connections for d.
func commitRate(ctx context.Context, dbURL string, clients int, d time.Duration) (float64, error) {
	conns := make([]*pgx.Conn, clients)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close(context.Background())
			}
		}
	}()
	for i := range conns {
		c, err := pgx.Connect(ctx, dbURL)
		if err != nil {
			return 0, fmt.Errorf("reference: connect: %w", err)
		}
		conns[i] = c
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		total int64
		first error
	)
	start := time.Now()
	deadline := start.Add(d)
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var n int64
			var err error
			for time.Now().Before(deadline) {
				if _, err = c.Exec(ctx, scratchInsertSQL, int64(i)<<40|n); err != nil {
					break
				}
				n++
			}
			mu.Lock()
			total += n
			if err != nil && first == nil {
				first = err
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	if first != nil {
		return 0, fmt.Errorf("reference insert: %w", first)
	}
	return float64(total) / time.Since(start).Seconds(), nil
}

// ---------------------------------------------------------------------------------------
// S1 throughput.

// Throughput is S1.
type Throughput struct {
	Runs                int         `json:"runs"`
	Wall                Seconds     `json:"wall_s"` // first created_at to last finished_at
	WorkflowsPerS       float64     `json:"workflows_per_s"`
	StepsPerS           float64     `json:"steps_per_s"`
	Latency             Percentiles `json:"start_to_complete"` // finished_at - created_at
	StartPhase          Seconds     `json:"start_phase_s"`     // the client's time to have every start accepted
	ExecutorPeakRSS     int64       `json:"executor_peak_rss_bytes"`
	ExecutorConcurrency string      `json:"executor_concurrency"`
	XactsPerRun         float64     `json:"pg_transactions_per_run"`
	Redispatched        int         `json:"redispatched_runs"`
	RatioTo8Clients     float64     `json:"ratio_to_8_client_commit_rate,omitempty"`
}

func (b *bencher) executorConcurrencyEnv() []string {
	if b.cfg.Concurrency > 0 {
		return []string{"KAGZI_CONCURRENCY=" + strconv.Itoa(b.cfg.Concurrency)}
	}
	return nil
}

func (b *bencher) runS1(ctx context.Context) error {
	n := b.cfg.N
	b.progress("S1 throughput: %d runs of %s started at once by %d clients, one executor", n, benchwf.Noop3Name, b.cfg.StartConcurrency)
	return b.withSystem(ctx, "s1", func(s *system) error {
		_, _, exec, err := s.services(ctx, b.executorConcurrencyEnv()...)
		if err != nil {
			return err
		}
		x0, err := s.xacts(ctx)
		if err != nil {
			return err
		}
		began := time.Now()
		if _, err := s.startMany(ctx, benchwf.Noop3Name, n, b.cfg.StartConcurrency, func(int) any { return struct{}{} }); err != nil {
			return err
		}
		startPhase := time.Since(began)
		if err := s.waitFinished(ctx, benchwf.Noop3Name, n, exec); err != nil {
			return err
		}
		if err := s.failed(ctx, benchwf.Noop3Name); err != nil {
			return err
		}
		mem, err := readMemory(exec.pid())
		if err != nil {
			return err
		}
		var first, last time.Time
		err = s.pool.QueryRow(ctx, `SELECT min(created_at), max(finished_at) FROM workflow_runs WHERE workflow = $1`,
			benchwf.Noop3Name).Scan(&first, &last)
		if err != nil {
			return fmt.Errorf("read S1 wall time: %w", err)
		}
		lat, err := queryFloats(ctx, s, `SELECT extract(epoch FROM finished_at - created_at)::float8 * 1000 FROM workflow_runs WHERE workflow = $1`,
			benchwf.Noop3Name)
		if err != nil {
			return fmt.Errorf("read S1 latencies: %w", err)
		}
		redis, err := s.redispatched(ctx, benchwf.Noop3Name, nil)
		if err != nil {
			return err
		}
		// Every transaction of the run must have reached pg_stat_database.
		if err := sleepCtx(ctx, statsFlushLag); err != nil {
			return err
		}
		x1, err := s.xacts(ctx)
		if err != nil {
			return err
		}
		wall := last.Sub(first)
		r := &Throughput{Runs: n, Wall: secs(wall), WorkflowsPerS: float64(n) / wall.Seconds(),
			StepsPerS: 3 * float64(n) / wall.Seconds(), Latency: percentiles(lat), StartPhase: secs(startPhase),
			ExecutorPeakRSS: mem.PeakBytes, ExecutorConcurrency: concurrencyLabel(b.cfg.Concurrency),
			// The probes of waitFinished are counted too; they are a handful.
			XactsPerRun: float64(x1-x0) / float64(n), Redispatched: redis}
		if ref := b.rep.Reference; ref != nil && ref.EightClients > 0 {
			r.RatioTo8Clients = r.WorkflowsPerS / ref.EightClients
		}
		b.rep.S1 = r
		b.progress("S1: %.0f workflows/s, %.0f steps/s, p50 %.1f ms, executor peak RSS %s",
			r.WorkflowsPerS, r.StepsPerS, r.Latency.P50, mib(r.ExecutorPeakRSS))
		return nil
	})
}

func concurrencyLabel(c int) string {
	if c > 0 {
		return strconv.Itoa(c)
	}
	return "default"
}

// ---------------------------------------------------------------------------------------
// S2 latency.

// Latency is S2: one run at a time, started through the scheduler and waited for by the
// client, as an application would.
type Latency struct {
	Runs         int         `json:"runs"`
	Warmup       int         `json:"warmup_runs"` // run first and not counted
	Client       Percentiles `json:"client_start_to_result"`
	Server       Percentiles `json:"server_created_to_finished"`
	Stages       *Stages     `json:"server_stages_p50,omitempty"`
	P50InCommits float64     `json:"p50_in_1_client_commits,omitempty"`
	// CommitMSBeside is the median of one-row commits made one after each run, from a
	// connection of the bench's own, and P50InCommitsBeside the p50 in those: a ratio of
	// figures from the same minutes, to compare S2 across runs. The reference at the
	// bench's start is minutes away, and on a shared machine one commit's time drifts by
	// half in that time. It is not the ratio: a lone commit after an idle moment,
	// like each of S2's, costs more than one of the reference's back-to-back commits
	// (0.41 against 0.26 ms in one run here).
	CommitMSBeside     float64 `json:"commit_ms_beside_runs,omitempty"`
	P50InCommitsBeside float64 `json:"p50_in_commits_beside_runs,omitempty"`
	RunsPerSecond      float64 `json:"runs_per_s"`
}

// Stages splits the server side of a run, as its database rows date it, into medians in
// ms. Each row is dated by the start of the transaction that wrote it, so a stage holds
// the commit that ends the one before it and whatever ran between the two statements:
// the broker hops, the executor's own work, a step's body. Where a run's milliseconds go,
// before anyone guesses.
type Stages struct {
	// CreatedToClaimed: the start's commit, the reply, the doorbell through JetStream,
	// the executor's fetch and the sending of its claim.
	CreatedToClaimed float64 `json:"created_to_claimed_ms"`
	// ClaimedToFirstStep: the claim's commit, the replay, the first step's body (its
	// record is written as the run reaches its next durable act).
	ClaimedToFirstStep float64 `json:"claimed_to_first_step_ms"`
	// StepToStep: a step's commit and the next step's body.
	StepToStep float64 `json:"step_to_step_ms"`
	// LastStepToFinished: 0 when the last step commits with the completion, as it does
	// when the workflow returns right after it.
	LastStepToFinished float64 `json:"last_step_to_finished_ms"`
}

// stagesOf reads the Stages of the runs ids, which must have recorded at least one step.
func stagesOf(ctx context.Context, s *system, ids []string) (*Stages, error) {
	var st Stages
	for _, q := range []struct {
		dst *float64
		sql string
	}{
		{&st.CreatedToClaimed, `SELECT extract(epoch FROM started_at - created_at)::float8 * 1000
			FROM workflow_runs WHERE id = ANY ($1::uuid[])`},
		{&st.ClaimedToFirstStep, `SELECT extract(epoch FROM min(s.created_at) - r.started_at)::float8 * 1000
			FROM workflow_runs r JOIN step_runs s ON s.run_id = r.id WHERE r.id = ANY ($1::uuid[]) GROUP BY r.id, r.started_at`},
		{&st.StepToStep, `SELECT gap FROM (
			SELECT extract(epoch FROM created_at - lag(created_at) OVER (PARTITION BY run_id ORDER BY seq))::float8 * 1000 AS gap
			FROM step_runs WHERE run_id = ANY ($1::uuid[])) g WHERE gap IS NOT NULL`},
		{&st.LastStepToFinished, `SELECT extract(epoch FROM r.finished_at - max(s.created_at))::float8 * 1000
			FROM workflow_runs r JOIN step_runs s ON s.run_id = r.id WHERE r.id = ANY ($1::uuid[]) GROUP BY r.id, r.finished_at`},
	} {
		vals, err := queryFloats(ctx, s, q.sql, ids)
		if err != nil {
			return nil, fmt.Errorf("read the stages of %d runs: %w", len(ids), err)
		}
		*q.dst = percentiles(vals).P50
	}
	return &st, nil
}

func (b *bencher) runS2(ctx context.Context) error {
	n := b.cfg.LatencyRuns
	warmup := min(10, n)
	b.progress("S2 latency: %d runs of %s one at a time (after %d warm-up runs)", n, benchwf.Noop3Name, warmup)
	return b.withSystem(ctx, "s2", func(s *system) error {
		sched, tmr, exec, err := s.services(ctx)
		if err != nil {
			return err
		}
		oneRun := func(ctx context.Context) error {
			run, err := benchwf.Noop3.Start(ctx, s.client, struct{}{})
			if err != nil {
				return fmt.Errorf("start run: %w", err)
			}
			_, err = run.Result(ctx)
			return err
		}
		beside, err := newBesideCommits(ctx, s.pool)
		if err != nil {
			return err
		}
		defer beside.close()
		var ids []string
		lat := make([]float64, 0, n)
		began := time.Now()
		for i := range warmup + n {
			if exec.exited() {
				return fmt.Errorf("executor exited\n%s", exec.logTail(20))
			}
			if i == warmup {
				began = time.Now()
			}
			t0 := time.Now()
			run, err := benchwf.Noop3.Start(ctx, s.client, struct{}{})
			if err != nil {
				return fmt.Errorf("start run %d: %w", i, err)
			}
			if _, err := run.Result(ctx); err != nil {
				return fmt.Errorf("result of run %d: %w", i, err)
			}
			if i >= warmup {
				lat = append(lat, ms(time.Since(t0)))
				ids = append(ids, run.ID)
				if err := beside.commit(ctx); err != nil {
					return err
				}
			}
		}
		elapsed := time.Since(began) - beside.took
		server, err := queryFloats(ctx, s, `SELECT extract(epoch FROM finished_at - created_at)::float8 * 1000 FROM workflow_runs WHERE id = ANY ($1::uuid[])`, ids)
		if err != nil {
			return fmt.Errorf("read S2 server-side latencies: %w", err)
		}
		stages, err := stagesOf(ctx, s, ids)
		if err != nil {
			return err
		}
		r := &Latency{Runs: n, Warmup: warmup, Client: percentiles(lat), Server: percentiles(server), Stages: stages,
			RunsPerSecond: float64(n) / elapsed.Seconds()}
		if ref := b.rep.Reference; ref != nil && ref.OneClientMS > 0 {
			r.P50InCommits = r.Client.P50 / ref.OneClientMS
		}
		if r.CommitMSBeside = percentiles(beside.ms).P50; r.CommitMSBeside > 0 {
			r.P50InCommitsBeside = r.Client.P50 / r.CommitMSBeside
		}
		b.rep.S2 = r
		b.progress("S2: p50 %.2f ms, p95 %.2f ms, p99 %.2f ms; one-row commits beside the runs %.3f ms (p50 = %.1f of them)",
			r.Client.P50, r.Client.P95, r.Client.P99, r.CommitMSBeside, r.P50InCommitsBeside)
		return b.profile(ctx, "S2", oneRun, sched, tmr, exec)
	})
}

// ---------------------------------------------------------------------------------------
// S3 durable sleep.

// SleepLateness is S3: how long after its wake time a sleeping run's next step starts.
// The step is a no-op, so its record time is its start to within a statement.
//
// Executors wait out a short sleep in process by default (KAGZI_LOCAL_SLEEP_MAX) and
// park longer ones for the timer, so S3 runs twice: with the executor's defaults, which
// is what a 2 s sleep gets, and with every sleep parked, which is what a long sleep gets
// and what measures the timer.
type SleepLateness struct {
	Runs     int       `json:"runs"`
	Sleep    Seconds   `json:"sleep_s"`
	Defaults SleepPath `json:"executor_defaults"`
	Parked   SleepPath `json:"every_sleep_parked"`
}

// SleepPath is one pass of S3.
type SleepPath struct {
	Lateness Percentiles `json:"lateness"` // step_runs.created_at of the step after the sleep - the sleep's wake_at
	// TimerPart is workflow_runs.queued_at - wake_at: when the timer queued the run, from
	// its wake time (negative: ahead of it, by up to the timer's wake lead).
	// Parked sleeps only: a sleep waited out in process is never queued.
	TimerPart *Percentiles `json:"timer_part,omitempty"`
	Early     int          `json:"woke_early"` // must be 0: a run that went on before its wake time
	// Redispatched runs were queued again by the reconciler: their timer part above is
	// then the re-dispatch, not the wake-up.
	Redispatched int `json:"redispatched_runs"`
}

// parkEverySleep makes an executor park every sleep for the timer, however short.
const parkEverySleep = "KAGZI_LOCAL_SLEEP_MAX=-1ns"

func (b *bencher) runS3(ctx context.Context) error {
	n := b.cfg.SleepRuns
	b.progress("S3 durable sleep: %d runs of %s sleeping %s, then one step; with the executor's defaults, then with every sleep parked",
		n, benchwf.SleepName, b.cfg.SleepFor)
	return b.withSystem(ctx, "s3", func(s *system) error {
		_, tmr, exec, err := s.services(ctx, b.executorConcurrencyEnv()...)
		if err != nil {
			return err
		}
		r := &SleepLateness{Runs: n, Sleep: secs(b.cfg.SleepFor)}
		pass := func(exec *proc, done int, parked bool) (SleepPath, error) {
			in := benchwf.SleepInput{MS: int(b.cfg.SleepFor / time.Millisecond)}
			ids, err := s.startMany(ctx, benchwf.SleepName, n, b.cfg.StartConcurrency, func(int) any { return in })
			if err != nil {
				return SleepPath{}, err
			}
			if err := s.waitFinished(ctx, benchwf.SleepName, done+n, exec, tmr); err != nil {
				return SleepPath{}, err
			}
			if err := s.failed(ctx, benchwf.SleepName); err != nil {
				return SleepPath{}, err
			}
			late, timer, err := s.lateness(ctx, nil, ids)
			if err != nil {
				return SleepPath{}, err
			}
			p := SleepPath{Lateness: percentiles(late)}
			if parked {
				tp := percentiles(timer)
				p.TimerPart = &tp
			}
			if p.Redispatched, err = s.redispatched(ctx, benchwf.SleepName, ids); err != nil {
				return SleepPath{}, err
			}
			for _, l := range late {
				if l < 0 {
					p.Early++
				}
			}
			return p, nil
		}
		if r.Defaults, err = pass(exec, 0, false); err != nil {
			return err
		}
		exec.stop(10 * time.Second)
		parked, err := s.start(ctx, "executor", "executor-parking", append(b.executorConcurrencyEnv(), parkEverySleep)...)
		if err != nil {
			return err
		}
		if r.Parked, err = pass(parked, n, true); err != nil {
			return err
		}
		b.rep.S3 = r
		b.progress("S3: lateness with the defaults p50 %.1f ms, p99 %.1f ms, max %.1f ms; parked p50 %.1f ms, p99 %.1f ms, max %.1f ms",
			r.Defaults.Lateness.P50, r.Defaults.Lateness.P99, r.Defaults.Lateness.Max,
			r.Parked.Lateness.P50, r.Parked.Lateness.P99, r.Parked.Lateness.Max)
		return nil
	})
}

// lateness is, for the bench-sleep runs that slept until wake (when given) or that are
// among ids (when given), the record time of the step after the sleep minus the sleep's
// wake time, in ms; and the timer's part of it: when the run was queued again minus the
// wake time (the rest is the executor picking the run up and replaying it).
func (s *system) lateness(ctx context.Context, wake *time.Time, ids []string) (total, timer []float64, err error) {
	rows, err := s.pool.Query(ctx, `
SELECT extract(epoch FROM a.created_at - z.wake_at)::float8 * 1000, extract(epoch FROM r.queued_at - z.wake_at)::float8 * 1000
FROM step_runs z
JOIN step_runs a ON a.run_id = z.run_id AND a.step_key = 'after'
JOIN workflow_runs r ON r.id = z.run_id
WHERE z.step_key = 'nap' AND ($1::timestamptz IS NULL OR z.wake_at = $1) AND ($2::uuid[] IS NULL OR z.run_id = ANY ($2))`, wake, ids)
	if err != nil {
		return nil, nil, fmt.Errorf("read wake-up lateness: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var t, q float64
		if err := rows.Scan(&t, &q); err != nil {
			return nil, nil, fmt.Errorf("read wake-up lateness: %w", err)
		}
		total, timer = append(total, t), append(timer, q)
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("read wake-up lateness: %w", err)
	}
	return total, timer, nil
}

// ---------------------------------------------------------------------------------------
// S4 crash recovery.

// CrashRecovery is S4.
type CrashRecovery struct {
	Runs           int     `json:"runs"`
	Step2          Seconds `json:"step2_s"`
	Lease          Seconds `json:"lease_s"`
	Recovery       Seconds `json:"kill_to_all_completed_s"`
	Target         Seconds `json:"target_s"`                // lease + step 2 + 1 s
	CompletedRerun int     `json:"completed_steps_rerun"`   // must be 0
	Interrupted    int     `json:"interrupted_steps_rerun"` // runs whose step 2 ran twice
	LaterRerun     int     `json:"later_steps_rerun"`       // step 3 bodies run more than once: must be 0
	AllInStep2     bool    `json:"all_inside_step2_at_kill"`
	InsideAtKill   int     `json:"inside_step2_at_kill"`
}

func (b *bencher) runS4(ctx context.Context) error {
	n := b.cfg.CrashRuns
	lease := b.cfg.CrashLease
	b.progress("S4 crash recovery: %d runs of %s (step 2 takes %s), lease %s, kill -9 of the executor inside step 2",
		n, benchwf.CrashName, b.cfg.CrashStep, lease)
	return b.withSystem(ctx, "s4", func(s *system) error {
		env := []string{
			"KAGZI_LEASE=" + lease.String(),
			// Every run must be inside step 2 at once.
			"KAGZI_CONCURRENCY=" + strconv.Itoa(n+64),
			"KAGZI_SHUTDOWN_GRACE=1s",
		}
		return b.crash(ctx, s, env)
	})
}

func (b *bencher) crash(ctx context.Context, s *system, env []string) error {
	n, lease := b.cfg.CrashRuns, b.cfg.CrashLease
	if _, err := s.start(ctx, "scheduler", "scheduler"); err != nil {
		return err
	}
	tmr, err := s.startTimer(ctx)
	if err != nil {
		return err
	}
	execA, err := s.start(ctx, "executor", "executor-a", env...)
	if err != nil {
		return err
	}
	in := benchwf.CrashInput{MS: int(b.cfg.CrashStep / time.Millisecond), Record: true}
	if _, err := s.startMany(ctx, benchwf.CrashName, n, b.cfg.StartConcurrency, func(int) any { return in }); err != nil {
		return err
	}
	// Every run inside step 2, or, if the engine was too slow to get them all there at
	// once, the moment the first one leaves it: the kill happens then and the report
	// says not all were inside.
	var inside, ahead int
	inStep2 := func(ctx context.Context) (bool, error) {
		err := s.pool.QueryRow(ctx, `SELECT count(DISTINCT run_id) FILTER (WHERE step_key = 's2'),
       count(*) FILTER (WHERE step_key = 's3') FROM kagzi_bench_effects`).Scan(&inside, &ahead)
		return err == nil && (inside >= n || ahead > 0), err
	}
	wctx, cancel := context.WithTimeout(ctx, b.cfg.CrashStep+time.Minute)
	err = poll(wctx, execA, 20*time.Millisecond, inStep2)
	cancel()
	if err != nil {
		return fmt.Errorf("waiting for the runs to be inside step 2 (%d of %d are): %w", inside, n, err)
	}
	execB, err := s.start(ctx, "executor", "executor-b", env...)
	if err != nil {
		return err
	}
	if err := s.pool.QueryRow(ctx, `SELECT count(DISTINCT run_id) FILTER (WHERE step_key = 's2'),
       count(*) FILTER (WHERE step_key = 's3') FROM kagzi_bench_effects`).Scan(&inside, &ahead); err != nil {
		return fmt.Errorf("count runs inside step 2: %w", err)
	}
	killAt, err := dbNow(ctx, s.pool)
	if err != nil {
		return err
	}
	execA.kill()
	b.progress("S4: killed executor A (pid %d) with %d of %d runs inside step 2 (%d past it); executor B (pid %d) running",
		execA.pid(), inside, n, ahead, execB.pid())
	if err := s.waitFinished(ctx, benchwf.CrashName, n, execB, tmr); err != nil {
		return err
	}
	if err := s.failed(ctx, benchwf.CrashName); err != nil {
		return err
	}
	var last time.Time
	if err := s.pool.QueryRow(ctx, `SELECT max(finished_at) FROM workflow_runs WHERE workflow = $1`, benchwf.CrashName).Scan(&last); err != nil {
		return fmt.Errorf("read S4 completion time: %w", err)
	}
	r := &CrashRecovery{Runs: n, Step2: secs(b.cfg.CrashStep), Lease: secs(lease), Recovery: secs(last.Sub(killAt)),
		Target: secs(lease + b.cfg.CrashStep + time.Second), AllInStep2: inside == n && ahead == 0, InsideAtKill: inside}
	rows, err := s.pool.Query(ctx, `
SELECT step_key, count(*) FILTER (WHERE n > 1), coalesce(sum(n - 1), 0)
FROM (SELECT run_id, step_key, count(*) AS n FROM kagzi_bench_effects GROUP BY run_id, step_key) e
GROUP BY step_key`)
	if err != nil {
		return fmt.Errorf("count step re-runs: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var key string
		var runs, extra int
		if err := rows.Scan(&key, &runs, &extra); err != nil {
			return fmt.Errorf("count step re-runs: %w", err)
		}
		switch key {
		case "s1":
			r.CompletedRerun = extra
		case "s2":
			r.Interrupted = runs
		case "s3":
			r.LaterRerun = extra
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("count step re-runs: %w", err)
	}
	b.rep.S4 = r
	b.progress("S4: all %d completed %.2f s after the kill; completed steps re-run %d, interrupted steps re-run %d",
		n, float64(r.Recovery), r.CompletedRerun, r.Interrupted)
	return nil
}

// ---------------------------------------------------------------------------------------
// S5 sleeping scale.

// ProcMemory is the resident memory of the executor and the timer at one moment.
type ProcMemory struct {
	Sleepers int   `json:"sleepers"`
	Executor int64 `json:"executor_rss_bytes"`
	Timer    int64 `json:"timer_rss_bytes"`
}

// SleepingScale is S5.
type SleepingScale struct {
	Sleepers int `json:"sleepers"`
	// ScaledFrom is the default (100,000) when the bench cut the number of sleepers down
	// to fit its time budget at the rate the probe measured; 0 when it did not.
	ScaledFrom      int         `json:"scaled_down_from,omitempty"`
	ProbeRate       float64     `json:"probe_parked_per_s"` // how fast the probe's runs were started and parked
	AllAsleepAtOnce bool        `json:"all_asleep_at_once"`
	PeakAsleep      int         `json:"peak_asleep"`
	StartPhase      Seconds     `json:"start_phase_s"` // first start to the last run parked
	First           ProcMemory  `json:"at_probe"`      // the probe's 1,000 asleep
	Quarter         ProcMemory  `json:"at_quarter"`    // a quarter of the sleepers asleep
	All             ProcMemory  `json:"at_all"`        // every sleeper asleep
	ExecutorPeakRSS int64       `json:"executor_peak_rss_bytes"`
	TimerPeakRSS    int64       `json:"timer_peak_rss_bytes"`
	PGBytes         int64       `json:"pg_bytes"` // what the sleepers added to workflow_runs + step_runs, indexes and TOAST included
	PGBytesPerRun   float64     `json:"pg_bytes_per_run"`
	WakeToFinish    Seconds     `json:"wake_to_all_finished_s"`
	FinishPerS      float64     `json:"finished_per_s"`
	Lateness        Percentiles `json:"lateness"`
	TimerPart       Percentiles `json:"timer_part"`
	Redispatched    int         `json:"redispatched_runs"`
	RatioTo8Clients float64     `json:"finish_rate_ratio_to_8_client_commit_rate,omitempty"`
}

// Sizes of S5.
const (
	defaultSleepers = 100_000
	probeSleepers   = 1000
	// s5Budget bounds S5 when the number of sleepers is left to the bench: with the rest
	// of the scenarios, `make bench` must stay under ten minutes.
	s5Budget = 4 * time.Minute
	// s5Cost is S5's duration in units of "time to start and park every sleeper": the
	// parking, the margin before the shared wake time, then waking and finishing them.
	s5Cost = 2.5
)

func (b *bencher) runS5(ctx context.Context) error {
	probe := probeSleepers
	if b.cfg.Sleepers > 0 {
		probe = min(probe, b.cfg.Sleepers)
	}
	b.progress("S5 sleeping scale: a probe of %d sleepers, then the sleepers asleep at once", probe)
	return b.withSystem(ctx, "s5", func(s *system) error {
		// Sleepers here stand for long sleeps, which park: however close the shared wake
		// time, no executor may wait one out in process.
		_, tmr, exec, err := s.services(ctx, append(b.executorConcurrencyEnv(), parkEverySleep)...)
		if err != nil {
			return err
		}
		// Reported as far as it got, should a later phase fail.
		r := &SleepingScale{}
		b.rep.S5 = r
		asleep := func(ctx context.Context) (int, error) {
			var k int
			err := s.pool.QueryRow(ctx, `SELECT count(*) FROM workflow_runs WHERE status = 'SLEEPING'`).Scan(&k)
			return k, err
		}
		snapshot := func(sleepers int) (ProcMemory, error) {
			me, err := readMemory(exec.pid())
			if err != nil {
				return ProcMemory{}, err
			}
			mt, err := readMemory(tmr.pid())
			if err != nil {
				return ProcMemory{}, err
			}
			return ProcMemory{Sleepers: sleepers, Executor: me.RSSBytes, Timer: mt.RSSBytes}, nil
		}
		tableBytes := func() (int64, error) {
			var n int64
			err := s.pool.QueryRow(ctx, `SELECT pg_total_relation_size('workflow_runs') + pg_total_relation_size('step_runs')`).Scan(&n)
			if err != nil {
				return 0, fmt.Errorf("read table sizes: %w", err)
			}
			return n, nil
		}
		// park starts n sleepers that all wake at one shared time, which must fall after
		// the last of them has parked, and waits until they are all asleep (or the wake
		// time has come: then the report says how many were asleep at once).
		// progress, if set, hears every count of runs asleep while they park.
		park := func(ctx context.Context, n int, rate float64, paced bool, progress func(asleep int) error) (wake time.Time, peak int, took time.Duration, err error) {
			now, err := dbNow(ctx, s.pool)
			if err != nil {
				return wake, 0, 0, err
			}
			estimate := time.Duration(float64(n) / rate * float64(time.Second))
			// Whole milliseconds: the time travels as JSON and is stored in microseconds,
			// and the lateness query finds these sleepers by it.
			wake = now.Add(time.Second + estimate + estimate/4).Truncate(time.Millisecond)
			in := benchwf.SleepInput{Until: &wake}
			began := time.Now()
			pace := 0.0
			if paced {
				pace = rate
			}
			if _, err := s.startPaced(ctx, benchwf.SleepName, n, b.cfg.StartConcurrency, pace, func(int) any { return in }); err != nil {
				return wake, 0, 0, err
			}
			err = poll(ctx, exec, 250*time.Millisecond, func(ctx context.Context) (bool, error) {
				k, err := asleep(ctx)
				peak = max(peak, k)
				if err == nil && progress != nil {
					err = progress(k)
				}
				if k >= n {
					return true, err
				}
				now, err2 := dbNow(ctx, s.pool)
				return err2 == nil && now.After(wake), errors.Join(err, err2)
			})
			return wake, peak, time.Since(began), err
		}

		// The probe measures what parking costs here, so that the shared wake time of the
		// sleepers is neither too soon (not all asleep at once) nor minutes too late.
		guess := 200.0
		if b.rep.S1 != nil && b.rep.S1.WorkflowsPerS > 0 {
			guess = b.rep.S1.WorkflowsPerS / 2
		}
		// S5 has no fixed timeout (its size varies by machine); each phase gets one from
		// what it should take, so a system that stops making progress fails S5 instead
		// of hanging the bench.
		pctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		_, peak, _, err := park(pctx, probe, guess, false, nil)
		if err != nil {
			return fmt.Errorf("probe: %w", err)
		}
		if r.First, err = snapshot(peak); err != nil {
			return err
		}
		// The rate is read from the rows (first start to last park), not from the polls,
		// which see parked runs only every quarter second.
		var parked int
		var span float64
		err = s.pool.QueryRow(ctx, `
SELECT count(*), coalesce(extract(epoch FROM max(z.created_at) - min(r.created_at))::float8, 0)
FROM workflow_runs r JOIN step_runs z ON z.run_id = r.id AND z.step_key = 'nap'`).Scan(&parked, &span)
		if err != nil {
			return fmt.Errorf("read the probe's parking rate: %w", err)
		}
		if parked == 0 || span <= 0 {
			return fmt.Errorf("probe: none of %d sleepers parked (%s)", probe, s.runSummary())
		}
		r.ProbeRate = float64(parked) / max(span, 0.05)
		if err := s.waitFinished(pctx, benchwf.SleepName, probe, exec, tmr); err != nil {
			return fmt.Errorf("probe: %w", err)
		}
		if _, err := s.pool.Exec(ctx, `VACUUM workflow_runs, step_runs`); err != nil {
			return fmt.Errorf("vacuum after the probe: %w", err)
		}
		before, err := tableBytes()
		if err != nil {
			return err
		}

		n := b.cfg.Sleepers
		if n <= 0 {
			n = defaultSleepers
			if fit := int(s5Budget.Seconds()/s5Cost*r.ProbeRate) / 1000 * 1000; fit < n {
				n, r.ScaledFrom = max(fit, probe), defaultSleepers
				b.progress("S5: at %.0f parked/s, %d sleepers would take about %.0f s; running %d (--sleepers forces a number)",
					r.ProbeRate, defaultSleepers, s5Cost*defaultSleepers/r.ProbeRate, n)
			}
		}
		r.Sleepers = n
		expected := time.Duration(s5Cost * float64(n) / r.ProbeRate * float64(time.Second))
		mctx, cancel := context.WithTimeout(ctx, expected+expected/4+time.Minute)
		defer cancel()
		// Paced at the probe's rate: S5 is about many runs asleep, not about a burst (that
		// is S1), and a backlog of queued starts would only measure the queue.
		// The executor's memory is compared between a quarter and all of the sleepers
		// asleep: by a quarter it has run at the full rate for a while (the probe's
		// burst is a cold start), so what it gains after that is what sleepers cost it.
		wake, peak, took, err := park(mctx, n, r.ProbeRate, true, func(k int) error {
			if r.Quarter.Sleepers > 0 || k < n/4 {
				return nil
			}
			var err error
			r.Quarter, err = snapshot(k)
			return err
		})
		if err != nil {
			return err
		}
		r.PeakAsleep, r.StartPhase, r.AllAsleepAtOnce = peak, secs(took), peak >= n
		if r.All, err = snapshot(peak); err != nil {
			return err
		}
		after, err := tableBytes()
		if err != nil {
			return err
		}
		r.PGBytes = after - before
		r.PGBytesPerRun = float64(r.PGBytes) / float64(n)
		b.progress("S5: %d asleep after %.1f s; %.0f PostgreSQL bytes per run; wake in %.0f s",
			r.PeakAsleep, took.Seconds(), r.PGBytesPerRun, time.Until(wake).Seconds())

		// Waking and finishing them costs about what starting and parking them did; a
		// system that takes much longer than that has stopped making progress.
		fctx, cancel := context.WithDeadline(mctx, wake.Add(took+took/2+30*time.Second))
		defer cancel()
		if err := s.waitFinished(fctx, benchwf.SleepName, probe+n, exec, tmr); err != nil {
			return err
		}
		if err := s.failed(ctx, benchwf.SleepName); err != nil {
			return err
		}
		me, err := readMemory(exec.pid())
		if err != nil {
			return err
		}
		mt, err := readMemory(tmr.pid())
		if err != nil {
			return err
		}
		r.ExecutorPeakRSS, r.TimerPeakRSS = me.PeakBytes, mt.PeakBytes
		var last time.Time
		if err := s.pool.QueryRow(ctx, `SELECT max(finished_at) FROM workflow_runs WHERE workflow = $1`, benchwf.SleepName).Scan(&last); err != nil {
			return fmt.Errorf("read S5 completion time: %w", err)
		}
		r.WakeToFinish = secs(last.Sub(wake))
		r.FinishPerS = float64(n) / last.Sub(wake).Seconds()
		late, timer, err := s.lateness(ctx, &wake, nil)
		if err != nil {
			return err
		}
		r.Lateness, r.TimerPart = percentiles(late), percentiles(timer)
		if r.Redispatched, err = s.redispatched(ctx, benchwf.SleepName, nil); err != nil {
			return err
		}
		if ref := b.rep.Reference; ref != nil && ref.EightClients > 0 {
			r.RatioTo8Clients = r.FinishPerS / ref.EightClients
		}
		b.progress("S5: woke and finished %d runs in %.1f s; executor RSS %s at %d sleepers (probe), %s at %d, %s at %d",
			n, float64(r.WakeToFinish), mib(r.First.Executor), r.First.Sleepers, mib(r.Quarter.Executor), r.Quarter.Sleepers, mib(r.All.Executor), r.All.Sleepers)
		return nil
	})
}

// ---------------------------------------------------------------------------------------
// S6 idle cost.

// IdleCost is S6: what a system with nothing to do costs.
type IdleCost struct {
	Window        Seconds            `json:"window_s"`
	Transactions  int64              `json:"pg_transactions"`
	PerMinute     float64            `json:"pg_transactions_per_min"`
	ProbeQueries  int64              `json:"bench_probe_transactions"` // subtracted; the probes read another database
	CPU           Seconds            `json:"cpu_s"`
	CPUPerMinute  Seconds            `json:"cpu_s_per_min"`
	CPUPerService map[string]Seconds `json:"cpu_s_by_service"`
}

func (b *bencher) runS6(ctx context.Context) error {
	window := b.cfg.Idle
	b.progress("S6 idle cost: scheduler, timer and executor doing nothing for %s", window)
	return b.withSystem(ctx, "s6", func(s *system) error {
		sched, tmr, exec, err := s.services(ctx)
		if err != nil {
			return err
		}
		procs := map[string]*proc{"scheduler": sched, "timer": tmr, "executor": exec}
		// A backend reports its transactions to pg_stat_database when it goes idle, but
		// at most once a second: what it did within a second of its last report waits
		// for its 10 s idle timeout. The window opens once the start-up's statements
		// have certainly been reported.
		if err := sleepCtx(ctx, min(statsFlushLag, window)); err != nil {
			return err
		}
		cpu := func() (map[string]time.Duration, error) {
			out := map[string]time.Duration{}
			for name, p := range procs {
				d, err := readCPU(p.pid())
				if err != nil {
					return nil, err
				}
				out[name] = d
			}
			return out, nil
		}
		x0, err := s.xacts(ctx)
		if err != nil {
			return err
		}
		c0, err := cpu()
		if err != nil {
			return err
		}
		began := time.Now()
		if err := sleepCtx(ctx, window); err != nil {
			return err
		}
		x1, err := s.xacts(ctx)
		if err != nil {
			return err
		}
		c1, err := cpu()
		if err != nil {
			return err
		}
		elapsed := time.Since(began)
		for name, p := range procs {
			if p.exited() {
				return fmt.Errorf("%s exited while idle\n%s", name, p.logTail(20))
			}
		}
		r := &IdleCost{Window: secs(elapsed), Transactions: x1 - x0, CPUPerService: map[string]Seconds{}}
		r.PerMinute = float64(r.Transactions) / elapsed.Minutes()
		var total time.Duration
		for name := range procs {
			d := c1[name] - c0[name]
			total += d
			r.CPUPerService[name] = secs(d)
		}
		r.CPU = secs(total)
		r.CPUPerMinute = Seconds(total.Seconds() / elapsed.Minutes())
		b.rep.S6 = r
		b.progress("S6: %.1f transactions/min, %.2f CPU s/min", r.PerMinute, float64(r.CPUPerMinute))
		return nil
	})
}

// statsFlushLag bounds how late a transaction shows in pg_stat_database (PostgreSQL's
// PGSTAT_IDLE_INTERVAL, 10 s, plus a margin).
const statsFlushLag = 12 * time.Second

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
