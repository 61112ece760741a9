package demuxer

import (
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/internal/replay"
	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/saver"
)

var opened = time.Date(2024, 11, 18, 12, 0, 0, 0, time.UTC)

func readPackets(t testing.TB, name string) []flow.Packet {
	t.Helper()
	rp, bad, err := replay.ReadFile(filepath.Join("..", "testdata", name))
	if err != nil || bad != 0 || len(rp) == 0 {
		t.Fatalf("%s: %d packets, %d bad, %v", name, len(rp), bad, err)
	}
	pkts := make([]flow.Packet, len(rp))
	for i := range rp {
		pkts[i] = rp[i].Packet
	}
	return pkts
}

// harness runs a demuxer's loop (Run's, with the test's clock events in
// place of its timers) on packet and event channels.
type harness struct {
	t       *testing.T
	dir     string
	m       *metrics.Metrics
	d       *Demuxer
	packets chan *flow.Batch
	events  chan Open
	done    chan struct{}
	// gcC and sweepC are the loop's GC and sweep ticks; ticked receives
	// when the loop has handled one.
	gcC, sweepC chan time.Time
	ticked      chan struct{}
	// clock is the demuxer's clock, in ns after its epoch.
	clock atomic.Int64
}

func newHarness(t *testing.T, tweak func(*Config)) *harness {
	h := &harness{
		t:       t,
		dir:     t.TempDir(),
		m:       metrics.New(prometheus.NewRegistry()),
		packets: make(chan *flow.Batch),
		events:  make(chan Open),
		done:    make(chan struct{}),
		gcC:     make(chan time.Time),
		sweepC:  make(chan time.Time),
		ticked:  make(chan struct{}),
	}
	cfg := Config{
		FlowTimeout: 30 * time.Second,
		UUIDWait:    5 * time.Second,
		Savers: saver.NewPool(saver.Config{
			Dir:             h.dir,
			CaptureDuration: time.Hour,
			Metrics:         h.m,
		}),
		Metrics: h.m,
	}
	if tweak != nil {
		tweak(&cfg)
	}
	h.d = New(cfg)
	epoch := h.d.epoch
	h.d.now = func() time.Time { return epoch.Add(time.Duration(h.clock.Load())) }
	tick := func() { h.ticked <- struct{}{} }
	go func() {
		h.d.run(h.packets, h.events, ticks{gc: h.gcC, sweep: h.sweepC, gcDone: tick, sweepDone: tick})
		close(h.done)
	}()
	return h
}

// gc makes the loop collect idle flows, as its FlowTimeout timer does, and
// returns once it has.
func (h *harness) gc() {
	h.gcC <- time.Time{}
	<-h.ticked
}

// sweep makes the loop expire the pending flows whose UUID wait is over, as
// its sweep ticker does, and returns once it has.
func (h *harness) sweep() {
	h.sweepC <- time.Time{}
	<-h.ticked
}

// advance moves the demuxer's clock forward.
func (h *harness) advance(d time.Duration) { h.clock.Add(int64(d)) }

// send hands packets to the loop in batches, and returns once it has routed
// them.
func (h *harness) send(pkts ...flow.Packet) {
	for len(pkts) > 0 {
		b := flow.GetBatch()
		n := min(len(pkts), flow.BatchSize)
		b.Packets = append(b.Packets, pkts[:n]...)
		pkts = pkts[n:]
		h.packets <- b
	}
	h.sync()
}

// open hands an Open to the loop, and returns once it has handled it.
func (h *harness) open(k flow.Key, uuid string) {
	h.events <- Open{Key: k, UUID: uuid, Time: opened}
	h.sync()
}

// sync returns once the loop has handled what was handed to it: it takes
// the next batch only then.
func (h *harness) sync() { h.packets <- flow.GetBatch() }

func (h *harness) stop() {
	close(h.packets)
	<-h.done
}

func (h *harness) path(uuid string) string { return saver.DatePath(h.dir, uuid, opened) }

func (h *harness) exists(uuid string) bool {
	_, err := os.Stat(h.path(uuid))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		h.t.Fatal(err)
	}
	return err == nil
}

// count reads back how many records a published file holds.
func (h *harness) count(uuid string) int {
	pkts, _, err := replay.ReadFile(h.path(uuid))
	if err != nil {
		h.t.Fatalf("read %s: %v", uuid, err)
	}
	return len(pkts)
}

