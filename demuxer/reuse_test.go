package demuxer

import (
	"encoding/binary"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/internal/replay"
	"github.com/m-lab/packet-headers/saver"
)

// TCP flags.
const (
	fin = 0x01
	syn = 0x02
	rst = 0x04
	psh = 0x08
	ack = 0x10
)

// The 4-tuple that the tests of this file reuse: client 198.18.0.2:40000,
// server 198.18.0.1:443.
const (
	clientIP   = 0xC6120002
	serverIP   = 0xC6120001
	clientPort = 40000
	serverPort = 443
)

// segment builds one packet of the reused 4-tuple, captured at ns
// nanoseconds since the epoch.
func segment(t testing.TB, fromClient bool, flags byte, seq, ackn uint32, ns int64) flow.Packet {
	t.Helper()
	raw := tcpFrame(flags)
	src, dst, sp, dp := uint32(clientIP), uint32(serverIP), uint16(clientPort), uint16(serverPort)
	if !fromClient {
		src, dst, sp, dp = dst, src, dp, sp
	}
	binary.BigEndian.PutUint32(raw[14+12:], src)
	binary.BigEndian.PutUint32(raw[14+16:], dst)
	binary.BigEndian.PutUint16(raw[34:], sp)
	binary.BigEndian.PutUint16(raw[36:], dp)
	binary.BigEndian.PutUint32(raw[38:], seq)
	binary.BigEndian.PutUint32(raw[42:], ackn)
	var b flow.Builder
	p, _, err := b.Build(raw, flow.LinkEthernet, ns, len(raw))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// tcpConn is one connection on the reused 4-tuple.
type tcpConn struct {
	uuid string
	pkts []flow.Packet
	// want describes each packet ("time bytes"), taken before the packets
	// are handed over (a saver owns their bytes then).
	want []string
}

// newConn builds a connection whose client and server ISNs are cisn and
// sisn, starting at ns: handshake, a request and its ACK, then the end:
// "rst" (the client aborts), "fin" (both close), "refused" (the server
// answers the SYN with RST) or "" (the connection goes quiet). Packets are
// 100 µs apart.
func newConn(t testing.TB, uuid string, cisn, sisn uint32, ns int64, end string) *tcpConn {
	c := &tcpConn{uuid: uuid}
	add := func(fromClient bool, flags byte, seq, ackn uint32) {
		c.pkts = append(c.pkts, segment(t, fromClient, flags, seq, ackn, ns))
		ns += int64(100 * time.Microsecond)
	}
	add(true, syn, cisn, 0)
	if end == "refused" {
		add(false, rst|ack, 0, cisn+1)
		c.describe()
		return c
	}
	add(false, syn|ack, sisn, cisn+1)
	add(true, ack, cisn+1, sisn+1)
	add(true, psh|ack, cisn+1, sisn+1)
	add(false, ack, sisn+1, cisn+101)
	switch end {
	case "rst":
		add(true, rst, cisn+101, 0)
	case "fin":
		add(true, fin|ack, cisn+101, sisn+1)
		add(false, fin|ack, sisn+1, cisn+102)
		add(true, ack, cisn+102, sisn+2)
	}
	c.describe()
	return c
}

func (c *tcpConn) describe() {
	c.want = c.want[:0]
	for _, p := range c.pkts {
		c.want = append(c.want, fmt.Sprintf("%d %x", p.Time, p.Data))
	}
}

// open is the connection's Open event, dated as tcp-info dates it: once
// the connection is established (50 µs after its third packet).
func (c *tcpConn) open() Open {
	return Open{Key: c.pkts[0].Key, UUID: c.uuid, Time: time.Unix(0, c.pkts[min(2, len(c.pkts)-1)].Time+int64(50*time.Microsecond))}
}

// feed hands packets to the demuxer as Run does with a batch.
func feed(d *Demuxer, pkts ...flow.Packet) {
	for _, p := range pkts {
		d.Packet(p)
	}
	d.WakeSavers()
}

// records describes the packets of a published file, or returns nil if there
// is no file.
func records(t *testing.T, dir, uuid string) []string {
	t.Helper()
	pkts, _, err := replay.ReadFile(saver.DatePath(dir, uuid, opened))
	if err != nil {
		return nil
	}
	var out []string
	for _, p := range pkts {
		out = append(out, fmt.Sprintf("%d %x", p.Time, p.Raw))
	}
	return out
}

// checkFiles checks that each connection's file holds exactly its packets,
// from its own SYN on.
func checkFiles(t *testing.T, dir string, conns ...*tcpConn) {
	t.Helper()
	for _, c := range conns {
		got := records(t, dir, c.uuid)
		if len(got) != len(c.want) {
			t.Errorf("file %s has %d packets, want %d", c.uuid, len(got), len(c.want))
		}
		for i := range min(len(got), len(c.want)) {
			if got[i] != c.want[i] {
				t.Errorf("file %s, packet %d:\n got %s\nwant %s", c.uuid, i, got[i], c.want[i])
				break
			}
		}
	}
}

// base is the capture time of the first packet of the tests here, on the
// day the files are dated by.
var base = opened.UnixNano()

const ms = int64(time.Millisecond)

// TestReuseFast: a client talks, aborts with RST and reconnects from the same
// port 2 ms later, three times. Each connection gets its own file with its
// own handshake, whatever the order in which its Open and its packets reach
// the demuxer.
func TestReuseFast(t *testing.T) {
	orders := []struct {
		name string
		// run drives the demuxer through the three connections.
		run func(d *Demuxer, cs []*tcpConn)
	}{
		{"open after the handshake", func(d *Demuxer, cs []*tcpConn) {
			for _, c := range cs {
				feed(d, c.pkts[:3]...)
				d.Open(c.open())
				feed(d, c.pkts[3:]...)
			}
		}},
		{"open before the SYN", func(d *Demuxer, cs []*tcpConn) {
			for _, c := range cs {
				d.Open(c.open())
				feed(d, c.pkts...)
			}
		}},
		{"open before the old connection's last packets", func(d *Demuxer, cs []*tcpConn) {
			d.Open(cs[0].open())
			for i, c := range cs {
				feed(d, c.pkts[:4]...)
				if i+1 < len(cs) {
					d.Open(cs[i+1].open())
				}
				feed(d, c.pkts[4:]...)
			}
		}},
		{"all opens before the first packet", func(d *Demuxer, cs []*tcpConn) {
			// The capture delay is longer than the three connections.
			for _, c := range cs {
				d.Open(c.open())
			}
			for _, c := range cs {
				feed(d, c.pkts...)
			}
		}},
		{"all opens after the last packet", func(d *Demuxer, cs []*tcpConn) {
			for _, c := range cs {
				feed(d, c.pkts...)
			}
			for _, c := range cs {
				d.Open(c.open())
			}
		}},
		{"each open after the next SYN", func(d *Demuxer, cs []*tcpConn) {
			feed(d, cs[0].pkts...)
			for i := 1; i < len(cs); i++ {
				feed(d, cs[i].pkts[0])
				d.Open(cs[i-1].open())
				feed(d, cs[i].pkts[1:]...)
			}
			d.Open(cs[len(cs)-1].open())
		}},
	}
	for _, o := range orders {
		t.Run(o.name, func(t *testing.T) {
			d, m, dir := manualDemuxer(t, nil)
			var cs []*tcpConn
			ns := base
			for i := range 3 {
				c := newConn(t, fmt.Sprintf("fast%d", i), uint32(1000+1_000_000*i), uint32(7_000_000+1000*i), ns, "rst")
				cs = append(cs, c)
				ns = c.pkts[len(c.pkts)-1].Time + 2*ms
			}
			o.run(d, cs)
			if len(d.flows) != 1 || d.npending != 0 {
				t.Errorf("%d flows in the table, %d pending; want the last connection only, none pending", len(d.flows), d.npending)
			}
			d.Flush()
			checkFiles(t, dir, cs...)
			if n := testutil.ToFloat64(m.FilesPublished); n != 3 {
				t.Errorf("%v files published, want 3", n)
			}
		})
	}
}

// TestReuseSlow: the first connection goes quiet without a FIN or RST seen
// (its end was not captured); a new SYN on its 4-tuple, with another ISN,
// comes after one GC, before the old flow is collected.
func TestReuseSlow(t *testing.T) {
	d, _, dir := manualDemuxer(t, nil)
	c1 := newConn(t, "slow1", 1000, 2000, base, "")
	c2 := newConn(t, "slow2", 500_000, 900_000, base+20*int64(time.Second), "fin")
	feed(d, c1.pkts[:3]...)
	d.Open(c1.open())
	feed(d, c1.pkts[3:]...)
	d.GC() // c1 had packets in this generation: it stays
	feed(d, c2.pkts[:3]...)
	d.Open(c2.open())
	feed(d, c2.pkts[3:]...)
	d.Flush()
	checkFiles(t, dir, c1, c2)
}

// TestReusePastCaptureDuration: the old flow's saver has stopped saving
// (its capture duration is over, by the packets' timestamps) but the flow
// is still in the table when the 4-tuple is reused.
func TestReusePastCaptureDuration(t *testing.T) {
	d, _, dir := manualDemuxer(t, func(c *Config) { c.Savers.(*saver.Pool).CaptureDuration = time.Minute })
	c1 := newConn(t, "long1", 1000, 2000, base, "")
	// Two more packets, 30 s and 90 s in, then the FIN exchange.
	sec := int64(time.Second)
	c1.pkts = append(c1.pkts,
		segment(t, true, ack, 1101, 2001, base+30*sec),
		segment(t, true, ack, 1101, 2001, base+90*sec),
		segment(t, true, fin|ack, 1101, 2001, base+100*sec),
		segment(t, false, fin|ack, 2001, 1102, base+100*sec+ms),
		segment(t, true, ack, 1102, 2002, base+100*sec+2*ms))
	c1.describe()
	c2 := newConn(t, "long2", 3_000_000, 4_000_000, base+101*sec, "fin")
	feed(d, c1.pkts[:3]...)
	d.Open(c1.open())
	feed(d, c1.pkts[3:]...)
	feed(d, c2.pkts[:3]...)
	d.Open(c2.open())
	feed(d, c2.pkts[3:]...)
	d.Flush()
	c1.want = c1.want[:6] // the first minute
	checkFiles(t, dir, c1, c2)
}

// TestRetransmittedSYNsDoNotSplit: a SYN retransmitted with the same ISN,
// and a SYN-ACK retransmitted with the same ISN, belong to the connection,
// on a fresh 4-tuple and on a reused one.
func TestRetransmittedSYNsDoNotSplit(t *testing.T) {
	withRetransmits := func(uuid string, cisn, sisn uint32, ns int64) *tcpConn {
		c := &tcpConn{uuid: uuid}
		sec := int64(time.Second)
		c.pkts = []flow.Packet{
			segment(t, true, syn, cisn, 0, ns),
			segment(t, true, syn, cisn, 0, ns+sec), // retransmitted
			segment(t, false, syn|ack, sisn, cisn+1, ns+sec+ms),
			segment(t, true, syn, cisn, 0, ns+sec+2*ms), // crossed the SYN-ACK
			segment(t, false, syn|ack, sisn, cisn+1, ns+sec+3*ms),
			segment(t, true, ack, cisn+1, sisn+1, ns+sec+4*ms),
			segment(t, true, psh|ack, cisn+1, sisn+1, ns+sec+5*ms),
			segment(t, false, ack, sisn+1, cisn+101, ns+sec+6*ms),
		}
		c.describe()
		return c
	}
	t.Run("fresh", func(t *testing.T) {
		d, m, dir := manualDemuxer(t, nil)
		c := withRetransmits("retx", 1000, 2000, base)
		feed(d, c.pkts[:6]...)
		d.Open(Open{Key: c.pkts[0].Key, UUID: c.uuid, Time: time.Unix(0, c.pkts[5].Time+ms)})
		feed(d, c.pkts[6:]...)
		if len(d.flows) != 1 || d.npending != 0 {
			t.Errorf("%d flows, %d pending; want 1, 0", len(d.flows), d.npending)
		}
		d.Flush()
		checkFiles(t, dir, c)
		if n := testutil.ToFloat64(m.PendingDropped.WithLabelValues("uuidtimeout")); n != 0 {
			t.Errorf("%v pending flows dropped", n)
		}
	})
	t.Run("simultaneous open", func(t *testing.T) {
		d, _, dir := manualDemuxer(t, nil)
		c := &tcpConn{uuid: "simultaneous"}
		c.pkts = []flow.Packet{
			segment(t, true, syn, 1000, 0, base),
			segment(t, false, syn, 2000, 0, base+ms),
			segment(t, true, syn|ack, 1000, 2001, base+2*ms),
			segment(t, false, syn|ack, 2000, 1001, base+3*ms),
			segment(t, true, psh|ack, 1001, 2001, base+4*ms),
		}
		c.describe()
		feed(d, c.pkts...)
		d.Open(Open{Key: c.pkts[0].Key, UUID: c.uuid, Time: time.Unix(0, base+5*ms)})
		if d.npending != 0 {
			t.Errorf("%d flows pending, want 0", d.npending)
		}
		d.Flush()
		checkFiles(t, dir, c)
	})
	t.Run("reused", func(t *testing.T) {
		d, _, dir := manualDemuxer(t, nil)
		c1 := newConn(t, "retx1", 1000, 2000, base, "rst")
		c2 := withRetransmits("retx2", 50_000, 60_000, base+5*ms)
		feed(d, c1.pkts[:3]...)
		d.Open(c1.open())
		feed(d, c1.pkts[3:]...)
		feed(d, c2.pkts[:6]...)
		d.Open(Open{Key: c2.pkts[0].Key, UUID: c2.uuid, Time: time.Unix(0, c2.pkts[5].Time+ms)})
		feed(d, c2.pkts[6:]...)
		d.Flush()
		checkFiles(t, dir, c1, c2)
	})
}

// TestLateOpenOfOldUUID: an Open of the old connection's UUID that arrives
// after the new connection started (a duplicate, or the first one, late)
// does not take the new connection's packets.
func TestLateOpenOfOldUUID(t *testing.T) {
	t.Run("duplicate", func(t *testing.T) {
		d, _, dir := manualDemuxer(t, nil)
		c1 := newConn(t, "old", 1000, 2000, base, "rst")
		c2 := newConn(t, "new", 90_000, 80_000, base+3*ms, "fin")
		feed(d, c1.pkts[:3]...)
		d.Open(c1.open())
		feed(d, c1.pkts[3:]...)
		feed(d, c2.pkts[:2]...)
		d.Open(c1.open()) // again
		feed(d, c2.pkts[2:4]...)
		d.Open(c2.open())
		feed(d, c2.pkts[4:]...)
		d.Flush()
		checkFiles(t, dir, c1, c2)
	})
	t.Run("first, late", func(t *testing.T) {
		d, _, dir := manualDemuxer(t, nil)
		c1 := newConn(t, "old", 1000, 2000, base, "rst")
		c2 := newConn(t, "new", 90_000, 80_000, base+3*ms, "fin")
		feed(d, c1.pkts...)
		feed(d, c2.pkts[:4]...)
		if d.npending != 2 {
			t.Fatalf("%d flows pending, want the two connections", d.npending)
		}
		d.Open(c1.open())
		if d.npending != 1 || !d.flows[c2.pkts[0].Key].pending {
			t.Errorf("after the old connection's Open: %d pending, the new connection pending: %v; want 1, true", d.npending, d.flows[c2.pkts[0].Key].pending)
		}
		feed(d, c2.pkts[4:]...)
		d.Open(c2.open())
		d.Flush()
		checkFiles(t, dir, c1, c2)
	})
}

// TestReuseAfterRefusedConnection: a connection refused with RST never gets
// a UUID; the UUID that arrives after it is the next connection's.
func TestReuseAfterRefusedConnection(t *testing.T) {
	d, m, dir := manualDemuxer(t, nil)
	c1 := newConn(t, "refused", 1000, 0, base, "refused")
	c2 := newConn(t, "accepted", 40_000, 50_000, base+10*ms, "fin")
	feed(d, c1.pkts...)
	d.Open(c2.open()) // before c2's packets reach the demuxer
	feed(d, c2.pkts...)
	if d.npending != 1 {
		t.Errorf("%d pending flows, want the refused one", d.npending)
	}
	d.Flush()
	checkFiles(t, dir, c2)
	if got := records(t, dir, c1.uuid); got != nil {
		t.Errorf("the refused connection has a file: %q", got)
	}
	if n := testutil.ToFloat64(m.PendingDropped.WithLabelValues("uuidtimeout")); n != 1 {
		t.Errorf("%v pending flows dropped, want the refused one", n)
	}
}

// TestReuseSYNACKStartsNewConnection: the new connection's SYN was not
// captured; its SYN-ACK, with another ISN than the old connection's, starts
// it.
func TestReuseSYNACKStartsNewConnection(t *testing.T) {
	d, _, dir := manualDemuxer(t, nil)
	c1 := newConn(t, "before", 1000, 2000, base, "")
	c2 := newConn(t, "after", 70_000, 80_000, base+5*ms, "rst")
	c2.pkts = c2.pkts[1:] // lost
	c2.describe()
	feed(d, c1.pkts[:3]...)
	d.Open(c1.open())
	feed(d, c1.pkts[3:]...)
	feed(d, c2.pkts[:2]...)
	d.Open(c2.open())
	feed(d, c2.pkts[2:]...)
	d.Flush()
	checkFiles(t, dir, c1, c2)
}

// TestQueuedOpenOutlivesIdleFlow: an Open for the next connection on a
// 4-tuple waits in the old flow; when that is collected, the Open waits on
// for the next connection's first packet, as an Open that came before any
// packet.
func TestQueuedOpenOutlivesIdleFlow(t *testing.T) {
	d, m, dir := manualDemuxer(t, nil)
	c1 := newConn(t, "idle", 1000, 2000, base, "fin")
	c2 := newConn(t, "next", 90_000, 80_000, base+90*int64(time.Second), "fin")
	feed(d, c1.pkts[:3]...)
	d.Open(c1.open())
	feed(d, c1.pkts[3:]...)
	d.Open(c2.open())
	d.GC()
	d.GC() // c1 is collected; c2's Open stays
	if len(d.flows) != 1 {
		t.Fatalf("%d flows in the table, want the one named by the waiting Open", len(d.flows))
	}
	if n := testutil.ToFloat64(m.DemuxerSaversGCed); n != 1 {
		t.Errorf("%v flows collected, want 1", n)
	}
	feed(d, c2.pkts...)
	d.Flush()
	checkFiles(t, dir, c1, c2)
}

// TestOpenDatedBeforeTheConnection: an Open dated before the flow's
// connection started is of an earlier connection on the 4-tuple.
func TestOpenDatedBeforeTheConnection(t *testing.T) {
	t.Run("no earlier connection known, flow unnamed", func(t *testing.T) {
		// The connection's first SYN was not captured, its retransmission
		// a second later was: its socket was seen before that one.
		d, _, dir := manualDemuxer(t, nil)
		c := newConn(t, "retx", 1000, 2000, base+int64(time.Second), "fin")
		feed(d, c.pkts...)
		d.Open(Open{Key: c.pkts[0].Key, UUID: c.uuid, Time: time.Unix(0, base)})
		d.Flush()
		checkFiles(t, dir, c)
	})
	t.Run("no earlier connection known, flow named", func(t *testing.T) {
		d, m, dir := manualDemuxer(t, nil)
		c1 := newConn(t, "one", 1000, 2000, base+10*ms, "fin")
		c2 := newConn(t, "two", 5000, 6000, base+20*ms, "fin")
		feed(d, c1.pkts[:3]...)
		d.Open(c1.open())
		feed(d, c1.pkts[3:]...)
		d.Open(Open{Key: c1.pkts[0].Key, UUID: "stale", Time: time.Unix(0, base)})
		feed(d, c2.pkts...) // not named by the stale Open
		if d.npending != 1 {
			t.Errorf("%d flows pending, want the second connection", d.npending)
		}
		d.Flush()
		checkFiles(t, dir, c1)
		if got := records(t, dir, "stale"); got != nil {
			t.Errorf("the stale Open named a connection: %d packets", len(got))
		}
		if n := testutil.ToFloat64(m.SaverErrors.WithLabelValues("nopackets")); n != 1 {
			t.Errorf("nopackets errors %v, want 1 (the stale Open)", n)
		}
	})
	t.Run("earlier connection dropped at its deadline", func(t *testing.T) {
		d, m, _ := manualDemuxer(t, func(c *Config) { c.UUIDWait = 5 * time.Second })
		var now time.Duration
		fakeClock(d, &now)
		c1 := newConn(t, "one", 1000, 2000, base, "rst")
		c2 := newConn(t, "two", 5000, 6000, base+4*int64(time.Second), "")
		feed(d, c1.pkts...)
		now = 4 * time.Second
		feed(d, c2.pkts...)
		now = 5 * time.Second
		d.expirePending(d.clock(d.now())) // c1's wait is over
		if d.npending != 1 {
			t.Fatalf("%d flows pending, want the second connection", d.npending)
		}
		d.Open(c1.open()) // too late for c1; not c2's
		if d.npending != 1 {
			t.Errorf("the first connection's late Open named the second connection")
		}
		if n := testutil.ToFloat64(m.SaverErrors.WithLabelValues("nopackets")); n != 1 {
			t.Errorf("nopackets errors %v, want 1 (the late Open)", n)
		}
		d.Flush()
	})
}

// TestOpensQueueBounded: at most maxQueued Opens wait for later
// connections on a 4-tuple; beyond that the oldest is counted as a UUID
// without packets and forgotten.
func TestOpensQueueBounded(t *testing.T) {
	d, m, dir := manualDemuxer(t, nil)
	c := newConn(t, "last", 1000, 2000, base+time.Hour.Nanoseconds(), "fin")
	k := c.pkts[0].Key
	for i := range maxQueued + 2 {
		d.Open(Open{Key: k, UUID: fmt.Sprintf("early%d", i), Time: time.Unix(0, base+int64(i))})
	}
	d.Open(c.open())
	// The first is the entry's name and maxQueued wait behind it: the two
	// oldest of those are dropped. At the SYN, all but the last, dated
	// before it, are taken for connections whose packets were not seen.
	if n := testutil.ToFloat64(m.SaverErrors.WithLabelValues("nopackets")); n != 2 {
		t.Errorf("nopackets errors %v after the Opens, want 2", n)
	}
	feed(d, c.pkts...)
	if n := testutil.ToFloat64(m.SaverErrors.WithLabelValues("nopackets")); n != maxQueued+2 {
		t.Errorf("nopackets errors %v after the SYN, want %d", n, maxQueued+2)
	}
	d.Flush()
	checkFiles(t, dir, c)
}
