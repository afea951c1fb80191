package clock

import (
	"testing"
	"time"
)

// An offset clock reads the wall time that far off, and measures intervals between its
// own readings exactly: each carries a monotonic reading, shifted with it.
func TestOffsetShiftsWallTimeAndKeepsIntervals(t *testing.T) {
	for _, off := range []time.Duration{5 * time.Minute, -5 * time.Minute} {
		c := Offset(off)
		before := time.Now()
		a := c.Now()
		if skew := a.Round(0).Sub(before.Round(0)); skew < off || skew > off+time.Second {
			t.Errorf("Offset(%s): wall reading %s from the system's, want %s", off, skew, off)
		}
		time.Sleep(20 * time.Millisecond)
		b := c.Now()
		if d := b.Sub(a); d < 20*time.Millisecond || d > time.Second {
			t.Errorf("Offset(%s): %s between readings 20 ms apart", off, d)
		}
		// Sub uses the monotonic readings only when both have one: check they do.
		if a.Round(0) == a || b.Round(0) == b {
			t.Errorf("Offset(%s): readings carry no monotonic clock reading", off)
		}
	}
}

func TestFromEnv(t *testing.T) {
	for _, tc := range []struct {
		val     string
		want    time.Duration
		wantErr bool
	}{
		{"", 0, false},
		{"0s", 0, false},
		{"+300s", 300 * time.Second, false},
		{"-300s", -300 * time.Second, false},
		{"-1h30m", -90 * time.Minute, false},
		{"300", 0, true},
		{"soon", 0, true},
	} {
		c, d, err := fromEnv(func(k string) string {
			if k != OffsetEnv {
				t.Errorf("read %s, want %s", k, OffsetEnv)
			}
			return tc.val
		})
		if (err != nil) != tc.wantErr || d != tc.want {
			t.Errorf("%q: offset %s, error %v; want %s, error %v", tc.val, d, err, tc.want, tc.wantErr)
			continue
		}
		if err != nil {
			continue
		}
		if tc.want == 0 && c != System {
			t.Errorf("%q: %T, want the system clock", tc.val, c)
		}
		if tc.want != 0 && c != Offset(tc.want) {
			t.Errorf("%q: %v, want Offset(%s)", tc.val, c, tc.want)
		}
	}
}

// Release builds must not let an environment variable move their clock.
func TestDefaultHonoursOffsetOnlyInTestBuilds(t *testing.T) {
	t.Setenv(OffsetEnv, "+1h")
	skew := Default().Now().Round(0).Sub(time.Now().Round(0))
	want := time.Duration(0)
	if OffsetHonoured {
		want = time.Hour
	}
	if skew < want-time.Second || skew > want+time.Second {
		t.Errorf("Default reads %s off with %s=+1h (honoured: %v), want %s", skew, OffsetEnv, OffsetHonoured, want)
	}
}
