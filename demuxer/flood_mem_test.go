package demuxer

import (
	"encoding/binary"
	"os"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/saver"
)

// manualDemuxer is a demuxer driven directly by the test (no Run), with
// timeouts long enough that only the test's own calls expire anything;
// tweak adjusts the config. It returns the demuxer, its metrics and its data
// directory.
func manualDemuxer(t *testing.T, tweak func(*Config)) (*Demuxer, *metrics.Metrics, string) {
	m := metrics.New(prometheus.NewRegistry())
	dir := t.TempDir()
	cfg := Config{
		FlowTimeout: time.Hour, UUIDWait: time.Hour,
		Savers:  saver.NewPool(saver.Config{Dir: dir, CaptureDuration: time.Hour, Metrics: m}),
		Metrics: m,
	}
	if tweak != nil {
		tweak(&cfg)
	}
	return New(cfg), m, dir
}

// tcpFrame returns an Ethernet + IPv4 + TCP header (58 bytes) to
// 198.18.0.1 with the given TCP flags; callers fill in the source address
// and ports.
func tcpFrame(flags byte) []byte {
	raw := make([]byte, 58)
	binary.BigEndian.PutUint16(raw[12:], 0x0800)
	raw[14] = 0x45
	raw[14+9] = 6
	binary.BigEndian.PutUint32(raw[14+16:], 0xC6120001) // 198.18.0.1
	raw[14+20+12] = 6 << 4
	raw[14+20+13] = flags
	return raw
}

// synFlood feeds n SYNs from distinct spoofed sources into d.
func synFlood(d *Demuxer, n int) {
	raw := tcpFrame(0x02) // SYN
	var b flow.Builder
	for i := 0; i < n; i++ {
		binary.BigEndian.PutUint32(raw[14+12:], 0xC6128000|uint32(i)) // 198.18.128.0/17 and beyond
		binary.BigEndian.PutUint16(raw[14+20:], uint16(i))
		p, _, err := b.Build(raw, flow.LinkEthernet, int64(i), len(raw))
		if err != nil {
			panic(err)
		}
		d.Packet(p)
	}
}

// TestSYNFloodMemoryBounded: a flood of spoofed SYNs, each a new flow that
// will never be named, keeps at most MaxPending flows, evicting the oldest,
// and its heap stays bounded whatever the flood's length.
func TestSYNFloodMemoryBounded(t *testing.T) {
	d, m, _ := manualDemuxer(t, nil) // only the limit evicts
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	const syns = 300_000
	synFlood(d, syns)
	runtime.GC()
	runtime.ReadMemStats(&after)
	if d.npending != DefaultMaxPending || len(d.flows) != DefaultMaxPending {
		t.Errorf("%d pending flows, %d in the table; want %d", d.npending, len(d.flows), DefaultMaxPending)
	}
	if n := testutil.ToFloat64(m.PendingDropped.WithLabelValues("limit")); n != syns-DefaultMaxPending {
		t.Errorf("evicted %v flows, want %d", n, syns-DefaultMaxPending)
	}
	perFlow := float64(after.HeapInuse-before.HeapInuse) / DefaultMaxPending
	t.Logf("heap in use per pending flow: %.0f bytes", perFlow)
	if perFlow > 450 {
		t.Errorf("a pending flow costs %.0f bytes of heap, want at most 450", perFlow)
	}
	// A flow named during the flood still gets its packets.
	v4 := readPackets(t, "v4.pcap")
	for _, p := range v4[:3] {
		d.Packet(p)
	}
	synFlood(d, 1000) // younger than the real flow: it is not evicted
	d.Open(Open{Key: v4[0].Key, UUID: "real", Time: opened})
	for _, p := range v4[3:] {
		d.Packet(p)
	}
	d.Flush()
	if n := testutil.ToFloat64(m.PacketsSaved); n != float64(len(v4)) {
		t.Errorf("real flow saved %v packets, want %d", n, len(v4))
	}
}

