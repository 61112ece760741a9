package capture

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/pcap"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/internal/replay"
	"github.com/m-lab/packet-headers/metrics"
)

// fakeSource replays packets, then a timeout, then the given error; closing
// it makes reads return io.EOF-like errors as libpcap does.
type fakeSource struct {
	mu      sync.Mutex
	pkts    [][]byte
	end     error
	closed  bool
	filter  string
	stats   pcap.Stats
	timeout chan struct{} // a read after the packets blocks here until closed
}

func (f *fakeSource) ZeroCopyReadPacketData() ([]byte, gopacket.CaptureInfo, error) {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil, gopacket.CaptureInfo{}, errors.New("closed")
	}
	if len(f.pkts) > 0 {
		p := f.pkts[0]
		f.pkts = f.pkts[1:]
		f.mu.Unlock()
		return p, gopacket.CaptureInfo{Timestamp: time.Unix(1, 0), CaptureLength: len(p), Length: len(p) + 1000}, nil
	}
	end := f.end
	f.mu.Unlock()
	if end != nil {
		return nil, gopacket.CaptureInfo{}, end
	}
	<-f.timeout
	return nil, gopacket.CaptureInfo{}, pcap.NextErrorTimeoutExpired
}

func (f *fakeSource) Stats() (*pcap.Stats, error) { s := f.stats; return &s, nil }
func (f *fakeSource) SetBPFFilter(s string) error { f.filter = s; return nil }
func (f *fakeSource) Close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.closed {
		f.closed = true
		close(f.timeout)
	}
}

func testPackets(t *testing.T) [][]byte {
	rp, _, err := replay.ReadFile(filepath.Join("..", "testdata", "v4.pcap"))
	if err != nil {
		t.Fatal(err)
	}
	var raws [][]byte
	for _, p := range rp {
		raws = append(raws, p.Raw)
	}
	return raws
}

func TestRunDeliversHeadersAndCountsBadPackets(t *testing.T) {
	raws := testPackets(t)
	junk := []byte{1, 2, 3}
	src := &fakeSource{pkts: append(append([][]byte{}, raws...), junk), end: errors.New("interface went down"), timeout: make(chan struct{})}
	m := metrics.New(prometheus.NewRegistry())
	c := newInterface("eth9", flow.LinkEthernet, src, "tcp", &Config{Metrics: m})
	out := make(chan *flow.Batch, 10)
	err := c.Run(context.Background(), out)
	if err == nil || !errors.Is(err, err) {
		t.Fatalf("Run = %v, want the read error", err)
	}
	close(out)
	var got int
	for b := range out {
		for _, p := range b.Packets {
			h, err := flow.Parse(raws[got], flow.LinkEthernet)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(raws[got][:min(h.End, len(raws[got]))], p.Data); diff != "" {
				t.Errorf("packet %d (-want +got):\n%s", got, diff)
			}
			if int(p.Len) != len(raws[got])+1000 {
				t.Errorf("packet %d: len %d", got, p.Len)
			}
			got++
		}
	}
	if got != len(raws) {
		t.Errorf("delivered %d packets, want %d", got, len(raws))
	}
	if n := testutil.ToFloat64(m.BadPackets.WithLabelValues("truncated")); n != 1 {
		t.Errorf("bad packets = %v, want 1", n)
	}
	if n := testutil.ToFloat64(m.PacketsCaptured.WithLabelValues("eth9")); n != float64(len(raws)) {
		t.Errorf("captured = %v", n)
	}
	if n := testutil.ToFloat64(m.InterfacesCaptured); n != 0 {
		t.Errorf("interfaces gauge = %v after Run, want 0", n)
	}
}

func TestRunStopsOnIdleInterface(t *testing.T) {
	// The original hung on an idle interface until a packet came; Run ends
	// when its context does, with nothing arriving.
	src := &fakeSource{timeout: make(chan struct{})}
	m := metrics.New(prometheus.NewRegistry())
	c := newInterface("eth9", flow.LinkEthernet, src, "tcp", &Config{Metrics: m})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- c.Run(ctx, make(chan *flow.Batch)) }()
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run after cancel = %v, want nil", err)
	}
}

