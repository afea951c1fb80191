package wire

import "testing"

// Setting one limit keeps the others: a Limits with only MaxSteps set must not mean
// "no output may have a byte".
func TestLimitsOrDefaults(t *testing.T) {
	t.Parallel()
	d := DefaultLimits()
	if got := (Limits{}).OrDefaults(); got != d {
		t.Errorf("zero limits: %+v, want the defaults %+v", got, d)
	}
	want := d
	want.MaxSteps = 50
	if got := (Limits{MaxSteps: 50}).OrDefaults(); got != want {
		t.Errorf("only MaxSteps set: %+v, want %+v", got, want)
	}
	if got := (Limits{MaxInputBytes: -1}).OrDefaults(); got != d {
		t.Errorf("a negative limit: %+v, want the defaults", got)
	}
}
