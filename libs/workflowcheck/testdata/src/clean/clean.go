package clean

import (
	"context"
	"sort"
	"time"

	"github.com/kagzi/kagzi/libs/sdk"
)

var Good = sdk.Workflow("good", func(ctx sdk.Context, in map[string]int) (int, error) {
	keys := make([]string, 0, len(in))
	for _, k := range sortedKeys(in) {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	now, err := sdk.Step(ctx, "now", func(context.Context) (time.Time, error) { return time.Now(), nil })
	if err != nil {
		return 0, err
	}
	if err := ctx.Sleep("wait", time.Hour); err != nil {
		return 0, err
	}
	return len(keys) + now.Second(), nil
})

func sortedKeys(m map[string]int) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
