package wire

import (
	"errors"
	"testing"
)

func TestSubjectsRoundTrip(t *testing.T) {
	for _, prefix := range []string{StartSubjectPrefix, SubmitSubjectPrefix} {
		subject := StartSubject("tenant-a", "greet")
		if prefix == SubmitSubjectPrefix {
			subject = SubmitSubject("tenant-a", "greet")
		}
		ns, wf, err := ParseStartSubject(prefix, subject)
		if err != nil || ns != "tenant-a" || wf != "greet" {
			t.Errorf("ParseStartSubject(%q) = %q, %q, %v", subject, ns, wf, err)
		}
	}
	ns, op, err := ParseAPISubject(DescribeSubject("tenant-a"))
	if err != nil || ns != "tenant-a" || op != DescribeOp {
		t.Errorf("ParseAPISubject = %q, %q, %v", ns, op, err)
	}
	if got, want := DoneSubject("tenant-a", "r1"), "kagzi.run.tenant-a.r1.done"; got != want {
		t.Errorf("DoneSubject = %q, want %q", got, want)
	}
}

func TestParseSubjectRejects(t *testing.T) {
	for _, subject := range []string{
		"kagzi.start.greet",           // no namespace token
		"kagzi.start.a$b.greet",       // namespace outside the alphabet
		"kagzi.start.tenant-a.a.b",    // dotted workflow (reachable through a '>' permission)
		"kagzi.start.tenant-a.",       // empty workflow
		"kagzi.start..greet",          // empty namespace
		"kagzi.submit.tenant-a.greet", // another prefix
	} {
		if _, _, err := ParseStartSubject(StartSubjectPrefix, subject); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("ParseStartSubject(%q): err = %v, want invalid argument", subject, err)
		}
	}
	for _, subject := range []string{"kagzi.api.describe", "kagzi.api.*.describe", "kagzi.start.a.describe"} {
		if _, _, err := ParseAPISubject(subject); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("ParseAPISubject(%q): err = %v, want invalid argument", subject, err)
		}
	}
}

func TestRequestNamespace(t *testing.T) {
	for _, body := range []string{"", "tenant-a"} {
		if ns, err := RequestNamespace("tenant-a", body); err != nil || ns != "tenant-a" {
			t.Errorf("body %q: %q, %v; want the subject's namespace", body, ns, err)
		}
	}
	_, err := RequestNamespace("tenant-a", "tenant-b")
	if !errors.Is(err, ErrPermissionDenied) || ToError(err).Code != CodePermissionDenied {
		t.Errorf("another namespace in the body: %v, want permission_denied", err)
	}
}
