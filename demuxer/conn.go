package demuxer

import (
	"encoding/binary"
	"time"

	"github.com/m-lab/packet-headers/flow"
)

// 4-tuple reuse (DESIGN.md, "Flow boundaries"): a new connection on a
// 4-tuple whose old flow is still in the table gets its own flow, and so its
// own file, from its own handshake on. The demuxer follows each connection's
// handshake and end in its entry (conn) and takes as the start of a new
// connection:
//
//   - a SYN without ACK after a RST or FIN, or with another initial sequence
//     number than the connection's SYN, or acknowledged otherwise than by
//     the connection's SYN-ACK, or on a connection whose handshake was not
//     seen (the old one started before the capture or went unseen);
//   - a SYN-ACK with another initial sequence number than the connection's
//     SYN-ACK, or acknowledging another SYN than the connection's, or after
//     a RST or FIN of a connection whose SYN-ACK was not seen.
//
// A SYN or SYN-ACK retransmitted with the same sequence number is the same
// connection, and so are the other side's SYN and SYN-ACK of a simultaneous
// open. At the start of a new connection the old flow ends (its saver
// publishes, as when it is collected) or, still without a UUID, waits on for
// it aside until its deadline; the new one starts with that packet.
//
// Which connection an Open names is decided from the order of events and
// their times: the Open's (when tcp-info saw the socket, so within its life)
// and the packets' capture timestamps, both from the host's real-time clock.
// An Open whose UUID the 4-tuple's flow does not have:
//
//   - if it is dated before the flow's connection started, names the earlier
//     connection it is of, if that still waits for its UUID (if that has
//     ended, the Open counts as a UUID without packets); if no earlier
//     connection is known, it names the flow's connection if that has no
//     UUID yet (its first SYN may have gone uncaptured), and otherwise counts
//     as a UUID without packets;
//   - names the flow's connection if that has no UUID yet and was not refused
//     (a SYN answered by RST has no socket for tcp-info to see);
//   - otherwise waits, with the flow, for the next connection's first packet
//     (the Open of a new connection often arrives before its SYN, which
//     capture hands on up to a few hundred milliseconds later).
//
// When several Opens wait for a connection's first packet, a SYN takes the
// oldest one dated after it (the sockets dated before it were there before
// it, so they are earlier connections whose packets were not seen), or the
// newest if none is; another packet takes the newest one dated before it, or
// the oldest if none is.
//
// An Open dated after its socket's end (the standalone source dates the Open
// of a socket it learns of from its destroy notification when it reads that)
// is taken for a later connection's when the 4-tuple is reused before it
// arrives.

// TCP header flags (byte 13 of the TCP header).
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

// timeSlack absorbs the difference between when tcp-info dates a socket and
// when the capture dates its packets: tcp-info names an outgoing connection
// in SYN_SENT, possibly microseconds before its SYN is captured.
const timeSlack = int64(time.Millisecond)

// conn is what the demuxer knows of one connection of a flow.
type conn struct {
	// start is the capture time of the connection's first packet if that
	// was a SYN or SYN-ACK, else 0 (the connection's start was not seen).
	start     int64
	synSeq    uint32 // the SYN's sequence number (the client's ISN)
	synAckSeq uint32 // the SYN-ACK's sequence number (the server's ISN)
	synAckAck uint32 // the SYN-ACK's acknowledgment number
	synPort   uint16 // the SYN's source port
	flags     uint8
}

// conn.flags.
const (
	connSeen   = 1 << iota // a packet of the connection has arrived
	connSYN                // synSeq is set
	connSYNACK             // synAckSeq and synAckAck are set
	connRST                // a RST has been seen
	connFIN                // a FIN has been seen
	connBoth               // a simultaneous open: both sides sent SYN-ACKs
)

// tcpFlags returns the TCP flags of p, or 0 if its bytes end before them.
func tcpFlags(p *flow.Packet) byte {
	if i := int(p.L4) + 13; i < len(p.Data) {
		return p.Data[i]
	}
	return 0
}

// tcpHdr is what the demuxer reads of a packet's TCP header.
type tcpHdr struct {
	flags    byte
	srcPort  uint16
	seq, ack uint32
}

