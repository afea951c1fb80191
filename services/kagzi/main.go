// Command kagzi runs Kagzi: `kagzi dev` for a whole system in one process, the services
// one by one, migrations, and starting and inspecting runs. `kagzi help` lists the
// commands; docs/configuration.md lists the settings.
package main

import "github.com/kagzi/kagzi/services/internal/cli"

func main() { cli.Main("kagzi", cli.Kagzi) }
