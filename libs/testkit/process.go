package testkit

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Build compiles Go main packages (import paths) into dir and returns the binaries'
// paths by the last element of each path. Fault tests build once in TestMain and run the
// binaries as real processes, so kill -9 is real.
func Build(dir string, pkgs ...string) (map[string]string, error) {
	return BuildWith(dir, nil, pkgs...)
}

// Process is a child process whose output goes to a log file in the test's directory.
type Process struct {
	t    testing.TB
	Name string
	bin  string
	args []string
	env  []string
	log  string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// StartProcess runs bin with env added to the test's environment. The process is killed
// when the test ends; its log is printed when the test failed.
func StartProcess(t testing.TB, name, bin string, env ...string) *Process {
	t.Helper()
	return StartCommand(t, name, bin, nil, env...)
}

// StartCommand is StartProcess with command-line arguments.
func StartCommand(t testing.TB, name, bin string, args []string, env ...string) *Process {
	t.Helper()
	dir := t.TempDir()
	if keep := os.Getenv("KAGZI_TEST_LOG_DIR"); keep != "" {
		// Kept after the test, passed or not: a whole log to read, where a failure
		// prints only its last lines.
		dir = filepath.Join(keep, strings.ReplaceAll(t.Name(), "/", "_"))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	p := &Process{t: t, Name: name, bin: bin, args: args, env: env, log: filepath.Join(dir, name+".log")}
	p.Start()
	t.Cleanup(func() {
		p.Kill()
		if t.Failed() {
			p.DumpLog(200)
		}
	})
	return p
}

// Start (re)starts the process.
func (p *Process) Start() {
	p.t.Helper()
	f, err := os.OpenFile(p.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		p.t.Fatalf("open log of %s: %v", p.Name, err)
	}
	cmd := exec.Command(p.bin, p.args...)
	cmd.Env = append(os.Environ(), p.env...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		p.t.Fatalf("start %s: %v", p.Name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); f.Close(); close(done) }()
	p.mu.Lock()
	p.cmd, p.done = cmd, done
	p.mu.Unlock()
}

// PID is the running process's id.
func (p *Process) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd.Process.Pid
}

// Kill sends SIGKILL and waits for the process to be gone: no deferred cleanup runs.
func (p *Process) Kill() { p.signalAndWait(syscall.SIGKILL, 10*time.Second) }

// Stop sends SIGTERM and waits up to grace, then SIGKILL.
func (p *Process) Stop(grace time.Duration) {
	if !p.signalAndWait(syscall.SIGTERM, grace) {
		p.Kill()
	}
}

// Signal sends sig (SIGSTOP, SIGCONT, …) without waiting.
func (p *Process) Signal(sig syscall.Signal) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil && p.cmd.Process != nil {
		_ = p.cmd.Process.Signal(sig)
	}
}

func (p *Process) signalAndWait(sig syscall.Signal, wait time.Duration) bool {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil {
		return true
	}
	select {
	case <-done:
		return true
	default:
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
		return true
	case <-time.After(wait):
		return false
	}
}

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Log returns everything the process wrote so far.
func (p *Process) Log() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

// DumpLog prints the last n lines of the process's log into the test output.
func (p *Process) DumpLog(n int) {
	lines := strings.Split(strings.TrimRight(p.Log(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	p.t.Logf("---- last %d lines of %s ----\n%s", len(lines), p.Name, strings.Join(lines, "\n"))
}