// readTCP reads p's TCP header (zeros if p's bytes end before its fixed
// part, which the parser does not let happen).
func readTCP(p *flow.Packet, flags byte) tcpHdr {
	l4 := int(p.L4)
	if len(p.Data) < l4+12 {
		return tcpHdr{flags: flags}
	}
	b := p.Data[l4:]
	return tcpHdr{
		flags:   flags,
		srcPort: binary.BigEndian.Uint16(b),
		seq:     binary.BigEndian.Uint32(b[4:]),
		ack:     binary.BigEndian.Uint32(b[8:]),
	}
}

// startsNew reports whether the TCP header s starts a new connection on the
// 4-tuple of c, which has had packets.
func (c *conn) startsNew(s tcpHdr) bool {
	if c.flags&connSeen == 0 {
		return false
	}
	ended := c.flags&(connRST|connFIN) != 0
	switch s.flags & (tcpSYN | tcpACK | tcpRST) {
	case tcpSYN:
		switch {
		case ended:
			return true
		case c.flags&connSYN != 0:
			// A retransmission, or the other side's SYN of a
			// simultaneous open.
			return s.seq != c.synSeq && (s.srcPort == c.synPort || c.flags&connSYNACK != 0)
		case c.flags&connSYNACK != 0:
			return c.synAckAck != s.seq+1
		default:
			return true
		}
	case tcpSYN | tcpACK:
		switch {
		case c.flags&connSYNACK != 0:
			// A retransmission, or the other side's SYN-ACK of a
			// simultaneous open, which acknowledges the first one's.
			both := c.flags&connBoth != 0 || c.flags&connSYN != 0 && s.srcPort == c.synPort
			return s.seq != c.synAckSeq && !(both && s.ack == c.synAckSeq+1)
		case c.flags&connSYN != 0:
			// Acknowledging the connection's SYN, unless it comes
			// from the SYN's side (a simultaneous open).
			return s.srcPort != c.synPort && s.ack != c.synSeq+1
		default:
			return ended
		}
	}
	return false
}

// record takes note of a packet of the connection, with TCP header s,
// captured at t.
func (c *conn) record(s tcpHdr, t int64) {
	if c.flags&connSeen == 0 {
		c.flags |= connSeen
		if s.flags&tcpSYN != 0 {
			c.start = t
		}
	}
	switch s.flags & (tcpSYN | tcpACK | tcpRST) {
	case tcpSYN:
		if c.flags&connSYN == 0 {
			c.flags |= connSYN
			c.synSeq, c.synPort = s.seq, s.srcPort
		}
	case tcpSYN | tcpACK:
		if c.flags&connSYNACK == 0 {
			c.flags |= connSYNACK
			c.synAckSeq, c.synAckAck = s.seq, s.ack
			if c.flags&connSYN != 0 && s.srcPort == c.synPort {
				c.flags |= connBoth // from the SYN's side
			}
		}
	}
	if s.flags&tcpRST != 0 {
		c.flags |= connRST
	}
	if s.flags&tcpFIN != 0 {
		c.flags |= connFIN
	}
}

// refused reports whether the connection's SYN was answered by a RST: it
// never had an established socket, so no Open names it.
func (c *conn) refused() bool {
	return c.flags&(connSYN|connSYNACK|connRST) == connSYN|connRST
}

// before reports whether an Open dated t is of a socket seen before the
// connection started.
func (c *conn) before(t time.Time) bool {
	return c.start != 0 && !t.IsZero() && t.UnixNano() < c.start-timeSlack
}

// pickIndex chooses, among n Opens that arrived for a 4-tuple before the
// first packet of a connection (time(i) is the i-th's date, in arrival
// order), the one naming the connection. The packet is captured at t and
// is a SYN or SYN-ACK if start.
func pickIndex(n int, time func(int) time.Time, t int64, start bool) int {
	if start {
		// The oldest socket seen after the SYN; the ones seen before
		// it were there before it.
		for i := range n {
			if at := time(i); at.IsZero() || at.UnixNano() >= t-timeSlack {
				return i
			}
		}
		// The SYN is later than all of them (its first copy was not
		// captured, say): the newest.
		return n - 1
	}
	// The newest socket seen before the packet; the older ones had ended
	// by then.
	for i := n - 1; i >= 0; i-- {
		if at := time(i); at.IsZero() || at.UnixNano() <= t+timeSlack {
			return i
		}
	}
	return 0
}