func TestUUIDTiming(t *testing.T) {
	tests := []struct {
		name string
		// run drives the demuxer with the flow's packets and key.
		run       func(h *harness, pkts []flow.Packet)
		wantFile  bool
		wantCount int // -1: all packets; -1-n: all but the first n
	}{
		{
			name: "uuid after the first packets, just in time",
			run: func(h *harness, pkts []flow.Packet) {
				h.send(pkts[:3]...)
				h.advance(5*time.Second - 1)
				h.sweep()
				h.open(pkts[0].Key, "u")
				h.send(pkts[3:]...)
			},
			wantFile:  true,
			wantCount: -1,
		},
		{
			name: "uuid before the first packet",
			run: func(h *harness, pkts []flow.Packet) {
				h.open(pkts[0].Key, "u")
				h.send(pkts...)
			},
			wantFile:  true,
			wantCount: -1,
		},
		{
			name: "uuid too late",
			run: func(h *harness, pkts []flow.Packet) {
				h.send(pkts[:3]...)
				h.advance(5 * time.Second)
				h.sweep()
				if n := testutil.ToFloat64(h.m.PendingDropped.WithLabelValues("uuidtimeout")); n != 1 {
					h.t.Errorf("pending dropped = %v, want 1", n)
				}
				if n := testutil.ToFloat64(h.m.SaverErrors.WithLabelValues("uuidtimedout")); n != 1 {
					h.t.Errorf("saver errors{uuidtimedout} = %v, want 1", n)
				}
				// The late UUID finds no pending flow: it saves what
				// comes after it, so the file lacks the first packets.
				h.open(pkts[0].Key, "u")
				h.send(pkts[3:]...)
			},
			wantFile:  true,
			wantCount: -4, // all but the first 3
		},
		{
			name: "uuid never",
			run: func(h *harness, pkts []flow.Packet) {
				h.send(pkts...)
				h.advance(5 * time.Second)
				h.sweep()
				if n := testutil.ToFloat64(h.m.PendingFlows); n != 0 {
					h.t.Errorf("pending flows = %v, want 0", n)
				}
			},
			wantFile: false,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, nil)
			pkts := readPackets(t, "v4.pcap")
			tt.run(h, pkts)
			h.stop()
			if got := h.exists("u"); got != tt.wantFile {
				t.Fatalf("file exists = %v, want %v", got, tt.wantFile)
			}
			if !tt.wantFile {
				return
			}
			want := tt.wantCount
			if want < 0 {
				want = len(pkts) + 1 + want
			}
			if got := h.count("u"); got != want {
				t.Errorf("file has %d packets, want %d", got, want)
			}
		})
	}
}

func TestGCPublishesIdleFlows(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		v4, v6 := readPackets(t, "v4.pcap"), readPackets(t, "v6.pcap")
		h.open(v4[0].Key, "v4")
		h.open(v6[0].Key, "v6")
		h.send(v4...)
		h.send(v6[:2]...)
		// v6 keeps sending; v4 goes quiet. After two GC ticks v4 is
		// collected and published, v6 is not.
		for i := range 2 {
			h.gc()
			h.send(v6[2+i])
		}
		synctest.Wait() // for v4's saver
		if !h.exists("v4") {
			t.Errorf("idle flow not published after two flow timeouts")
		}
		if h.exists("v6") {
			t.Errorf("active flow published early")
		}
		if n := testutil.ToFloat64(h.m.DemuxerSaversGCed); n != 1 {
			t.Errorf("garbage collected = %v, want 1", n)
		}
		h.stop()
		if !h.exists("v6") {
			t.Errorf("shutdown did not publish the active flow")
		}
		if got, want := h.count("v6"), 4; got != want {
			t.Errorf("v6 file has %d packets, want %d", got, want)
		}
	})
}

