package demuxer

import "testing"

// TestConnStartsNew walks the rules that tell a new connection on a 4-tuple
// from the packets of the connection already there.
func TestConnStartsNew(t *testing.T) {
	const a, b = 40000, 443 // the two sides' ports
	hdr := func(port uint16, flags byte, seq, ack uint32) tcpHdr {
		return tcpHdr{flags: flags, srcPort: port, seq: seq, ack: ack}
	}
	tests := []struct {
		name   string
		before []tcpHdr // the connection's packets so far
		next   tcpHdr
		want   bool
	}{
		{"first packet", nil, hdr(a, tcpSYN, 1, 0), false},
		{"SYN retransmitted", []tcpHdr{hdr(a, tcpSYN, 1, 0)}, hdr(a, tcpSYN, 1, 0), false},
		{"SYN with another ISN", []tcpHdr{hdr(a, tcpSYN, 1, 0)}, hdr(a, tcpSYN, 9, 0), true},
		{"SYN-ACK of the SYN", []tcpHdr{hdr(a, tcpSYN, 1, 0)}, hdr(b, tcpSYN|tcpACK, 5, 2), false},
		{"SYN-ACK of another SYN", []tcpHdr{hdr(a, tcpSYN, 1, 0)}, hdr(b, tcpSYN|tcpACK, 5, 10), true},
		{"SYN-ACK retransmitted", []tcpHdr{hdr(a, tcpSYN, 1, 0), hdr(b, tcpSYN|tcpACK, 5, 2)}, hdr(b, tcpSYN|tcpACK, 5, 2), false},
		{"SYN-ACK with another ISN", []tcpHdr{hdr(a, tcpSYN, 1, 0), hdr(b, tcpSYN|tcpACK, 5, 2)}, hdr(b, tcpSYN|tcpACK, 6, 2), true},
		{"SYN retransmitted after the SYN-ACK", []tcpHdr{hdr(a, tcpSYN, 1, 0), hdr(b, tcpSYN|tcpACK, 5, 2)}, hdr(a, tcpSYN, 1, 0), false},
		{"SYN after RST, same ISN", []tcpHdr{hdr(a, tcpSYN, 1, 0), hdr(a, tcpRST, 2, 0)}, hdr(a, tcpSYN, 1, 0), true},
		{"SYN after FIN", []tcpHdr{hdr(a, tcpSYN, 1, 0), hdr(a, tcpFIN|tcpACK, 2, 6)}, hdr(a, tcpSYN, 50, 0), true},
		{"SYN-ACK retransmitted after RST", []tcpHdr{hdr(a, tcpSYN, 1, 0), hdr(b, tcpSYN|tcpACK, 5, 2), hdr(a, tcpRST, 2, 0)}, hdr(b, tcpSYN|tcpACK, 5, 2), false},
		{"SYN on a connection seen mid-flow", []tcpHdr{hdr(a, tcpACK, 1, 1)}, hdr(a, tcpSYN, 1, 0), true},
		{"SYN-ACK on a connection seen mid-flow", []tcpHdr{hdr(a, tcpACK, 1, 1)}, hdr(b, tcpSYN|tcpACK, 5, 2), false},
		{"SYN-ACK after a FIN, mid-flow", []tcpHdr{hdr(a, tcpACK, 1, 1), hdr(a, tcpFIN|tcpACK, 1, 1)}, hdr(b, tcpSYN|tcpACK, 5, 2), true},
		{"SYN answered by the SYN-ACK seen first", []tcpHdr{hdr(b, tcpSYN|tcpACK, 5, 2)}, hdr(a, tcpSYN, 1, 0), false},
		{"SYN not answered by the SYN-ACK seen first", []tcpHdr{hdr(b, tcpSYN|tcpACK, 5, 2)}, hdr(a, tcpSYN, 7, 0), true},
		{"simultaneous open: the other SYN", []tcpHdr{hdr(a, tcpSYN, 1, 0)}, hdr(b, tcpSYN, 5, 0), false},
		{"simultaneous open: the other SYN-ACK", []tcpHdr{hdr(a, tcpSYN, 1, 0), hdr(b, tcpSYN, 5, 0), hdr(a, tcpSYN|tcpACK, 1, 6)}, hdr(b, tcpSYN|tcpACK, 5, 2), false},
		{"simultaneous open, SYN-ACKs the other way", []tcpHdr{hdr(a, tcpSYN, 1, 0), hdr(b, tcpSYN, 5, 0), hdr(b, tcpSYN|tcpACK, 5, 2)}, hdr(a, tcpSYN|tcpACK, 1, 6), false},
		{"RST is no new connection", []tcpHdr{hdr(a, tcpSYN, 1, 0)}, hdr(b, tcpRST|tcpACK, 0, 2), false},
	}
	for _, tt := range tests {
		var c conn
		for i, h := range tt.before {
			c.record(h, int64(i+1))
		}
		if got := c.startsNew(tt.next); got != tt.want {
			t.Errorf("%s: startsNew = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestRefused: a SYN answered by RST never had a socket.
func TestRefused(t *testing.T) {
	var c conn
	c.record(tcpHdr{flags: tcpSYN, srcPort: 1, seq: 1}, 1)
	if c.refused() {
		t.Error("refused after the SYN alone")
	}
	c.record(tcpHdr{flags: tcpRST | tcpACK, srcPort: 2, ack: 2}, 2)
	if !c.refused() {
		t.Error("not refused after SYN, RST")
	}
	c = conn{}
	for _, h := range []tcpHdr{{flags: tcpSYN, seq: 1}, {flags: tcpSYN | tcpACK, seq: 5, ack: 2}, {flags: tcpRST}} {
		c.record(h, 1)
	}
	if c.refused() {
		t.Error("refused after a handshake")
	}
}
