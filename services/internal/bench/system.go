package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/embednats"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/store"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/benchwf"
)

// system is one scenario's private Kagzi: a fresh database, a fresh JetStream, the
// services as child processes, and the bench's own client side.
type system struct {
	b      *bencher
	name   string
	dbName string
	dbURL  string

	natsSrv *server.Server // nil when an external NATS is used
	natsDir string
	natsURL string

	pool   *pgxpool.Pool // the bench's probes: counts and timestamps
	nc     *nats.Conn
	client *sdk.Client
	done   *doneWatcher

	mu    sync.Mutex // procs: services start in parallel
	procs []*proc
}

// randSuffix keeps concurrent benches (and leftovers of --keep) apart.
func randSuffix() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// withDatabase returns the URL with its database replaced.
func withDatabase(databaseURL, name string) (string, error) {
	u, err := url.Parse(databaseURL)
	if err != nil {
		return "", fmt.Errorf("parse database url: %w", err)
	}
	u.Path = "/" + name
	return u.String(), nil
}

// adminConn connects to the server's maintenance database, where databases are created
// and dropped and where the bench reads pg_stat_database without counting itself.
func adminConn(ctx context.Context, databaseURL string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(databaseURL)
	if err != nil {
		return nil, fmt.Errorf("parse database url: %w", err)
	}
	cfg.Database = "postgres"
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to the maintenance database of %s: %w", store.RedactURL(databaseURL), err)
	}
	return conn, nil
}

// createDatabase makes an empty database and migrates it. The services would migrate it
// too, but doing it first keeps their start-up (and the advisory lock they would queue
// on) out of every figure.
func (b *bencher) createDatabase(ctx context.Context, scenario string) (name, dbURL string, err error) {
	name = "kagzi_bench_" + scenario + "_" + randSuffix()
	conn, err := adminConn(ctx, b.cfg.DatabaseURL)
	if err != nil {
		return "", "", err
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		return "", "", fmt.Errorf("create database %s: %w", name, err)
	}
	dbURL, err = withDatabase(b.cfg.DatabaseURL, name)
	if err != nil {
		return "", "", err
	}
	return name, dbURL, nil
}

func (b *bencher) dropDatabase(name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := adminConn(ctx, b.cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("drop database %s: %w", name, err)
	}
	return nil
}

// newSystem prepares a scenario's database and NATS and connects the bench's client; the
// services are started by the scenario, which knows which ones it needs and how.
func (b *bencher) newSystem(ctx context.Context, scenario string) (s *system, err error) {
	s = &system{b: b, name: scenario}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	s.dbName, s.dbURL, err = b.createDatabase(ctx, scenario)
	if err != nil {
		return s, err
	}
	if err := store.Migrate(ctx, s.dbURL); err != nil {
		return s, fmt.Errorf("migrate %s: %w", s.dbName, err)
	}
	s.pool, err = store.Connect(ctx, s.dbURL, 4)
	if err != nil {
		return s, err
	}
	if _, err := s.pool.Exec(ctx, benchwf.EffectsDDL); err != nil {
		return s, fmt.Errorf("create %s: %w", benchwf.EffectsTable, err)
	}
	if err := s.startNATS(ctx); err != nil {
		return s, err
	}
	s.done, err = watchDone(s.nc)
	if err != nil {
		return s, err
	}
	opts := []sdk.ClientOption{sdk.WithRequestTimeout(30 * time.Second)}
	if ns := b.cfg.Namespace; ns != "" {
		opts = append(opts, sdk.WithNamespace(ns))
	}
	s.client = sdk.NewClient(s.nc, opts...)
	return s, nil
}

