package security

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"testing"
	"text/tabwriter"
	"time"
)

// The chaos tier of the security battery (BATTERY.md b.0 H8: S05 and S08 run in make
// chaos, not in the gate), selected as in services/internal/battery. Flags, after -args:
//
//	-kagzi.chaos          run the chaos-tier tests; so does building with -tags chaos
//	-kagzi.summary=FILE   also append their summary rows to this file (make chaos prints it)
var (
	chaos       = flag.Bool("kagzi.chaos", chaosByTag, "run the chaos-tier security tests (BATTERY.md S08)")
	summaryFile = flag.String("kagzi.summary", "", "also append the chaos-tier summary rows to this file")
)

// securityRow is a chaos-tier security test's line in the summary `make chaos` prints.
type securityRow struct {
	Test     string
	Size     string
	Faults   string // what was attempted or injected, with counts
	Refused  string // refused / attempted, per kind
	Measured string // the figures the pass criteria compare
	Verdict  string
	Took     time.Duration
}

// newSecurityRow starts the test's row; it is printed, and appended to -kagzi.summary,
// when the test ends, with the test's verdict.
func newSecurityRow(t *testing.T, size string) *securityRow {
	t.Logf("size: %s", size)
	r := &securityRow{Test: t.Name(), Size: size, Verdict: "?"}
	start := time.Now()
	t.Cleanup(func() {
		r.Took = time.Since(start).Round(100 * time.Millisecond)
		switch {
		case t.Failed():
			r.Verdict = "FAIL"
		case t.Skipped():
			r.Verdict = "SKIP"
		default:
			r.Verdict = "PASS"
		}
		var b bytes.Buffer
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "test\tsize\tattempts and faults\trefused\tmeasured\tverdict\ttime")
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Test, r.Size, r.Faults, r.Refused, r.Measured, r.Verdict, r.Took)
		_ = tw.Flush()
		fmt.Print("\nsecurity battery summary\n" + b.String())
		if *summaryFile == "" {
			return
		}
		f, err := os.OpenFile(*summaryFile, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err == nil {
			_, err = f.Write(append([]byte("\nsecurity battery\n"), b.Bytes()...))
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		if err != nil {
			t.Errorf("append the summary to %s: %v", *summaryFile, err)
		}
	})
	return r
}
