package capture

import (
	"context"
	"encoding/binary"
	"errors"
	"net/netip"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/internal/replay"
	"github.com/m-lab/packet-headers/metrics"
)

// fakeRing is a ring source whose blocks the test fills as the kernel
// would. Its ring is mapped memory that close unmaps, so that a read after
// the close faults instead of passing unnoticed; its descriptor is an
// eventfd that is readable while a block is ready.
type fakeRing struct {
	t         *testing.T
	mem       []byte
	blockSize int
	nblocks   int
	evfd      int

	mu       sync.Mutex
	next     int // next block the "kernel" fills
	ready    int // blocks handed over and not released
	closed   bool
	filters  [][]unix.SockFilter
	drops    uint64
	err      error
	misuse   atomic.Bool
	released atomic.Int64
	// refill, if set, is called after each release, like a kernel that
	// fills the ring as fast as it is read.
	refill func()
}

func newFakeRing(t *testing.T, nblocks int) *fakeRing {
	const bs = 64 << 10
	mem, err := unix.Mmap(-1, 0, bs*nblocks, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeRing{t: t, mem: mem, blockSize: bs, nblocks: nblocks, evfd: fd}
	t.Cleanup(func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		if !f.closed {
			unix.Munmap(f.mem)
		}
		unix.Close(f.evfd)
	})
	return f
}

// fakePacket is one packet as the kernel would put it in a block.
type fakePacket struct {
	data    []byte // from the link-layer header
	wireLen int
	ts      time.Time
	hatype  uint16
	netOff  int // offset of the network header in data
	vlan    int // -1: none
}

// deliver writes pkts into the next block and hands it over.
func (f *fakeRing) deliver(pkts ...fakePacket) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		f.t.Error("deliver after close")
		return
	}
	b := f.mem[f.next*f.blockSize : (f.next+1)*f.blockSize]
	if blockReady(b) {
		f.t.Fatal("fake ring full")
	}
	off := 48
	binary.NativeEndian.PutUint32(b[blkNumPkts:], uint32(len(pkts)))
	binary.NativeEndian.PutUint32(b[blkFirst:], uint32(off))
	for i, p := range pkts {
		h := b[off:]
		mac := 80
		binary.NativeEndian.PutUint32(h[pktSec:], uint32(p.ts.Unix()))
		binary.NativeEndian.PutUint32(h[pktNsec:], uint32(p.ts.Nanosecond()))
		binary.NativeEndian.PutUint32(h[pktSnaplen:], uint32(len(p.data)))
		binary.NativeEndian.PutUint32(h[pktLen:], uint32(p.wireLen))
		status := uint32(unix.TP_STATUS_USER)
		if p.vlan >= 0 {
			status |= unix.TP_STATUS_VLAN_VALID
			binary.NativeEndian.PutUint32(h[pktVLANTCI:], uint32(p.vlan))
		}
		binary.NativeEndian.PutUint32(h[pktStatus:], status)
		binary.NativeEndian.PutUint16(h[pktMac:], uint16(mac))
		binary.NativeEndian.PutUint16(h[pktNet:], uint16(mac+p.netOff))
		binary.NativeEndian.PutUint16(h[sllHatype:], p.hatype)
		copy(h[mac:], p.data)
		next := 0
		if i < len(pkts)-1 {
			next = (mac + len(p.data) + 15) &^ 15
		}
		binary.NativeEndian.PutUint32(h[pktNext:], uint32(next))
		off += next
	}
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&b[blkStatus])), unix.TP_STATUS_USER)
	f.next = (f.next + 1) % f.nblocks
	f.ready++
	var one [8]byte
	one[0] = 1
	if _, err := unix.Write(f.evfd, one[:]); err != nil {
		f.t.Error(err)
	}
}

func (f *fakeRing) check() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		f.misuse.Store(true)
	}
}

func (f *fakeRing) fd() int { return f.evfd }

func (f *fakeRing) block(i int) []byte {
	f.check()
	return f.mem[i*f.blockSize : (i+1)*f.blockSize]
}

func (f *fakeRing) blocks() int { return f.nblocks }

func (f *fakeRing) release(i int) {
	f.check()
	releaseBlock(f.block(i))
	f.released.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ready--
	if f.ready == 0 {
		var buf [8]byte
		if _, err := unix.Read(f.evfd, buf[:]); err != nil && !errors.Is(err, unix.EAGAIN) {
			f.t.Error(err)
		}
	}
	if f.refill != nil {
		f.mu.Unlock()
		f.refill()
		f.mu.Lock()
	}
}

func (f *fakeRing) stats() (uint64, error) {
	f.check()
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.drops
	f.drops = 0
	return d, nil
}

func (f *fakeRing) setFilter(p []unix.SockFilter) error {
	f.check()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.filters = append(f.filters, p)
	return nil
}

func (f *fakeRing) sockErr() error {
	f.check()
	f.mu.Lock()
	defer f.mu.Unlock()
	err := f.err
	f.err = nil
	return err
}

func (f *fakeRing) close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		f.t.Error("closed twice")
		return nil
	}
	f.closed = true
	return unix.Munmap(f.mem)
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

