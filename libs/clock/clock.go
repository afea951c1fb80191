// Package clock is where Kagzi's processes read the current time.
//
// Kagzi decides nothing by a process's wall clock: wake times, leases and staleness are
// set and compared by PostgreSQL's now(), and a process only measures intervals (how
// long to wait, whether its own lease has lapsed) between readings of its own clock.
// Reading the time through a Clock lets the fault battery prove that (BATTERY.md H5,
// T13): in builds with the kagzi_failpoints tag, Default shifts the process's clock by
// KAGZI_TEST_CLOCK_OFFSET, and a wall-clock reading that leaked into the database or
// into a deadline would show up skewed by that much. Release builds ignore the variable.
//
// It imports only the standard library.
package clock

import (
	"fmt"
	"time"
)

// Clock reads the current time. Its readings must carry a monotonic clock reading, as
// time.Now's do, so that an interval between two readings (Sub, Before, After) ignores
// steps of the wall clock. Code that holds a Clock measures every interval between two
// readings of it, never against time.Now (time.Since, time.Until): see Offset.
type Clock interface {
	Now() time.Time
}

// System is the machine's clock.
var System Clock = system{}

type system struct{}

func (system) Now() time.Time { return time.Now() }

// Offset is the system clock shifted by a fixed amount: what a process on a machine
// whose clock is that far off reads. Add shifts a time.Now reading's monotonic reading
// along with its wall reading, so intervals between Offset readings are exact, but
// time.Since of one is off by the offset. (A machine whose clock really is off keeps an
// unshifted monotonic clock, which no Go API can build.) Hence the rule on Clock: both
// ends of every interval are readings of the same Clock.
type Offset time.Duration

// Now is the system time shifted by the offset.
func (o Offset) Now() time.Time { return time.Now().Add(time.Duration(o)) }

// OffsetEnv names the variable that shifts Default in builds with the kagzi_failpoints
// tag: a signed Go duration such as "+300s" or "-5m".
const OffsetEnv = "KAGZI_TEST_CLOCK_OFFSET"

// fromEnv is the clock OffsetEnv asks for: the system clock when it is unset or zero.
func fromEnv(getenv func(string) string) (Clock, time.Duration, error) {
	s := getenv(OffsetEnv)
	if s == "" {
		return System, 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return nil, 0, fmt.Errorf("%s=%q: %w", OffsetEnv, s, err)
	}
	if d == 0 {
		return System, 0, nil
	}
	return Offset(d), d, nil
}
