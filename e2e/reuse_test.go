package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/internal/netns"
	"github.com/m-lab/packet-headers/internal/replay"
)

// 4-tuple reuse (issue 9, DESIGN.md "Flow boundaries"): a client that
// aborts a connection with RST and connects again from the same port makes a
// new connection on the same 4-tuple. Each connection must have its own
// file, from its own handshake on, with none of another connection's
// packets.

const (
	tcpFlagSYN = 0x02
	tcpFlagACK = 0x10
)

// reuseAddr sets SO_REUSEADDR on a socket before it binds.
func reuseAddr(network, address string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	})
	return errors.Join(err, serr)
}

// dialFrom connects from the client namespace to addr from a fixed local
// address and port.
func dialFrom(t *testing.T, tp *topology, local *net.TCPAddr, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: local, Control: reuseAddr}
	var c net.Conn
	err := netns.Run(tp.clientNS, func() error {
		var err error
		c, err = d.Dial("tcp", addr)
		return err
	})
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, local, err)
	}
	return c
}

// tcpFlags returns a packet's TCP flags and whether it goes to server.
func tcpFlags(t *testing.T, p replay.Packet, server net.IP) (flags byte, toServer bool) {
	h, err := flow.Parse(p.Raw, flow.LinkEthernet)
	if err != nil || len(p.Raw) <= h.L4+13 {
		t.Fatalf("packet does not parse: %v", err)
	}
	_, dst := h.SrcDst(p.Raw)
	return p.Raw[h.L4+13], net.IP(dst).Equal(server)
}

// splitConnections splits the packets of one 4-tuple into connections, each
// starting at a SYN from the client.
func splitConnections(t *testing.T, pkts []replay.Packet, server string) [][]replay.Packet {
	sip := net.ParseIP(server)
	var out [][]replay.Packet
	for _, p := range pkts {
		flags, up := tcpFlags(t, p, sip)
		if up && flags&(tcpFlagSYN|tcpFlagACK) == tcpFlagSYN && (len(out) == 0 || len(out[len(out)-1]) > 1) {
			out = append(out, nil)
		}
		if len(out) == 0 {
			t.Fatalf("a packet before the first SYN")
		}
		out[len(out)-1] = append(out[len(out)-1], p)
	}
	return out
}

// checkOneConnection checks that a file holds one connection from its
// handshake on: a SYN from the client first, the server's SYN-ACK next, and
// no other SYN. (Whether the connection's RST and every other packet are
// there, compareFlow checks against the reference.)
func checkOneConnection(t *testing.T, name string, pkts []replay.Packet, server string) {
	t.Helper()
	sip := net.ParseIP(server)
	var syns, synacks int
	for i, p := range pkts {
		flags, up := tcpFlags(t, p, sip)
		switch {
		case flags&(tcpFlagSYN|tcpFlagACK) == tcpFlagSYN:
			syns++
			if i != 0 || !up {
				t.Errorf("%s: packet %d is a SYN (to the server: %v); a connection's SYN comes first", name, i, up)
			}
		case flags&(tcpFlagSYN|tcpFlagACK) == tcpFlagSYN|tcpFlagACK:
			synacks++
			if i != 1 || up {
				t.Errorf("%s: packet %d is a SYN-ACK (to the server: %v); a connection's SYN-ACK comes second", name, i, up)
			}
		}
	}
	if syns != 1 || synacks != 1 {
		t.Errorf("%s: %d SYNs and %d SYN-ACKs in %d packets; want one connection", name, syns, synacks, len(pkts))
	}
}

// reuseSeq is one client port reused for n connections, each aborted with
// RST, the next one gap later.
type reuseSeq struct {
	name  string
	v6    bool
	port  int
	n     int
	gap   time.Duration
	key   flow.Key
	uuids []string
}

// run makes the sequence's connections, each gap after the previous one's
// RST.
func (q *reuseSeq) run(t *testing.T, e *env) {
	local := &net.TCPAddr{IP: net.ParseIP(clientV4), Port: q.port}
	addr := e.server.ln4.Addr().String()
	if q.v6 {
		local.IP = net.ParseIP(clientV6)
		addr = e.server.ln6.Addr().String()
	}
	seen := map[uint64]bool{}
	for i := range q.n {
		if i > 0 {
			// The traffic's pattern: the next connection comes gap
			// after the previous one's RST.
			<-time.After(q.gap)
		}
		q.connect(t, e, i, local, addr, seen)
	}
}

