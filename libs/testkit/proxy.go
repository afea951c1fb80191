package testkit

import (
	"fmt"
	"net"
	"sync"
	"testing"
	"time"
)

// Mode is what a Proxy does to the traffic between its clients and its target.
type Mode struct {
	kind  modeKind
	delay time.Duration
}

type modeKind int

const (
	passKind modeKind = iota
	blackholeKind
	resetKind
)

var (
	// Pass forwards every byte at once.
	Pass = Mode{}
	// Blackhole forwards nothing, as across a network partition: new connections are
	// accepted, open ones stay open, and neither carries a byte either way. What is sent
	// meanwhile is held (a bounded amount, then the sender blocks, as on a full TCP
	// window) and delivered once the mode changes back, as TCP retransmission delivers it
	// when a partition heals. A client that gave up meanwhile is told when its close is
	// delivered too, after what it sent before.
	Blackhole = Mode{kind: blackholeKind}
	// Reset closes every connection with a TCP RST at once and resets new ones as soon
	// as they are accepted, as a peer that restarted or a firewall rejecting them would.
	Reset = Mode{kind: resetKind}
)

// Delay forwards every chunk d after the proxy read it, in both directions.
func Delay(d time.Duration) Mode { return Mode{delay: d} }

func (m Mode) String() string {
	switch {
	case m.kind == blackholeKind:
		return "blackhole"
	case m.kind == resetKind:
		return "reset"
	case m.delay > 0:
		return fmt.Sprintf("delay(%s)", m.delay)
	}
	return "pass"
}

// Proxy is a TCP proxy on 127.0.0.1 in front of one target (a PostgreSQL or NATS
// server), for tests that put one service behind a network fault while the rest of the
// system reaches the target directly. It needs no privileges, unlike network namespaces.
type Proxy struct {
	t        testing.TB
	target   string
	ln       net.Listener
	wg       sync.WaitGroup
	mu       sync.Mutex
	mode     Mode
	changed  chan struct{} // closed and replaced by every SetMode: wakes held pumps
	conns    map[*proxyConn]struct{}
	accepted int
}

type proxyConn struct{ client, server *net.TCPConn }

// StartProxy listens on a free 127.0.0.1 port in Pass mode and forwards each connection
// to target; the proxy is closed when the test ends.
func StartProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testkit: proxy listen: %v", err)
	}
	p := &Proxy{t: t, target: target, ln: ln, changed: make(chan struct{}), conns: map[*proxyConn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

// Addr is the host:port clients connect to instead of the target.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Accepted counts the connections the proxy has accepted.
func (p *Proxy) Accepted() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepted
}

// SetMode changes what the proxy does, for open connections and new ones alike.
func (p *Proxy) SetMode(m Mode) {
	p.mu.Lock()
	p.mode = m
	close(p.changed)
	p.changed = make(chan struct{})
	var doomed []*proxyConn
	if m.kind == resetKind {
		for c := range p.conns {
			doomed = append(doomed, c)
		}
	}
	p.mu.Unlock()
	for _, c := range doomed {
		c.reset()
	}
}

// Close resets every connection and stops listening; idempotent.
func (p *Proxy) Close() {
	p.SetMode(Reset)
	_ = p.ln.Close()
	p.wg.Wait()
}

// reset closes both sides with SO_LINGER 0, which makes the kernel send RST, not FIN.
func (c *proxyConn) reset() {
	for _, s := range []*net.TCPConn{c.client, c.server} {
		_ = s.SetLinger(0)
		_ = s.Close()
	}
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		nc, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		client := nc.(*net.TCPConn)
		p.mu.Lock()
		p.accepted++
		refuse := p.mode.kind == resetKind
		p.mu.Unlock()
		if refuse {
			_ = client.SetLinger(0)
			_ = client.Close()
			continue
		}
		p.wg.Add(1)
		go p.serve(client)
	}
}

func (p *Proxy) serve(client *net.TCPConn) {
	defer p.wg.Done()
	sc, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil {
		_ = client.SetLinger(0)
		_ = client.Close()
		return
	}
	c := &proxyConn{client: client, server: sc.(*net.TCPConn)}
	p.mu.Lock()
	if p.mode.kind == resetKind { // reset while we dialled
		p.mu.Unlock()
		c.reset()
		return
	}
	p.conns[c] = struct{}{}
	p.mu.Unlock()
	var pipes sync.WaitGroup
	pipes.Add(2)
	go func() { defer pipes.Done(); p.pipe(c, c.client, c.server) }()
	go func() { defer pipes.Done(); p.pipe(c, c.server, c.client) }()
	pipes.Wait()
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	_ = c.client.Close()
	_ = c.server.Close()
}

type chunk struct {
	data []byte
	at   time.Time
}

// pipe copies src to dst through a small queue, so that reading (and noticing the
// sender's close) goes on while writing is held or delayed. An EOF is passed on as a
// half-close once everything read before it is written; a failed write or a reset ends
// the whole connection.
func (p *Proxy) pipe(c *proxyConn, src, dst *net.TCPConn) {
	queue := make(chan chunk, 16)
	go func() {
		defer close(queue)
		for {
			buf := make([]byte, 32<<10)
			n, err := src.Read(buf)
			if n > 0 {
				queue <- chunk{data: buf[:n], at: time.Now()}
			}
			if err != nil {
				return
			}
		}
	}()
	for ch := range queue {
		if !p.hold(ch.at) {
			break
		}
		if _, err := dst.Write(ch.data); err != nil {
			c.reset()
			break
		}
	}
	_ = dst.CloseWrite()
	for range queue { // let the reader finish: its Read fails once the connection is closed
	}
}

// hold waits until a chunk read at `at` may be written: never in Blackhole, after the
// delay in Delay. It reports false when the connection is being reset.
func (p *Proxy) hold(at time.Time) bool {
	for {
		p.mu.Lock()
		m, changed := p.mode, p.changed
		p.mu.Unlock()
		switch m.kind {
		case resetKind:
			return false
		case blackholeKind:
			<-changed
			continue
		}
		wait := time.Until(at.Add(m.delay))
		if wait <= 0 {
			return true
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
			return true
		case <-changed:
			t.Stop()
		}
	}
}
