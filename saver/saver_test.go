package saver

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/gopacket/gopacket/pcapgo"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/internal/replay"
	"github.com/m-lab/packet-headers/metrics"
)

var opened = time.Date(2024, 11, 18, 12, 0, 0, 0, time.UTC)

const testUUID = "host_1548788619_00000000000084FF"

func newConfig(t *testing.T, dir string) *Config {
	t.Helper()
	return &Config{
		Dir:             dir,
		CaptureDuration: 30 * time.Second,
		Metrics:         metrics.New(prometheus.NewRegistry()),
	}
}

// readPackets reads a testdata capture; each call returns fresh copies that
// the saver may own.
func readPackets(t testing.TB, name string) []replay.Packet {
	t.Helper()
	pkts, bad, err := replay.ReadFile(filepath.Join("..", "testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	if bad != 0 || len(pkts) == 0 {
		t.Fatalf("%s: %d packets, %d bad", name, len(pkts), bad)
	}
	return pkts
}

// record is one pcap record as read back from a file.
type record struct {
	Time    int64
	CapLen  int
	OrigLen int
	Data    []byte
}

type pcapFile struct {
	Snaplen  uint32
	LinkType int
	Records  []record
}

func readBack(t *testing.T, path string) pcapFile {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	pr, err := pcapgo.NewReader(zr)
	if err != nil {
		t.Fatal(err)
	}
	out := pcapFile{Snaplen: pr.Snaplen(), LinkType: int(pr.LinkType())}
	for {
		data, ci, err := pr.ReadPacketData()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if ci.CaptureLength > int(out.Snaplen) || ci.CaptureLength > ci.Length {
			t.Errorf("record caplen %d exceeds snaplen %d or length %d", ci.CaptureLength, out.Snaplen, ci.Length)
		}
		out.Records = append(out.Records, record{ci.Timestamp.UnixNano(), ci.CaptureLength, ci.Length, data})
	}
	return out
}

// expected returns the records a file of pkts should hold: each packet cut at
// the end of its TCP header (and at the snaplen), with its original length.
func expected(pkts []replay.Packet, snaplen int) []record {
	var recs []record
	for _, p := range pkts {
		h, err := flow.Parse(p.Raw, flow.LinkEthernet)
		if err != nil {
			panic(err)
		}
		n := min(h.End, len(p.Raw), snaplen)
		recs = append(recs, record{p.Time, n, int(p.Len), append([]byte(nil), p.Raw[:n]...)})
	}
	return recs
}

// runSaver pushes pkts through a saver and closes it.
func runSaver(cfg *Config, pkts []replay.Packet) *Saver {
	s := NewPool(*cfg).New(testUUID, opened, nil)
	var wg sync.WaitGroup
	s.Start(&wg)
	for _, p := range pkts {
		s.Push(p.Packet)
	}
	s.Close()
	wg.Wait()
	return s
}

func TestSaverWritesHeadersOnly(t *testing.T) {
	for _, name := range []string{"v4.pcap", "v6.pcap", "large-ndt.pcap"} {
		for _, stream := range []bool{false, true} {
			t.Run(name+map[bool]string{false: "/buffered", true: "/stream"}[stream], func(t *testing.T) {
				dir := t.TempDir()
				cfg := newConfig(t, dir)
				cfg.Stream = stream
				pkts := readPackets(t, name)
				s := runSaver(cfg, pkts)
				if got := s.State(); got != Stopped {
					t.Errorf("state = %v, want stopped", got)
				}
				path := DatePath(dir, testUUID, opened)
				if !strings.HasSuffix(path, "2024/11/18/"+testUUID+".pcap.gz") {
					t.Errorf("path %q", path)
				}
				got := readBack(t, path)
				wantSnap := int(pkts[0].L4) + 60
				if got.Snaplen != uint32(wantSnap) || got.LinkType != 1 {
					t.Errorf("snaplen %d link %d, want %d 1", got.Snaplen, got.LinkType, wantSnap)
				}
				if diff := cmp.Diff(expected(readPackets(t, name), wantSnap), got.Records); diff != "" {
					t.Errorf("records (-want +got):\n%s", diff)
				}
				if n := testutil.ToFloat64(cfg.Metrics.FilesPublished); n != 1 {
					t.Errorf("files published = %v", n)
				}
				fi, err := os.Stat(path)
				if err != nil {
					t.Fatal(err)
				}
				if fi.Mode().Perm() != 0o664 {
					t.Errorf("file mode %v, want 0664", fi.Mode().Perm())
				}
				di, err := os.Stat(filepath.Dir(path))
				if err != nil {
					t.Fatal(err)
				}
				if di.Mode().Perm() != 0o775 {
					t.Errorf("dir mode %v, want 0775", di.Mode().Perm())
				}
			})
		}
	}
}

func TestSnaplenIPv4AndIPv6(t *testing.T) {
	// The original's production files have snaplen 94 (IPv4) and 114
	// (IPv6): bytes before TCP plus 60.
	for name, want := range map[string]uint32{"v4.pcap": 94, "v6.pcap": 114} {
		dir := t.TempDir()
		runSaver(newConfig(t, dir), readPackets(t, name))
		if got := readBack(t, DatePath(dir, testUUID, opened)).Snaplen; got != want {
			t.Errorf("%s: snaplen %d, want %d", name, got, want)
		}
	}
}

func TestStreamAndBufferedIdentical(t *testing.T) {
	var files [2][]byte
	for i, stream := range []bool{false, true} {
		dir := t.TempDir()
		cfg := newConfig(t, dir)
		cfg.Stream = stream
		runSaver(cfg, readPackets(t, "large-ndt.pcap"))
		b, err := os.ReadFile(DatePath(dir, testUUID, opened))
		if err != nil {
			t.Fatal(err)
		}
		files[i] = b
	}
	if !bytes.Equal(files[0], files[1]) {
		t.Errorf("buffered (%d bytes) and stream (%d bytes) files differ", len(files[0]), len(files[1]))
	}
}

func TestCaptureDurationCut(t *testing.T) {
	pkts := readPackets(t, "large-ndt.pcap")
	dur := time.Duration(pkts[len(pkts)/2].Time - pkts[0].Time)
	dir := t.TempDir()
	cfg := newConfig(t, dir)
	cfg.CaptureDuration = dur
	runSaver(cfg, pkts)
	got := readBack(t, DatePath(dir, testUUID, opened)).Records
	var want int
	for _, p := range pkts {
		if p.Time-pkts[0].Time < int64(dur) {
			want++
		}
	}
	if len(got) != want || want == 0 || want == len(pkts) {
		t.Errorf("saved %d packets, want %d of %d", len(got), want, len(pkts))
	}
}

func TestCaptureDurationClockPublishes(t *testing.T) {
	// A flow that goes quiet is published when its capture duration is
	// over, not when the demuxer collects it.
	synctest.Test(t, func(t *testing.T) {
		dir := t.TempDir()
		cfg := newConfig(t, dir)
		cfg.CaptureDuration = 10 * time.Second
		s := NewPool(*cfg).New(testUUID, opened, nil)
		var wg sync.WaitGroup
		s.Start(&wg)
		for _, p := range readPackets(t, "v4.pcap") {
			s.Push(p.Packet)
		}
		synctest.Wait()
		if _, err := os.Stat(DatePath(dir, testUUID, opened)); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("file visible before the capture duration: %v", err)
		}
		time.Sleep(10 * time.Second) // fake time: synctest's clock
		wg.Wait()
		if got := s.State(); got != Discarding {
			t.Errorf("state %v, want discardingpackets", got)
		}
		if _, err := os.Stat(DatePath(dir, testUUID, opened)); err != nil {
			t.Errorf("file not published after the capture duration: %v", err)
		}
		// Later packets are dropped on purpose, not counted as missed.
		s.Push(readPackets(t, "v4.pcap")[0].Packet)
		s.Close()
		if got := s.State(); got != Stopped {
			t.Errorf("state after Close %v, want stopped", got)
		}
		if n := testutil.ToFloat64(cfg.Metrics.MissedPackets.WithLabelValues("discardingpackets")); n != 0 {
			t.Errorf("missed packets %v", n)
		}
	})
}