// TestRunTimers checks Run's own timers, in the virtual time of a synctest
// bubble (the other tests drive the loop's clock events themselves): a
// pending flow is dropped at the first sweep (every UUIDWait/4) at or after
// UUIDWait from its first packet, and an idle flow is collected by the
// second GC, FlowTimeout after the first. The checks are made between timer
// instants, once every goroutine of the bubble is idle.
func TestRunTimers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := metrics.New(prometheus.NewRegistry())
		d := New(Config{
			FlowTimeout: 30 * time.Second,
			UUIDWait:    4 * time.Second,
			Savers:      saver.NewPool(saver.Config{Dir: t.TempDir(), CaptureDuration: time.Hour, Metrics: m}),
			Metrics:     m,
		})
		packets, events, done := make(chan *flow.Batch), make(chan Open), make(chan struct{})
		go func() {
			d.Run(packets, events)
			close(done)
		}()
		send := func(pkts ...flow.Packet) {
			b := flow.GetBatch()
			b.Packets = append(b.Packets, pkts...)
			packets <- b
		}
		v4, v6 := readPackets(t, "v4.pcap"), readPackets(t, "v6.pcap")
		events <- Open{Key: v4[0].Key, UUID: "v4", Time: opened}
		send(v4...)
		send(v6[0]) // never named
		start := time.Now()
		at := func(d time.Duration) {
			time.Sleep(time.Until(start.Add(d)))
			synctest.Wait()
		}
		at(3500 * time.Millisecond)
		if n := testutil.ToFloat64(m.PendingFlows); n != 1 {
			t.Errorf("%v pending flows before UUIDWait, want 1", n)
		}
		at(4500 * time.Millisecond)
		if n := testutil.ToFloat64(m.PendingFlows); n != 0 {
			t.Errorf("%v pending flows after UUIDWait, want 0", n)
		}
		at(45 * time.Second)
		if n := testutil.ToFloat64(m.DemuxerSaversGCed); n != 0 {
			t.Errorf("%v flows collected by the first GC, want 0", n)
		}
		at(75 * time.Second)
		if n := testutil.ToFloat64(m.DemuxerSaversGCed); n != 1 {
			t.Errorf("%v flows collected by the second GC, want 1", n)
		}
		close(packets)
		<-done
	})
}

func TestDuplicateAndReusedUUIDs(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, nil)
		pkts := readPackets(t, "v4.pcap")
		h.open(pkts[0].Key, "first")
		h.send(pkts[:4]...)
		// tcp-info restarted: the same Open again changes nothing.
		h.open(pkts[0].Key, "first")
		h.send(pkts[4:6]...)
		synctest.Wait()
		if n := testutil.ToFloat64(h.m.SaversStarted); n != 1 {
			t.Errorf("savers started = %v after a duplicate Open, want 1", n)
		}
		// Another UUID on the same 4-tuple is a new socket's: it does not
		// cut the flow, it names the next connection, from its SYN on.
		h.open(pkts[0].Key, "second")
		h.send(pkts[6:]...) // the flow ends with a RST
		syn := pkts[0]
		syn.Data = append([]byte(nil), syn.Data...)
		binary.BigEndian.PutUint32(syn.Data[syn.L4+4:], binary.BigEndian.Uint32(syn.Data[syn.L4+4:])+12345)
		syn.Time = pkts[len(pkts)-1].Time + int64(time.Second)
		h.send(syn)
		h.stop()
		if got := h.count("first"); got != len(pkts) {
			t.Errorf("first file has %d packets, want %d", got, len(pkts))
		}
		if got := h.count("second"); got != 1 {
			t.Errorf("second file has %d packets, want its SYN", got)
		}
	})
}

func TestLimits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(c *Config) { c.MaxFlows = 1 })
		v4, v6 := readPackets(t, "v4.pcap"), readPackets(t, "v6.pcap")
		h.open(v4[0].Key, "v4")
		h.send(v4...)
		h.open(v6[0].Key, "v6") // refused: the table is full
		h.send(v6...)
		h.stop()
		if !h.exists("v4") || h.exists("v6") {
			t.Errorf("with -maxflows=1: v4 saved %v, v6 saved %v; want true, false", h.exists("v4"), h.exists("v6"))
		}
		if n := testutil.ToFloat64(h.m.FlowsShed.WithLabelValues("maxflows")); n < 1 {
			t.Errorf("shed{maxflows} = %v", n)
		}
		if n := testutil.ToFloat64(h.m.DemuxerIgnored); n != float64(len(v6)) {
			t.Errorf("ignored = %v, want %d", n, len(v6))
		}
	})
}

