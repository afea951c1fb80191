package security

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/url"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kagzi/kagzi/libs/testkit"
)

// pgRoles are a migrator and a runtime role made by deploy/postgres/roles.sql under
// names unique to one test: roles are cluster-wide, and tests of other packages share
// the server.
type pgRoles struct {
	Migrator, Runtime string
	password          string
}

// newPGRoles names the roles and drops them when the test ends. Call it before creating
// the database the roles will own objects in: cleanups run last-registered first, so the
// database is gone by the time its owner's role is dropped.
func newPGRoles(t *testing.T) pgRoles {
	t.Helper()
	r := pgRoles{Migrator: "kagzi_t_migrator_" + randHex(5), Runtime: "kagzi_t_runtime_" + randHex(5), password: randHex(16)}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, testkit.AdminURL())
		if err != nil {
			t.Logf("drop test roles: %v", err)
			return
		}
		defer conn.Close(ctx)
		for _, role := range []string{r.Runtime, r.Migrator} {
			if _, err := conn.Exec(ctx, `DROP ROLE IF EXISTS `+pgx.Identifier{role}.Sanitize()); err != nil {
				t.Logf("drop role %s: %v", role, err)
			}
		}
	})
	return r
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// apply runs the shipped roles.sql on the database with psql, as an operator would, then
// gives both roles a password so the test works whatever authentication the server asks
// of them.
func (r pgRoles) apply(t *testing.T, dbURL string) {
	t.Helper()
	cmd := exec.Command(psqlPath(t), "-X", "-q", "-v", "ON_ERROR_STOP=1",
		"-v", "migrator="+r.Migrator, "-v", "runtime="+r.Runtime,
		"-d", dbURL, "-f", deployFile(t, "postgres/roles.sql"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("psql -f roles.sql: %v\n%s", err, out)
	}
	ctx := ctxT(t, 30*time.Second)
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, role := range []string{r.Migrator, r.Runtime} {
		// ALTER ROLE takes no parameters; the password is hex, so quoting it is exact.
		sql := `ALTER ROLE ` + pgx.Identifier{role}.Sanitize() + ` PASSWORD '` + r.password + `'`
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatalf("set password of %s: %v", role, err)
		}
	}
}

// url is dbURL with role's credentials in place of the administrator's.
func (r pgRoles) url(t *testing.T, dbURL, role string) string {
	t.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.UserPassword(role, r.password)
	return u.String()
}

func psqlPath(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("psql"); err == nil {
		return p
	}
	if m, _ := filepath.Glob("/usr/lib/postgresql/*/bin/psql"); len(m) > 0 {
		return m[len(m)-1]
	}
	t.Fatal("psql not found: the roles are applied with psql, as deploy/postgres/README.md says")
	return ""
}
