package security

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/kagzi/kagzi/libs/bus"
	"github.com/kagzi/kagzi/libs/sdk"
	"github.com/kagzi/kagzi/libs/testkit"
	"github.com/kagzi/kagzi/libs/wire"
	"github.com/kagzi/kagzi/services/internal/security/sealedwf"
)

// S07 — payload encryption at rest. The real scheduler, timer and an executor built on
// the SDK with an AES-256-GCM codec (sealedexec) run against their own database and
// their own nats-server process; every input, step output, output and error quotes a
// marker KAGZI-SECRET-<uuid>: a run started by request, one submitted through the
// JetStream submit stream (so its input is stored by the broker), one whose step fails
// on both of its attempts with an error quoting the marker, and one whose two step
// records the test swaps while the run sleeps. Services log at info level.
//
// Pass (codec on): the marker occurs 0 times in pg_dump of the database (as text, and
// hex-encoded as pg_dump writes bytea), 0 times in the bytes of every file of the
// JetStream store directory, 0 times in every process's log; the swapped run fails
// closed on its replay (1/1 detected, 0 step bodies run after the swap), while every
// other run's results read back through the codec are what the workflow produced.
//
// The same system without the codec is the control that shows each count can fail:
// there the marker is found in the dump, the store and the executor's log, and the
// swap goes unnoticed (the run completes with the swapped values, its last step body
// having run on them).
func TestS07PayloadEncryptionAtRest(t *testing.T) {
	t.Parallel()
	t.Run("sealed", func(t *testing.T) {
		t.Parallel()
		key := make([]byte, 32)
		_, _ = rand.Read(key)
		r := runS07(t, key)
		for what, n := range r.found {
			if n != 0 {
				t.Errorf("marker found %d times in %s", n, what)
			}
		}
		if r.swapDetected != 1 || r.bodiesAfterSwap != 0 {
			t.Errorf("swapped step records: %d/1 detected, %d step bodies run after the swap; want 1/1 and 0",
				r.swapDetected, r.bodiesAfterSwap)
		}
	})
	t.Run("control without a codec", func(t *testing.T) {
		t.Parallel()
		r := runS07(t, nil)
		for _, what := range []string{"pg_dump", atRest, "the log of sealedexec"} {
			if r.found[what] == 0 {
				t.Errorf("plaintext marker not found in %s: that scan cannot fail", what)
			}
		}
		if r.swapDetected != 0 || r.bodiesAfterSwap != 1 {
			t.Errorf("swapped plaintext step records: %d detected, %d bodies run after the swap; want 0 and 1 (the check could not fail otherwise)",
				r.swapDetected, r.bodiesAfterSwap)
		}
	})
}

// atRest names the scan of the JetStream store while a submitted start waits there.
const atRest = "the JetStream store, a submitted start at rest"

type s07Result struct {
	found           map[string]int // where → marker occurrences
	swapDetected    int
	bodiesAfterSwap int
}

