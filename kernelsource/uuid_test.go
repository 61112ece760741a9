package kernelsource

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/m-lab/uuid"

	"github.com/m-lab/packet-headers/saver"

	"github.com/m-lab/packet-headers/flow"
)

func TestUUID(t *testing.T) {
	tests := []struct {
		prefix string
		cookie uint64
		want   string
	}{
		{"host_1548788619", 0x84FF, "host_1548788619_00000000000084FF"},
		{"host_1548788619", 0, "host_1548788619_0000000000000000"},
		{"host_1548788619", 1, "host_1548788619_0000000000000001"},
		{"h", math.MaxUint64, "h_FFFFFFFFFFFFFFFF"},
		{"h", 0x0123456789ABCDEF, "h_0123456789ABCDEF"},
		{"h", 0xFEDCBA9876543210, "h_FEDCBA9876543210"},
		{"", 0xA, "_000000000000000A"},
		// m-lab/uuid does not trim the prefix file, and neither do we.
		{"h\n", 0xA, "h\n_000000000000000A"},
		{"mlab1.lga0t.measurement-lab.org_1588110475", 0x1E3D, "mlab1.lga0t.measurement-lab.org_1588110475_0000000000001E3D"},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%q/%x", tt.prefix, tt.cookie), func(t *testing.T) {
			if got := UUID(tt.prefix, tt.cookie); got != tt.want {
				t.Errorf("UUID(%q, %#x) = %q, want %q", tt.prefix, tt.cookie, got, tt.want)
			}
			// m-lab/uuid's FromCookie, without its global prefix.
			if got, want := UUID(tt.prefix, tt.cookie), fmt.Sprintf("%s_%016X", tt.prefix, tt.cookie); got != want {
				t.Errorf("UUID(%q, %#x) = %q, m-lab/uuid's format gives %q", tt.prefix, tt.cookie, got, want)
			}
		})
	}
}

func TestUUIDAllocs(t *testing.T) {
	if n := testing.AllocsPerRun(100, func() { _ = UUID("host_1548788619", 0x84FF) }); n > 1 {
		t.Errorf("UUID allocates %v times, want 1", n)
	}
}

// mlabPrefix is m-lab/uuid's current prefix, taken from its output.
func mlabPrefix() string {
	return strings.TrimSuffix(uuid.FromCookie(0), "_0000000000000000")
}

// TestDefaultPrefixMatchesMLabUUID: without a prefix file, tcp-info names a
// socket with m-lab/uuid's default prefix, computed when its process starts;
// ours must be the same string.
func TestDefaultPrefixMatchesMLabUUID(t *testing.T) {
	if f := flag.Lookup("uuid-prefix-file"); f == nil || f.Value.String() != mlabPrefix() {
		t.Fatal("m-lab/uuid's prefix flag is not at its default")
	}
	// prefix.UnsafeString is hostname_boottime_unsafe, the boot time being
	// time.Now() minus /proc/uptime (in centiseconds), truncated to the
	// second. Two computations on the same boot agree except when the
	// boot time lies within 10 ms before a second boundary, where either
	// second may come out, in tcp-info as here; a few tries show the
	// computation is the same one.
	var got string
	for range 5 {
		p, err := readPrefix("")
		if err != nil {
			t.Fatal(err)
		}
		got = p
		if p == mlabPrefix() {
			break
		}
	}
	if want := mlabPrefix(); got != want {
		t.Errorf("default prefix %q, m-lab/uuid's is %q", got, want)
	}
	if !strings.HasSuffix(got, "_unsafe") {
		t.Errorf("default prefix %q does not end in _unsafe", got)
	}
	for _, c := range []uint64{0, 1, 0x84FF, math.MaxUint64} {
		if got, want := UUID(got, c), uuid.FromCookie(c); got != want {
			t.Errorf("UUID(default, %#x) = %q, m-lab/uuid gives %q", c, got, want)
		}
	}
}

// TestPrefixFileMatchesMLabUUID sets m-lab/uuid's -uuid-prefix-file flag (and
// restores it) to compare with the names tcp-info gives given the same file.
func TestPrefixFileMatchesMLabUUID(t *testing.T) {
	dir := t.TempDir()
	restore := filepath.Join(dir, "restore")
	if err := os.WriteFile(restore, []byte(mlabPrefix()), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := flag.Set("uuid-prefix-file", restore); err != nil {
			t.Error(err)
		}
	})
	for _, content := range []string{
		"mlab1.lga0t.measurement-lab.org_1588110475",
		"host_1548788619\n", // a trailing newline is kept by both
		"",
	} {
		t.Run(fmt.Sprintf("%q", content), func(t *testing.T) {
			path := filepath.Join(dir, "prefix")
			if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := flag.Set("uuid-prefix-file", path); err != nil {
				t.Fatal(err)
			}
			got, err := readPrefix(path)
			if err != nil {
				t.Fatal(err)
			}
			if got != content {
				t.Errorf("prefix %q, want the file's bytes %q", got, content)
			}
			for _, c := range []uint64{0, 0x84FF, math.MaxUint64} {
				if got, want := UUID(got, c), uuid.FromCookie(c); got != want {
					t.Errorf("UUID(%#x) = %q, m-lab/uuid gives %q", c, got, want)
				}
			}
		})
	}
}

func TestNewMissingPrefixFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "no-such-prefix")
	s, err := New(Config{PrefixFile: path}, make(chan flow.Named))
	if err == nil {
		s.Run(canceled())
		t.Fatal("New with a missing prefix file succeeded")
	}
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), path) {
		t.Errorf("New: %v; want an error naming %s that is fs.ErrNotExist", err, path)
	}
}

// TestCheckPrefix: a prefix passes exactly when the UUIDs made of it pass
// the eventsocket's rule (saver.CheckUUID), and the error says what is wrong
// with the prefix.
func TestCheckPrefix(t *testing.T) {
	maxLen := saver.MaxUUIDLen - len("_0000000000000000")
	tests := []struct {
		name    string
		prefix  string
		wantErr string // in the error; "" for a valid prefix
	}{
		{name: "tcp-info's", prefix: "mlab1.lga0t.measurement-lab.org_1588110475"},
		{name: "host", prefix: "host_1548788619"},
		{name: "empty", prefix: ""}, // "_<cookie>", as tcp-info names with an empty file
		{name: "longest", prefix: strings.Repeat("a", maxLen)},
		{name: "escape", prefix: "../../escaped", wantErr: `uuid prefix "../../escaped" has byte 0x2f at offset 2; file names allow only letters, digits, '.', '_' and '-'`},
		{name: "slash", prefix: "a/b", wantErr: "has byte 0x2f at offset 1"},
		{name: "echo", prefix: "host_1548788619\n", wantErr: `uuid prefix "host_1548788619\n" ends with a newline, which would be part of every file name; write the file without it (printf '%s' PREFIX > FILE, not echo)`},
		{name: "crlf", prefix: "host\r\n", wantErr: "has byte 0x0d at offset 4"},
		{name: "inner newline", prefix: "a\nb\n", wantErr: "has byte 0x0a at offset 1"},
		{name: "space", prefix: "my host", wantErr: "has byte 0x20 at offset 2"},
		{name: "utf-8", prefix: "h\u00f4te", wantErr: "has byte 0xc3 at offset 1"},
		{name: "dot", prefix: ".hidden", wantErr: `uuid prefix ".hidden" starts with a dot, which would hide every file from the uploader`},
		{name: "dots", prefix: "..", wantErr: "starts with a dot"},
		{name: "too long", prefix: strings.Repeat("a", maxLen+1), wantErr: "uuid prefix is 231 bytes long; at most 230 fit in a file name with the socket cookie"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckPrefix(tt.prefix)
			if tt.wantErr == "" {
				if err != nil {
					t.Errorf("CheckPrefix(%q) = %v, want nil", tt.prefix, err)
				}
			} else if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("CheckPrefix(%q) = %v, want an error containing %q", tt.prefix, err, tt.wantErr)
			}
			// The verdict is the eventsocket rule's on every UUID of the
			// prefix.
			for _, c := range []uint64{0, 0x84FF, math.MaxUint64} {
				if uerr := saver.CheckUUID(UUID(tt.prefix, c)); (uerr == nil) != (err == nil) {
					t.Errorf("CheckPrefix(%q) = %v but saver.CheckUUID(%q) = %v", tt.prefix, err, UUID(tt.prefix, c), uerr)
				}
			}
		})
	}
}

// TestNewRefusesBadPrefix: New reads the prefix file and refuses a prefix
// that would make unsafe file names, before opening anything.
func TestNewRefusesBadPrefix(t *testing.T) {
	dir := t.TempDir()
	for _, tt := range []struct{ content, want string }{
		{"../../escaped", "has byte 0x2f"},
		{"host_1548788619\n", "ends with a newline"},
	} {
		t.Run(tt.content, func(t *testing.T) {
			path := filepath.Join(dir, "prefix")
			if err := os.WriteFile(path, []byte(tt.content), 0o644); err != nil {
				t.Fatal(err)
			}
			if _, err := ReadPrefix(path); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ReadPrefix: %v, want an error containing %q", err, tt.want)
			}
			s, err := New(Config{PrefixFile: path}, make(chan flow.Named))
			if err == nil {
				s.Run(canceled())
				t.Fatalf("New with prefix %q succeeded", tt.content)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("New: %v, want an error containing %q", err, tt.want)
			}
		})
	}
	// A good one is read as it is.
	path := filepath.Join(dir, "good")
	if err := os.WriteFile(path, []byte("host_1548788619"), 0o644); err != nil {
		t.Fatal(err)
	}
	if p, err := ReadPrefix(path); err != nil || p != "host_1548788619" {
		t.Errorf("ReadPrefix = %q, %v; want the file's bytes", p, err)
	}
}