func TestSaverErrors(t *testing.T) {
	tests := []struct {
		name   string
		setup  func(t *testing.T, dir string)
		pkts   bool
		want   State
		reason string
	}{
		{
			name:   "no packets",
			setup:  func(*testing.T, string) {},
			want:   NoPacketsError,
			reason: "nopackets",
		},
		{
			name: "existing file is never overwritten",
			setup: func(t *testing.T, dir string) {
				p := DatePath(dir, testUUID, opened)
				if err := os.MkdirAll(filepath.Dir(p), 0o775); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte("old"), 0o664); err != nil {
					t.Fatal(err)
				}
			},
			pkts:   true,
			want:   ExistsError,
			reason: "exists",
		},
		{
			name: "directory cannot be created",
			setup: func(t *testing.T, dir string) {
				// A file where the year directory should be: mkdir
				// fails even for root.
				if err := os.WriteFile(filepath.Join(dir, "2024"), nil, 0o664); err != nil {
					t.Fatal(err)
				}
			},
			pkts:   true,
			want:   MkdirError,
			reason: "mkdir",
		},
	}
	for _, tt := range tests {
		for _, stream := range []bool{false, true} {
			t.Run(tt.name+map[bool]string{false: "/buffered", true: "/stream"}[stream], func(t *testing.T) {
				dir := t.TempDir()
				tt.setup(t, dir)
				cfg := newConfig(t, dir)
				cfg.Stream = stream
				var pkts []replay.Packet
				if tt.pkts {
					pkts = readPackets(t, "v4.pcap")
				}
				s := runSaver(cfg, pkts)
				// The error state is left for stopped once closed;
				// the counter keeps the reason.
				if got := s.State(); got != Stopped {
					t.Errorf("state %v, want stopped", got)
				}
				if n := testutil.ToFloat64(cfg.Metrics.SaverErrors.WithLabelValues(tt.reason)); n != 1 {
					t.Errorf("errors{%s} = %v, want 1", tt.reason, n)
				}
				if n := testutil.ToFloat64(cfg.Metrics.FilesPublished); n != 0 {
					t.Errorf("files published = %v, want 0", n)
				}
				if tt.want == ExistsError {
					b, err := os.ReadFile(DatePath(dir, testUUID, opened))
					if err != nil || string(b) != "old" {
						t.Errorf("existing file changed: %q, %v", b, err)
					}
				}
			})
		}
	}
}

func TestDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs")
	}
	dir := t.TempDir()
	// 64 KiB of space: large-ndt's file (about 100 KB compressed) does not fit.
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount: %v %s", err, out)
		}
	})
	for _, stream := range []bool{false, true} {
		cfg := newConfig(t, dir)
		cfg.Stream = stream
		pkts := readPackets(t, "large-ndt.pcap")
		// Many copies of the flow so that the file is larger than the disk.
		var many []replay.Packet
		for i := 0; i < 20; i++ {
			many = append(many, readPackets(t, "large-ndt.pcap")...)
		}
		_ = pkts
		runSaver(cfg, many)
		if n := testutil.ToFloat64(cfg.Metrics.SaverErrors.WithLabelValues("write")); n != 1 {
			t.Errorf("stream=%v: write errors = %v, want 1", stream, n)
		}
		// Nothing partial is visible anywhere.
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !d.IsDir() {
				t.Errorf("stream=%v: file %s left behind", stream, p)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		// Space returns: the next flow is saved.
		cfg2 := newConfig(t, dir)
		cfg2.Stream = stream
		runSaver(cfg2, readPackets(t, "v4.pcap"))
		if n := testutil.ToFloat64(cfg2.Metrics.FilesPublished); n != 1 {
			t.Errorf("stream=%v: after the failure, files published = %v, want 1", stream, n)
		}
		if err := os.RemoveAll(filepath.Join(dir, "2024")); err != nil {
			t.Fatal(err)
		}
	}
}

type recordingAnon struct{ calls int }

func (a *recordingAnon) Packet(data []byte, l3, l4 int, ipv6 bool) {
	a.calls++
	// Mark the packet so the test can see the bytes written are the
	// anonymized ones.
	data[l3+15] = 0
}

func TestAnonymizerApplied(t *testing.T) {
	dir := t.TempDir()
	cfg := newConfig(t, dir)
	a := &recordingAnon{}
	cfg.Anon = a
	pkts := readPackets(t, "v4.pcap")
	runSaver(cfg, pkts)
	recs := readBack(t, DatePath(dir, testUUID, opened)).Records
	if a.calls != len(pkts) || len(recs) != len(pkts) {
		t.Fatalf("anonymizer called %d times for %d packets, %d records", a.calls, len(pkts), len(recs))
	}
	for i, r := range recs {
		if r.Data[14+15] != 0 {
			t.Errorf("record %d not anonymized", i)
		}
	}
}

