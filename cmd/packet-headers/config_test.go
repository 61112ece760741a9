package main

import (
	"bytes"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/m-lab/packet-headers/anonymize"
)

// envOf is an environment of the given variables, for parseConfig and run.
func envOf(env map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := env[k]; return v, ok }
}

// noEnv is an empty environment.
var noEnv = envOf(nil)

func TestDefaultsAreTheOriginals(t *testing.T) {
	env := envOf(nil)
	c, err := parseConfig(nil, io.Discard, env)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{
		"anonymize.ip":               c.AnonymizeIP.String(),
		"captureduration":            c.CaptureDuration.String(),
		"datadir":                    c.DataDir,
		"flowtimeout":                c.FlowTimeout.String(),
		"maxheadersize":              "256",
		"maxidleram":                 c.MaxIdleRAM.String(),
		"prometheusx.listen-address": c.PromListen,
		"sigtermwait":                c.SigtermWait.String(),
		"stream":                     map[bool]string{false: "false", true: "true"}[c.Stream],
		"tcpinfo.eventsocket":        c.EventSocket,
		"uuidwaitduration":           c.UUIDWait.String(),
	}
	want := map[string]string{
		"anonymize.ip":               "none",
		"captureduration":            "30s",
		"datadir":                    ".",
		"flowtimeout":                "30s",
		"maxheadersize":              "256",
		"maxidleram":                 "3GB",
		"prometheusx.listen-address": ":9990",
		"sigtermwait":                "1s",
		"stream":                     "false",
		"tcpinfo.eventsocket":        "",
		"uuidwaitduration":           "5s",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("defaults (-want +got):\n%s", diff)
	}
	if c.MaxHeaderSize != 256 || len(c.Interfaces) != 0 || c.MaxFlows != 0 || c.MaxHeap != 8*GB {
		t.Errorf("defaults: %+v", c)
	}
}

func TestFlagsAndEnvironment(t *testing.T) {
	env := envOf(map[string]string{
		"DATADIR":             "/from/env",
		"TCPINFO_EVENTSOCKET": "/env.sock",
		"ANONYMIZE_IP":        "netblock",
		"MAXIDLERAM":          "1500MB",
		"INTERFACE":           "eth0,eth1",
	})
	c, err := parseConfig([]string{"-datadir=/from/flag", "-maxheap=2GB", "-maxflows=150", "-stream=false", "-flowtimeout=5s"}, io.Discard, env)
	if err != nil {
		t.Fatal(err)
	}
	if c.DataDir != "/from/flag" {
		t.Errorf("command line must win over the environment: datadir %q", c.DataDir)
	}
	if c.EventSocket != "/env.sock" || c.AnonymizeIP != anonymize.Netblock || c.MaxIdleRAM != 1500*MB {
		t.Errorf("environment not applied: %+v", c)
	}
	if diff := cmp.Diff([]string{"eth0", "eth1"}, []string(c.Interfaces)); diff != "" {
		t.Errorf("interfaces (-want +got):\n%s", diff)
	}
	if c.MaxHeap != 2*GB || c.MaxFlows != 150 || c.FlowTimeout != 5*time.Second {
		t.Errorf("flags: %+v", c)
	}
}

