//go:build kagzi_failpoints

package clock

import (
	"fmt"
	"os"
	"sync"
)

// OffsetHonoured reports whether this build obeys KAGZI_TEST_CLOCK_OFFSET.
const OffsetHonoured = true

var (
	defaultOnce  sync.Once
	defaultClock Clock
)

// Default is the clock a Kagzi process uses unless it is given another: in a build with
// the kagzi_failpoints tag, the system clock shifted by KAGZI_TEST_CLOCK_OFFSET.
//
// A malformed offset panics: a fault test that meant to skew the clock must not pass
// with an unskewed one. An offset in effect is announced once on stderr, where the test
// can check that it took.
func Default() Clock {
	defaultOnce.Do(func() {
		c, d, err := fromEnv(os.Getenv)
		if err != nil {
			panic("clock: " + err.Error())
		}
		if d != 0 {
			fmt.Fprintf(os.Stderr, "clock: %s in effect: this process's clock reads %s off\n", OffsetEnv, d)
		}
		defaultClock = c
	})
	return defaultClock
}
