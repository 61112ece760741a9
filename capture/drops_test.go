package capture

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestDropLogSince(t *testing.T) {
	var l dropLog
	if got := l.since(0); got != 0 {
		t.Fatalf("empty log: since(0) = %d", got)
	}
	const s = int64(time.Second)
	l.add(3, 10*s)
	l.add(0, 11*s) // nothing dropped: no step
	l.add(4, 20*s)
	l.add(5, 30*s)
	for _, tt := range []struct {
		t    int64
		want uint64
	}{
		{0, 12}, // before every step: all of them
		{10*s - 1, 12},
		{10 * s, 9}, // the drops read at 10 s happened before it
		{15 * s, 9},
		{20 * s, 5},
		{29 * s, 5},
		{30 * s, 0},
		{40 * s, 0},
	} {
		if got := l.since(tt.t); got != tt.want {
			t.Errorf("since(%d s) = %d, want %d", tt.t/s, got, tt.want)
		}
	}
}

func TestDropLogMergesWithinASecond(t *testing.T) {
	var l dropLog
	const s = int64(time.Second)
	l.add(2, 10*s)
	l.add(3, 10*s+s/2) // merged into the step at 10 s, which moves to 10.5 s
	if l.n != 1 {
		t.Fatalf("%d steps, want 1", l.n)
	}
	// A flow whose first packet was at 10.2 s gets every drop: the bound
	// grows, it never shrinks.
	if got := l.since(10*s + s/5); got != 5 {
		t.Errorf("since(10.2 s) = %d, want 5", got)
	}
	if got := l.since(11 * s); got != 0 {
		t.Errorf("since(11 s) = %d, want 0", got)
	}
}

func TestDropLogForgetsOldestAsABound(t *testing.T) {
	var l dropLog
	const s = int64(time.Second)
	for i := range dropLogSize + 10 {
		l.add(1, int64(i+1)*2*s)
	}
	total := uint64(dropLogSize + 10)
	// Older than every step kept: every drop counted, a bound still.
	if got := l.since(3 * s); got != total {
		t.Errorf("since(3 s) = %d, want %d", got, total)
	}
	// Within the steps kept: exact.
	last := int64(dropLogSize+10) * 2 * s
	if got := l.since(last - 2*s); got != 1 {
		t.Errorf("since(second to last) = %d, want 1", got)
	}
}

// TestReadStatsFeedsKernelDropsSince: the drops a capture reads from the
// kernel reach the Config's KernelDropsSince as well as the gauge.
func TestReadStatsFeedsKernelDropsSince(t *testing.T) {
	ring := newFakeRing(t, 8)
	c, m := newTestInterface(t, ring, 10*time.Millisecond)
	defer c.Close()
	before := time.Now().UnixNano()
	ring.mu.Lock()
	ring.drops = 7
	ring.mu.Unlock()
	c.readStats()
	if got := c.cfg.KernelDropsSince(before); got != 7 {
		t.Errorf("KernelDropsSince(before the read) = %d, want 7", got)
	}
	if got := c.cfg.KernelDropsSince(time.Now().UnixNano()); got != 0 {
		t.Errorf("KernelDropsSince(after the read) = %d, want 0", got)
	}
	if got := testutil.ToFloat64(m.KernelDrops.WithLabelValues("eth9")); got != 7 {
		t.Errorf("pcap_capture_kernel_drops = %v, want 7", got)
	}
}
