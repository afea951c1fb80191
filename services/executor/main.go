// Command executor is the reference executor: an SDK worker hosting the demo workflows.
// A real deployment builds its own executor around its own workflows.
// Configuration: docs/configuration.md.
package main

import "github.com/kagzi/kagzi/services/internal/cli"

func main() { cli.Main("executor", cli.Executor) }