// connect makes connection i of the sequence: it writes a message, waits
// until the daemon's UUID source has named it, writes four more 20 ms apart
// and aborts with RST.
func (q *reuseSeq) connect(t *testing.T, e *env, i int, local *net.TCPAddr, addr string, seen map[uint64]bool) {
	msg := bytes.Repeat([]byte("U"), sweepMsgLen)
	named := e.metric(e.namedMetric())
	c := dialFrom(t, e.tp, local, addr)
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	q.key = flow.KeyFromAddrPorts(c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort())
	q.uuids = append(q.uuids, e.server.newUUIDOf(t, c.LocalAddr().String(), seen))
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if !e.waitMetric(e.namedMetric(), named+1, 3*time.Second) {
		t.Logf("%s: connection %d (%s) not named by the UUID source within 3s", q.name, i+1, q.uuids[i])
	}
	tk := time.NewTicker(20 * time.Millisecond)
	defer tk.Stop()
	for range 4 {
		<-tk.C
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
	}
	// Abort: SO_LINGER 0 makes close send RST and leave no TIME_WAIT, so
	// the port can be bound again at once.
	if err := c.(*net.TCPConn).SetLinger(0); err != nil {
		t.Fatal(err)
	}
	c.Close()
}

// TestReuse4Tuple: beside tcp-info, a client port reused three times, tens
// of milliseconds and one second after an RST, gives three files per
// 4-tuple, each one connection with all its packets.
func TestReuse4Tuple(t *testing.T) { reuse4Tuple(t) }

// TestReuse4TupleStandalone is TestReuse4Tuple with the built-in UUID
// source.
func TestReuse4TupleStandalone(t *testing.T) { reuse4Tuple(t, standaloneArg) }

func reuse4Tuple(t *testing.T, extra ...string) {
	e := newEnv(t, append([]string{fmt.Sprintf("-flowtimeout=%v", sweepFlowTimeout)}, extra...)...)
	seqs := []*reuseSeq{
		{name: "v4, 30 ms after RST", port: 20001, n: 3, gap: 30 * time.Millisecond},
		{name: "v6, 30 ms after RST", v6: true, port: 20001, n: 3, gap: 30 * time.Millisecond},
		// Within one flow timeout: the old flow is still in the table.
		{name: "v4, 1 s after RST", port: 20002, n: 3, gap: time.Second},
	}
	start := time.Now()
	var uuids []string
	for _, q := range seqs {
		q.run(t, e)
		uuids = append(uuids, q.uuids...)
	}
	t.Logf("traffic took %v", time.Since(start))
	found := e.findFiles(uuids, 2*sweepFlowTimeout+10*time.Second)
	metrics := e.pcapMetrics()
	ref := e.stopReference()
	for _, q := range seqs {
		server := serverAddrOf(conn{key: q.key})
		conns := splitConnections(t, ref[q.key], server)
		if len(conns) != q.n {
			t.Errorf("%s: the reference holds %d connections on %s, want %d", q.name, len(conns), q.key, q.n)
			continue
		}
		for i, u := range q.uuids {
			name := fmt.Sprintf("%s: connection %d (%s)", q.name, i+1, u)
			path, ok := found[u]
			if !ok {
				t.Errorf("%s: no file; the reference has %d packets", name, len(conns[i]))
				continue
			}
			got, _, err := replay.ReadFile(path)
			if err != nil {
				t.Errorf("%s: %v", name, err)
				continue
			}
			t.Logf("%s: %d packets in the file, %d in the reference", name, len(got), len(conns[i]))
			checkOneConnection(t, name, got, server)
			compareFlow(t, path, conns[i], server, false)
		}
	}
	if n, want := len(e.files()), len(uuids); n != want {
		t.Errorf("%d files for %d connections: %v", n, want, e.files())
	}
	if t.Failed() {
		t.Logf("daemon metrics:\n%s", metrics)
	}
}
