// Command workflowcheck reports non-deterministic code in Kagzi workflow functions.
//
//	go run github.com/kagzi/kagzi/libs/workflowcheck/cmd/workflowcheck ./...
//	go vet -vettool=$(which workflowcheck) ./...
package main

import (
	"golang.org/x/tools/go/analysis/singlechecker"

	"github.com/kagzi/kagzi/libs/workflowcheck"
)

func main() { singlechecker.Main(workflowcheck.Analyzer) }
