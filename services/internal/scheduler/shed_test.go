package scheduler_test

import (
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/scheduler"
)

// A flood far beyond what the workers and a queue of 4 per namespace hold is answered in
// full: each start either makes a run or is refused at once as overloaded (counted), none
// goes unanswered. Another namespace's starts, sent one after another during the flood,
// wait in their own queue and are never refused.
func TestStartShedsWhenQueueFull(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.startScheduler(t, scheduler.Config{RequestQueue: 4})
	nc, err := bus.Connect(bus.ConnOptions{URL: e.nc.ConnectedUrl(), Name: "flood"})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()

	var (
		mu      sync.Mutex
		answers = map[string]wire.StartReply{} // reply subject → answer
	)
	inbox := nats.NewInbox()
	sub, err := nc.Subscribe(inbox+".*", func(m *nats.Msg) {
		var r wire.StartReply
		if err := json.Unmarshal(m.Data, &r); err != nil {
			t.Errorf("reply %q: %v", m.Data, err)
		}
		mu.Lock()
		answers[m.Subject] = r
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe() //nolint:errcheck // the connection closes anyway

	// The flood: bursts of 50 every 5 ms until the quiet namespace is done.
	quietDone := make(chan struct{})
	floodDone := make(chan int)
	go func() {
		sent := 0
		defer func() { floodDone <- sent }()
		for {
			for range 50 {
				if err := nc.PublishRequest(wire.StartSubject("flood", "wf"), fmt.Sprintf("%s.%d", inbox, sent), []byte(`{}`)); err != nil {
					t.Errorf("flood: %v", err)
					return
				}
				sent++
			}
			select {
			case <-quietDone:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	const quiet = 10
	quietCreated := 0
	for i := range quiet {
		msg, err := e.nc.Request(wire.StartSubject("quiet", "wf"), fmt.Appendf(nil, `{"input":%d}`, i), 10*time.Second)
		if err != nil {
			t.Fatalf("quiet start %d: %v", i, err)
		}
		var r wire.StartReply
		if err := json.Unmarshal(msg.Data, &r); err != nil || r.Error != nil {
			t.Errorf("quiet start %d answered %s (%v); want a run", i, msg.Data, err)
			continue
		}
		quietCreated++
	}
	close(quietDone)
	sent := <-floodDone
	eventually(t, 30*time.Second, "every flood start answered", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(answers) == sent
	})

	var created, overloaded int
	mu.Lock()
	for subject, r := range answers {
		switch {
		case r.Error == nil && r.RunID != "":
			created++
		case r.Error != nil && r.Error.Code == wire.CodeOverloaded:
			overloaded++
		default:
			t.Errorf("%s answered %+v", subject, r)
		}
	}
	mu.Unlock()
	t.Logf("%d flood starts: %d created, %d overloaded; %d/%d quiet starts created", sent, created, overloaded, quietCreated, quiet)
	if overloaded == 0 || quietCreated != quiet || created+overloaded != sent {
		t.Fatalf("flood: created %d, overloaded %d of %d; quiet: %d/%d created; want some overloaded, every start answered, every quiet start created",
			created, overloaded, sent, quietCreated, quiet)
	}
	if got := testutil.ToFloat64(e.m.Starts.WithLabelValues("overloaded")); int(got) != overloaded {
		t.Errorf("kagzi_starts_total{result=overloaded} = %v, want %d", got, overloaded)
	}
	if n := e.countRuns(t); n != created+quiet {
		t.Errorf("%d runs, want the %d created", n, created+quiet)
	}
	if got := testutil.ToFloat64(e.m.Queued); got != 0 {
		t.Errorf("kagzi_scheduler_queued_requests = %v after the flood, want 0", got)
	}
}

// A namespace over its rate is refused at once, as rate_limited, with the overloaded
// code; another namespace is not.
func TestStartRateLimitedPerNamespace(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const rate = 20
	e.startScheduler(t, scheduler.Config{NamespaceRate: rate})
	codes := map[string]map[wire.Code]int{"loud": {}, "quiet": {}}
	began := time.Now()
	for i := range 100 {
		for _, ns := range []string{"loud", "quiet"} {
			if ns == "quiet" && i%10 != 0 {
				continue
			}
			r := e.startOn(t, wire.StartSubject(ns, "wf"), fmt.Appendf(nil, `{"input":%d}`, i))
			var code wire.Code
			if r.Error != nil {
				code = r.Error.Code
			}
			codes[ns][code]++
		}
	}
	// The loud namespace gets its burst plus what the rate refilled meanwhile.
	maxLoud := rate + int(time.Since(began).Seconds()*rate) + 1
	if ok := codes["loud"][""]; ok < rate || ok > maxLoud || ok+codes["loud"][wire.CodeOverloaded] != 100 {
		t.Errorf("loud namespace: %v; want %d..%d created, the rest overloaded", codes["loud"], rate, maxLoud)
	}
	if codes["quiet"][""] != 10 {
		t.Errorf("quiet namespace: %v; want its 10 starts created", codes["quiet"])
	}
	if got := testutil.ToFloat64(e.m.Starts.WithLabelValues("rate_limited")); int(got) != codes["loud"][wire.CodeOverloaded] {
		t.Errorf("kagzi_starts_total{result=rate_limited} = %v, want %d", got, codes["loud"][wire.CodeOverloaded])
	}
}