// startNATS gives the scenario a JetStream of its own: a new embedded server over a new
// store directory, or, on an external server, the Kagzi streams deleted so that no
// doorbell or consumer of an earlier scenario is left.
func (s *system) startNATS(ctx context.Context) error {
	if s.b.cfg.NATS.URL == "" {
		dir, err := os.MkdirTemp("", "kagzi-bench-nats-")
		if err != nil {
			return fmt.Errorf("create nats store directory: %w", err)
		}
		s.natsDir = dir
		// SyncAlways, as kagzi dev and the shipped config run it: an acknowledged
		// doorbell costs an fsync here too, so the figures are those of a durable setup.
		srv, err := embednats.Start(embednats.Config{StoreDir: dir, SyncAlways: true})
		if err != nil {
			return err
		}
		s.natsSrv = srv
		s.natsURL = srv.ClientURL()
	} else {
		s.natsURL = s.b.cfg.NATS.URL
	}
	opts := s.b.cfg.NATS
	opts.URL = s.natsURL
	opts.Name = "kagzi-bench"
	nc, err := bus.Connect(opts)
	if err != nil {
		return err
	}
	s.nc = nc
	if s.natsSrv != nil {
		return nil
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("open jetstream: %w", err)
	}
	for _, name := range []string{wire.TaskStream, wire.SubmitStream} {
		if err := js.DeleteStream(ctx, name); err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
			return fmt.Errorf("delete stream %s of an earlier scenario: %w", name, err)
		}
	}
	return nil
}

// serviceEnv is the environment of a service: the caller's, without any Kagzi setting
// that could point it elsewhere, plus the scenario's.
func (s *system) serviceEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(k, "KAGZI_"), k == "DATABASE_URL", k == "MIGRATION_DATABASE_URL":
			continue
		case strings.HasPrefix(k, "NATS_") && s.natsSrv != nil:
			continue // the embedded server takes no credentials
		}
		env = append(env, kv)
	}
	env = append(env,
		"DATABASE_URL="+s.dbURL,
		"NATS_URL="+s.natsURL,
		"KAGZI_HTTP_ADDR=off",
		"KAGZI_LOG_LEVEL="+s.b.cfg.ServiceLogLevel,
		"KAGZI_LOG_FORMAT=json",
		// Migrated by the bench already; the services only check the version.
		"KAGZI_AUTO_MIGRATE=false",
	)
	if ns := s.b.cfg.Namespace; ns != "" {
		env = append(env, "KAGZI_NAMESPACE="+ns)
	}
	return append(env, extra...)
}

// start runs `kagzi <service>` with the scenario's environment plus extra.
func (s *system) start(ctx context.Context, service, name string, extra ...string) (*proc, error) {
	var pprofAddr string
	if s.b.cfg.ProfileDir != "" {
		addr, err := freeLoopbackAddr()
		if err != nil {
			return nil, err
		}
		pprofAddr = addr
		// Later entries win: these replace serviceEnv's KAGZI_HTTP_ADDR=off.
		extra = append(slices.Clip(extra), "KAGZI_HTTP_ADDR="+addr, "KAGZI_PPROF=true")
	}
	p, err := startProc(s.name+"-"+name, s.b.cfg.Binary, []string{service}, s.serviceEnv(extra...), s.b.logDir)
	if err != nil {
		return nil, err
	}
	p.pprof = pprofAddr
	s.mu.Lock()
	s.procs = append(s.procs, p)
	s.mu.Unlock()
	var ready func(context.Context, *proc) error
	switch service {
	case "scheduler":
		ready = s.schedulerReady
	case "timer":
		ready = s.timerReady
	case "executor":
		ready = s.executorReady
	}
	rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := ready(rctx, p); err != nil {
		return nil, fmt.Errorf("%s did not become ready: %w\n--- last lines of %s ---\n%s", name, err, p.log, p.logTail(20))
	}
	return p, nil
}

// startTimer starts the timer with the configured KAGZI_MAX_IDLE, if any.
func (s *system) startTimer(ctx context.Context) (*proc, error) {
	var env []string
	if d := s.b.cfg.TimerMaxIdle; d > 0 {
		env = append(env, "KAGZI_MAX_IDLE="+d.String())
	}
	return s.start(ctx, "timer", "timer", env...)
}

// services starts a scheduler, a timer and one executor, in parallel, and waits until
// each one serves.
func (s *system) services(ctx context.Context, executorEnv ...string) (sched, tmr, exec *proc, err error) {
	var wg sync.WaitGroup
	var errs [3]error
	wg.Add(3)
	go func() { defer wg.Done(); sched, errs[0] = s.start(ctx, "scheduler", "scheduler") }()
	go func() { defer wg.Done(); tmr, errs[1] = s.startTimer(ctx) }()
	go func() { defer wg.Done(); exec, errs[2] = s.start(ctx, "executor", "executor", executorEnv...) }()
	wg.Wait()
	return sched, tmr, exec, errors.Join(errs[:]...)
}