// runS07 runs the S07 workload on a private system, sealing payloads with key (none
// when nil), stops every process and counts the marker everywhere it might have gone.
func runS07(t *testing.T, key []byte) s07Result {
	var codec sdk.Codec
	execEnv := []string{"KAGZI_LOCAL_SLEEP_MAX=-1s"} // every sleep parks: the timer wakes it
	if key != nil {
		var err error
		if codec, err = sdk.NewAEADCodec(key); err != nil {
			t.Fatal(err)
		}
		execEnv = append(execEnv, "KAGZI_TEST_CODEC_KEY="+hex.EncodeToString(key))
	}
	marker := "KAGZI-SECRET-" + wire.NewRunID()
	dbURL := testkit.NewDatabase(t)
	pool := connectPG(t, dbURL)
	oracle := testkit.NewOracle(t, pool)
	natsProc := testkit.StartNATSProcess(t, bins["nats-server"])
	env := []string{"DATABASE_URL=" + dbURL, "NATS_URL=" + natsProc.URL(), "KAGZI_HTTP_ADDR=off",
		"KAGZI_LOG_LEVEL=info", "KAGZI_LOG_FORMAT=json"}
	procs := []*testkit.Process{
		testkit.StartProcess(t, "timer", bins["timer"], append(env, "KAGZI_MAX_IDLE=1s")...),
		testkit.StartProcess(t, "sealedexec", bins["sealedexec"], append(env, execEnv...)...),
	}
	nc := connect(t, bus.ConnOptions{URL: natsProc.URL(), Name: t.Name()})
	opts := []sdk.ClientOption{sdk.WithRequestTimeout(5 * time.Second)}
	if codec != nil {
		opts = append(opts, sdk.WithCodec(codec))
	}
	client := sdk.NewClient(nc, opts...)
	ctx := ctxT(t, 90*time.Second)
	res := s07Result{found: map[string]int{}}

	// A submitted start waits in the submit stream until a scheduler commits it, and a
	// consumed message does not stay on disk: the store is scanned while the start is
	// at rest there, before any scheduler runs (the executor has made the streams).
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "the submit stream", func() bool {
		_, err := js.Stream(ctx, wire.SubmitStream)
		return err == nil
	})
	submitted, err := client.SubmitByName(ctx, sealedwf.Name, sealedwf.Input{Secret: marker})
	if err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(ctx, wire.SubmitStream)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := st.Info(ctx); err != nil || info.State.Msgs != 1 {
		t.Fatalf("submit stream holds %v starts (%v), want the 1 submitted", info, err)
	}
	files, n := countInFiles(t, natsProc.StoreDir, marker)
	if files == 0 {
		t.Fatalf("no files in the JetStream store directory %s", natsProc.StoreDir)
	}
	res.found[atRest] = n
	procs = append(procs, testkit.StartProcess(t, "scheduler", bins["scheduler"], env...))

	started, err := client.StartByName(ctx, sealedwf.Name, sealedwf.Input{Secret: marker, NapMS: 300})
	if err != nil {
		t.Fatal(err)
	}
	failing, err := client.StartByName(ctx, sealedwf.Name, sealedwf.Input{Secret: marker, Fail: true}, sdk.MaxAttempts(2))
	if err != nil {
		t.Fatal(err)
	}
	swapped, err := client.StartByName(ctx, sealedwf.Name, sealedwf.Input{Secret: marker, NapMS: 1500})
	if err != nil {
		t.Fatal(err)
	}

	for _, id := range []string{started, submitted} {
		info, err := client.Wait(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		want := `"` + sealedwf.Expected(sealedwf.Input{Secret: marker}) + `"`
		if info.Status != wire.StatusCompleted || string(info.Output) != want {
			t.Errorf("run %s: %s with output %s (%s); want COMPLETED with %s", id, info.Status, info.Output, info.Error, want)
		}
	}
	info, err := client.Wait(ctx, failing)
	if err != nil {
		t.Fatal(err)
	}
	if info.Status != wire.StatusFailed || info.Attempt != 2 || !strings.Contains(info.Error, sealedwf.ErrorPrefix+marker) {
		t.Errorf("failing run: %s at attempt %d with error %q; want FAILED at attempt 2 with the step's error", info.Status, info.Attempt, info.Error)
	}

	res.swapDetected, res.bodiesAfterSwap = swapSteps(t, ctx, client, oracle, swapped, marker)

	// Stopped before counting: each process has written its last line, and nats-server
	// has flushed its store.
	for _, p := range procs {
		p.Stop(20 * time.Second)
	}
	natsProc.Stop(20 * time.Second)
	for _, p := range append(procs, natsProc.Process) {
		log := p.Log()
		res.found["the log of "+p.Name] = countMarker([]byte(log), marker)
		// The services log JSON; an empty log or one without info lines proves nothing.
		if p.Name != "nats-server" && !strings.Contains(log, `"level":"info"`) {
			t.Errorf("%s logged no info line:\n%s", p.Name, log)
		}
	}
	files, res.found["the JetStream store at the end"] = countInFiles(t, natsProc.StoreDir, marker)
	res.found["pg_dump"] = countInDump(t, dbURL, marker)
	t.Logf("marker %s found: %v (%d store files scanned); swap detected %d/1, bodies after the swap %d",
		marker, res.found, files, res.swapDetected, res.bodiesAfterSwap)
	return res
}

