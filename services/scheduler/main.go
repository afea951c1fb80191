// Command scheduler accepts workflow starts over NATS, commits them to PostgreSQL and
// dispatches their first task. Configuration: docs/configuration.md.
package main

import "github.com/kagzi/kagzi/services/internal/cli"

func main() { cli.Main("scheduler", cli.Scheduler) }
