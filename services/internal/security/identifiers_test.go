package security

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/wire"
)

// hostile are the S03 inputs. keyOK says whether a free-form key (step key, idempotency
// key) may hold the value: keys are stored as text, parameterised, so SQL and subject
// syntax in them is harmless and must round-trip; only what text cannot hold (NUL,
// invalid UTF-8) and what is over the 255-byte limit is refused. No value is a valid
// workflow name or namespace: those become NATS subject tokens.
var hostile = []struct {
	name, v string
	keyOK   bool
}{
	{"sql", "'; DROP TABLE workflow_runs;--", true},
	{"placeholder", "$1", true},
	{"nul", "a\x00b", false},
	{"invalid-utf8", "a\xff\xfeb", false},
	{"10000-chars", strings.Repeat("k", 10_000), false},
	{"dot", "a.b", true},
	{"star", "*", true},
	{"gt", ">", true},
	{"spaces", "a b\tc", true},
	{"newline", "a\nb\r\n", true},
	{"rtl", "abc\u202edcba\u200f", true},
}

// s03Input selects the step key of a run: hostile[I], or a plain key when I < 0.
type s03Input struct {
	I int `json:"i"`
}

var s03Workflow = sdk.Workflow("s03", func(ctx sdk.Context, in s03Input) (string, error) {
	key := "plain"
	if in.I >= 0 {
		key = hostile[in.I].v
	}
	return sdk.Step(ctx, key, func(context.Context) (string, error) { return "ok", nil })
})

