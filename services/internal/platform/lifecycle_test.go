package platform

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

type fakeComponent struct {
	startErr error
	stopped  chan struct{}
	block    chan struct{}
}

func (f *fakeComponent) Start(context.Context) error { return f.startErr }

func (f *fakeComponent) Stop() {
	if f.block != nil {
		<-f.block
	}
	close(f.stopped)
}

func TestHook(t *testing.T) {
	t.Parallel()
	c := &fakeComponent{stopped: make(chan struct{})}
	h := Hook("fake", c)
	if err := h.OnStart(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := h.OnStop(t.Context()); err != nil {
		t.Fatal(err)
	}
	<-c.stopped

	bad := Hook("fake", &fakeComponent{startErr: errors.New("no database")})
	if err := bad.OnStart(t.Context()); err == nil || err.Error() != "start fake: no database" {
		t.Errorf("start error = %v", err)
	}
}

func TestHookStopTimesOut(t *testing.T) {
	t.Parallel()
	c := &fakeComponent{stopped: make(chan struct{}), block: make(chan struct{})}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	err := Hook("stuck", c).OnStop(ctx)
	if err == nil || !strings.Contains(err.Error(), "stop stuck") || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v", err)
	}
	close(c.block) // let the goroutine end before the test does
	<-c.stopped
}
