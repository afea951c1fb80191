package testkit

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kagzi/kagzi/libs/store"
)

// PGServer is a PostgreSQL server private to one test, for tests that crash or stop
// PostgreSQL (BATTERY.md H1): the shared server on 5432 must never be touched, other
// packages run against it at the same time. It has its own data directory and port,
// fsync on, and a database named kagzi with Kagzi's schema migrated.
//
// PostgreSQL refuses to run as root, so when the test runs as root (CI does) every
// server command runs as the postgres user through runuser, in a directory that user
// owns.
type PGServer struct {
	t    testing.TB
	bin  string // directory of initdb and pg_ctl
	dir  string // owned by the server's user: data/, the socket and the log
	port int
	// asUser is the user the server runs as when the test runs as root; empty: the
	// test's own user.
	asUser   string
	settings []string // -c name=value, in order

	mu sync.Mutex
	up bool
}

// StartPostgres creates, starts and migrates a private server; it is stopped and its
// directory removed when the test ends. settings are server settings as name=value
// (e.g. "max_connections=40"), given on the server's command line: they win over the
// defaults here (fsync=on, max_connections=200) and cannot be changed by ALTER SYSTEM.
// PostgreSQL's binaries are looked up in KAGZI_TEST_PG_BIN, else the newest
// /usr/lib/postgresql/*/bin.
func StartPostgres(t testing.TB, settings ...string) *PGServer {
	t.Helper()
	bin, err := pgBinDir()
	if err != nil {
		t.Fatalf("testkit: %v", err)
	}
	s := &PGServer{t: t, bin: bin, port: freePort(t)}
	// listen_addresses: TCP on loopback only. max_connections: every service pool of a
	// battery test, with room.
	s.settings = []string{"fsync=on", "listen_addresses=127.0.0.1", "max_connections=200"}
	for _, kv := range settings {
		name, _, ok := strings.Cut(kv, "=")
		if !ok || strings.ContainsAny(kv, " \t'\"\\") {
			// pg_ctl hands its -o string to a shell.
			t.Fatalf("testkit: postgres setting %q: want name=value without spaces or quotes", kv)
		}
		s.settings = slices.DeleteFunc(s.settings, func(d string) bool { return strings.HasPrefix(d, name+"=") })
		s.settings = append(s.settings, kv)
	}
	if os.Geteuid() == 0 {
		s.asUser = "postgres"
	}
	// Not t.TempDir: its parents are private to root, and the server's user must reach it.
	s.dir, err = os.MkdirTemp("", "kagzi-pg-")
	if err != nil {
		t.Fatalf("testkit: %v", err)
	}
	t.Cleanup(func() {
		s.stop("fast")
		if t.Failed() {
			s.dumpLog(60)
		}
		_ = os.RemoveAll(s.dir)
	})
	if s.asUser != "" {
		if err := chownTo(s.dir, s.asUser); err != nil {
			t.Fatalf("testkit: %v", err)
		}
	}
	if out, err := s.run("initdb", "-D", s.dataDir(), "-U", "postgres", "-A", "trust", "-E", "UTF8",
		"--locale=C", "--no-sync"); err != nil {
		t.Fatalf("testkit: initdb: %v\n%s", err, out)
	}
	s.Start()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := store.CreateDatabaseIfMissing(ctx, s.URL()); err != nil {
		t.Fatalf("testkit: %v", err)
	}
	if err := store.Migrate(ctx, s.URL()); err != nil {
		t.Fatalf("testkit: migrate the private server: %v", err)
	}
	return s
}

// URL is the kagzi database's URL.
func (s *PGServer) URL() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/kagzi?sslmode=disable", s.port)
}

// Log is the server's log so far (e.g. to count "too many clients" refusals).
func (s *PGServer) Log() string {
	b, _ := os.ReadFile(s.logFile())
	return string(b)
}

// Start starts the server and waits until it accepts connections; after a crash that
// includes its recovery.
func (s *PGServer) Start() {
	s.t.Helper()
	// The socket lives in the test's directory, never beside the shared server's.
	opts := fmt.Sprintf("-p %d -k %s", s.port, s.dir)
	for _, kv := range s.settings {
		opts += " -c " + kv
	}
	if out, err := s.run("pg_ctl", "-D", s.dataDir(), "-l", s.logFile(), "-o", opts, "-w", "-t", "120", "start"); err != nil {
		s.dumpLog(60)
		s.t.Fatalf("testkit: start postgres on port %d: %v\n%s", s.port, err, out)
	}
	s.mu.Lock()
	s.up = true
	s.mu.Unlock()
}

// Crash stops the server the way a power cut would look to it: pg_ctl stop -m immediate
// (no checkpoint, every backend killed); the next Start runs crash recovery.
func (s *PGServer) Crash() {
	s.t.Helper()
	if out, err := s.stop("immediate"); err != nil {
		s.t.Fatalf("testkit: crash postgres: %v\n%s", err, out)
	}
}

// Stop shuts the server down cleanly; idempotent.
func (s *PGServer) Stop() {
	s.t.Helper()
	if out, err := s.stop("fast"); err != nil {
		s.t.Fatalf("testkit: stop postgres: %v\n%s", err, out)
	}
}

func (s *PGServer) stop(mode string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.up {
		return nil, nil
	}
	out, err := s.run("pg_ctl", "-D", s.dataDir(), "-m", mode, "-w", "-t", "60", "stop")
	if err == nil {
		s.up = false
	}
	return out, err
}

func (s *PGServer) dataDir() string { return filepath.Join(s.dir, "data") }
func (s *PGServer) logFile() string { return filepath.Join(s.dir, "postgres.log") }

// run runs one of the server's programs, as the server's user.
func (s *PGServer) run(prog string, args ...string) ([]byte, error) {
	path := filepath.Join(s.bin, prog)
	var cmd *exec.Cmd
	if s.asUser != "" {
		cmd = exec.Command("runuser", append([]string{"-u", s.asUser, "--", path}, args...)...)
	} else {
		cmd = exec.Command(path, args...)
	}
	cmd.Dir = s.dir
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.Bytes(), err
}

// dumpLog prints the last n lines of the server's log.
func (s *PGServer) dumpLog(n int) {
	b, err := os.ReadFile(s.logFile())
	if err != nil {
		return
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	s.t.Logf("---- last %d lines of the private postgres log ----\n%s", len(lines), bytes.Join(lines, []byte("\n")))
}

func pgBinDir() (string, error) {
	if d := os.Getenv("KAGZI_TEST_PG_BIN"); d != "" {
		return d, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	// Newest major version first: "15" sorts after "9" only numerically.
	sort.Slice(dirs, func(i, j int) bool { return pgMajor(dirs[i]) > pgMajor(dirs[j]) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "pg_ctl")); err == nil {
			return d, nil
		}
	}
	return "", fmt.Errorf("no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin; set KAGZI_TEST_PG_BIN")
}

func pgMajor(binDir string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return n
}

func chownTo(dir, name string) error {
	u, err := user.Lookup(name)
	if err != nil {
		return fmt.Errorf("look up user %s: %w", name, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(dir, uid, gid); err != nil {
		return fmt.Errorf("give %s to %s: %w", dir, name, err)
	}
	return nil
}