// S03: every hostile value in a workflow name, namespace, idempotency key or step key is
// either stored and read back byte for byte or rejected with a validation error, a
// rejection writes nothing, PostgreSQL sees no statement fail, and no subject Kagzi
// publishes carries a raw '.', '*', '>' or whitespace from a name.
func TestS03HostileIdentifiers(t *testing.T) {
	t.Parallel()
	s := newSystem(t, wire.Limits{}, s03Workflow)
	rec := recordSubjects(t, s)
	ctx := ctxT(t, 60*time.Second)
	var tally tally

	t.Run("workflow name", func(t *testing.T) {
		for _, h := range hostile {
			before := s.rows(t)
			_, err := s.client.StartByName(ctx, h.v, s03Input{I: -1})
			tally.rejected(t, "client start of workflow "+h.name, err)
			// Past the client: a raw request on the subject the name would make. NATS
			// itself may refuse the subject; if it reaches a scheduler, the scheduler
			// must refuse the name.
			subject := wire.StartSubjectPrefix + wire.DefaultNamespace + "." + h.v
			rec.attacker(subject)
			if reply, err := rawRequest(t, s, subject, []byte(`{"input":null}`)); err == nil {
				var r wire.StartReply
				if err := json.Unmarshal(reply, &r); err != nil {
					t.Fatalf("decode reply: %v", err)
				}
				tally.rejected(t, "raw start of workflow "+h.name, replyErr(r.Error))
			} else {
				tally.refusedByNATS(t, "raw start of workflow "+h.name, err)
			}
			w, err := sdk.NewWorker(sdk.WorkerConfig{Pool: s.pool, Conn: s.nc})
			if err != nil {
				t.Fatal(err)
			}
			tally.rejected(t, "registration of workflow "+h.name, w.Register(sdk.Workflow(h.v, func(sdk.Context, int) (int, error) { return 0, nil })))
			if after := s.rows(t); after != before {
				t.Errorf("workflow %s: rows %v → %v", h.name, before, after)
			}
		}
	})

	t.Run("namespace", func(t *testing.T) {
		for _, h := range hostile {
			before := s.rows(t)
			c := sdk.NewClient(s.nc, sdk.WithNamespace(h.v), sdk.WithRequestTimeout(5*time.Second))
			_, err := c.StartByName(ctx, "s03", s03Input{I: -1})
			tally.rejected(t, "start in namespace "+h.name, err)
			_, err = c.Describe(ctx, wire.NewRunID())
			tally.rejected(t, "describe in namespace "+h.name, err)
			// Past the client: raw requests on the subjects the namespace would make.
			for _, subject := range []string{wire.StartSubjectPrefix + h.v + ".s03", wire.APISubjectPrefix + h.v + "." + wire.DescribeOp} {
				rec.attacker(subject)
				reply, err := rawRequest(t, s, subject, []byte(`{"run_id":"`+wire.NewRunID()+`"}`))
				if err != nil {
					tally.refusedByNATS(t, "raw request on "+subject, err)
					continue
				}
				var r struct{ Error *wire.Error }
				if err := json.Unmarshal(reply, &r); err != nil {
					t.Fatalf("decode reply: %v", err)
				}
				tally.rejected(t, "raw request in namespace "+h.name, replyErr(r.Error))
			}
			_, err = sdk.NewWorker(sdk.WorkerConfig{Pool: s.pool, Conn: s.nc, Namespace: h.v})
			tally.rejected(t, "worker in namespace "+h.name, err)
			if after := s.rows(t); after != before {
				t.Errorf("namespace %s: rows %v → %v", h.name, before, after)
			}
		}
	})

	t.Run("idempotency key", func(t *testing.T) {
		for _, h := range hostile {
			for _, via := range []string{"client", "raw"} {
				before := s.rows(t)
				var runID string
				var err error
				if via == "client" {
					runID, err = s.client.StartByName(ctx, "s03", s03Input{I: -1}, sdk.IdempotencyKey(h.v))
				} else {
					// The key's bytes exactly as given, even where they are not UTF-8.
					body := append(append([]byte(`{"input":{"i":-1},"idempotency_key":`), jsonString(h.v)...), '}')
					var reply []byte
					if reply, err = rawRequest(t, s, wire.StartSubject(wire.DefaultNamespace, "s03"), body); err != nil {
						t.Fatalf("raw start: %v", err)
					}
					var r wire.StartReply
					if err := json.Unmarshal(reply, &r); err != nil {
						t.Fatalf("decode reply: %v", err)
					}
					runID, err = r.RunID, replyErr(r.Error)
				}
				what := fmt.Sprintf("idempotency key %s (%s)", h.name, via)
				if !h.keyOK {
					if err == nil {
						// encoding/json turns bytes that are not UTF-8 into U+FFFD: a key
						// must be validated before it is encoded, or it is silently changed.
						var stored string
						_ = s.pool.QueryRow(ctx, `SELECT idempotency_key FROM workflow_runs WHERE id = $1`, runID).Scan(&stored)
						t.Errorf("%s: accepted and stored as %q; want it refused with %s before anything is written",
							what, stored, wire.CodeInvalidArgument)
						continue
					}
					tally.rejected(t, what, err)
					if after := s.rows(t); after != before {
						t.Errorf("%s: rows %v → %v", what, before, after)
					}
					continue
				}
				if err != nil {
					t.Errorf("%s refused: %v", what, err)
					continue
				}
				var stored []byte
				if err := s.pool.QueryRow(ctx, `SELECT convert_to(idempotency_key, 'UTF8') FROM workflow_runs WHERE id = $1`, runID).Scan(&stored); err != nil {
					t.Fatalf("%s: read back: %v", what, err)
				}
				info := s.wait(t, runID)
				if !bytes.Equal(stored, []byte(h.v)) || info.IdempotencyKey != h.v {
					t.Errorf("%s stored as %q, described as %q; want %q", what, stored, info.IdempotencyKey, h.v)
					continue
				}
				tally.nStored++
			}
		}
	})

	t.Run("step key", func(t *testing.T) {
		ids := make([]string, len(hostile))
		for i := range hostile {
			id, err := s.client.StartByName(ctx, "s03", s03Input{I: i})
			if err != nil {
				t.Fatal(err)
			}
			ids[i] = id
		}
		for i, h := range hostile {
			info := s.wait(t, ids[i])
			what := "step key " + h.name
			var keys [][]byte
			rows, err := s.pool.Query(ctx, `SELECT convert_to(step_key, 'UTF8') FROM step_runs WHERE run_id = $1`, ids[i])
			if err != nil {
				t.Fatal(err)
			}
			for rows.Next() {
				var k []byte
				if err := rows.Scan(&k); err != nil {
					t.Fatal(err)
				}
				keys = append(keys, k)
			}
			if err := rows.Err(); err != nil {
				t.Fatal(err)
			}
			if !h.keyOK {
				// The SDK refuses the key before the body runs: the run fails for good,
				// with nothing recorded.
				if info.Status != wire.StatusFailed || info.Attempt != 1 || !strings.HasPrefix(info.Error, wire.ErrInvalidArgument.Error()) || len(keys) != 0 {
					t.Errorf("%s: run %s attempt %d error %q with %d steps; want FAILED at attempt 1 with a validation error and no step",
						what, info.Status, info.Attempt, info.Error, len(keys))
					continue
				}
				tally.nRejected++
				continue
			}
			if info.Status != wire.StatusCompleted || len(keys) != 1 || !bytes.Equal(keys[0], []byte(h.v)) ||
				len(info.Steps) != 1 || info.Steps[0].Key != h.v {
				t.Errorf("%s: run %s (%s) stored keys %q; want the key byte for byte", what, info.Status, info.Error, keys)
				continue
			}
			tally.nStored++
		}
	})

	subjects, unexpected := rec.check(t)
	t.Logf("S03: %d values stored byte for byte, %d rejected with a validation error, %d refused by NATS; %d subjects seen on kagzi.>, %d unexpected",
		tally.nStored, tally.nRejected, tally.nRefused, subjects, len(unexpected))
	for _, u := range unexpected {
		t.Errorf("unexpected subject %q: %s", u.subject, u.why)
	}
	if n := s.count(t, `SELECT count(*) FROM pg_tables WHERE schemaname = 'public'`); n != 4 {
		t.Errorf("public schema has %d tables, want 4", n)
	}
	if n := s.pgErrors(t); n != 0 {
		t.Errorf("%d transactions failed in PostgreSQL; every hostile value must be stopped before SQL", n)
	}
}

