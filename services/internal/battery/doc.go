// Package battery is the reliability part of Kagzi's fault battery (BATTERY.md, T01–T20):
// tests that run the real scheduler, timer and a chaos executor, all built with the
// kagzi_failpoints tag, as child processes against a private database and nats-server,
// inject faults (SIGKILL, SIGSTOP, failpoints, lost and duplicated messages, a broker that
// forgets its store) and count what the oracle tables recorded.
//
// The gate tier (plain `go test`) runs each test at a size that keeps the package near
// two minutes on two cores. Flags, after -args:
//
//	-kagzi.chaos          the bracketed (chaos) sizes; so does building with -tags chaos
//	-kagzi.summary=FILE   also write the summary table `make chaos` prints
//	-kagzi.stacks         on failure, add the goroutine stacks of every live service
//
// A failing test always prints the oracle dump (offending runs with their steps, step-body
// executions and transitions), the broker's stream and consumer state, each executor's
// stats and the tail of every process log. The tests are timing-sensitive and run one at
// a time: run the package with -p 1 and never mark a battery test parallel.
package battery
