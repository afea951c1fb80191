package bus_test

import (
	"strings"
	"testing"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/wire"
)

// DecodeTask accepts exactly one task and nothing else: everything it refuses is poison,
// which the executor terminates instead of claiming.
func TestDecodeTask(t *testing.T) {
	const id = "0190a3f0-0000-7000-8000-000000000000"
	valid := `{"run_id":"` + id + `","dispatch_seq":3}`
	for _, data := range []string{valid, " " + valid + "\n"} {
		task, err := bus.DecodeTask([]byte(data))
		if err != nil || task != (wire.Task{RunID: id, DispatchSeq: 3}) {
			t.Errorf("DecodeTask(%q) = %+v, %v; want the task", data, task, err)
		}
	}
	for _, data := range []string{
		``, `not json`, `null`, `[]`, `{}`, `"task"`, `42`,
		valid + ` garbage`, valid + valid, valid + `}`,
		`{"run_id":"` + id + `","dispatch_seq":0}`,
		`{"run_id":"` + id + `","dispatch_seq":-1}`,
		`{"run_id":"` + id + `","dispatch_seq":"3"}`,
		`{"run_id":"` + strings.ToUpper(id) + `","dispatch_seq":3}`,
		`{"run_id":"` + id + `","dispatch_seq":3,"namespace":"other"}`,
		`{"run_id":"` + id + `","dispatch_seq":3,"pad":"` + strings.Repeat("x", 1024) + `"}`,
	} {
		if task, err := bus.DecodeTask([]byte(data)); err == nil {
			t.Errorf("DecodeTask(%.60q) = %+v; want an error", data, task)
		}
	}
}