// poll calls check every interval until it says done, ctx ends or p exits.
func poll(ctx context.Context, p *proc, interval time.Duration, check func(context.Context) (bool, error)) error {
	for {
		if p != nil && p.exited() {
			return fmt.Errorf("%s exited", p.name)
		}
		ok, err := check(ctx)
		if ok {
			return nil
		}
		t := time.NewTimer(interval)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			if err != nil {
				return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
			}
			return ctx.Err()
		}
	}
}

// schedulerReady: a describe of a run that does not exist is answered "not found" only
// by a scheduler that is up.
func (s *system) schedulerReady(ctx context.Context, p *proc) error {
	return poll(ctx, p, 50*time.Millisecond, func(ctx context.Context) (bool, error) {
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := sdk.NewClient(s.nc, sdk.WithRequestTimeout(500*time.Millisecond)).Describe(qctx, wire.NewRunID())
		return errors.Is(err, wire.ErrRunNotFound), err
	})
}

// timerReady: the timer subscribes to hints and never replies, so a request there times
// out once it listens and fails with "no responders" before. The body is not a hint and
// is ignored.
func (s *system) timerReady(ctx context.Context, p *proc) error {
	return poll(ctx, p, 50*time.Millisecond, func(context.Context) (bool, error) {
		_, err := s.nc.Request(wire.TimerHintSubject, []byte(`{}`), 200*time.Millisecond)
		return errors.Is(err, nats.ErrTimeout), err
	})
}

// executorReady: a worker announces itself (with its pid) once its consumers exist.
func (s *system) executorReady(ctx context.Context, p *proc) error {
	return poll(ctx, p, 50*time.Millisecond, func(ctx context.Context) (bool, error) {
		var n int
		err := s.pool.QueryRow(ctx, `SELECT count(*) FROM workers WHERE pid = $1`, p.pid()).Scan(&n)
		return err == nil && n > 0, err
	})
}

// close stops what is still running, then drops the database unless --keep.
func (s *system) close() {
	s.mu.Lock()
	procs := s.procs
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Add(1)
		go func() { defer wg.Done(); p.stop(5 * time.Second) }()
	}
	wg.Wait()
	if s.done != nil {
		s.done.close()
	}
	if s.nc != nil {
		s.nc.Close()
	}
	if s.natsSrv != nil {
		s.natsSrv.Shutdown()
		s.natsSrv.WaitForShutdown()
	}
	if s.natsDir != "" {
		_ = os.RemoveAll(s.natsDir)
	}
	if s.pool != nil {
		s.pool.Close()
	}
	if s.dbName != "" {
		if s.b.cfg.Keep {
			s.b.progress("kept database %s", s.dbName)
		} else if err := s.b.dropDatabase(s.dbName); err != nil {
			s.b.progress("warning: %v", err)
		}
	}
}

// doneWatcher counts the completion notices of runs. Notices are best effort, so they
// only tell the bench when to look; the database has the last word.
type doneWatcher struct {
	sub *nats.Subscription

	mu     sync.Mutex
	seen   map[string]struct{}
	notify chan struct{}
}

func watchDone(nc *nats.Conn) (*doneWatcher, error) {
	w := &doneWatcher{seen: map[string]struct{}{}, notify: make(chan struct{}, 1)}
	sub, err := nc.Subscribe(wire.DoneSubjects, func(m *nats.Msg) {
		var d wire.RunDone
		if json.Unmarshal(m.Data, &d) != nil {
			return
		}
		w.mu.Lock()
		w.seen[d.RunID] = struct{}{}
		w.mu.Unlock()
		select {
		case w.notify <- struct{}{}:
		default:
		}
	})
	if err != nil {
		return nil, fmt.Errorf("subscribe to completion notices: %w", err)
	}
	// A large burst of notices must not be dropped as a slow consumer.
	_ = sub.SetPendingLimits(-1, -1)
	if err := nc.Flush(); err != nil {
		return nil, fmt.Errorf("subscribe to completion notices: %w", err)
	}
	w.sub = sub
	return w, nil
}

func (w *doneWatcher) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.seen)
}

func (w *doneWatcher) close() { _ = w.sub.Unsubscribe() }

