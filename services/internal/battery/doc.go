// Package battery is the reliability part of Kagzi's fault battery (BATTERY.md, T01–T20):
// tests that run the real scheduler, timer and a chaos executor, all built with the
// kagzi_failpoints tag, as child processes against a private database and nats-server,
// inject faults (SIGKILL, SIGSTOP, failpoints, lost and duplicated messages, a broker that
// forgets its store) and count what the oracle tables recorded.
//
// The gate tier (plain `go test`) runs each test at a size that keeps the package near
// two and a half minutes on two cores; `-kagzi.chaos` (or the `chaos` build tag) runs the
// bracketed sizes, and `-kagzi.summary=FILE` writes the summary table `make chaos`
// prints. The tests are timing-sensitive and run one at a time: run the package with
// -p 1 and never mark a battery test parallel.
package battery
