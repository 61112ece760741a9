package demuxer

import (
	"compress/gzip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/saver"
)

// TestRecordCountsPendingMisses: the packets of a flow dropped while it
// waited for its UUID, beyond the pending limit, are in its file's record.
func TestRecordCountsPendingMisses(t *testing.T) {
	dir := t.TempDir()
	m := metrics.New(prometheus.NewRegistry())
	d := New(Config{
		FlowTimeout:    time.Minute,
		UUIDWait:       time.Minute,
		PendingPackets: 3,
		Savers:         saver.NewPool(saver.Config{Dir: dir, CaptureDuration: time.Hour, Metrics: m}),
		Metrics:        m,
	})
	pkts := readPackets(t, "v4.pcap")
	for _, p := range pkts {
		d.Packet(p)
	}
	d.Open(Open{Key: pkts[0].Key, UUID: "flow_1", Time: opened})
	// A second flow, named before its first packet, misses nothing.
	v6 := readPackets(t, "v6.pcap")
	d.Open(Open{Key: v6[0].Key, UUID: "flow_2", Time: opened})
	for _, p := range v6 {
		d.Packet(p)
	}
	d.Flush()
	for _, tt := range []struct {
		uuid             string
		packets, missed  uint64
		incompleteReason bool
	}{
		{"flow_1", 3, uint64(len(pkts) - 3), true},
		{"flow_2", uint64(len(v6)), 0, false},
	} {
		f, err := os.Open(saver.DatePath(dir, tt.uuid, opened))
		if err != nil {
			t.Fatal(err)
		}
		zr, err := gzip.NewReader(f)
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		r, err := saver.ParseRecord(zr.Comment)
		if err != nil {
			t.Fatal(err)
		}
		if r.Packets != tt.packets || r.MissedPackets.Pending != tt.missed {
			t.Errorf("%s: packets %d, missed %+v; want %d, pending %d", tt.uuid, r.Packets, r.MissedPackets, tt.packets, tt.missed)
		}
		if got := slices.Contains(r.Incomplete(), "pending"); got != tt.incompleteReason {
			t.Errorf("%s: Incomplete() = %v", tt.uuid, r.Incomplete())
		}
	}
	if n := testutil.ToFloat64(m.FilesIncomplete.WithLabelValues("pending")); n != 1 {
		t.Errorf("pcap_saver_files_incomplete_total{pending} = %v, want 1", n)
	}
}
