package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/internal/replay"
	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/saver"
)

type fixedDrops uint64

func (d fixedDrops) KernelDropsSince(int64) uint64 { return uint64(d) }

var opened = time.Date(2024, 11, 18, 12, 0, 0, 0, time.UTC)

// writeFlow saves the packets of a testdata capture as the daemon configured
// by args would, pushing them all before the saver runs, and returns the
// file's path.
func writeFlow(t *testing.T, dir string, args []string, uuid, capture string, drops uint64, dur time.Duration) string {
	t.Helper()
	cfg, err := parseConfig(append(args, "-datadir="+dir), io.Discard, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	if dur > 0 {
		cfg.CaptureDuration = dur
	}
	var anon saver.Anonymizer
	if cfg.AnonymizeIP != anonymize.None {
		anon = anonymize.New(cfg.AnonymizeIP, []netip.Addr{netip.MustParseAddr("172.17.0.2")})
	}
	sc := saverConfig(cfg, dir, anon, fixedDrops(drops), metrics.New(prometheus.NewRegistry()), nil)
	sc.Sync = false
	pkts, _, err := replay.ReadFile(filepath.Join("..", "..", "testdata", capture))
	if err != nil {
		t.Fatal(err)
	}
	s := saver.NewPool(*sc).New(uuid, opened, nil)
	for _, p := range pkts {
		s.Push(p.Packet)
	}
	s.Close()
	var wg sync.WaitGroup
	s.Start(&wg)
	wg.Wait()
	path := saver.DatePath(dir, uuid, opened)
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("%s not published: %v", uuid, err)
	}
	return path
}

// inspectFiles writes a complete flow, a truncated one, and takes a file the
// original daemon wrote (no record).
func inspectFiles(t *testing.T) (complete, truncated, old string) {
	dir := t.TempDir()
	args := []string{"-tcpinfo.eventsocket=/run/tcpinfo.sock", "-anonymize.ip=netblock", "-interface=eth0,eth1"}
	complete = writeFlow(t, dir, args, "host_1548788619_0000000000000001", "v4.pcap", 0, 0)
	truncated = writeFlow(t, dir, args, "host_1548788619_0000000000000002", "large-ndt.pcap", 5, 10*time.Second)
	old = filepath.Join("..", "..", "testdata", "production", "ndt-nnwk2_1611335823_00000000000C2DA8.pcap.gz")
	return complete, truncated, old
}

