package kernelsource

import (
	"encoding/binary"
	"errors"
	"math"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/m-lab/tcp-info/tcp"
	"golang.org/x/sys/unix"
)

// encodeInetDiagMsg lays m out as the kernel's struct inet_diag_msg.
func encodeInetDiagMsg(m sockMsg) []byte {
	b := make([]byte, sizeofInetDiagMsg)
	b[0] = m.family
	b[1] = tcpEstablished // state, not parsed
	id := b[offsetInetDiagSockID:]
	binary.BigEndian.PutUint16(id[0:2], m.sport)
	binary.BigEndian.PutUint16(id[2:4], m.dport)
	copy(id[4:20], m.src[:])
	copy(id[20:36], m.dst[:])
	binary.NativeEndian.PutUint32(id[40:44], uint32(m.cookie))
	binary.NativeEndian.PutUint32(id[44:48], uint32(m.cookie>>32))
	return b
}

// nlmsg wraps payload in a netlink header, padded to the netlink alignment.
func nlmsg(typ uint16, seq uint32, payload []byte) []byte {
	l := sizeofNlMsghdr + len(payload)
	b := make([]byte, (l+3)&^3)
	binary.NativeEndian.PutUint32(b[0:4], uint32(l))
	binary.NativeEndian.PutUint16(b[4:6], typ)
	binary.NativeEndian.PutUint32(b[8:12], seq)
	copy(b[sizeofNlMsghdr:], payload)
	return b
}

func TestParseInetDiagMsg(t *testing.T) {
	want := sockMsg{
		family: unix.AF_INET6, sport: 443, dport: 0xC350,
		src:    diagAddr(mustAddr("2001:db8::1")),
		dst:    diagAddr(mustAddr("2001:db8::2")),
		cookie: 0x0102030405060708,
	}
	// Attributes after the message are ignored.
	b := append(encodeInetDiagMsg(want), 5, 0, 8, 0, 1, 0, 0, 0)
	got, err := parseInetDiagMsg(b)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(sockMsg{})); diff != "" {
		t.Errorf("parse (-want +got):\n%s", diff)
	}
	// Ports are big-endian on the wire.
	if b[4] != 0x01 || b[5] != 0xBB {
		t.Errorf("sport bytes %x, want 01bb", b[4:6])
	}
	if _, err := parseInetDiagMsg(b[:sizeofInetDiagMsg-1]); err == nil {
		t.Error("a short message parsed")
	}
}

// TestDumpStates ties the states asked for to tcp-info's code.
func TestDumpStates(t *testing.T) {
	tcpinfo := tcp.AllFlags &^ (1<<uint(tcp.SYN_RECV) | 1<<uint(tcp.TIME_WAIT) | 1<<uint(tcp.CLOSE))
	if tcpinfoStates != tcpinfo {
		t.Errorf("tcpinfoStates = %#x, tcp-info's makeReq asks for %#x", tcpinfoStates, tcpinfo)
	}
	var want uint32 = 1 // state 0, which no socket has, is in tcp-info's mask
	for _, st := range []tcp.State{tcp.ESTABLISHED, tcp.SYN_SENT, tcp.FIN_WAIT1, tcp.FIN_WAIT2, tcp.CLOSE_WAIT, tcp.LAST_ACK, tcp.CLOSING} {
		want |= 1 << uint(st)
	}
	if dumpStates != want {
		t.Errorf("dumpStates = %#x, want %#x", dumpStates, want)
	}
}

func TestForEachMessage(t *testing.T) {
	m := encodeInetDiagMsg(sockMsg{family: unix.AF_INET, cookie: math.MaxUint64})
	dgram := append(append(nlmsg(unix.SOCK_DIAG_BY_FAMILY, 7, m), nlmsg(unix.SOCK_DIAG_BY_FAMILY, 7, m[:3])...), nlmsg(unix.NLMSG_DONE, 7, []byte{0, 0, 0, 0})...)
	type seen struct {
		Typ uint16
		Seq uint32
		Len int
	}
	var got []seen
	err := forEachMessage(dgram, func(typ, _ uint16, seq uint32, p []byte) error {
		got = append(got, seen{typ, seq, len(p)})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []seen{{unix.SOCK_DIAG_BY_FAMILY, 7, sizeofInetDiagMsg}, {unix.SOCK_DIAG_BY_FAMILY, 7, 3}, {unix.NLMSG_DONE, 7, 4}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("messages (-want +got):\n%s", diff)
	}

	stop := errors.New("stop")
	n := 0
	if err := forEachMessage(dgram, func(uint16, uint16, uint32, []byte) error { n++; return stop }); err != stop || n != 1 {
		t.Errorf("forEachMessage returned %v after %d messages, want stop after 1", err, n)
	}

	for name, b := range map[string][]byte{
		"length beyond datagram": nlmsg(unix.SOCK_DIAG_BY_FAMILY, 1, m)[:40],
		"length below header":    {8, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
	} {
		if err := forEachMessage(b, func(uint16, uint16, uint32, []byte) error { return nil }); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

// FuzzParse: no datagram makes the parsers panic.
func FuzzParse(f *testing.F) {
	m := encodeInetDiagMsg(sockMsg{family: unix.AF_INET, cookie: 9})
	f.Add(nlmsg(unix.SOCK_DIAG_BY_FAMILY, 1, m))
	f.Add(nlmsg(unix.NLMSG_ERROR, 1, []byte{0xff, 0xff, 0xff, 0xff}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		_ = forEachMessage(b, func(typ, _ uint16, _ uint32, p []byte) error {
			if typ == unix.SOCK_DIAG_BY_FAMILY {
				if m, err := parseInetDiagMsg(p); err == nil {
					_ = excluded(&m)
					_ = m.key()
				}
			}
			return nil
		})
	})
}
