// Command timer wakes sleeping and retrying runs, expires lost leases and re-dispatches
// runs whose task message went missing. Configuration: docs/configuration.md.
package main

import "github.com/kagzi/kagzi/services/internal/cli"

func main() { cli.Main("timer", cli.Timer) }