func TestRunRawIPGetsEthernetHeader(t *testing.T) {
	raws := testPackets(t)
	var ip [][]byte
	for _, r := range raws {
		ip = append(ip, r[14:]) // strip Ethernet: raw IP link type
	}
	src := &fakeSource{pkts: ip, end: errors.New("gone"), timeout: make(chan struct{})}
	c := newInterface("tun0", flow.LinkRaw, src, "tcp", &Config{Metrics: metrics.New(prometheus.NewRegistry())})
	out := make(chan *flow.Batch, 10)
	c.Run(context.Background(), out)
	close(out)
	b := <-out
	if len(b.Packets) != len(raws) {
		t.Fatalf("%d packets", len(b.Packets))
	}
	p := b.Packets[0]
	if p.L3 != 14 || p.Data[12] != 0x08 || p.Data[13] != 0x00 {
		t.Errorf("no synthetic Ethernet header: L3 %d, % x", p.L3, p.Data[:14])
	}
}

func TestFilter(t *testing.T) {
	tests := []struct {
		addrs []string
		want  string
	}{
		{nil, "tcp"},
		{[]string{"198.18.0.1"}, "tcp and (host 198.18.0.1)"},
		{[]string{"2001:db8::1", "198.18.0.1", "198.18.0.1", "fe80::1%eth0"}, "tcp and (host 198.18.0.1 or host 2001:db8::1 or host fe80::1)"},
	}
	for _, tt := range tests {
		var addrs []netip.Addr
		for _, a := range tt.addrs {
			addrs = append(addrs, netip.MustParseAddr(a))
		}
		if got := Filter(addrs); got != tt.want {
			t.Errorf("Filter(%v) = %q, want %q", tt.addrs, got, tt.want)
		}
	}
}

func TestReason(t *testing.T) {
	seen := map[string]bool{}
	for _, e := range []error{flow.ErrTruncated, flow.ErrNotIP, flow.ErrNotTCP, flow.ErrFragment, flow.ErrMalformed, flow.ErrLinkType, flow.ErrTooManyExt} {
		r := reason(e)
		if r == "other" || seen[r] {
			t.Errorf("reason(%v) = %q", e, r)
		}
		seen[r] = true
	}
}

// scriptedSource returns its reads in order, then blocks until closed.
type scriptedSource struct {
	fakeSource
	reads []func() ([]byte, gopacket.CaptureInfo, error)
}

func (s *scriptedSource) ZeroCopyReadPacketData() ([]byte, gopacket.CaptureInfo, error) {
	s.mu.Lock()
	if len(s.reads) > 0 {
		r := s.reads[0]
		s.reads = s.reads[1:]
		s.mu.Unlock()
		return r()
	}
	s.mu.Unlock()
	<-s.timeout
	return nil, gopacket.CaptureInfo{}, errors.New("closed")
}

// TestRunDrainsAfterStop: packets captured before the stop but handed over
// by the kernel only later (their ring block was not full) are still
// delivered; the capture ends at the first packet captured after the stop.
func TestRunDrainsAfterStop(t *testing.T) {
	raws := testPackets(t)
	stopped := time.Now()
	pkt := func(raw []byte, ts time.Time) func() ([]byte, gopacket.CaptureInfo, error) {
		return func() ([]byte, gopacket.CaptureInfo, error) {
			return raw, gopacket.CaptureInfo{Timestamp: ts, CaptureLength: len(raw), Length: len(raw)}, nil
		}
	}
	timeout := func() ([]byte, gopacket.CaptureInfo, error) {
		return nil, gopacket.CaptureInfo{}, pcap.NextErrorTimeoutExpired
	}
	src := &scriptedSource{fakeSource: fakeSource{timeout: make(chan struct{})}}
	src.reads = append(src.reads, timeout) // the block is not handed over yet
	for _, r := range raws[:5] {
		src.reads = append(src.reads, pkt(r, stopped.Add(-time.Millisecond)))
	}
	src.reads = append(src.reads, pkt(raws[5], stopped.Add(time.Hour))) // after the stop
	src.reads = append(src.reads, pkt(raws[6], stopped.Add(-time.Millisecond)))
	c := newInterface("eth9", flow.LinkEthernet, src, "tcp", &Config{Metrics: metrics.New(prometheus.NewRegistry()), Timeout: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	out := make(chan *flow.Batch, 10)
	if err := c.Run(ctx, out); err != nil {
		t.Fatalf("Run = %v", err)
	}
	close(out)
	n := 0
	for b := range out {
		n += len(b.Packets)
	}
	if n != 5 {
		t.Errorf("delivered %d packets after the stop, want the 5 captured before it", n)
	}
}
