package security

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/testkit"
)

// identities of deploy/nats/nats-secure.conf, as deploy/nats/gen-nkeys.sh names them.
var identities = []string{"scheduler", "timer", "executor", "client", "operator", "tenant_a"}

// secureNATS is nats-server running deploy/nats/nats-secure.conf as shipped, with keys
// made by the shipped deploy/nats/gen-nkeys.sh and a certificate from a test CA. Only
// what a deployment must supply differs: the listen address and a monitoring port come
// from command-line flags, the rest from the environment the config names.
type secureNATS struct {
	proc    *testkit.Process
	port    int
	monPort int
	pki     pki
	seeds   map[string]string // identity → seed file (NATS_NKEY_SEED)
	pubs    map[string]string // identity → public key
}

func startSecureNATS(t *testing.T) *secureNATS {
	t.Helper()
	return startSecureNATSWith(t, "")
}

// startSecureNATSWith runs the shipped config with settings of the test's after it
// (e.g. a lower max_connections): a config beside a link to the shipped file includes it
// and then sets extra, which overrides what the shipped file set. Empty extra: the
// shipped file itself.
func startSecureNATSWith(t *testing.T, extra string) *secureNATS {
	t.Helper()
	conf := deployFile(t, "nats/nats-secure.conf")
	if extra != "" {
		dir := t.TempDir()
		if err := os.Symlink(conf, filepath.Join(dir, "nats-secure.conf")); err != nil {
			t.Fatal(err)
		}
		conf = filepath.Join(dir, "test.conf")
		if err := os.WriteFile(conf, []byte("include ./nats-secure.conf\n"+extra+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	n := &secureNATS{pki: newPKI(t), seeds: map[string]string{}, pubs: map[string]string{}}
	keys := filepath.Join(t.TempDir(), "keys")
	gen := exec.Command("bash", deployFile(t, "nats/gen-nkeys.sh"), keys)
	gen.Env = append(os.Environ(), "NK="+bins["nk"])
	if out, err := gen.CombinedOutput(); err != nil {
		t.Fatalf("gen-nkeys.sh: %v\n%s", err, out)
	}
	envFile, err := os.ReadFile(filepath.Join(keys, "nkeys.env"))
	if err != nil {
		t.Fatal(err)
	}
	env := []string{
		"KAGZI_NATS_TLS_CERT=" + n.pki.ServerCert,
		"KAGZI_NATS_TLS_KEY=" + n.pki.ServerKey,
		"KAGZI_NATS_STORE_DIR=" + filepath.Join(t.TempDir(), "js"),
	}
	for _, line := range strings.Split(strings.TrimSpace(string(envFile)), "\n") {
		env = append(env, line)
		name, pub, _ := strings.Cut(line, "=")
		id := strings.ToLower(strings.TrimPrefix(name, "KAGZI_NKEY_"))
		n.pubs[id] = pub
		n.seeds[id] = filepath.Join(keys, id+".nk")
	}
	for _, id := range identities {
		if n.pubs[id] == "" {
			t.Fatalf("gen-nkeys.sh made no key for %s:\n%s", id, envFile)
		}
		if st, err := os.Stat(n.seeds[id]); err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("seed of %s: %v, mode %v; want a 0600 file", id, err, st.Mode())
		}
	}
	n.port, n.monPort = freePort(t), freePort(t)
	args := []string{"-c", conf,
		"-a", "127.0.0.1", "-p", fmt.Sprint(n.port), "-m", fmt.Sprint(n.monPort)}
	n.proc = testkit.StartCommand(t, "nats-server", bins["nats-server"], args, env...)
	// The monitor listens before JetStream starts and the client port after it, so only
	// a connection to the client port says the server is ready (CI once dialled between).
	eventually(t, 20*time.Second, "nats-server to listen", func() bool {
		c, err := net.DialTimeout("tcp", n.Addr(), time.Second)
		if err != nil {
			return false
		}
		c.Close()
		_, err = n.varz()
		return err == nil
	})
	return n
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// URL is the TLS client URL.
func (n *secureNATS) URL() string { return fmt.Sprintf("tls://127.0.0.1:%d", n.port) }

// Addr is the client port's address.
func (n *secureNATS) Addr() string { return fmt.Sprintf("127.0.0.1:%d", n.port) }

// ConnOptions are the options a service configured as identity id connects with.
func (n *secureNATS) ConnOptions(id string) bus.ConnOptions {
	return bus.ConnOptions{URL: n.URL(), Name: "security-" + id, NKeySeed: n.seeds[id], TLSCA: n.pki.CA}
}

// Env is the environment of a service process running as identity id.
func (n *secureNATS) Env(id string) []string {
	return []string{"NATS_URL=" + n.URL(), "NATS_NKEY_SEED=" + n.seeds[id], "NATS_TLS_CA=" + n.pki.CA}
}

// varz is the server's view of its own configuration, from the monitoring port (which
// needs no NATS credentials, so it observes the server from outside its auth).
type varz struct {
	AuthRequired   bool `json:"auth_required"`
	TLSRequired    bool `json:"tls_required"`
	MaxPayload     int  `json:"max_payload"`
	MaxConnections int  `json:"max_connections"`
	Connections    int  `json:"connections"`
	JetStream      struct {
		Config *struct {
			SyncAlways bool `json:"sync_always"`
		} `json:"config"`
	} `json:"jetstream"`
}

func (n *secureNATS) varz() (varz, error) {
	var v varz
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/varz", n.monPort))
	if err != nil {
		return v, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return v, fmt.Errorf("decode /varz: %w", err)
	}
	return v, nil
}

// violations counts the permission violations the server logged.
func (n *secureNATS) violations() int {
	return strings.Count(n.proc.Log(), " Violation - ")
}

// rawConn is a NATS protocol connection made by hand, so a test can send what a well
// behaved client library refuses to (a plaintext CONNECT to a TLS port, a message over
// max_payload) and see exactly what the server answers.
type rawConn struct {
	conn net.Conn
	r    *bufio.Reader
	info map[string]any
}

// dialRaw connects and reads the server's INFO, which NATS sends in the clear before any
// TLS handshake.
func dialRaw(t testing.TB, addr string) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	rc := &rawConn{conn: c, r: bufio.NewReader(c)}
	line, err := rc.r.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "INFO ") {
		t.Fatalf("read INFO: %q, %v", line, err)
	}
	if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "INFO ")), &rc.info); err != nil {
		t.Fatalf("decode INFO: %v", err)
	}
	return rc
}

