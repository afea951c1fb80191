//go:build kagzi_failpoints

package failpoint

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Enabled reports whether this binary was built with failpoints.
const Enabled = true

type point struct {
	action  string
	sleep   time.Duration
	left    int // -1: unlimited
	percent int // 0: always
}

var (
	once   sync.Once
	mu     sync.Mutex
	points map[string]*point
)

func load() {
	points = map[string]*point{}
	for _, spec := range strings.Split(os.Getenv("KAGZI_FAILPOINTS"), ",") {
		spec = strings.TrimSpace(spec)
		if spec == "" {
			continue
		}
		name, action, ok := strings.Cut(spec, "=")
		if !ok {
			fmt.Fprintf(os.Stderr, "failpoint: ignoring %q: want name=action\n", spec)
			continue
		}
		p := &point{left: -1}
		if a, n, ok := strings.Cut(action, "*"); ok {
			action = a
			p.left, _ = strconv.Atoi(n)
		}
		if a, n, ok := strings.Cut(action, "%"); ok {
			action = a
			p.percent, _ = strconv.Atoi(n)
		}
		if strings.HasPrefix(action, "sleep(") && strings.HasSuffix(action, ")") {
			ms, _ := strconv.Atoi(action[len("sleep(") : len(action)-1])
			p.sleep = time.Duration(ms) * time.Millisecond
			action = "sleep"
		}
		p.action = action
		points[name] = p
	}
}

// Inject fires the named point if it is armed.
func Inject(name string) error {
	once.Do(load)
	mu.Lock()
	p := points[name]
	if p == nil || p.left == 0 || (p.percent > 0 && rand.IntN(100) >= p.percent) {
		mu.Unlock()
		return nil
	}
	if p.left > 0 {
		p.left--
	}
	action, sleep := p.action, p.sleep
	mu.Unlock()
	switch action {
	case "exit":
		fmt.Fprintf(os.Stderr, "failpoint %s: exit 137\n", name)
		os.Exit(137)
	case "sleep":
		time.Sleep(sleep)
	case "error", "commit_then_error":
		return fmt.Errorf("%w at %s", ErrInjected, name)
	}
	return nil
}