func TestMaxPendingEvictsOldest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(c *Config) { c.MaxPending = 1 })
		v4, v6 := readPackets(t, "v4.pcap"), readPackets(t, "v6.pcap")
		h.send(v4[:2]...) // pending
		h.send(v6[:2]...) // pending: evicts v4
		h.open(v6[0].Key, "v6")
		h.open(v4[0].Key, "v4")
		h.send(v6[2:]...)
		h.stop()
		if n := testutil.ToFloat64(h.m.PendingDropped.WithLabelValues("limit")); n != 1 {
			t.Errorf("pending dropped{limit} = %v, want 1", n)
		}
		if got := h.count("v6"); got != len(v6) {
			t.Errorf("v6 file has %d packets, want %d (the newest pending flow must survive)", got, len(v6))
		}
		if h.exists("v4") {
			t.Errorf("v4 saved without packets")
		}
	})
}

func TestPendingPacketsBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(c *Config) { c.PendingPackets = 3 })
		pkts := readPackets(t, "v4.pcap")
		h.send(pkts[:5]...)
		h.open(pkts[0].Key, "u")
		h.stop()
		if got := h.count("u"); got != 3 {
			t.Errorf("file has %d packets, want 3", got)
		}
		if n := testutil.ToFloat64(h.m.MissedPackets.WithLabelValues("uuidwait")); n != 2 {
			t.Errorf("missed{uuidwait} = %v, want 2", n)
		}
	})
}

func TestShutdownWaitsForSavers(t *testing.T) {
	// Every flow with a UUID is published when packets is closed, however
	// long its capture duration.
	h := newHarness(t, nil)
	var uuids []string
	for i, name := range []string{"v4.pcap", "v6.pcap", "large-ndt.pcap"} {
		pkts := readPackets(t, name)
		u := []string{"a", "b", "c"}[i]
		uuids = append(uuids, u)
		h.open(pkts[0].Key, u)
		h.send(pkts...)
	}
	h.stop()
	for _, u := range uuids {
		if !h.exists(u) {
			t.Errorf("flow %s not published at shutdown", u)
		}
	}
	if a, b := testutil.ToFloat64(h.m.SaversStarted), testutil.ToFloat64(h.m.SaversStopped); a != 3 || b != 3 {
		t.Errorf("savers started %v stopped %v, want 3 3", a, b)
	}
}

func TestPendingPacketsBoundedOverall(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, func(c *Config) { c.MaxPendingPackets = 4 })
		v4, v6 := readPackets(t, "v4.pcap"), readPackets(t, "v6.pcap")
		h.send(v4[:3]...)
		h.send(v6[:3]...) // only one fits in the overall budget
		h.open(v6[0].Key, "v6")
		h.open(v4[0].Key, "v4")
		h.send(v6[3:]...)
		h.stop()
		if got := h.count("v4"); got != 3 {
			t.Errorf("v4 file has %d packets, want 3", got)
		}
		// v6 got 1 pending packet, then everything after its UUID.
		if got, want := h.count("v6"), 1+len(v6)-3; got != want {
			t.Errorf("v6 file has %d packets, want %d", got, want)
		}
		if n := testutil.ToFloat64(h.m.MissedPackets.WithLabelValues("uuidwait")); n != 2 {
			t.Errorf("missed{uuidwait} = %v, want 2", n)
		}
	})
}

// TestOpensWaitingAtShutdownNameTheirFlows: Opens that the UUID source
// delivered before the shutdown, still waiting in the channel when packets
// closes, name their flows before the flows end.
func TestOpensWaitingAtShutdownNameTheirFlows(t *testing.T) {
	for range 20 { // the loop may or may not take the Open before the close
		m := metrics.New(prometheus.NewRegistry())
		dir := t.TempDir()
		d := New(Config{
			FlowTimeout: time.Hour,
			UUIDWait:    time.Hour,
			Savers:      saver.NewPool(saver.Config{Dir: dir, CaptureDuration: time.Hour, Metrics: m}),
			Metrics:     m,
		})
		pkts := readPackets(t, "v4.pcap")
		packets, events, done := make(chan *flow.Batch), make(chan Open, 1), make(chan struct{})
		go func() {
			d.Run(packets, events)
			close(done)
		}()
		b := flow.GetBatch()
		b.Packets = append(b.Packets, pkts...)
		packets <- b
		events <- Open{Key: pkts[0].Key, UUID: "late", Time: opened}
		close(packets)
		<-done
		if _, err := os.Stat(saver.DatePath(dir, "late", opened)); err != nil {
			t.Fatalf("flow named at shutdown not published: %v", err)
		}
	}
}
