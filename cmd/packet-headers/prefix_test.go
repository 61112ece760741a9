package main

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBadUUIDPrefixFile: standalone, a prefix that would make unsafe file
// names is refused at start, with one line naming the flag and the problem
// and exit code 2, before anything is created.
func TestBadUUIDPrefixFile(t *testing.T) {
	env := envOf(nil)
	dir := t.TempDir()
	tests := []struct {
		name    string
		content string
		want    string
	}{
		{"escape", "../../escaped", `uuid prefix "../../escaped" has byte 0x2f at offset 2`},
		{"echo", "host_1548788619\n", `ends with a newline, which would be part of every file name; write the file without it (printf '%s' PREFIX > FILE, not echo)`},
		{"leading dot", ".host", "starts with a dot"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := filepath.Join(dir, tt.name)
			if err := os.WriteFile(prefix, []byte(tt.content), 0o644); err != nil {
				t.Fatal(err)
			}
			datadir := filepath.Join(dir, tt.name+"-data")
			var stdout, stderr bytes.Buffer
			code := run(t.Context(), []string{"-datadir=" + datadir, "-uuid-prefix-file=" + prefix}, env, &stdout, &stderr)
			if code != 2 {
				t.Errorf("exit code %d, want 2 (stderr %q)", code, stderr.String())
			}
			msg := stderr.String()
			if want := "packet-headers: -uuid-prefix-file=" + prefix + ": "; !strings.HasPrefix(msg, want) {
				t.Errorf("error %q does not start with %q", msg, want)
			}
			if !strings.Contains(msg, tt.want) {
				t.Errorf("error %q does not contain %q", msg, tt.want)
			}
			if strings.Count(msg, "\n") != 1 {
				t.Errorf("want one line, got %q", msg)
			}
			// Refused before anything started: not even the data
			// directory was made.
			if _, err := os.Stat(datadir); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("data directory: %v, want it not created", err)
			}
		})
	}
}

// TestUUIDPrefixFileBesideTCPInfo: with the eventsocket, tcp-info names the
// flows and the prefix file is not read.
func TestUUIDPrefixFileBesideTCPInfo(t *testing.T) {
	env := envOf(nil)
	prefix := filepath.Join(t.TempDir(), "prefix")
	if err := os.WriteFile(prefix, []byte("../../escaped"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := parseConfig([]string{"-tcpinfo.eventsocket=/run/tcpinfo.sock", "-uuid-prefix-file=" + prefix}, io.Discard, env); err != nil {
		t.Errorf("parseConfig beside tcp-info: %v, want no error", err)
	}
	if _, err := parseConfig([]string{"-uuid-prefix-file=" + prefix}, io.Discard, env); err == nil {
		t.Error("parseConfig standalone: no error, want the prefix refused")
	}
	good := filepath.Join(t.TempDir(), "good")
	if err := os.WriteFile(good, []byte("host_1548788619"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := parseConfig([]string{"-uuid-prefix-file=" + good}, io.Discard, env); err != nil {
		t.Errorf("parseConfig standalone with a good prefix: %v", err)
	}
}
