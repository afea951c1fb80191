//go:build !kagzi_failpoints

package clock

// OffsetHonoured reports whether this build obeys KAGZI_TEST_CLOCK_OFFSET.
const OffsetHonoured = false

// Default is the clock a Kagzi process uses unless it is given another: in a normal
// build, the system clock.
func Default() Clock { return System }
