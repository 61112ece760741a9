package demuxer

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/saver"
)

// fakeClock makes d's clock read epoch+*offset (the test goroutine sets
// offset only while the demuxer's loop is not running).
func fakeClock(d *Demuxer, offset *time.Duration) {
	epoch := d.epoch
	d.now = func() time.Time { return epoch.Add(*offset) }
}

// runOnce runs d's loop with a batch and an Open (either may be nil) and a
// tick of gc or sweep all ready at once, until the tick is handled; it then
// stops the loop (which flushes d) and returns what check saw right after the
// tick.
func runOnce(t *testing.T, d *Demuxer, b *flow.Batch, ev *Open, gc bool, check func()) {
	t.Helper()
	packets := make(chan *flow.Batch, 1)
	events := make(chan Open, 1)
	tick := make(chan time.Time, 1)
	handled := make(chan struct{})
	if b != nil {
		packets <- b
	}
	if ev != nil {
		events <- *ev
	}
	tick <- time.Time{}
	tk := ticks{gc: tick, gcDone: func() { close(handled) }}
	if !gc {
		tk = ticks{sweep: tick, sweepDone: func() { close(handled) }}
	}
	done := make(chan struct{})
	go func() {
		d.run(packets, events, tk)
		close(done)
	}()
	<-handled
	check() // the loop waits in select: its state is quiet
	close(packets)
	<-done
}

// TestGCTakesWaitingPacketsFirst: a GC tick that comes together with a batch
// does not collect a flow whose packet is in that batch (the loop's select
// would take either first). Repeated, since a wrong order shows only half of
// the time.
func TestGCTakesWaitingPacketsFirst(t *testing.T) {
	v4 := readPackets(t, "v4.pcap")
	for range 32 {
		d, m, _ := manualDemuxer(t, nil)
		d.Open(Open{Key: v4[0].Key, UUID: "u", Time: opened})
		d.Packet(v4[0])
		d.GC() // v4 has had no packet since
		b := flow.GetBatch()
		b.Packets = append(b.Packets, v4[1])
		runOnce(t, d, b, nil, true, func() {
			if n := testutil.ToFloat64(m.DemuxerSaversGCed); n != 0 {
				t.Fatalf("the GC collected a flow whose packet waited in the channel")
			}
		})
	}
}

// TestSweepTakesWaitingOpensFirst: a sweep that comes together with a
// flow's Open, after its UUID wait is over, does not drop the flow.
func TestSweepTakesWaitingOpensFirst(t *testing.T) {
	v4 := readPackets(t, "v4.pcap")
	for range 32 {
		d, m, _ := manualDemuxer(t, func(c *Config) { c.UUIDWait = 5 * time.Second })
		var now time.Duration
		fakeClock(d, &now)
		d.Packet(v4[0])
		now = 6 * time.Second
		ev := Open{Key: v4[0].Key, UUID: "u", Time: opened}
		runOnce(t, d, nil, &ev, false, func() {
			if n := testutil.ToFloat64(m.PendingDropped.WithLabelValues("uuidtimeout")); n != 0 {
				t.Fatalf("the sweep dropped a flow whose Open waited in the channel")
			}
			if e := d.flows[v4[0].Key]; e == nil || e.saver == nil {
				t.Fatalf("the flow was not named")
			}
		})
	}
}

// TestUUIDWaitFromArrival: a flow waits UUIDWait for its UUID from when its
// first packet reached the demuxer, whenever that packet was captured: a
// capture delay does not shorten the wait.
func TestUUIDWaitFromArrival(t *testing.T) {
	d, m, _ := manualDemuxer(t, func(c *Config) { c.UUIDWait = 5 * time.Second })
	var now time.Duration
	fakeClock(d, &now)
	v4, v6 := readPackets(t, "v4.pcap"), readPackets(t, "v6.pcap")
	d.Packet(v6[0]) // captured later, arrives first
	now = 3 * time.Second
	d.Packet(v4[0]) // captured earlier (v4.pcap is older), arrives 3 s later
	if v4[0].Time >= v6[0].Time {
		t.Fatal("the test wants v4.pcap to be the older capture")
	}
	d.expirePending(d.clock(d.now().Add(2*time.Second - 1)))
	if d.npending != 2 {
		t.Fatalf("%d flows pending just before the first one's wait is over, want 2", d.npending)
	}
	d.expirePending(d.clock(d.now().Add(2 * time.Second)))
	if d.npending != 1 || d.flows[v4[0].Key] == nil {
		t.Fatalf("%d flows pending when the first one's wait is over, want the one that arrived later", d.npending)
	}
	d.expirePending(d.clock(d.now().Add(5 * time.Second)))
	if n := testutil.ToFloat64(m.PendingDropped.WithLabelValues("uuidtimeout")); n != 2 {
		t.Errorf("%v flows dropped, want 2", n)
	}
	d.Flush()
}

// TestCaptureDurationByTimestamps: what a flow's file holds is decided by
// the packets' capture timestamps, not by when they reach the demuxer: a
// flow's packets captured over 12 s and handed over at once, after a wait
// for the UUID, give a file with the first 10 s (the capture duration).
func TestCaptureDurationByTimestamps(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.Savers.(*saver.Pool).CaptureDuration = 10 * time.Second })
	pkts := readPackets(t, "v4.pcap")
	for i := range pkts {
		pkts[i].Time = opened.UnixNano() + int64(i)*int64(time.Second)
	}
	h.send(pkts[:3]...)
	h.advance(4 * time.Second)
	h.sweep()
	h.open(pkts[0].Key, "u")
	h.send(pkts[3:]...)
	h.stop()
	if got := h.count("u"); got != 10 {
		t.Errorf("file has %d packets, want the 10 captured in its first 10 s", got)
	}
}

// TestShutdownAppliesWaitingOpens: the Opens that wait in events when
// packets is closed name their flows before the flows end (repeated: the
// loop's select takes ready cases in random order). A closed events channel
// is no end of the loop.
func TestShutdownAppliesWaitingOpens(t *testing.T) {
	v4 := readPackets(t, "v4.pcap")
	for i := range 16 {
		d, m, _ := manualDemuxer(t, nil)
		d.Packet(v4[0]) // waits for its UUID
		packets := make(chan *flow.Batch)
		events := make(chan Open, 1)
		events <- Open{Key: v4[0].Key, UUID: "u", Time: opened}
		if i%2 == 1 {
			close(events)
		}
		close(packets)
		d.run(packets, events, ticks{})
		if n := testutil.ToFloat64(m.FilesPublished); n != 1 {
			t.Fatalf("%v files published, want the flow named by the waiting Open", n)
		}
	}
}
