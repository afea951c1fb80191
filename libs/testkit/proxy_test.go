package testkit_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/url"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kagzi/kagzi/libs/testkit"
)

// startEcho runs a TCP echo server that lives as long as the test.
func startEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	return ln.Addr().String()
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrip writes msg and reads as many bytes back within timeout.
func roundTrip(c net.Conn, msg string, timeout time.Duration) (string, error) {
	if _, err := c.Write([]byte(msg)); err != nil {
		return "", err
	}
	return readN(c, len(msg), timeout)
}

func readN(c net.Conn, n int, timeout time.Duration) (string, error) {
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, n)
	got, err := io.ReadFull(c, buf)
	return string(buf[:got]), err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestProxyModesOverTCP(t *testing.T) {
	t.Parallel()
	p := testkit.StartProxy(t, startEcho(t))

	old := dial(t, p.Addr())
	if got, err := roundTrip(old, "pass", 2*time.Second); err != nil || got != "pass" {
		t.Fatalf("pass: got %q, %v", got, err)
	}

	p.SetMode(testkit.Delay(150 * time.Millisecond))
	start := time.Now()
	if got, err := roundTrip(old, "slow", 5*time.Second); err != nil || got != "slow" {
		t.Fatalf("delay: got %q, %v", got, err)
	}
	// Delayed on the way there and on the way back.
	if took := time.Since(start); took < 300*time.Millisecond {
		t.Errorf("delay(150ms): round trip took %s, want at least 300ms", took)
	}

	p.SetMode(testkit.Blackhole)
	accepted := p.Accepted()
	fresh := dial(t, p.Addr()) // accepted, as a partition would not refuse it
	for name, c := range map[string]net.Conn{"open": old, "new": fresh} {
		if got, err := roundTrip(c, "held-"+name, 300*time.Millisecond); got != "" || !isTimeout(err) {
			t.Errorf("blackhole, %s connection: got %q, %v; want nothing and a timeout", name, got, err)
		}
	}
	if got := p.Accepted(); got != accepted+1 {
		t.Errorf("blackhole accepted %d new connections, want 1", got-accepted)
	}
	// Healed: what was sent across the partition arrives, in order, and the
	// connections carry on.
	p.SetMode(testkit.Pass)
	for name, c := range map[string]net.Conn{"open": old, "new": fresh} {
		if got, err := readN(c, len("held-"+name), 2*time.Second); err != nil || got != "held-"+name {
			t.Errorf("after the heal, %s connection: got %q, %v; want the held bytes", name, got, err)
		}
		if got, err := roundTrip(c, "again", 2*time.Second); err != nil || got != "again" {
			t.Errorf("after the heal, %s connection: got %q, %v", name, got, err)
		}
	}

	p.SetMode(testkit.Reset)
	if _, err := readN(old, 1, 2*time.Second); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("reset, open connection: read err %v, want ECONNRESET", err)
	}
	// The proxy accepts and resets at once, so the RST can reach the client before Go
	// has seen its connect finish: then the dial itself reports it.
	refused, err := net.DialTimeout("tcp", p.Addr(), 2*time.Second)
	if err == nil {
		defer refused.Close()
		_, err = readN(refused, 1, 2*time.Second)
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("reset, new connection: err %v, want ECONNRESET", err)
	}
	p.SetMode(testkit.Pass)
	if got, err := roundTrip(dial(t, p.Addr()), "back", 2*time.Second); err != nil || got != "back" {
		t.Fatalf("pass after reset: got %q, %v", got, err)
	}
}

// The proxy in front of the real PostgreSQL server: a statement sent into a blackhole
// completes when the partition heals; a reset breaks the session.
func TestProxyPostgres(t *testing.T) {
	t.Parallel()
	admin, err := url.Parse(testkit.AdminURL())
	if err != nil {
		t.Fatal(err)
	}
	p := testkit.StartProxy(t, admin.Host)
	via := *admin
	via.Host = p.Addr()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, via.String())
	if err != nil {
		t.Fatalf("connect through the proxy: %v", err)
	}
	defer conn.Close(context.Background())
	var pid int
	if err := conn.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid); err != nil {
		t.Fatal(err)
	}

	p.SetMode(testkit.Blackhole)
	const partition = 500 * time.Millisecond
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		var again int
		err := conn.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&again)
		if err == nil && again != pid {
			err = errors.New("answered by another backend")
		}
		done <- err
	}()
	time.Sleep(partition)
	select {
	case err := <-done:
		t.Fatalf("statement answered inside the blackhole: %v", err)
	default:
	}
	p.SetMode(testkit.Pass)
	if err := <-done; err != nil {
		t.Fatalf("statement sent into the blackhole, after the heal: %v", err)
	}
	if took := time.Since(start); took < partition {
		t.Errorf("statement took %s across a %s partition", took, partition)
	}

	p.SetMode(testkit.Reset)
	if _, err := conn.Exec(ctx, `SELECT 1`); err == nil {
		t.Error("statement on a reset connection succeeded")
	}
	p.SetMode(testkit.Pass)
	again, err := pgx.Connect(ctx, via.String())
	if err != nil {
		t.Fatalf("connect after the reset: %v", err)
	}
	defer again.Close(context.Background())
	if _, err := again.Exec(ctx, `SELECT 1`); err != nil {
		t.Errorf("statement after the reset: %v", err)
	}
}
