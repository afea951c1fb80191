//go:build !kagzi_failpoints

package failpoint

// Inject does nothing in a normal build.
func Inject(string) error { return nil }

// Enabled reports whether this binary was built with failpoints.
const Enabled = false
