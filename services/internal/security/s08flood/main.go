// Command s08flood is the other side of the ingress flooding test (BATTERY.md S08): a
// client identity that either holds many idle NATS connections or floods the scheduler
// with start requests at a target rate. It runs as its own process, built without the
// race detector, so the attacker's bookkeeping does not run inside the test's process.
//
//	s08flood -mode idle  -conns N  ...   connect N times, print {"ready":N}, hold them until stdin closes
//	s08flood -mode flood -rate R -for D  send R starts a second for D, print what came back as JSON
//
// Both take the connection flags -url, -seed (NKey seed file), -ca and -inbox (the
// identity's reply prefix). A flood answer is one of: a run id, the overloaded error,
// another error, or none within -grace after the flood (unanswered).
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
)

type conf struct {
	url, seed, ca, inbox, subject string
	mode                          string
	conns                         int
	rate                          int
	dur, grace                    time.Duration
}

func main() {
	var c conf
	flag.StringVar(&c.url, "url", "", "NATS URL")
	flag.StringVar(&c.seed, "seed", "", "NKey seed file")
	flag.StringVar(&c.ca, "ca", "", "CA bundle")
	flag.StringVar(&c.inbox, "inbox", "", "inbox prefix of the identity")
	flag.StringVar(&c.subject, "subject", "", "flood: the start subject")
	flag.StringVar(&c.mode, "mode", "flood", "idle or flood")
	flag.IntVar(&c.conns, "conns", 1000, "idle: connections to hold")
	flag.IntVar(&c.rate, "rate", 10_000, "flood: starts a second")
	flag.DurationVar(&c.dur, "for", 10*time.Second, "flood: how long")
	flag.DurationVar(&c.grace, "grace", 5*time.Second, "flood: how long to wait for the last answers")
	flag.Parse()
	var err error
	switch c.mode {
	case "idle":
		err = idle(c)
	case "flood":
		err = flood(c)
	default:
		err = fmt.Errorf("unknown mode %q", c.mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "s08flood:", err)
		os.Exit(1)
	}
}

func connect(c conf, name string) (*nats.Conn, error) {
	opts := []nats.Option{nats.Name(name), nats.RootCAs(c.ca), nats.NoReconnect(), nats.Timeout(10 * time.Second)}
	if c.inbox != "" {
		opts = append(opts, nats.CustomInboxPrefix(c.inbox))
	}
	nkey, err := nats.NkeyOptionFromSeed(c.seed)
	if err != nil {
		return nil, err
	}
	return nats.Connect(c.url, append(opts, nkey)...)
}

// idle holds conns connections, doing nothing, until stdin closes (the test ends it).
func idle(c conf) error {
	conns := make([]*nats.Conn, 0, c.conns)
	defer func() {
		for _, nc := range conns {
			nc.Close()
		}
	}()
	for i := range c.conns {
		nc, err := connect(c, "s08-idle-"+strconv.Itoa(i))
		if err != nil {
			return fmt.Errorf("idle connection %d: %w", i, err)
		}
		conns = append(conns, nc)
	}
	if err := json.NewEncoder(os.Stdout).Encode(map[string]int{"ready": len(conns)}); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

// Result is what the flood saw; the test decodes it.
type Result struct {
	Sent        int     `json:"sent"`
	SendSeconds float64 `json:"send_seconds"`
	Rate        float64 `json:"rate"` // starts a second really sent
	Created     int     `json:"created"`
	Overloaded  int     `json:"overloaded"`
	Other       int     `json:"other"`
	Unanswered  int     `json:"unanswered"`
	// Answer times of created and overloaded starts, milliseconds.
	CreatedP50, CreatedP99       float64
	OverloadedP50, OverloadedP99 float64
	FirstOther                   string `json:"first_other,omitempty"`
}

const (
	kindNone int32 = iota
	kindCreated
	kindOverloaded
	kindOther
)

func flood(c conf) error {
	nc, err := connect(c, "s08-flood")
	if err != nil {
		return err
	}
	defer nc.Close()
	n := int(float64(c.rate)*c.dur.Seconds()) + 1
	sentAt := make([]atomic.Int64, n) // unix nanoseconds, by sequence
	kind := make([]atomic.Int32, n)
	took := make([]int64, n)
	var firstOther atomic.Value
	inbox := nc.NewInbox() // under the identity's prefix
	sub, err := nc.Subscribe(inbox+".*", func(m *nats.Msg) {
		now := time.Now().UnixNano()
		seq, err := strconv.Atoi(m.Subject[len(inbox)+1:])
		if err != nil || seq < 0 || seq >= n {
			return
		}
		k := kindOther
		switch {
		case bytes.Contains(m.Data, []byte(`"run_id"`)):
			k = kindCreated
		case bytes.Contains(m.Data, []byte(`"code":"overloaded"`)):
			k = kindOverloaded
		default:
			firstOther.CompareAndSwap(nil, string(m.Data))
		}
		took[seq] = now - sentAt[seq].Load()
		kind[seq].Store(k)
	})
	if err != nil {
		return err
	}
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		return err
	}
	body := []byte(`{"input":null}`)
	began := time.Now()
	sent := 0
	tick := time.NewTicker(time.Millisecond)
	for {
		el := time.Since(began)
		if el >= c.dur {
			break
		}
		// Catch up to where the rate says we should be: a late tick sends more.
		for target := min(int(el.Seconds()*float64(c.rate))+1, n); sent < target; sent++ {
			sentAt[sent].Store(time.Now().UnixNano())
			if err := nc.PublishRequest(c.subject, inbox+"."+strconv.Itoa(sent), body); err != nil {
				return fmt.Errorf("publish start %d: %w", sent, err)
			}
		}
		<-tick.C
	}
	tick.Stop()
	sendSeconds := time.Since(began).Seconds()
	if err := nc.Flush(); err != nil {
		return err
	}
	deadline := time.Now().Add(c.grace)
	for time.Now().Before(deadline) && answered(kind[:sent]) < sent {
		time.Sleep(20 * time.Millisecond)
	}
	_ = sub.Unsubscribe()

	r := Result{Sent: sent, SendSeconds: sendSeconds, Rate: float64(sent) / sendSeconds}
	var createdMS, overloadedMS []float64
	for i := range sent {
		ms := float64(took[i]) / 1e6
		switch kind[i].Load() {
		case kindCreated:
			r.Created++
			createdMS = append(createdMS, ms)
		case kindOverloaded:
			r.Overloaded++
			overloadedMS = append(overloadedMS, ms)
		case kindOther:
			r.Other++
		default:
			r.Unanswered++
		}
	}
	r.CreatedP50, r.CreatedP99 = pct(createdMS, 50), pct(createdMS, 99)
	r.OverloadedP50, r.OverloadedP99 = pct(overloadedMS, 50), pct(overloadedMS, 99)
	if s, ok := firstOther.Load().(string); ok {
		r.FirstOther = s
	}
	return json.NewEncoder(os.Stdout).Encode(r)
}

func answered(kinds []atomic.Int32) int {
	n := 0
	for i := range kinds {
		if kinds[i].Load() != kindNone {
			n++
		}
	}
	return n
}

// pct is the nearest-rank percentile p of xs.
func pct(xs []float64, p int) float64 {
	if len(xs) == 0 {
		return 0
	}
	slices.Sort(xs)
	i := (len(xs)*p + 99) / 100
	return xs[max(i-1, 0)]
}