// tally counts outcomes; anything that is neither stored nor a clean rejection fails the
// test where it happens.
type tally struct{ nStored, nRejected, nRefused int }

// rejected requires a validation error (invalid_argument, or payload_too_large for size).
func (c *tally) rejected(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, wire.ErrInvalidArgument) {
		t.Errorf("%s: got %v, want a validation error (%s)", what, err, wire.CodeInvalidArgument)
		return
	}
	c.nRejected++
}

// refusedByNATS accepts NATS refusing a raw subject (malformed, or too long for a
// control line) or nobody answering it: no scheduler listens on a subject of more than
// one token, so only the test's own recorder receives it. The rows checks prove nothing
// was written either way.
func (c *tally) refusedByNATS(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, nats.ErrBadSubject) && !errors.Is(err, nats.ErrNoResponders) && !errors.Is(err, nats.ErrConnectionClosed) &&
		!errors.Is(err, nats.ErrTimeout) {
		t.Errorf("%s: NATS failed the request with %v, want it refused or unanswered", what, err)
		return
	}
	c.nRefused++
}

func replyErr(e *wire.Error) error {
	if e == nil {
		return nil
	}
	return e
}

// rawRequest sends a request on a connection of its own: a hostile subject may make the
// server close the connection (a control line over 4 KiB does), which must not take the
// test's other connections with it.
func rawRequest(t *testing.T, s *system, subject string, body []byte) ([]byte, error) {
	t.Helper()
	nc, err := nats.Connect(s.nats.URL(), nats.NoReconnect(), nats.SkipSubjectValidation(),
		nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {})) // seen through LastError
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	// Every request a scheduler receives is answered in milliseconds; one it never
	// receives times out.
	msg, err := nc.Request(subject, body, time.Second)
	if err != nil {
		if nc.LastError() != nil {
			err = fmt.Errorf("%w (%v)", err, nc.LastError())
		}
		return nil, err
	}
	return msg.Data, nil
}

// jsonString quotes s as a JSON string, keeping bytes that are not UTF-8 as they are, so
// the scheduler sees exactly what a hostile publisher sends.
func jsonString(s string) []byte {
	if utf8.ValidString(s) {
		b, _ := json.Marshal(s)
		return b
	}
	var b bytes.Buffer
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"' || c == '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case c < 0x20:
			fmt.Fprintf(&b, `\u%04x`, c)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
	return b.Bytes()
}

// subjectRecorder sees every message on kagzi.>, the way any subscriber would.
type subjectRecorder struct {
	mu       sync.Mutex
	nc       *nats.Conn
	subjects []string
	attack   map[string]bool // subjects the test itself published, bypassing Kagzi
}

func recordSubjects(t *testing.T, s *system) *subjectRecorder {
	t.Helper()
	r := &subjectRecorder{nc: connect(t, bus.ConnOptions{URL: s.nats.URL(), Name: "recorder"}), attack: map[string]bool{}}
	if _, err := r.nc.Subscribe("kagzi.>", func(m *nats.Msg) {
		r.mu.Lock()
		r.subjects = append(r.subjects, m.Subject)
		r.mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	if err := r.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *subjectRecorder) attacker(subject string) {
	r.mu.Lock()
	r.attack[subject] = true
	r.mu.Unlock()
}

type badSubject struct{ subject, why string }

// check reads what was recorded and returns how many subjects Kagzi published and those
// not of a shape libs/wire/subjects.go defines with valid tokens.
func (r *subjectRecorder) check(t *testing.T) (int, []badSubject) {
	t.Helper()
	if err := r.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var bad []badSubject
	n := 0
	for _, subj := range r.subjects {
		if r.attack[subj] {
			continue
		}
		n++
		if why := subjectProblem(subj); why != "" {
			bad = append(bad, badSubject{subj, why})
		}
	}
	return n, bad
}

func subjectProblem(subj string) string {
	if strings.ContainsAny(subj, "*> \t\r\n") {
		return "wildcard or whitespace"
	}
	tok := strings.Split(subj, ".")
	switch {
	case subj == wire.TimerHintSubject:
		return ""
	case len(tok) == 4 && tok[1] == "api" && tok[3] == wire.DescribeOp:
		return errText(wire.ValidateName("namespace", tok[2]))
	case len(tok) == 4 && (tok[1] == "start" || tok[1] == "submit" || tok[1] == "task"):
		if err := wire.ValidateName("namespace", tok[2]); err != nil {
			return err.Error()
		}
		return errText(wire.ValidateName("workflow", tok[3]))
	case len(tok) == 5 && tok[1] == "run" && tok[4] == "done":
		if err := wire.ValidateName("namespace", tok[2]); err != nil {
			return err.Error()
		}
		if !wire.ValidRunID(tok[3]) {
			return "run id is not a UUID"
		}
		return ""
	}
	return "not a subject Kagzi defines"
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
