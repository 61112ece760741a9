package demuxer

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/internal/replay"
	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/saver"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/golden")

// goldenInputs are the captures replayed through the pipeline: the original
// project's test captures and files its daemon wrote in production.
var goldenInputs = []string{
	"v4.pcap",
	"v6.pcap",
	"large-ndt.pcap",
	"production/ndt-4c6fb_1625899199_000000000121C1A0.pcap.gz",
	"production/ndt-nnwk2_1611335823_00000000000C2DA8.pcap.gz",
	"production/ndt-nnwk2_1611335823_00000000000C2DA9.pcap.gz",
	"production/ndt-nnwk2_1611335823_00000000000C2DFE.pcap.gz",
}

// replayFile runs a capture through a demuxer (driven directly, without Run)
// with an Open event for each flow before its first packet, and returns the
// files written by UUID.
func replayFile(t *testing.T, name string, dir string) map[string]string {
	t.Helper()
	rp, bad, err := replay.ReadFile(filepath.Join("..", "testdata", name))
	if err != nil || bad != 0 {
		t.Fatalf("%s: %d bad, %v", name, bad, err)
	}
	m := metrics.New(prometheus.NewRegistry())
	d := New(Config{
		FlowTimeout: time.Minute,
		UUIDWait:    time.Minute,
		Savers:      saver.NewPool(saver.Config{Dir: dir, CaptureDuration: time.Hour, Metrics: m}),
		Metrics:     m,
	})
	base := strings.TrimSuffix(strings.TrimSuffix(filepath.Base(name), ".gz"), ".pcap")
	uuids := map[flow.Key]string{}
	files := map[string]string{}
	for _, p := range rp {
		if _, ok := uuids[p.Key]; !ok {
			u := fmt.Sprintf("%s_%d", base, len(uuids))
			uuids[p.Key] = u
			ts := time.Unix(0, p.Time)
			d.Open(Open{Key: p.Key, UUID: u, Time: ts})
			files[u] = saver.DatePath(dir, u, ts)
		}
		d.Packet(p.Packet)
		d.WakeSavers()
	}
	d.Flush()
	return files
}

// TestGoldenReplay replays every capture through the pipeline and checks the
// files against golden copies (go test ./demuxer -update rewrites them) and
// against the input: every packet present, cut exactly at the end of its TCP
// header, with its original length and timestamp.
func TestGoldenReplay(t *testing.T) {
	for _, name := range goldenInputs {
		t.Run(filepath.Base(name), func(t *testing.T) {
			dir := t.TempDir()
			files := replayFile(t, name, dir)
			if len(files) == 0 {
				t.Fatal("no flows")
			}
			rp, _, err := replay.ReadFile(filepath.Join("..", "testdata", name))
			if err != nil {
				t.Fatal(err)
			}
			var want []string
			for _, p := range rp {
				h, err := flow.Parse(p.Raw, flow.LinkEthernet)
				if err != nil {
					t.Fatal(err)
				}
				n := min(h.End, len(p.Raw))
				want = append(want, fmt.Sprintf("%d %d %x", p.Time, p.Len, p.Raw[:n]))
			}
			var got []string
			for u, path := range files {
				out, _, err := replay.ReadFile(path)
				if err != nil {
					t.Fatalf("%s: %v", u, err)
				}
				for _, p := range out {
					got = append(got, fmt.Sprintf("%d %d %x", p.Time, p.Len, p.Raw))
				}
				compareGolden(t, path, filepath.Join("..", "testdata", "golden", u+".pcap.gz"))
			}
			// Flows are separate files; compare the packets as sets in
			// capture order per flow by sorting both sides.
			if diff := cmp.Diff(sorted(want), sorted(got)); diff != "" {
				t.Errorf("packets (-want +got):\n%s", diff)
			}
		})
	}
}

func sorted(s []string) []string {
	c := append([]string(nil), s...)
	for i := 1; i < len(c); i++ {
		for j := i; j > 0 && c[j] < c[j-1]; j-- {
			c[j], c[j-1] = c[j-1], c[j]
		}
	}
	return c
}

func compareGolden(t *testing.T, path, golden string) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := os.MkdirAll(filepath.Dir(golden), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test ./demuxer -update to create it)", err)
	}
	if !bytes.Equal(want, got) {
		t.Errorf("%s differs from golden %s", path, golden)
	}
}

// TestTcpdumpReads checks that tcpdump, the tool operators reach for, reads
// the files written.
func TestTcpdumpReads(t *testing.T) {
	tcpdump, err := exec.LookPath("tcpdump")
	if err != nil {
		t.Skip("tcpdump is not installed (the README's test command installs it)")
	}
	dir := t.TempDir()
	for _, name := range []string{"v4.pcap", "v6.pcap"} {
		rp, _, err := replay.ReadFile(filepath.Join("..", "testdata", name))
		if err != nil {
			t.Fatal(err)
		}
		for u, path := range replayFile(t, name, dir) {
			cmd := exec.Command("sh", "-c", "gzip -dc \"$1\" | \"$2\" -nr -", "sh", path, tcpdump)
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("%s: tcpdump: %v\n%s", u, err, out)
			}
			lines := strings.Count(string(out), "\n")
			// One line per packet, plus tcpdump's "reading from" line.
			if lines != len(rp)+1 {
				t.Errorf("%s: tcpdump printed %d lines for %d packets:\n%s", u, lines, len(rp), out)
			}
			if strings.Contains(string(out), "truncated") && !strings.Contains(string(out), "[|tcp]") {
				t.Errorf("%s: tcpdump reports a malformed file:\n%s", u, out)
			}
		}
	}
}
