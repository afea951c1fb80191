package security

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/wire"
)

// s04Input shapes a run of the s04 workflow. Size is the length of a string of x's, so
// its JSON is Size+2 bytes.
type s04Input struct {
	Mode string `json:"mode"` // "step", "state" (three steps), "output", or anything else: no-op
	Size int    `json:"size"`
	Pad  string `json:"pad,omitempty"` // makes the input as large as a test needs
}

// s04Bodies counts step-body executions per run: a value over a limit must fail the run
// for good, never run the body again.
var s04Bodies sync.Map // run id → *int

func countBody(runID string) {
	v, _ := s04Bodies.LoadOrStore(runID, new(int))
	*v.(*int)++ // bodies of one run never run concurrently
}

func bodies(runID string) int {
	if v, ok := s04Bodies.Load(runID); ok {
		return *v.(*int)
	}
	return 0
}

var s04Workflow = sdk.Workflow("s04", func(ctx sdk.Context, in s04Input) (string, error) {
	body := func(context.Context) (string, error) {
		countBody(ctx.RunID())
		return strings.Repeat("x", in.Size), nil
	}
	switch in.Mode {
	case "step":
		if _, err := sdk.Step(ctx, "big", body); err != nil {
			return "", err
		}
	case "state":
		for range 3 {
			if _, err := sdk.Step(ctx, "chunk", body); err != nil {
				return "", err
			}
		}
	case "output":
		return strings.Repeat("x", in.Size), nil
	}
	return "done", nil
})