// swapSteps exchanges the recorded outputs of steps a and b of a sleeping run, lets the
// run wake and reports whether it was stopped for it (failed with ErrCodec, not
// completed) and how many step bodies ran after the swap.
func swapSteps(t *testing.T, ctx context.Context, client *sdk.Client, oracle *testkit.Oracle, runID, marker string) (detected, bodies int) {
	t.Helper()
	if _, ok := oracle.WaitCount(20*time.Second, 1, `SELECT count(*) FROM workflow_runs WHERE id = $1 AND status = 'SLEEPING'`, runID); !ok {
		t.Fatalf("run %s never went to sleep", runID)
	}
	before := oracle.Count(`SELECT count(*) FROM test_effects WHERE run_id = $1`, runID)
	if n := oracle.Count(`WITH s AS (
		UPDATE step_runs s SET output = o.output FROM step_runs o
		WHERE s.run_id = $1 AND o.run_id = $1 AND s.step_key IN ('a', 'b') AND o.step_key IN ('a', 'b') AND s.step_key <> o.step_key
		RETURNING 1) SELECT count(*) FROM s`, runID); n != 2 {
		t.Fatalf("swapped %d step records of run %s, want 2", n, runID)
	}
	info, err := client.Wait(ctx, runID)
	if err != nil {
		t.Fatal(err)
	}
	bodies = oracle.Count(`SELECT count(*) FROM test_effects WHERE run_id = $1`, runID) - before
	switch {
	case info.Status == wire.StatusFailed && strings.Contains(info.Error, sdk.ErrCodec.Error()):
		detected = 1
	case info.Status == wire.StatusCompleted:
		a, b := "a:"+marker, "b:"+marker
		if want := `"` + b + "|" + a + "|c:" + b + `"`; string(info.Output) != want {
			t.Errorf("swapped run completed with %s, want the swapped values %s", info.Output, want)
		}
	default:
		t.Errorf("swapped run ended %s: %s", info.Status, info.Error)
	}
	return detected, bodies
}

// countInFiles counts the marker (countMarker) in the raw bytes of every regular file
// under dir.
func countInFiles(t *testing.T, dir, marker string) (files, n int) {
	t.Helper()
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		files++
		n += countMarker(b, marker)
		return nil
	})
	if err != nil {
		t.Fatalf("scan %s: %v", dir, err)
	}
	return files, n
}

// countMarker counts the marker in b as text, hex-encoded (pg_dump's bytea) and
// base64-encoded (encoding/json's []byte) at each of the three offsets it can have
// within a longer encoded value, in the standard and URL alphabets.
func countMarker(b []byte, marker string) int {
	n := bytes.Count(b, []byte(marker)) + bytes.Count(b, []byte(hex.EncodeToString([]byte(marker))))
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding} {
		for _, needle := range base64Forms(enc, []byte(marker)) {
			n += bytes.Count(b, needle)
		}
	}
	return n
}

// base64Forms are the encoded forms of m inside any longer input: for each offset of m
// within a 3-byte group, the characters that only m's bytes determine (the group it
// shares with the bytes before it and the partial group at its end are left out).
func base64Forms(enc *base64.Encoding, m []byte) [][]byte {
	var forms [][]byte
	for off := range 3 {
		full := enc.EncodeToString(append(make([]byte, off), m...))
		start, end := 0, (off+len(m))/3*4
		if off > 0 {
			start = 4
		}
		forms = append(forms, []byte(full[start:end]))
	}
	return forms
}

// countInDump counts the marker (countMarker) in a plain-format pg_dump of the database:
// as text, and in the hex form pg_dump writes bytea columns in (inputs and outputs are
// bytea).
func countInDump(t *testing.T, dbURL, marker string) int {
	t.Helper()
	out, err := exec.Command(pgDumpPath(t), "--no-owner", "--dbname="+dbURL).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("pg_dump: %v\n%s", err, ee.Stderr)
		}
		t.Fatalf("pg_dump: %v", err)
	}
	if !bytes.Contains(out, []byte("CREATE TABLE public.workflow_runs")) {
		t.Fatalf("pg_dump output holds no workflow_runs table:\n%.2000s", out)
	}
	return countMarker(out, marker)
}

func pgDumpPath(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("pg_dump"); err == nil {
		return p
	}
	if m, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_dump"); len(m) > 0 {
		return m[len(m)-1]
	}
	t.Fatal("pg_dump not found")
	return ""
}

// The scan finds the marker base64-encoded inside a longer value, wherever it starts.
func TestCountMarkerFindsEncodedForms(t *testing.T) {
	t.Parallel()
	marker := "KAGZI-SECRET-" + wire.NewRunID()
	for off := range 6 {
		value := append(append(bytes.Repeat([]byte{'x'}, off), marker...), `","more":1}`...)
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding, base64.RawStdEncoding} {
			if n := countMarker([]byte(`{"input":"`+enc.EncodeToString(value)+`"}`), marker); n == 0 {
				t.Errorf("marker at offset %d, base64-encoded: not found", off)
			}
		}
	}
	if n := countMarker([]byte(hex.EncodeToString([]byte("\\x"+marker))), marker); n == 0 {
		t.Error("marker hex-encoded: not found")
	}
	if n := countMarker([]byte(`{"input":"`+base64.StdEncoding.EncodeToString([]byte("KAGZI-SECRET-something-else"))+`"}`), marker); n != 0 {
		t.Errorf("another value: %d occurrences found", n)
	}
}
