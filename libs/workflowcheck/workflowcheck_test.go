package workflowcheck_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/tools/go/analysis/analysistest"

	"github.com/kagzi/kagzi/libs/workflowcheck"
)

// Every banned construct in the fixture is reported (each `// want` line must match),
// nothing is reported where the fixture has no want, and the clean package is silent.
func TestFixture(t *testing.T) {
	analysistest.Run(t, analysistest.TestData(), workflowcheck.Analyzer, "fixture", "clean")
}

// The examples and the demo workflows, written as users write them, have 0 findings.
func TestExamplesAreClean(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the analyzer and vets two modules")
	}
	bin := filepath.Join(t.TempDir(), "workflowcheck")
	build := exec.Command("go", "build", "-o", bin, "./cmd/workflowcheck")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build analyzer: %v\n%s", err, out)
	}
	for _, dir := range []string{"../../examples", "../../services/internal/demo", "../../libs/sdk"} {
		vet := exec.Command("go", "vet", "-vettool="+bin, "./...")
		vet.Dir = dir
		vet.Env = os.Environ()
		if out, err := vet.CombinedOutput(); err != nil {
			t.Errorf("workflowcheck in %s: %v\n%s", dir, err, out)
		}
	}
}
