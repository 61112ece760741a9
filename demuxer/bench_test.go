package demuxer

import (
	"encoding/binary"
	"fmt"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/internal/replay"
	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/saver"
)

// rawPackets returns the raw bytes and metadata of a testdata capture.
func rawPackets(tb testing.TB, name string) []replay.Packet {
	tb.Helper()
	rp, _, err := replay.ReadFile(filepath.Join("..", "testdata", name))
	if err != nil {
		tb.Fatal(err)
	}
	return rp
}

// pipeline is the offline pipeline: parse and copy (what a capture
// goroutine does), demultiplex, save.
type pipeline struct {
	b    flow.Builder
	d    *Demuxer
	m    *metrics.Metrics
	raws []replay.Packet
	// templates are raw packets rewritten to n distinct flows.
	flows int
	next  int
}

func newPipeline(tb testing.TB, flows int, stream bool) *pipeline {
	tb.Helper()
	m := metrics.New(prometheus.NewRegistry())
	d := New(Config{
		FlowTimeout: time.Hour,
		UUIDWait:    time.Hour,
		Savers: saver.NewPool(saver.Config{
			Dir:             tb.TempDir(),
			CaptureDuration: 24 * time.Hour,
			Stream:          stream,
			Metrics:         m,
		}),
		Metrics: m,
	})
	p := &pipeline{d: d, m: m, raws: rawPackets(tb, "large-ndt.pcap"), flows: flows}
	// Name every flow first, so the benchmark measures saving, not
	// pending.
	for i := 0; i < flows; i++ {
		raw := p.variant(0, i)
		h, err := flow.Parse(raw, flow.LinkEthernet)
		if err != nil {
			tb.Fatal(err)
		}
		d.Open(Open{Key: h.Key, UUID: fmt.Sprintf("bench_%016X", i), Time: time.Unix(1700000000, 0)})
	}
	return p
}

// variant returns raw packet j rewritten to belong to flow i: the client
// port (the low two bytes of the port pair that is not 443/ndt's) is set
// from i. large-ndt.pcap is IPv4 over Ethernet.
func (p *pipeline) variant(j, i int) []byte {
	raw := append([]byte(nil), p.raws[j].Raw...)
	h, err := flow.Parse(raw, flow.LinkEthernet)
	if err != nil {
		panic(err)
	}
	src := binary.BigEndian.Uint16(raw[h.L4:])
	dst := binary.BigEndian.Uint16(raw[h.L4+2:])
	port := uint16(10000 + i)
	if src < dst {
		binary.BigEndian.PutUint16(raw[h.L4+2:], port)
	} else {
		binary.BigEndian.PutUint16(raw[h.L4:], port)
	}
	return raw
}

// step runs one packet through the pipeline.
func (p *pipeline) step(raws [][]byte) {
	r := raws[p.next%len(raws)]
	p.next++
	pkt, _, err := p.b.Build(r, flow.LinkEthernet, int64(p.next), len(r))
	if err != nil {
		panic(err)
	}
	p.d.Packet(pkt)
	if p.next%flow.BatchSize == 0 {
		p.d.WakeSavers() // as Run does after each batch
	}
}

// benchRaws prepares the packets of the benchmark: the capture's packets
// interleaved over the flows. The packets with SYN, FIN or RST are left out:
// the benchmark replays them in a loop on the same 4-tuples, and a SYN after
// the connection's FIN is a new connection on a reused 4-tuple (a new flow,
// waiting for a UUID that never comes), not the steady state measured here.
func (p *pipeline) benchRaws() [][]byte {
	var mid []int
	for j, r := range p.raws {
		h, err := flow.Parse(r.Raw, flow.LinkEthernet)
		if err != nil {
			panic(err)
		}
		if r.Raw[h.L4+13]&(tcpSYN|tcpFIN|tcpRST) == 0 {
			mid = append(mid, j)
		}
	}
	var out [][]byte
	n := max(len(mid), p.flows)
	for k := 0; k < n; k++ {
		out = append(out, p.variant(mid[k%len(mid)], k%p.flows))
	}
	return out
}

// BenchmarkPipeline measures the whole offline path per packet: parse and
// copy the headers, demultiplex, queue to the flow's saver, encode and
// compress, with 1, 100 and 10,000 concurrent flows. The savers' goroutines
// work concurrently; the file is published when the benchmark ends, and that
// time is included.
func BenchmarkPipeline(b *testing.B) {
	for _, flows := range []int{1, 100, 10000} {
		for _, stream := range []bool{false, true} {
			b.Run(fmt.Sprintf("flows=%d/stream=%v", flows, stream), func(b *testing.B) {
				p := newPipeline(b, flows, stream)
				raws := p.benchRaws()
				var ms0, ms1 runtime.MemStats
				runtime.ReadMemStats(&ms0)
				b.ReportAllocs()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					p.step(raws)
				}
				p.d.Flush()
				b.StopTimer()
				runtime.ReadMemStats(&ms1)
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/pkt")
				b.ReportMetric(float64(ms1.Mallocs-ms0.Mallocs)/float64(b.N), "allocs/pkt")
			})
		}
	}
}

// BenchmarkDemux measures the demultiplexer alone: a packet already parsed,
// looked up in a table of n flows and queued to its saver (whose goroutine
// drains it concurrently).
func BenchmarkDemux(b *testing.B) {
	for _, flows := range []int{1, 100, 10000} {
		b.Run(fmt.Sprintf("flows=%d", flows), func(b *testing.B) {
			p := newPipeline(b, flows, false)
			var pkts []flow.Packet
			for _, r := range p.benchRaws() {
				pkt, _, err := p.b.Build(r, flow.LinkEthernet, 1, len(r))
				if err != nil {
					b.Fatal(err)
				}
				pkts = append(pkts, pkt)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				// The saver may modify a packet's bytes (anonymization
				// is off here, so it does not); reusing them is safe.
				p.d.Packet(pkts[i%len(pkts)])
				if i%flow.BatchSize == 0 {
					p.d.WakeSavers()
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/pkt")
			p.d.Flush()
		})
	}
}

// TestSteadyStateZeroAllocs pins the hot path (capture copy, demux, saver
// queue, pcap encoding and compression) at zero allocations per packet in
// steady state: what is allocated (header slabs, chunk buffers) is amortized
// over hundreds of packets.
func TestSteadyStateZeroAllocs(t *testing.T) {
	p := newPipeline(t, 1, false)
	raws := p.benchRaws()
	for i := 0; i < 20000; i++ { // warm up: buffers grown, pools filled
		p.step(raws)
	}
	allocs := testing.AllocsPerRun(20000, func() { p.step(raws) })
	if allocs != 0 {
		t.Errorf("%v allocations per packet on the hot path, want 0", allocs)
	}
	p.d.Flush()
	if n := p.m.FilesPublished; n == nil {
		t.Fatal("no metrics")
	}
}