// upgradeTLS performs the client side of the TLS handshake, trusting caFile.
func (rc *rawConn) upgradeTLS(t testing.TB, caFile string) {
	t.Helper()
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	tc := tls.Client(rc.conn, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})
	if err := tc.Handshake(); err != nil {
		t.Fatalf("tls handshake: %v", err)
	}
	rc.conn, rc.r = tc, bufio.NewReader(tc)
}

// connectNKey sends CONNECT signed with seedFile's key and waits for the PONG.
func (rc *rawConn) connectNKey(t testing.TB, seedFile string) {
	t.Helper()
	seed, err := os.ReadFile(seedFile)
	if err != nil {
		t.Fatal(err)
	}
	kp, err := nkeys.FromSeed([]byte(strings.TrimSpace(string(seed))))
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	nonce, _ := rc.info["nonce"].(string)
	sig, err := kp.Sign([]byte(nonce))
	if err != nil {
		t.Fatal(err)
	}
	connect, _ := json.Marshal(map[string]any{"verbose": false, "pedantic": false, "tls_required": true,
		"nkey": pub, "sig": encodeSig(sig), "protocol": 1, "name": "raw"})
	rc.send(t, "CONNECT "+string(connect)+"\r\nPING\r\n")
	if line := rc.readLine(); line != "PONG" {
		t.Fatalf("signed CONNECT answered %q, want PONG", line)
	}
}

// encodeSig encodes a nonce signature as CONNECT carries it.
func encodeSig(sig []byte) string { return base64.RawURLEncoding.EncodeToString(sig) }

func (rc *rawConn) send(t testing.TB, s string) {
	t.Helper()
	if _, err := rc.conn.Write([]byte(s)); err != nil {
		t.Fatalf("write: %v", err)
	}
}

// readLine returns the next protocol line without its CRLF, skipping PINGs (answered)
// and INFO updates, or "" when the server closed the connection.
func (rc *rawConn) readLine() string {
	for {
		line, err := rc.r.ReadString('\n')
		line = strings.TrimRight(line, "\r\n")
		if line == "PING" {
			_, _ = rc.conn.Write([]byte("PONG\r\n"))
			continue
		}
		if strings.HasPrefix(line, "INFO ") {
			continue
		}
		if err != nil && line == "" {
			return ""
		}
		return line
	}
}