func TestInterfaceRepeatedAndComma(t *testing.T) {
	env := envOf(nil)
	c, err := parseConfig([]string{"-interface=a,b", "-interface", "c"}, io.Discard, env)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"a", "b", "c"}, []string(c.Interfaces)); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestBadInput(t *testing.T) {
	tests := []struct {
		args []string
		env  map[string]string
		want string // in the one-line error
	}{
		{[]string{"-captureduration=5s"}, nil, "-captureduration=5s must be longer than -uuidwaitduration=5s"},
		{[]string{"-captureduration=0s"}, nil, "-captureduration=0s: must be positive"},
		{[]string{"-flowtimeout=-1s"}, nil, "-flowtimeout"},
		{[]string{"-uuidwaitduration=0"}, nil, "-uuidwaitduration"},
		{[]string{"-maxheadersize=20"}, nil, "-maxheadersize=20"},
		{[]string{"-maxflows=-1"}, nil, "-maxflows=-1"},
		{[]string{"-maxpending=0"}, nil, "-maxpending=0"},
		{[]string{"-gziplevel=0"}, nil, "-gziplevel=0"},
		{[]string{"-gziplevel=10"}, nil, "-gziplevel=10"},
		{[]string{"-sigtermwait=-1s"}, nil, "-sigtermwait"},
		{[]string{"-anonymize.ip=sha256"}, nil, "anonymize.ip"},
		{[]string{"-maxidleram=lots"}, nil, "-maxidleram"},
		{[]string{"-maxheap=99999999999999999999GB"}, nil, "-maxheap"},
		{[]string{"-capture.buffersize=1K"}, nil, "-capture.buffersize"},
		{[]string{"-datadir="}, nil, "-datadir"},
		{[]string{"-interface="}, nil, "-interface"},
		{[]string{"-log.level=loud"}, nil, "-log.level"},
		{[]string{"-nosuchflag"}, nil, "nosuchflag"},
		{[]string{"extra"}, nil, "unexpected arguments"},
		{nil, map[string]string{"CAPTUREDURATION": "soon"}, "CAPTUREDURATION"},
		{[]string{"-interface=nonexistent0"}, nil, "-interface=nonexistent0: no such interface"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			env := envOf(tt.env)
			var stdout, stderr bytes.Buffer
			code := run(t.Context(), tt.args, env, &stdout, &stderr)
			if code != 2 {
				t.Errorf("exit code %d, want 2", code)
			}
			msg := stderr.String()
			if !strings.Contains(msg, tt.want) {
				t.Errorf("error %q does not contain %q", msg, tt.want)
			}
			if strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "packet-headers: ") {
				t.Errorf("want one line, got %q", msg)
			}
		})
	}
}

func TestHelp(t *testing.T) {
	env := envOf(nil)
	var stdout, stderr bytes.Buffer
	if code := run(t.Context(), []string{"-help"}, env, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d", code)
	}
	for _, f := range []string{"anonymize.ip", "captureduration", "datadir", "flowtimeout", "interface", "maxheadersize",
		"maxidleram", "maxheap", "maxflows", "prometheusx.listen-address", "sigtermwait", "stream",
		"tcpinfo.eventsocket", "uuidwaitduration", "uuid-prefix-file"} {
		out := stdout.String() + "\n"
		if !strings.Contains(out, "\n  -"+f+" ") && !strings.Contains(out, "\n  -"+f+"\n") {
			t.Errorf("-help does not describe -%s", f)
		}
	}
}

func TestByteSize(t *testing.T) {
	tests := []struct {
		in   string
		want ByteSize
		ok   bool
	}{
		{"0", 0, true}, {"3GB", 3 * GB, true}, {"1500MB", 1500 * MB, true}, {"2G", 2 * GB, true},
		{"64MiB", 64 * MiB, true}, {"10KB", 10 * KB, true}, {"7B", 7, true}, {"12", 12, true},
		{"", 0, false}, {"GB", 0, false}, {"1.5GB", 0, false}, {"-1", 0, false}, {"3TB", 0, false},
		{"99999999999GiB", 0, false},
	}
	for _, tt := range tests {
		var b ByteSize
		err := b.Set(tt.in)
		if (err == nil) != tt.ok || (tt.ok && b != tt.want) {
			t.Errorf("Set(%q) = %v, %v; want %v, ok=%v", tt.in, b, err, tt.want, tt.ok)
		}
		if tt.ok {
			var again ByteSize
			if err := again.Set(b.String()); err != nil || again != b {
				t.Errorf("round trip of %v via %q: %v %v", b, b.String(), again, err)
			}
		}
	}
}

func TestBadEnvironmentAtStart(t *testing.T) {
	env := envOf(nil)
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"datadir is a file", []string{"-datadir=" + file, "-tcpinfo.eventsocket=/nonexistent"}, "-datadir=" + file + ": cannot write files there"},
		{"datadir below a file", []string{"-datadir=" + file + "/sub", "-tcpinfo.eventsocket=/nonexistent"}, "-datadir="},
		{"listen address in use", []string{"-datadir=" + t.TempDir(), "-tcpinfo.eventsocket=/nonexistent", "-prometheusx.listen-address=" + ln.Addr().String()}, "-prometheusx.listen-address=" + ln.Addr().String()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := run(t.Context(), tt.args, env, &stdout, &stderr); code != 2 {
				t.Errorf("exit %d, want 2 (stderr %q)", code, stderr.String())
			}
			msg := stderr.String()
			if !strings.Contains(msg, tt.want) || strings.Count(msg, "\n") != 1 {
				t.Errorf("error %q, want one line containing %q", msg, tt.want)
			}
		})
	}
}