func TestInspectText(t *testing.T) {
	complete, truncated, old := inspectFiles(t)
	var stdout, stderr bytes.Buffer
	if code := run(t.Context(), []string{"inspect", complete, truncated, old}, noEnv, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	out := stdout.String()
	sections := strings.Split(out, "\n"+truncated+"\n")
	if len(sections) != 2 || !strings.HasPrefix(out, complete+"\n") {
		t.Fatalf("output does not have a section per file:\n%s", out)
	}
	first, rest, _ := strings.Cut(sections[1], "\n"+old+"\n")
	for _, want := range []string{
		"  uuid             host_1548788619_0000000000000001\n",
		"  version          " + recordVersion() + "\n",
		"  source           tcpinfo\n",
		"  anonymization    netblock\n",
		"  interfaces       eth0,eth1\n",
		"  packets          12\n",
		"  missed_packets   none\n",
		"  kernel_drops     0 (on the capture socket, not only this flow's)\n",
		"  summary          12 packets (7 172.17.0.2:49834 > 91.189.88.0:80, 5 back), 247.304ms, complete",
	} {
		if !strings.Contains(sections[0], want) {
			t.Errorf("complete file: no %q in\n%s", want, sections[0])
		}
	}
	for _, want := range []string{
		"  truncated        true\n",
		"  missed_packets   duration ",
		", incomplete: truncated by -captureduration (",
		"; the kernel dropped 5 packets on the capture socket meanwhile, perhaps some of this flow's",
	} {
		if !strings.Contains(first, want) {
			t.Errorf("truncated file: no %q in\n%s", want, first)
		}
	}
	for _, want := range []string{
		"  record           none: written before capture records, or by another program\n",
		"  summary          15 packets (8 [2a0d:5600:24:a71::1d]:1894 > [2001:1900:2100:14::24]:443, 7 back), 134.434ms, completeness unknown (no record; the pcap holds a SYN and no FIN or RST)\n",
	} {
		if !strings.Contains(rest, want) {
			t.Errorf("old file: no %q in\n%s", want, rest)
		}
	}
	if strings.Contains(out, "warning") {
		t.Errorf("warnings for files whose record agrees with them:\n%s", out)
	}
}

func TestInspectJSON(t *testing.T) {
	complete, truncated, old := inspectFiles(t)
	var stdout, stderr bytes.Buffer
	if code := run(t.Context(), []string{"inspect", "-json", complete, truncated, old}, noEnv, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	type line struct {
		File    string        `json:"file"`
		Record  *saver.Record `json:"record"`
		Summary struct {
			Packets    int      `json:"packets"`
			Complete   *bool    `json:"complete"`
			Incomplete []string `json:"incomplete"`
			Directions []struct {
				Packets int `json:"packets"`
			} `json:"directions"`
		} `json:"summary"`
	}
	var lines []line
	sc := bufio.NewScanner(&stdout)
	for sc.Scan() {
		var l line
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("not a JSON line: %v: %s", err, sc.Bytes())
		}
		lines = append(lines, l)
	}
	if len(lines) != 3 {
		t.Fatalf("%d lines, want 3", len(lines))
	}
	c, tr, o := lines[0], lines[1], lines[2]
	if c.File != complete || c.Record == nil || c.Record.UUID != "host_1548788619_0000000000000001" ||
		c.Record.Version != recordVersion() || c.Record.Source != "tcpinfo" || c.Record.Anonymization != "netblock" ||
		!slices.Equal(c.Record.Interfaces, []string{"eth0", "eth1"}) {
		t.Errorf("complete file: %+v", c)
	}
	if c.Summary.Complete == nil || !*c.Summary.Complete || c.Summary.Packets != 12 || len(c.Summary.Directions) != 2 {
		t.Errorf("complete file's summary: %+v", c.Summary)
	}
	if tr.Summary.Complete == nil || *tr.Summary.Complete || !slices.Equal(tr.Summary.Incomplete, []string{"truncated", "kerneldrops"}) ||
		tr.Record == nil || !tr.Record.Truncated || tr.Record.Packets != uint64(tr.Summary.Packets) {
		t.Errorf("truncated file: %+v %+v", tr.Record, tr.Summary)
	}
	if o.Record != nil || o.Summary.Complete != nil || o.Summary.Packets != 15 {
		t.Errorf("old file: %+v", o)
	}
}

func TestInspectErrors(t *testing.T) {
	complete, _, _ := inspectFiles(t)
	notGzip := filepath.Join(t.TempDir(), "x.pcap.gz")
	if err := os.WriteFile(notGzip, []byte("not gzip"), 0o644); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	code := run(t.Context(), []string{"inspect", "/nonexistent.pcap.gz", notGzip, complete}, noEnv, &stdout, &stderr)
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	if !strings.Contains(stderr.String(), "/nonexistent.pcap.gz") || !strings.Contains(stderr.String(), notGzip) {
		t.Errorf("stderr does not name the unreadable files: %s", stderr.String())
	}
	if !strings.HasPrefix(stdout.String(), complete+"\n") {
		t.Errorf("the readable file is not inspected: %s", stdout.String())
	}
	for _, tt := range []struct {
		args []string
		code int
	}{
		{[]string{"inspect"}, 2},
		{[]string{"inspect", "-nosuchflag", complete}, 2},
		{[]string{"inspect", "-help"}, 0},
	} {
		var stdout, stderr bytes.Buffer
		if got := run(t.Context(), tt.args, noEnv, &stdout, &stderr); got != tt.code {
			t.Errorf("%q: exit %d, want %d", tt.args, got, tt.code)
		}
		if !strings.Contains(stderr.String(), "Usage: packet-headers inspect") {
			t.Errorf("%q: no usage: %s", tt.args, stderr.String())
		}
	}
}

// TestInspectWarnsOnDisagreement: a record that does not match its file (a
// file edited, or a record copied) is pointed out.
func TestInspectWarnsOnDisagreement(t *testing.T) {
	complete, _, _ := inspectFiles(t)
	b, err := os.ReadFile(complete)
	if err != nil {
		t.Fatal(err)
	}
	b = bytes.Replace(b, []byte(`"packets":12`), []byte(`"packets":13`), 1)
	edited := filepath.Join(t.TempDir(), "edited.pcap.gz")
	if err := os.WriteFile(edited, b, 0o644); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	if code := run(t.Context(), []string{"inspect", edited}, noEnv, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	if want := "  warning          the record says 13 packets, the file holds 12\n"; !strings.Contains(stdout.String(), want) {
		t.Errorf("no %q in\n%s", want, stdout.String())
	}
}

func TestSaverConfig(t *testing.T) {
	for _, tt := range []struct {
		args       []string
		source     string
		interfaces []string
		anon       string
		sync       bool
	}{
		{nil, "standalone", []string{"any"}, "none", true},
		{[]string{"-tcpinfo.eventsocket=/s", "-interface=eth0", "-interface=eth1", "-anonymize.ip=netblock", "-fsync=false"},
			"tcpinfo", []string{"eth0", "eth1"}, "netblock", false},
	} {
		cfg, err := parseConfig(tt.args, io.Discard, noEnv)
		if err != nil {
			t.Fatal(err)
		}
		sc := saverConfig(cfg, "/data", nil, fixedDrops(0), nil, nil)
		if sc.Source != tt.source || !slices.Equal(sc.Interfaces, tt.interfaces) || sc.Anonymization != tt.anon ||
			sc.Sync != tt.sync || sc.Drops == nil || sc.Dir != "/data" || sc.Version != version+"+"+commit() {
			t.Errorf("%q: %+v", tt.args, sc)
		}
	}
}

// TestInspectUnreadableRecord: a gzip comment that is not a record (another
// program's) is said to be one, and the file is still summarized.
func TestInspectUnreadableRecord(t *testing.T) {
	old := filepath.Join("..", "..", "testdata", "production", "ndt-nnwk2_1611335823_00000000000C2DA8.pcap.gz")
	f, err := os.Open(old)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	zw.Comment = "written by hand"
	if _, err := io.Copy(zw, zr); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "other.pcap.gz")
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"inspect", path}, "  record           unreadable: invalid character"},
		{[]string{"inspect", "-json", path}, `"record":null,"record_error":"invalid character`},
	} {
		var stdout, stderr bytes.Buffer
		if code := run(t.Context(), tt.args, noEnv, &stdout, &stderr); code != 0 {
			t.Fatalf("exit %d: %s", code, stderr.String())
		}
		if !strings.Contains(stdout.String(), tt.want) || !strings.Contains(stdout.String(), "15") {
			t.Errorf("%q: no %q (or the 15 packets) in\n%s", tt.args, tt.want, stdout.String())
		}
	}
}