// S04: a start over the input limit is refused with ErrPayloadTooLarge (code
// payload_too_large) by the client and, past the client, by the scheduler, writing
// nothing; a message over the server's max_payload never gets in; a step output, the
// run's total state or the workflow's output over its limit fails the run for good at
// attempt 1.
func TestS04OversizedPayloads(t *testing.T) {
	t.Parallel()
	const stepLimit, stateLimit = 64 << 10, 160 << 10
	s := newSystem(t, wire.Limits{MaxStepOutputBytes: stepLimit, MaxRunStateBytes: stateLimit,
		MaxInputBytes: wire.DefaultLimits().MaxInputBytes, MaxSteps: wire.DefaultLimits().MaxSteps}, s04Workflow)
	ctx := ctxT(t, 60*time.Second)
	inputLimit := wire.DefaultLimits().MaxInputBytes // the scheduler's and the client's
	rejected, cases := 0, 0
	tooLarge := func(what string, err error) {
		t.Helper()
		cases++
		if !errors.Is(err, wire.ErrPayloadTooLarge) || wire.ToError(err).Code != wire.CodePayloadTooLarge {
			t.Errorf("%s: got %v, want ErrPayloadTooLarge (%s)", what, err, wire.CodePayloadTooLarge)
			return
		}
		rejected++
	}

	t.Run("start input", func(t *testing.T) {
		before := s.rows(t)
		atLimit, overLimit := inputOfSize(t, inputLimit), inputOfSize(t, inputLimit+1)
		_, err := s.client.StartByName(ctx, "s04", overLimit)
		tooLarge("client start with input of limit+1 bytes", err)

		body, _ := json.Marshal(map[string]any{"input": overLimit})
		reply, err := rawRequest(t, s, wire.StartSubject(wire.DefaultNamespace, "s04"), body)
		if err != nil {
			t.Fatalf("raw start: %v", err)
		}
		var r wire.StartReply
		if err := json.Unmarshal(reply, &r); err != nil {
			t.Fatal(err)
		}
		tooLarge("raw start request with input of limit+1 bytes", replyErr(r.Error))

		// The submit stream has no one to answer: the scheduler must drop the start.
		js, err := jetstream.New(s.nc)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.Publish(ctx, wire.SubmitSubject(wire.DefaultNamespace, "s04"), body); err != nil {
			t.Fatalf("publish to the submit stream: %v", err)
		}
		eventually(t, 10*time.Second, "the scheduler to settle the oversized submit", func() bool {
			c, err := js.Consumer(ctx, wire.SubmitStream, wire.SchedulerQueueGroup)
			if err != nil {
				return false
			}
			info, err := c.Info(ctx)
			return err == nil && info.Delivered.Stream >= 1 && info.NumPending == 0 && info.NumAckPending == 0
		})
		if after := s.rows(t); after != before {
			t.Errorf("oversized starts wrote rows: %v → %v", before, after)
		}

		// The limit is the limit, not less: an input of exactly that size is a run.
		id, err := s.client.StartByName(ctx, "s04", atLimit)
		if err != nil {
			t.Fatalf("start with input of exactly the limit: %v", err)
		}
		if info := s.wait(t, id); info.Status != wire.StatusCompleted {
			t.Errorf("run with input at the limit ended %s: %s", info.Status, info.Error)
		}
	})

	t.Run("message over max_payload", func(t *testing.T) {
		// The client library refuses it before it is sent…
		big := make([]byte, s.nc.MaxPayload()+1)
		if err := s.nc.Publish(wire.StartSubject(wire.DefaultNamespace, "s04"), big); !errors.Is(err, nats.ErrMaxPayload) {
			t.Errorf("publish of max_payload+1 bytes: %v, want %v", err, nats.ErrMaxPayload)
		}
		// …and the server refuses it from anyone who sends it anyway, here under the
		// shipped secure config as the client identity, which may publish starts.
		n := startSecureNATS(t)
		rc := dialRaw(t, n.Addr())
		rc.upgradeTLS(t, n.pki.CA)
		rc.connectNKey(t, n.seeds["client"])
		rc.send(t, "PUB "+wire.StartSubject(wire.DefaultNamespace, "s04")+" 2\r\n{}\r\nPING\r\n")
		if line := rc.readLine(); line != "PONG" {
			t.Fatalf("small publish as the client identity answered %q, want PONG", line)
		}
		maxPayload := int(rc.info["max_payload"].(float64))
		if maxPayload != 1<<20 {
			t.Errorf("server max_payload %d, want the shipped 1 MiB", maxPayload)
		}
		rc.send(t, fmt.Sprintf("PUB %s %d\r\n", wire.StartSubject(wire.DefaultNamespace, "s04"), maxPayload+1))
		line := rc.readLine()
		cases++
		if !strings.Contains(line, "Maximum Payload Violation") {
			t.Errorf("PUB of max_payload+1 bytes answered %q, want a Maximum Payload Violation", line)
		} else {
			rejected++
		}
		if rest := rc.readLine(); rest != "" {
			t.Errorf("connection still open after the violation: %q", rest)
		}
	})

	t.Run("run state", func(t *testing.T) {
		before := s.rows(t)[1]
		for _, c := range []struct {
			what   string
			in     s04Input
			steps  int // recorded before the failure
			bodies int // executed: each once, none retried
		}{
			{"step output of limit+1 bytes", s04Input{Mode: "step", Size: stepLimit - 1}, 0, 1},
			{"run state over its limit", s04Input{Mode: "state", Size: 60 << 10}, 2, 3},
			{"workflow output of limit+1 bytes", s04Input{Mode: "output", Size: stepLimit - 1}, 0, 0},
		} {
			id, err := s.client.StartByName(ctx, "s04", c.in)
			if err != nil {
				t.Fatal(err)
			}
			info := s.wait(t, id)
			cases++
			if info.Status != wire.StatusFailed || info.Attempt != 1 || !strings.HasPrefix(info.Error, wire.ErrPayloadTooLarge.Error()) ||
				len(info.Steps) != c.steps || bodies(id) != c.bodies {
				t.Errorf("%s: run %s at attempt %d with %d steps and %d bodies, error %q; want FAILED at attempt 1, %s, %d steps, %d bodies",
					c.what, info.Status, info.Attempt, len(info.Steps), bodies(id), info.Error, wire.ErrPayloadTooLarge, c.steps, c.bodies)
				continue
			}
			rejected++
		}
		// At the limit exactly, the step is recorded.
		id, err := s.client.StartByName(ctx, "s04", s04Input{Mode: "step", Size: stepLimit - 2})
		if err != nil {
			t.Fatal(err)
		}
		if info := s.wait(t, id); info.Status != wire.StatusCompleted || len(info.Steps) != 1 {
			t.Errorf("step output at the limit: run %s with %d steps (%s)", info.Status, len(info.Steps), info.Error)
		}
		if got := s.rows(t)[1] - before; got != 3 {
			t.Errorf("%d step rows recorded, want 3 (two chunks before the state limit, one step at the limit)", got)
		}
	})

	t.Logf("S04: %d/%d oversized payloads rejected with %s", rejected, cases, wire.CodePayloadTooLarge)
	if rejected != cases {
		t.Errorf("%d/%d rejected", rejected, cases)
	}
}

// inputOfSize is a start input whose JSON is exactly n bytes.
func inputOfSize(t *testing.T, n int) s04Input {
	t.Helper()
	in := s04Input{Mode: "noop", Pad: "p"}
	base, _ := json.Marshal(in)
	in.Pad = strings.Repeat("p", n-len(base)+1)
	if b, _ := json.Marshal(in); len(b) != n {
		t.Fatalf("input is %d bytes, want %d", len(b), n)
	}
	return in
}