// TestEvictionKeepsYoungerPending: at the limit, only the oldest pending
// flow is dropped.
func TestEvictionKeepsYoungerPending(t *testing.T) {
	d, m, _ := manualDemuxer(t, func(c *Config) { c.MaxPending = 2 })
	synFlood(d, 3)
	if d.npending != 2 || len(d.flows) != 2 {
		t.Errorf("after 3 flows with room for 2: %d pending, %d in the table", d.npending, len(d.flows))
	}
	if n := testutil.ToFloat64(m.PendingDropped.WithLabelValues("limit")); n != 1 {
		t.Errorf("evicted %v, want 1", n)
	}
}

// TestMaxHeapSheds: 10,000 saving flows and 100,000 pending flows under a
// -maxheap budget smaller than they need: once the heap is over the budget,
// new flows are shed and counted, the heap stays near the budget, and
// nothing crashes.
func TestMaxHeapSheds(t *testing.T) {
	const budget = 24 << 20
	d, m, _ := manualDemuxer(t, func(c *Config) { c.MaxPending, c.MaxHeap = 100_000, budget })
	v4 := readPackets(t, "v4.pcap")
	raw := tcpFrame(0)
	var b flow.Builder
	var peak uint64
	var ms runtime.MemStats
	for i := 0; i < 110_000; i++ {
		binary.BigEndian.PutUint32(raw[14+12:], 0xC6128000|uint32(i))
		binary.BigEndian.PutUint16(raw[14+20:], uint16(i))
		p, _, err := b.Build(raw, flow.LinkEthernet, int64(i), len(raw))
		if err != nil {
			t.Fatal(err)
		}
		d.Packet(p)
		if i < 10_000 {
			// A saving flow: named, with a few more packets.
			d.Open(Open{Key: p.Key, UUID: "s" + strconv.Itoa(i), Time: opened})
			for _, q := range v4[:4] {
				q.Key = p.Key
				d.Packet(q)
			}
		}
		if i%2000 == 0 {
			// The daemon samples the live heap as of the last collection,
			// every UUIDWait/4; here a collection before each sample
			// stands in for the time between them.
			runtime.GC()
			d.checkHeap()
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&ms)
	peak = ms.HeapAlloc // live, after a collection
	shed := testutil.ToFloat64(m.FlowsShed.WithLabelValues("maxheap"))
	t.Logf("live heap %.1f MB with a %.0f MB budget; %v flows shed, %d in the table", float64(peak)/1e6, float64(budget)/1e6, shed, len(d.flows))
	if shed == 0 {
		t.Error("no flow shed although the heap exceeded -maxheap")
	}
	if peak > budget*3/2 {
		t.Errorf("live heap %.1f MB, more than 1.5 times the %.0f MB budget", float64(peak)/1e6, float64(budget)/1e6)
	}
	if n := testutil.ToFloat64(m.SaverSkipped); n != shed {
		t.Errorf("pcap_saver_skipped_total %v, want %v", n, shed)
	}
	d.Flush()
}

// TestOpensWithoutPacketsStartNoGoroutine: when tcp-info restarts it sends an
// Open for every live socket, also the idle ones whose flows were collected.
// Those cost a table entry, not a saver goroutine, until a packet comes; the
// ones that never get one are counted as flows without packets, as a saver
// would count them.
func TestOpensWithoutPacketsStartNoGoroutine(t *testing.T) {
	d, m, dir := manualDemuxer(t, nil)
	const opens = 10_000
	before := runtime.NumGoroutine()
	keys := make([]flow.Key, opens)
	var b flow.Builder
	raw := tcpFrame(0x10) // ACK
	packet := func(i int) flow.Packet {
		binary.BigEndian.PutUint32(raw[14+12:], 0xC6120002)
		binary.BigEndian.PutUint16(raw[14+20:], uint16(1024+i))
		binary.BigEndian.PutUint16(raw[14+22:], 443)
		// Captured after the Opens (whose sockets tcp-info saw first).
		p, _, err := b.Build(raw, flow.LinkEthernet, opened.UnixNano()+int64(i), len(raw))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	for i := range keys {
		keys[i] = packet(i).Key
		d.Open(Open{Key: keys[i], UUID: "idle" + strconv.Itoa(i), Time: opened})
	}
	if n := runtime.NumGoroutine() - before; n > 10 {
		t.Errorf("%d goroutines after %d Opens without packets", n, opens)
	}
	if n := testutil.ToFloat64(m.SaversStarted); n != 0 {
		t.Errorf("%v savers started before any packet", n)
	}
	// The same Open again (tcp-info restarted twice) changes nothing; a new
	// UUID on a 4-tuple that had none of its packets yet is of a new socket
	// on it: a packet captured after both sockets were seen is the new
	// one's, and the old one ends without packets.
	d.Open(Open{Key: keys[0], UUID: "idle0", Time: opened})
	d.Open(Open{Key: keys[1], UUID: "reused1", Time: opened})
	// One flow sends: its saver starts and saves under its UUID.
	d.Packet(packet(1))
	d.WakeSavers()
	d.GC()
	d.Packet(packet(1))
	d.GC() // the idle ones: one to two GCs without packets
	if n, want := testutil.ToFloat64(m.SaverErrors.WithLabelValues("nopackets")), float64(opens-1+1); n != want {
		t.Errorf("nopackets errors %v, want %v", n, want)
	}
	if len(d.flows) != 1 {
		t.Errorf("%d flows in the table, want the one sending", len(d.flows))
	}
	d.Flush()
	// Counted by the saver's goroutine as it starts: after Flush, which
	// waits for every saver.
	if n := testutil.ToFloat64(m.SaversStarted); n != 1 {
		t.Errorf("%v savers started, want 1", n)
	}
	if _, err := os.Stat(saver.DatePath(dir, "reused1", opened)); err != nil {
		t.Errorf("the flow that sent was not saved under its UUID: %v", err)
	}
}

// TestHasPending: HasPending and PendingWake follow the flows waiting for a
// UUID, for a UUID source that polls only while one waits.
func TestHasPending(t *testing.T) {
	d, _, _ := manualDemuxer(t, nil)
	if d.HasPending() {
		t.Error("HasPending before any packet")
	}
	select {
	case <-d.PendingWake():
		t.Error("PendingWake received before any packet")
	default:
	}
	v4 := readPackets(t, "v4.pcap")
	d.Packet(v4[0])
	d.Packet(v4[1])
	if !d.HasPending() {
		t.Error("no HasPending with a flow waiting")
	}
	select {
	case <-d.PendingWake():
	default:
		t.Error("PendingWake did not receive when a flow started waiting")
	}
	select {
	case <-d.PendingWake():
		t.Error("PendingWake received twice for one flow")
	default:
	}
	d.Open(Open{Key: v4[0].Key, UUID: "u", Time: opened})
	if d.HasPending() {
		t.Error("HasPending after the only waiting flow was named")
	}
	d.Flush()
}

// TestRenamedFlowWaitsAFullFlowTimeout: a new UUID on a 4-tuple still
// waiting for its first packet waits one to two FlowTimeouts from then, not
// from the old UUID; the SYN that comes then is the new socket's (the old
// socket was seen long before it).
func TestRenamedFlowWaitsAFullFlowTimeout(t *testing.T) {
	d, m, dir := manualDemuxer(t, nil)
	v4 := readPackets(t, "v4.pcap")
	oldAt := time.Unix(0, v4[0].Time).Add(-time.Minute)
	newAt := time.Unix(0, v4[2].Time).Add(time.Millisecond) // established
	d.Open(Open{Key: v4[0].Key, UUID: "old", Time: oldAt})
	d.GC() // "old" has waited one tick
	d.Open(Open{Key: v4[0].Key, UUID: "new", Time: newAt})
	d.GC() // "new" has waited one tick: it stays
	if len(d.flows) != 1 {
		t.Fatalf("the renamed flow was collected one tick after its Open")
	}
	for _, p := range v4 {
		d.Packet(p)
	}
	d.Flush()
	if _, err := os.Stat(saver.DatePath(dir, "new", newAt)); err != nil {
		t.Errorf("the renamed flow was not saved under its new UUID: %v", err)
	}
	if n := testutil.ToFloat64(m.SaverErrors.WithLabelValues("nopackets")); n != 1 {
		t.Errorf("nopackets errors %v, want 1 (the old UUID)", n)
	}
}