func TestBacklogFullCountsMissed(t *testing.T) {
	dir := t.TempDir()
	cfg := newConfig(t, dir)
	cfg.MaxBacklog = 5
	pkts := readPackets(t, "v4.pcap")
	s := NewPool(*cfg).New(testUUID, opened, nil)
	// Run is not started yet, so the backlog fills.
	for _, p := range pkts[:7] {
		s.Push(p.Packet)
	}
	if n := testutil.ToFloat64(cfg.Metrics.MissedPackets.WithLabelValues("notstarted")); n != 2 {
		t.Errorf("missed = %v, want 2", n)
	}
	s.Close()
	runNow(s)
	if got := len(readBack(t, DatePath(dir, testUUID, opened)).Records); got != 5 {
		t.Errorf("saved %d records, want 5", got)
	}
}

func TestStateGauges(t *testing.T) {
	dir := t.TempDir()
	cfg := newConfig(t, dir)
	runSaver(cfg, readPackets(t, "v4.pcap"))
	for s := State(0); s < numStates; s++ {
		if n := testutil.ToFloat64(cfg.Metrics.SaverCount.WithLabelValues(s.String())); n != 0 {
			t.Errorf("gauge %v = %v after the saver stopped, want 0", s, n)
		}
	}
	if a, b := testutil.ToFloat64(cfg.Metrics.SaversStarted), testutil.ToFloat64(cfg.Metrics.SaversStopped); a != 1 || b != 1 {
		t.Errorf("starts %v stops %v", a, b)
	}
}

func TestCheckDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "new", "data")
	if err := CheckDir(dir); err != nil {
		t.Fatalf("CheckDir(%s) = %v", dir, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 0 {
		t.Errorf("CheckDir left %v (%v)", entries, err)
	}
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := CheckDir(file); err == nil {
		t.Errorf("CheckDir on a regular file succeeded")
	}
}

func TestStateString(t *testing.T) {
	seen := map[string]bool{}
	for s := State(0); s < numStates; s++ {
		n := s.String()
		if n == "" || n == "unknown" || seen[n] {
			t.Errorf("state %d has name %q", s, n)
		}
		seen[n] = true
		if _, ok := errorReasons[s]; ok != s.isError() {
			t.Errorf("state %v: reason %v, IsError %v", s, ok, s.isError())
		}
	}
	if State(-1).String() != "unknown" || numStates.String() != "unknown" {
		t.Error("out-of-range states must be unknown")
	}
}

// BenchmarkSaver measures one saver alone: queueing a packet, encoding its
// record and compressing it, with the file published at the end (included).
func BenchmarkSaver(b *testing.B) {
	for _, stream := range []bool{false, true} {
		b.Run(map[bool]string{false: "buffered", true: "stream"}[stream], func(b *testing.B) {
			pkts := readPackets(b, "large-ndt.pcap")
			// A backlog that holds every packet: the benchmark measures the
			// saver's throughput, not what it drops when it falls behind.
			cfg := &Config{Dir: b.TempDir(), CaptureDuration: time.Hour, Stream: stream, MaxBacklog: b.N + 1, Metrics: metrics.New(prometheus.NewRegistry())}
			s := NewPool(*cfg).New(testUUID, opened, nil)
			var wg sync.WaitGroup
			s.Start(&wg)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				p := pkts[i%len(pkts)].Packet
				p.Time = int64(i)
				s.Push(p)
			}
			s.Close()
			wg.Wait()
			b.StopTimer()
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/pkt")
			if got := testutil.ToFloat64(cfg.Metrics.PacketsSaved); got != float64(b.N) {
				b.Fatalf("saved %v of %d packets", got, b.N)
			}
		})
	}
}

// runNow starts s, whose packets are pushed and which is closed already, and
// waits for it to publish: its goroutine takes every packet in one batch.
func runNow(s *Saver) {
	var wg sync.WaitGroup
	s.Start(&wg)
	wg.Wait()
}
