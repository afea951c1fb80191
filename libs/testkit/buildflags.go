package testkit

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
)

// BuildWith is Build with extra `go build` flags, e.g. {"-tags", "kagzi_failpoints"} for
// fault tests that arm failpoints in the binaries they run. Binaries built with
// different flags must go to different directories: the names do not say how they were
// built.
func BuildWith(dir string, flags []string, pkgs ...string) (map[string]string, error) {
	args := append([]string{"build"}, flags...)
	args = append(args, "-o", dir+string(os.PathSeparator))
	args = append(args, pkgs...)
	cmd := exec.Command("go", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, stderr.String())
	}
	out := make(map[string]string, len(pkgs))
	for _, p := range pkgs {
		name := path.Base(p)
		if len(name) > 1 && name[0] == 'v' && strings.Trim(name[1:], "0123456789") == "" {
			name = path.Base(path.Dir(p)) // go build names a /vN module after the element before
		}
		out[name] = filepath.Join(dir, name)
	}
	return out, nil
}