// waitFinished waits until want runs of workflow are terminal (by the database), looking
// when notices say enough have finished and at least every two seconds otherwise, so the
// bench's own queries stay out of the way of the load it measures.
func (s *system) waitFinished(ctx context.Context, workflow string, want int, watch ...*proc) error {
	check := func() (bool, error) {
		var n int
		err := s.pool.QueryRow(ctx, `SELECT count(*) FROM workflow_runs WHERE workflow = $1 AND status IN ('COMPLETED','FAILED','CANCELLED')`,
			workflow).Scan(&n)
		return n >= want, err
	}
	slow := time.NewTicker(2 * time.Second)
	defer slow.Stop()
	for {
		for _, p := range watch {
			if p.exited() {
				return fmt.Errorf("%s exited\n--- last lines of %s ---\n%s", p.name, p.log, p.logTail(20))
			}
		}
		select {
		case <-s.done.notify:
			if s.done.count() < want {
				continue
			}
		case <-slow.C:
		case <-ctx.Done():
			return fmt.Errorf("waiting for %d runs of %s: %w (%s)", want, workflow, ctx.Err(), s.runSummary())
		}
		ok, err := check()
		if err != nil {
			return fmt.Errorf("count finished runs: %w", err)
		}
		if ok {
			return nil
		}
	}
}

// runSummary says where the runs are, for a scenario that did not finish: how many are
// in each status and how often the most re-dispatched one was dispatched.
func (s *system) runSummary() string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT status, count(*), max(dispatch_seq), max(attempt) FROM workflow_runs GROUP BY status ORDER BY status`)
	if err != nil {
		return "runs unknown: " + err.Error()
	}
	defer rows.Close()
	var parts []string
	for rows.Next() {
		var status string
		var n, seq, attempt int64
		if err := rows.Scan(&status, &n, &seq, &attempt); err != nil {
			return "runs unknown: " + err.Error()
		}
		parts = append(parts, fmt.Sprintf("%s %d (dispatched up to %d times, attempt up to %d)", status, n, seq, attempt))
	}
	if err := rows.Err(); err != nil {
		return "runs unknown: " + err.Error()
	}
	return "runs: " + strings.Join(parts, ", ")
}

// failed reports runs that did not complete, which void a scenario's figures.
func (s *system) failed(ctx context.Context, workflow string) error {
	var n int
	var msg *string
	err := s.pool.QueryRow(ctx, `SELECT count(*), min(error) FROM workflow_runs WHERE workflow = $1 AND status <> 'COMPLETED'`,
		workflow).Scan(&n, &msg)
	if err != nil {
		return fmt.Errorf("count failed runs: %w", err)
	}
	if n > 0 {
		m := ""
		if msg != nil {
			m = ": " + *msg
		}
		return fmt.Errorf("%d runs of %s did not complete%s", n, workflow, m)
	}
	return nil
}

// startMany starts n runs with `workers` concurrent clients, the way a busy front end
// would, and returns their ids.
func (s *system) startMany(ctx context.Context, workflow string, n, workers int, input func(i int) any) ([]string, error) {
	return s.startPaced(ctx, workflow, n, workers, 0, input)
}

// startPaced is startMany at no more than rate starts a second (0: as fast as the
// scheduler accepts them).
func (s *system) startPaced(ctx context.Context, workflow string, n, workers int, rate float64, input func(i int) any) ([]string, error) {
	ids := make([]string, n)
	next := make(chan int)
	errc := make(chan error, workers)
	var wg sync.WaitGroup
	for range min(workers, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				id, err := s.client.StartByName(ctx, workflow, input(i))
				if err != nil {
					errc <- fmt.Errorf("start run %d of %s: %w", i, workflow, err)
					return
				}
				ids[i] = id
			}
		}()
	}
	var err error
	began := time.Now()
feed:
	for i := range n {
		if rate > 0 {
			if d := time.Until(began.Add(time.Duration(float64(i) / rate * float64(time.Second)))); d > 0 {
				if err = sleepCtx(ctx, d); err != nil {
					break feed
				}
			}
		}
		select {
		case next <- i:
		case err = <-errc:
			break feed
		case <-ctx.Done():
			err = ctx.Err()
			break feed
		}
	}
	close(next)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errc:
		default:
		}
	}
	return ids, err
}