func ether(raw []byte, ts time.Time) fakePacket {
	return fakePacket{data: raw, wireLen: len(raw) + 1000, ts: ts, hatype: unix.ARPHRD_ETHER, netOff: 14, vlan: -1}
}

func newTestInterface(t *testing.T, src ringSource, timeout time.Duration) (*Interface, *metrics.Metrics) {
	m := metrics.New(prometheus.NewRegistry())
	c, err := newInterface("eth9", 9, src, &Config{Metrics: m, Timeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	return c, m
}

// receive reads a batch, failing the test if none comes: a capture that
// held packets back would hang here.
func receive(t *testing.T, out <-chan *flow.Batch) *flow.Batch {
	t.Helper()
	select {
	case b := <-out:
		return b
	case <-time.After(30 * time.Second):
		t.Fatal("no batch handed over")
		return nil
	}
}

func TestRunDeliversHeadersAndCountsBadPackets(t *testing.T) {
	raws := testPackets(t)
	ring := newFakeRing(t, 8)
	c, m := newTestInterface(t, ring, 10*time.Millisecond)
	ts := time.Unix(1, 0)
	var pkts []fakePacket
	for _, r := range raws {
		pkts = append(pkts, ether(r, ts))
	}
	pkts = append(pkts, ether([]byte{1, 2, 3}, ts)) // junk
	ring.deliver(pkts...)
	out := make(chan *flow.Batch, 100)
	done := make(chan error)
	go func() { done <- c.Run(context.Background(), out) }()
	got := 0
	for got < len(raws) {
		b := receive(t, out)
		for _, p := range b.Packets {
			if p.Len != uint32(len(raws[got])+1000) || p.Time != ts.UnixNano() {
				t.Errorf("packet %d: len %d time %d", got, p.Len, p.Time)
			}
			got++
		}
	}
	c.Stop()
	if err := <-done; err != nil {
		t.Fatalf("Run = %v", err)
	}
	if n := testutil.ToFloat64(m.BadPackets.WithLabelValues("truncated")); n != 1 {
		t.Errorf("truncated packets = %v, want 1", n)
	}
	if n := testutil.ToFloat64(m.PacketsCaptured.WithLabelValues("eth9")); n != float64(len(raws)) {
		t.Errorf("packets captured = %v, want %d", n, len(raws))
	}
	if ring.misuse.Load() {
		t.Error("the ring was used after it was closed")
	}
}

// TestTrickleHandedOverAtOnce: a batch is handed on as soon as the ring has
// nothing more to read, however few packets it holds (a slow, steady flow
// once waited in a batch until 128 packets had come).
func TestTrickleHandedOverAtOnce(t *testing.T) {
	raws := testPackets(t)
	ring := newFakeRing(t, 4)
	// The block timeout only sets how long the stop drains here.
	c, _ := newTestInterface(t, ring, time.Millisecond)
	out := make(chan *flow.Batch)
	done := make(chan error)
	go func() { done <- c.Run(context.Background(), out) }()
	for i := range 10 { // more rounds than blocks: the ring wraps
		ring.deliver(ether(raws[i%len(raws)], time.Unix(int64(i), 0)))
		b := receive(t, out)
		if len(b.Packets) != 1 || b.Packets[0].Time != int64(i)*1e9 {
			t.Fatalf("round %d: got %d packets", i, len(b.Packets))
		}
	}
	if n := ring.released.Load(); n != 10 {
		t.Errorf("released %d blocks, want 10", n)
	}
	c.Stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestFullBatchesUnderLoad: a burst larger than a batch arrives in full
// batches and a remainder, all in order.
func TestFullBatchesUnderLoad(t *testing.T) {
	raws := testPackets(t)
	ring := newFakeRing(t, 8)
	var pkts []fakePacket
	for i := range 300 {
		pkts = append(pkts, ether(raws[i%len(raws)], time.Unix(0, int64(i))))
	}
	ring.deliver(pkts[:150]...)
	ring.deliver(pkts[150:]...)
	c, _ := newTestInterface(t, ring, time.Millisecond)
	out := make(chan *flow.Batch, 10)
	c.Stop() // drains what is in the ring, then ends
	if err := c.Run(context.Background(), out); err != nil {
		t.Fatal(err)
	}
	close(out)
	var sizes []int
	next := int64(0)
	for b := range out {
		sizes = append(sizes, len(b.Packets))
		for _, p := range b.Packets {
			if p.Time != next {
				t.Fatalf("packet %d out of order (time %d)", next, p.Time)
			}
			next++
		}
	}
	if next != 300 || sizes[0] != flow.BatchSize {
		t.Errorf("delivered %d packets in batches %v", next, sizes)
	}
}

// TestReadRingOnePassAtATime: a ring the kernel refills as fast as it is
// read is read one pass at a time, so that the capture still gets to a stop
// or a filter change (it once read such a ring for as long as the load
// lasted).
func TestReadRingOnePassAtATime(t *testing.T) {
	raws := testPackets(t)
	ring := newFakeRing(t, 4)
	for i := range 4 {
		ring.deliver(ether(raws[0], time.Unix(int64(i), 0)))
	}
	refills := 0
	ring.refill = func() {
		if refills < 1000 { // bounded: the test ends either way
			refills++
			ring.deliver(ether(raws[0], time.Unix(0, 0)))
		}
	}
	c, _ := newTestInterface(t, ring, time.Millisecond)
	defer c.Close()
	c.batch = flow.GetBatch()
	out := make(chan *flow.Batch, 100)
	if n := c.readRing(out); n != 4 {
		t.Errorf("one call read %d packets, want one pass over the 4 blocks", n)
	}
}

func TestRawIPGetsEthernetHeader(t *testing.T) {
	raws := testPackets(t)
	ring := newFakeRing(t, 4)
	ip := raws[0][14:]
	ring.deliver(fakePacket{data: ip, wireLen: len(ip), ts: time.Unix(1, 0), hatype: 0xfffe /* ARPHRD_NONE */, vlan: -1})
	c, _ := newTestInterface(t, ring, time.Millisecond)
	out := make(chan *flow.Batch, 10)
	c.Stop()
	if err := c.Run(context.Background(), out); err != nil {
		t.Fatal(err)
	}
	b := <-out
	if len(b.Packets) != 1 {
		t.Fatalf("got %d packets", len(b.Packets))
	}
	p := b.Packets[0]
	if p.L3 != 14 || p.Data[12] != 0x08 || p.Data[13] != 0x00 || p.Len != uint32(len(ip)+14) {
		t.Errorf("no synthetic Ethernet header: L3 %d len %d, % x", p.L3, p.Len, p.Data[:14])
	}
}

// TestVLANTagPutBack: a tag the kernel took out of the frame is put back,
// as libpcap does, and counted in the length.
func TestVLANTagPutBack(t *testing.T) {
	raws := testPackets(t)
	ring := newFakeRing(t, 4)
	pk := ether(raws[0], time.Unix(1, 0))
	pk.vlan = 42
	ring.deliver(pk)
	c, _ := newTestInterface(t, ring, time.Millisecond)
	out := make(chan *flow.Batch, 10)
	c.Stop()
	if err := c.Run(context.Background(), out); err != nil {
		t.Fatal(err)
	}
	p := (<-out).Packets[0]
	if p.L3 != 18 || binary.BigEndian.Uint16(p.Data[12:]) != 0x8100 || binary.BigEndian.Uint16(p.Data[14:]) != 42 || p.Len != uint32(pk.wireLen+4) {
		t.Errorf("tag not put back: L3 %d len %d % x", p.L3, p.Len, p.Data[:18])
	}
}

// TestOnlyTheReaderTouchesTheRing: filter changes and stops come from other
// goroutines while packets flow, and after the capture ended; the ring is
// touched by the reading goroutine only, never after its close (the fake
// unmaps its memory then, so a late read would fault).
func TestOnlyTheReaderTouchesTheRing(t *testing.T) {
	raws := testPackets(t)
	ring := newFakeRing(t, 64)
	c, _ := newTestInterface(t, ring, time.Millisecond)
	out := make(chan *flow.Batch, 1000)
	done := make(chan error)
	go func() { done <- c.Run(context.Background(), out) }()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 200 {
				c.SetFilter([]unix.SockFilter{{Code: bpfRet, K: uint32(g*1000 + i)}})
			}
		})
	}
	for i := range 20 {
		ring.deliver(ether(raws[i%len(raws)], time.Unix(0, int64(i))))
	}
	wg.Wait()
	// The last filter reaches the socket (a later SetFilter(nil) would
	// replace it in the mailbox before the reader took it).
	for deadline := time.Now().Add(10 * time.Second); ; {
		ring.mu.Lock()
		nf := len(ring.filters)
		ring.mu.Unlock()
		if nf > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no filter change reached the socket")
		}
		runtime.Gosched()
	}
	c.Stop()
	wg.Go(func() {
		for range 100 {
			c.SetFilter(nil)
			c.Stop()
		}
	})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if ring.misuse.Load() {
		t.Error("the ring was used after it was closed")
	}
}

// TestSocketErrorOnVanishedInterface: a socket error on an interface that
// no longer exists ends the capture; on the capture of every interface it
// does not.
func TestSocketErrorOnVanishedInterface(t *testing.T) {
	m := metrics.New(prometheus.NewRegistry())
	ring := newFakeRing(t, 4)
	c, err := newInterface("gone0", 1<<30, ring, &Config{Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ring.err = unix.ENETDOWN
	if err := c.socketError(); err == nil {
		t.Error("socketError = nil for an interface that does not exist")
	}
	if err := c.socketError(); err != nil {
		t.Errorf("socketError = %v with no error pending", err)
	}
	anyRing := newFakeRing(t, 4)
	a, err := newInterface(AnyInterface, 0, anyRing, &Config{Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	anyRing.err = unix.ENETDOWN
	if err := a.socketError(); err != nil {
		t.Errorf("socketError on every interface = %v", err)
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
