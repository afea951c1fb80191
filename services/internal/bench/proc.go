package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is one service running as a child process of the bench: the same kagzi binary an
// operator runs, so kill -9 and the RSS and CPU figures are those of the real thing.
type proc struct {
	name string
	log  string
	// pprof is the address of the process's profiler (KAGZI_PPROF), when the bench
	// profiles.
	pprof string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

func startProc(name, bin string, args, env []string, logDir string) (*proc, error) {
	logPath := filepath.Join(logDir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open log of %s: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = f, f
	// Own process group: a Ctrl-C at the terminal reaches the bench, which then stops its
	// children in order, rather than every process at once. Pdeathsig: a bench that dies
	// (kill -9) takes its services with it instead of leaving them polling forever.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s (%s): %w", name, bin, err)
	}
	p := &proc{name: name, log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); f.Close(); close(p.done) }()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill is kill -9: no deferred cleanup, no hand-back of runs.
func (p *proc) kill() { p.signalAndWait(syscall.SIGKILL, 10*time.Second) }

// stop asks for a clean shutdown and kills after grace.
func (p *proc) stop(grace time.Duration) {
	if !p.signalAndWait(syscall.SIGTERM, grace) {
		p.kill()
	}
}

func (p *proc) signalAndWait(sig syscall.Signal, wait time.Duration) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited() {
		return true
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return true
	case <-time.After(wait):
		return false
	}
}

// logTail is the end of the process's log, for error messages.
func (p *proc) logTail(lines int) string {
	b, err := os.ReadFile(p.log)
	if err != nil {
		return ""
	}
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// memory is what /proc/<pid>/status says of a process's resident memory.
type memory struct {
	RSSBytes  int64 `json:"rss_bytes"`  // VmRSS: resident now
	PeakBytes int64 `json:"peak_bytes"` // VmHWM: the most it has been resident
}

func readMemory(pid int) (memory, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memory{}, fmt.Errorf("read memory of pid %d: %w", pid, err)
	}
	defer f.Close()
	var m memory
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		var dst *int64
		switch {
		case strings.HasPrefix(line, "VmRSS:"):
			dst = &m.RSSBytes
		case strings.HasPrefix(line, "VmHWM:"):
			dst = &m.PeakBytes
		default:
			continue
		}
		fields := strings.Fields(line) // "VmRSS:", "12345", "kB"
		if len(fields) >= 2 {
			kb, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil {
				return memory{}, fmt.Errorf("parse %q of pid %d: %w", line, pid, err)
			}
			*dst = kb << 10
		}
	}
	if err := sc.Err(); err != nil {
		return memory{}, fmt.Errorf("read memory of pid %d: %w", pid, err)
	}
	return m, nil
}

// clockTicks is USER_HZ, which Linux fixes at 100 on every architecture Go supports
// (sysconf would need cgo to ask).
const clockTicks = 100

// readCPU is the user plus system CPU time a process has used so far.
func readCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read cpu of pid %d: %w", pid, err)
	}
	// The command name (field 2) is in parentheses and may hold spaces; count fields
	// after its closing one. utime and stime are fields 14 and 15.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat: no command name", pid)
	}
	fields := strings.Fields(string(b[i+1:]))
	if len(fields) < 13 {
		return 0, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(fields))
	}
	var ticks int64
	for _, f := range fields[11:13] { // fields 14 and 15 of the whole line
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse /proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
}
