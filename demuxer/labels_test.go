package demuxer

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m-lab/packet-headers/metrics"
)

// The original daemon's label values that the demuxer counts under: a flow
// that waits for its UUID is in the original's saver state uuidwait; one
// collected idle while it waits is the original's uuidchanclosed, one whose
// wait runs out its uuidtimedout.

func waitCounts(m *metrics.Metrics) (waiting, timedOut, chanClosed float64) {
	return testutil.ToFloat64(m.SaverCount.WithLabelValues("uuidwait")),
		testutil.ToFloat64(m.SaverErrors.WithLabelValues("uuidtimedout")),
		testutil.ToFloat64(m.SaverErrors.WithLabelValues("uuidchanclosed"))
}

func TestUUIDWaitState(t *testing.T) {
	d, m, _ := manualDemuxer(t, nil)
	v4, v6 := readPackets(t, "v4.pcap"), readPackets(t, "v6.pcap")
	d.Packet(v4[0])
	d.Packet(v6[0])
	if w, _, _ := waitCounts(m); w != 2 {
		t.Errorf("pcap_saver_states{state=uuidwait} = %v with two flows waiting, want 2", w)
	}
	d.Open(Open{Key: v4[0].Key, UUID: "u", Time: opened})
	if w, _, _ := waitCounts(m); w != 1 {
		t.Errorf("pcap_saver_states{state=uuidwait} = %v once one is named, want 1", w)
	}
	d.Flush()
	if w, to, cc := waitCounts(m); w != 0 || to != 1 || cc != 0 {
		t.Errorf("after shutdown: uuidwait %v, uuidtimedout %v, uuidchanclosed %v; want 0 1 0", w, to, cc)
	}
}

func TestUUIDChanClosed(t *testing.T) {
	// The flow goes idle for two collections before its UUID wait is over.
	d, m, _ := manualDemuxer(t, func(c *Config) {
		c.FlowTimeout = time.Second
		c.UUIDWait = time.Minute
	})
	v4 := readPackets(t, "v4.pcap")
	d.Packet(v4[0])
	d.GC() // the flow had a packet since the previous collection
	if w, to, cc := waitCounts(m); w != 1 || to != 0 || cc != 0 {
		t.Fatalf("after one GC: uuidwait %v, uuidtimedout %v, uuidchanclosed %v; want 1 0 0", w, to, cc)
	}
	d.GC()
	if w, to, cc := waitCounts(m); w != 0 || to != 0 || cc != 1 {
		t.Errorf("after the flow is collected: uuidwait %v, uuidtimedout %v, uuidchanclosed %v; want 0 0 1", w, to, cc)
	}
	// A wait that runs out outside a collection is still a time-out.
	d.Packet(v4[1])
	d.expirePending(d.clock(d.now().Add(2 * time.Minute)))
	if w, to, cc := waitCounts(m); w != 0 || to != 1 || cc != 1 {
		t.Errorf("after the second flow's wait ran out: uuidwait %v, uuidtimedout %v, uuidchanclosed %v; want 0 1 1", w, to, cc)
	}
	d.Flush()
}
