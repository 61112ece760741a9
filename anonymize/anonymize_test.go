package anonymize

import (
	"bytes"
	"encoding/binary"
	"flag"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/m-lab/packet-headers/flow"
)

// Test addresses. The local ones stand for the server, the remote ones for
// clients; remote2 differs from remote only in the bytes anonymization zeroes.
var (
	local4   = netip.MustParseAddr("192.0.2.10")
	remote4  = netip.MustParseAddr("203.0.113.77")
	remote4b = netip.MustParseAddr("203.0.113.201")
	local6   = netip.MustParseAddr("2001:db8:1::10")
	remote6  = netip.MustParseAddr("2001:db8:abcd:1234:5678:9abc:def0:1234")
	remote6b = netip.MustParseAddr("2001:db8:abcd:ffff:0:1:2:3")
)

func TestParseMethod(t *testing.T) {
	tests := []struct {
		in      string
		want    Method
		wantErr string
	}{
		{in: "none", want: None},
		{in: "netblock", want: Netblock},
		{in: "", wantErr: `unknown anonymization method "" (valid: none, netblock)`},
		{in: "Netblock", wantErr: `unknown anonymization method "Netblock" (valid: none, netblock)`},
		{in: "bogus", wantErr: `unknown anonymization method "bogus" (valid: none, netblock)`},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseMethod(tt.in)
			gotErr := ""
			if err != nil {
				gotErr = err.Error()
			}
			if diff := cmp.Diff(tt.wantErr, gotErr); diff != "" {
				t.Errorf("ParseMethod(%q) error mismatch (-want +got):\n%s", tt.in, diff)
			}
			if err == nil && got != tt.want {
				t.Errorf("ParseMethod(%q) = %v, want %v", tt.in, got, tt.want)
			}
			if err == nil && got.String() != tt.in {
				t.Errorf("ParseMethod(%q).String() = %q, want it back", tt.in, got.String())
			}
		})
	}
}

func TestMethodString(t *testing.T) {
	tests := []struct {
		m    Method
		want string
	}{
		{None, "none"},
		{Netblock, "netblock"},
		{Method(7), "Method(7)"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, tt.m.String()); diff != "" {
				t.Errorf("String() mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestMethodFlag(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		want    Method
		wantErr bool
	}{
		{name: "default", args: nil, want: None},
		{name: "netblock", args: []string{"-anonymize.ip=netblock"}, want: Netblock},
		{name: "none", args: []string{"-anonymize.ip=none"}, want: None},
		{name: "unknown", args: []string{"-anonymize.ip=all"}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs := flag.NewFlagSet("test", flag.ContinueOnError)
			fs.SetOutput(&bytes.Buffer{})
			var m Method
			fs.Var(&m, "anonymize.ip", "anonymization method")
			err := fs.Parse(tt.args)
			if (err != nil) != tt.wantErr {
				t.Fatalf("Parse(%q) error = %v, want error %v", tt.args, err, tt.wantErr)
			}
			if !tt.wantErr && m != tt.want {
				t.Errorf("after Parse(%q), method = %v, want %v", tt.args, m, tt.want)
			}
		})
	}
}

func TestNewMethod(t *testing.T) {
	tests := []struct {
		name string
		in   Method
		want Method
	}{
		{"none", None, None},
		{"netblock", Netblock, Netblock},
		// Out of the enum: fail closed.
		{"unknown", Method(7), Netblock},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := New(tt.in, nil).Method(); got != tt.want {
				t.Errorf("New(%v).Method() = %v, want %v", tt.in, got, tt.want)
			}
		})
	}
	var nilA *Anonymizer
	if got := nilA.Method(); got != None {
		t.Errorf("nil Anonymizer: Method() = %v, want none", got)
	}
}

func TestAddr(t *testing.T) {
	local := []netip.Addr{local4, local6, netip.MustParseAddr("fe80::1%eth0")}
	tests := []struct {
		name   string
		method Method
		in     string
		want   string
	}{
		{"v4", Netblock, "203.0.113.77", "203.0.113.0"},
		{"v4 already zero", Netblock, "203.0.113.0", "203.0.113.0"},
		{"v4 broadcast", Netblock, "255.255.255.255", "255.255.255.0"},
		{"v6", Netblock, "2001:db8:abcd:1234:5678:9abc:def0:1234", "2001:db8:abcd::"},
		{"v6 all ones", Netblock, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "ffff:ffff:ffff::"},
		{"v6 zone kept", Netblock, "fe80::abcd:1%eth1", "fe80::%eth1"},
		{"v4-mapped", Netblock, "::ffff:203.0.113.77", "::ffff:203.0.113.0"},
		{"local v4", Netblock, "192.0.2.10", "192.0.2.10"},
		{"local v4 mapped", Netblock, "::ffff:192.0.2.10", "::ffff:192.0.2.10"},
		{"local v6", Netblock, "2001:db8:1::10", "2001:db8:1::10"},
		{"local v6 other zone", Netblock, "fe80::1%eth1", "fe80::1%eth1"},
		{"neighbour of local v4", Netblock, "192.0.2.11", "192.0.2.0"},
		{"none v4", None, "203.0.113.77", "203.0.113.77"},
		{"none v6", None, "2001:db8:abcd:1234:5678:9abc:def0:1234", "2001:db8:abcd:1234:5678:9abc:def0:1234"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := New(tt.method, local)
			got := a.Addr(netip.MustParseAddr(tt.in))
			if diff := cmp.Diff(tt.want, got.String()); diff != "" {
				t.Errorf("Addr(%s) mismatch (-want +got):\n%s", tt.in, diff)
			}
		})
	}
}

func TestNilAndNone(t *testing.T) {
	pkt := build(t, spec{src: local4, dst: remote4, payload: []byte("hello")})
	h := parse(t, pkt)
	for name, a := range map[string]*Anonymizer{"nil": nil, "none": New(None, nil)} {
		t.Run(name, func(t *testing.T) {
			a.SetLocal([]netip.Addr{local4}) // must not panic on nil
			if got := a.Addr(remote4); got != remote4 {
				t.Errorf("Addr(%v) = %v, want it unchanged", remote4, got)
			}
			got := bytes.Clone(pkt)
			a.Packet(got, h.L3, h.L4, h.IPv6)
			if diff := cmp.Diff(pkt, got); diff != "" {
				t.Errorf("Packet changed the packet (-want +got):\n%s", diff)
			}
		})
	}
}

func TestSetLocal(t *testing.T) {
	a := New(Netblock, []netip.Addr{local4})
	if got := a.Addr(local4); got != local4 {
		t.Errorf("Addr(%v) = %v, want it unchanged while local", local4, got)
	}
	a.SetLocal([]netip.Addr{local6, {}})
	if got, want := a.Addr(local4), netip.MustParseAddr("192.0.2.0"); got != want {
		t.Errorf("after SetLocal without it, Addr(%v) = %v, want %v", local4, got, want)
	}
	if got := a.Addr(local6); got != local6 {
		t.Errorf("Addr(%v) = %v, want it unchanged once local", local6, got)
	}
}

// TestConcurrentSetLocal runs SetLocal against Packet and Addr, for the race
// detector.
func TestConcurrentSetLocal(t *testing.T) {
	a := New(Netblock, nil)
	pkt := build(t, spec{src: local4, dst: remote4})
	h := parse(t, pkt)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			buf := make([]byte, len(pkt))
			for range 1000 {
				copy(buf, pkt)
				a.Packet(buf, h.L3, h.L4, h.IPv6)
				a.Addr(local4)
			}
		})
	}
	for i := range 1000 {
		if i%2 == 0 {
			a.SetLocal([]netip.Addr{local4})
		} else {
			a.SetLocal(nil)
		}
	}
	wg.Wait()
	a.SetLocal([]netip.Addr{local4})
	if got := a.Addr(local4); got != local4 {
		t.Errorf("after the last SetLocal, Addr(%v) = %v, want it unchanged", local4, got)
	}
}

// TestPacketChecksums anonymizes whole packets, payload included so that the
// TCP checksum can be checked, and checks that each checksum is valid after
// exactly when it was before, and equal to a fresh computation if valid.
func TestPacketChecksums(t *testing.T) {
	packets := []struct {
		name string
		spec spec
	}{
		{"v4", spec{src: local4, dst: remote4, payload: []byte("GET / HTTP/1.1\r\n\r\n")}},
		{"v4 options odd payload", spec{src: remote4, dst: local4, ipOptions: true, payload: []byte("odd")}},
		{"v4 both remote", spec{src: remote4, dst: remote4b, payload: bytes.Repeat([]byte{0xff}, 100)}},
		{"v4 no payload", spec{src: remote4, dst: local4}},
		{"v6", spec{src: local6, dst: remote6, payload: []byte("GET / HTTP/1.1\r\n\r\n")}},
		{"v6 both remote", spec{src: remote6, dst: remote6b, payload: []byte{1}}},
		{"v6 no payload", spec{src: remote6, dst: local6}},
	}
	breaks := []struct {
		name           string
		badIP, badTCP  bool
		ipOnlyVersion4 bool
	}{
		{name: "valid"},
		{name: "bad tcp", badTCP: true},
		{name: "bad ip", badIP: true, ipOnlyVersion4: true},
		{name: "bad both", badIP: true, badTCP: true, ipOnlyVersion4: true},
	}
	a := New(Netblock, []netip.Addr{local4, local6})
	for _, p := range packets {
		for _, br := range breaks {
			if br.ipOnlyVersion4 && p.spec.src.Is6() {
				continue
			}
			t.Run(p.name+"/"+br.name, func(t *testing.T) {
				pkt := build(t, p.spec)
				h := parse(t, pkt)
				if br.badIP {
					addToField(pkt, h.L3+10, 0x0101)
				}
				if br.badTCP {
					addToField(pkt, h.L4+16, 0x0101)
				}
				ipBefore, tcpBefore := ipValid(pkt, h), tcpValid(pkt, h)
				if want := !br.badIP; !h.IPv6 && ipBefore != want {
					t.Fatalf("before: IPv4 checksum valid = %v, want %v", ipBefore, want)
				}
				if tcpBefore == br.badTCP {
					t.Fatalf("before: TCP checksum valid = %v, want %v", tcpBefore, !br.badTCP)
				}

				a.Packet(pkt, h.L3, h.L4, h.IPv6)

				if got := ipValid(pkt, h); !h.IPv6 && got != ipBefore {
					t.Errorf("IPv4 checksum valid = %v after, %v before", got, ipBefore)
				}
				if got := tcpValid(pkt, h); got != tcpBefore {
					t.Errorf("TCP checksum valid = %v after, %v before", got, tcpBefore)
				}
				if !h.IPv6 && ipBefore {
					if got, want := field(pkt, h.L3+10), ipChecksum(pkt, h); got != want {
						t.Errorf("IPv4 checksum = %#04x, want %#04x as computed afresh", got, want)
					}
				}
				if tcpBefore {
					if got, want := field(pkt, h.L4+16), tcpChecksum(pkt, h); got != want {
						t.Errorf("TCP checksum = %#04x, want %#04x as computed afresh", got, want)
					}
				}
			})
		}
	}
}

// TestPacketRevealsNothing anonymizes pairs of packets that differ only in
// the bytes of the remote address that anonymization zeroes, and checks that
// the results are identical: nothing left in the headers, checksums included,
// depends on those bytes. With the checksums left as they were (the original
// daemon), or a partial checksum updated like a full one, this fails.
func TestPacketRevealsNothing(t *testing.T) {
	setIP := func(v uint16) func([]byte, flow.Header) {
		return func(p []byte, h flow.Header) { binary.BigEndian.PutUint16(p[h.L3+10:], v) }
	}
	setTCP := func(v uint16) func([]byte, flow.Header) {
		return func(p []byte, h flow.Header) { binary.BigEndian.PutUint16(p[h.L4+16:], v) }
	}
	tests := []struct {
		name        string
		spec        spec // dst is replaced by each address of the pair
		pair        [2]netip.Addr
		headersOnly bool // cut the packet after the TCP header, as capture does
		mangle      func([]byte, flow.Header)
	}{
		{name: "v4 valid", spec: spec{src: local4, payload: []byte("data")}, pair: [2]netip.Addr{remote4, remote4b}},
		{name: "v4 valid headers only", spec: spec{src: local4, payload: []byte("data")}, pair: [2]netip.Addr{remote4, remote4b}, headersOnly: true},
		{name: "v4 valid no payload", spec: spec{src: local4}, pair: [2]netip.Addr{remote4, remote4b}},
		{name: "v4 options", spec: spec{src: local4, ipOptions: true}, pair: [2]netip.Addr{remote4, remote4b}},
		{name: "v4 partial tcp", spec: spec{src: local4, payload: []byte("data")}, pair: [2]netip.Addr{remote4, remote4b}, mangle: setPartial},
		{name: "v4 partial tcp headers only", spec: spec{src: local4, payload: []byte("data")}, pair: [2]netip.Addr{remote4, remote4b}, headersOnly: true, mangle: setPartial},
		{name: "v4 partial tcp no payload", spec: spec{src: local4}, pair: [2]netip.Addr{remote4, remote4b}, mangle: setPartial},
		{name: "v4 zero tcp", spec: spec{src: local4, payload: []byte("data")}, pair: [2]netip.Addr{remote4, remote4b}, mangle: setTCP(0)},
		{name: "v4 zero ip", spec: spec{src: local4}, pair: [2]netip.Addr{remote4, remote4b}, mangle: setIP(0)},
		{name: "v4 damaged ip", spec: spec{src: local4}, pair: [2]netip.Addr{remote4, remote4b}, mangle: func(p []byte, h flow.Header) { addToField(p, h.L3+10, 0x1234) }},
		{name: "v4 damaged tcp", spec: spec{src: local4}, pair: [2]netip.Addr{remote4, remote4b}, mangle: func(p []byte, h flow.Header) { addToField(p, h.L4+16, 0x1234) }},
		{name: "v6 valid", spec: spec{src: local6, payload: []byte("data")}, pair: [2]netip.Addr{remote6, remote6b}},
		{name: "v6 valid headers only", spec: spec{src: local6, payload: []byte("data")}, pair: [2]netip.Addr{remote6, remote6b}, headersOnly: true},
		{name: "v6 partial tcp", spec: spec{src: local6, payload: []byte("data")}, pair: [2]netip.Addr{remote6, remote6b}, mangle: setPartial},
		{name: "v6 partial tcp headers only", spec: spec{src: local6, payload: []byte("data")}, pair: [2]netip.Addr{remote6, remote6b}, headersOnly: true, mangle: setPartial},
		{name: "v6 zero tcp", spec: spec{src: local6}, pair: [2]netip.Addr{remote6, remote6b}, mangle: setTCP(0)},
		{name: "v6 damaged tcp", spec: spec{src: local6}, pair: [2]netip.Addr{remote6, remote6b}, mangle: func(p []byte, h flow.Header) { addToField(p, h.L4+16, 0x1234) }},
	}
	a := New(Netblock, []netip.Addr{local4, local6})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got [2][]byte
			for i, dst := range tt.pair {
				s := tt.spec
				s.dst = dst
				p := build(t, s)
				h := parse(t, p)
				if tt.mangle != nil {
					tt.mangle(p, h)
				}
				if tt.headersOnly {
					p = p[:h.End]
				}
				a.Packet(p, h.L3, h.L4, h.IPv6)
				got[i] = p
			}
			if diff := cmp.Diff(got[0], got[1]); diff != "" {
				t.Errorf("anonymized packets from %v and %v differ (-first +second):\n%s", tt.pair[0], tt.pair[1], diff)
			}
		})
	}
}

// TestPacketZeroesHost checks which bytes Packet changes: the host part of
// each remote address and the checksums, and nothing else.
func TestPacketZeroesHost(t *testing.T) {
	tests := []struct {
		name  string
		spec  spec
		local []netip.Addr
	}{
		{"v4 no local", spec{src: local4, dst: remote4}, nil},
		{"v4 local src", spec{src: local4, dst: remote4}, []netip.Addr{local4}},
		{"v4 local dst", spec{src: remote4, dst: local4}, []netip.Addr{local4}},
		{"v4 both local", spec{src: local4, dst: remote4}, []netip.Addr{local4, remote4}},
		{"v4 options", spec{src: remote4, dst: remote4b, ipOptions: true}, nil},
		{"v6 no local", spec{src: local6, dst: remote6}, nil},
		{"v6 local src", spec{src: local6, dst: remote6}, []netip.Addr{local6}},
		{"v6 local dst", spec{src: remote6, dst: local6}, []netip.Addr{local6}},
		{"v6 both local", spec{src: local6, dst: remote6}, []netip.Addr{local6, remote6}},
		{"v6 v4-mapped", spec{src: netip.AddrFrom16(local4.As16()), dst: netip.AddrFrom16(remote4.As16())}, []netip.Addr{local4}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := New(Netblock, tt.local)
			orig := build(t, tt.spec)
			h := parse(t, orig)
			got := bytes.Clone(orig)
			a.Packet(got, h.L3, h.L4, h.IPv6)

			// What each address must become, which must also be what Addr
			// says.
			want := bytes.Clone(orig)
			src, dst := h.SrcDst(want)
			allLocal := true
			for _, b := range [][]byte{src, dst} {
				addr, _ := netip.AddrFromSlice(b)
				isLocal := false
				for _, l := range tt.local {
					isLocal = isLocal || l.Unmap() == addr.Unmap()
				}
				allLocal = allLocal && isLocal
				switch {
				case isLocal:
				case len(b) == 4 || addr.Is4In6():
					b[len(b)-1] = 0
				default:
					clear(b[6:])
				}
				if anon := a.Addr(addr).AsSlice(); !bytes.Equal(anon, b) {
					t.Errorf("Addr(%v) = %v, want %v as in the packet", addr, anon, b)
				}
			}
			// Unless nothing else did, the checksums change too; their
			// values are checked elsewhere.
			if !allLocal && !h.IPv6 {
				copy(want[h.L3+10:h.L3+12], got[h.L3+10:h.L3+12])
			}
			if !allLocal {
				copy(want[h.L4+16:h.L4+18], got[h.L4+16:h.L4+18])
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("anonymized packet mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

// TestChecksumCorners pins the RFC 1624 corner cases: where the sum of the
// other words is 0xFFFF the checksum is 0x0000, never 0xFFFF; a stored 0xFFFF
// (also valid there) is rewritten as 0x0000 when the packet changes and left
// alone when it does not.
func TestChecksumCorners(t *testing.T) {
	t.Run("rfc1624 example", func(t *testing.T) {
		// RFC 1624 section 4: m = 0x5555 changes to m' = 0x3285 and the
		// other words sum to 0xCD7A. HC = 0xDD2F and HC' must be 0x0000;
		// RFC 1141's HC + m + ~m' gives 0xFFFF.
		ck := []byte{0xdd, 0x2f}
		m, m2 := uint16(0x5555), uint16(0x3285)
		update(ck, ckFull, uint32(^m)+uint32(m2))
		if got := field(ck, 0); got != 0x0000 {
			t.Errorf("updated checksum = %#04x, want 0x0000", got)
		}
	})

	// Each case tunes one free 16-bit word (at tune) until the checksum (at
	// ck) computed afresh is 0x0000, before anonymization if zeroBefore and
	// after otherwise. It then stores store there (0x0000 or 0xFFFF, both
	// valid then), or the checksum computed afresh, and anonymizes. The
	// result must be want, or the checksum computed afresh if want is nil.
	type fieldAt func(h flow.Header) int
	ipAt := func(off int) fieldAt { return func(h flow.Header) int { return h.L3 + off } }
	tcpAt := func(off int) fieldAt { return func(h flow.Header) int { return h.L4 + off } }
	ipCk := func(p []byte, h flow.Header) uint16 { return ipChecksum(p, h) }
	tests := []struct {
		name       string
		spec       spec
		local      []netip.Addr
		tune, ck   fieldAt
		compute    func([]byte, flow.Header) uint16
		zeroBefore bool
		store      *uint16
		want       *uint16
	}{
		{name: "ip becomes 0x0000", spec: spec{src: local4, dst: remote4}, tune: ipAt(4), ck: ipAt(10), compute: ipCk, want: ptr(0x0000)},
		{name: "ip was 0x0000", spec: spec{src: local4, dst: remote4}, tune: ipAt(4), ck: ipAt(10), compute: ipCk, zeroBefore: true, store: ptr(0x0000)},
		{name: "ip was 0xffff", spec: spec{src: local4, dst: remote4}, tune: ipAt(4), ck: ipAt(10), compute: ipCk, zeroBefore: true, store: ptr(0xffff)},
		{name: "ip 0xffff unchanged", spec: spec{src: local4, dst: remote4}, local: []netip.Addr{local4, remote4}, tune: ipAt(4), ck: ipAt(10), compute: ipCk, zeroBefore: true, store: ptr(0xffff), want: ptr(0xffff)},
		{name: "tcp v4 becomes 0x0000", spec: spec{src: local4, dst: remote4}, tune: tcpAt(14), ck: tcpAt(16), compute: tcpChecksum, want: ptr(0x0000)},
		{name: "tcp v4 was 0xffff", spec: spec{src: local4, dst: remote4}, tune: tcpAt(14), ck: tcpAt(16), compute: tcpChecksum, zeroBefore: true, store: ptr(0xffff)},
		{name: "tcp v6 becomes 0x0000", spec: spec{src: local6, dst: remote6}, tune: tcpAt(14), ck: tcpAt(16), compute: tcpChecksum, want: ptr(0x0000)},
		{name: "tcp v6 was 0x0000", spec: spec{src: local6, dst: remote6}, tune: tcpAt(14), ck: tcpAt(16), compute: tcpChecksum, zeroBefore: true, store: ptr(0x0000)},
		{name: "tcp v6 0xffff unchanged", spec: spec{src: local6, dst: remote6}, local: []netip.Addr{local6, remote6}, tune: tcpAt(14), ck: tcpAt(16), compute: tcpChecksum, zeroBefore: true, store: ptr(0xffff), want: ptr(0xffff)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := New(Netblock, tt.local)
			p := build(t, tt.spec)
			h := parse(t, p)
			anonymized := func(p []byte) []byte {
				q := bytes.Clone(p)
				a.Packet(q, h.L3, h.L4, h.IPv6)
				return q
			}
			found := false
			for v := range 0x10000 {
				binary.BigEndian.PutUint16(p[tt.tune(h):], uint16(v))
				q := p
				if !tt.zeroBefore {
					q = anonymized(p)
				}
				if tt.compute(q, h) == 0 {
					found = true
					break
				}
			}
			if !found {
				t.Fatal("no value of the tuned word gives a checksum of 0x0000")
			}
			ck := tt.compute(p, h)
			if tt.store != nil {
				ck = *tt.store
			}
			binary.BigEndian.PutUint16(p[tt.ck(h):], ck)
			if !tcpValid(p, h) || (!h.IPv6 && !ipValid(p, h)) {
				t.Fatal("before: checksums not valid")
			}
			got := anonymized(p)
			if !tcpValid(got, h) || (!h.IPv6 && !ipValid(got, h)) {
				t.Error("after: checksums not valid")
			}
			want := tt.compute(got, h)
			if tt.want != nil {
				want = *tt.want
			}
			if diff := cmp.Diff(want, field(got, tt.ck(h))); diff != "" {
				t.Errorf("checksum mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

// counts counts the checksums of a capture by kind.
type counts struct{ Packets, IPValid, TCPValid, TCPPartial, TCPInvalid int }

// TestPcaps anonymizes every packet of the test captures and checks that each
// checksum is of the same kind (valid, partial or invalid) after as before.
func TestPcaps(t *testing.T) {
	tests := []struct {
		file      string
		host      netip.Addr // the capturing host
		truncated bool
		want      counts
	}{
		// The packets the host sent (SYN, ACK, PSH, FIN) carry partial
		// checksums: checksum offload.
		{"v4.pcap", netip.MustParseAddr("172.17.0.2"), false, counts{Packets: 12, IPValid: 12, TCPValid: 8, TCPPartial: 4}},
		// Every TCP checksum is off by one from valid (packets received) or
		// partial (packets sent), as if the host's address had been edited
		// after the capture. tcpdump too reports a truncated record at the
		// end.
		{"v6.pcap", netip.MustParseAddr("2001:1900:2100:2d::86"), true, counts{Packets: 8, TCPInvalid: 8}},
	}
	for _, tt := range tests {
		pkts, truncated := readPcap(t, filepath.Join("..", "testdata", tt.file))
		if truncated != tt.truncated {
			t.Errorf("%s: truncated = %v, want %v", tt.file, truncated, tt.truncated)
		}
		for _, local := range [][]netip.Addr{nil, {tt.host}} {
			t.Run(tt.file+"/local="+addrsString(local), func(t *testing.T) {
				a := New(Netblock, local)
				got := counts{Packets: len(pkts)}
				for i, orig := range pkts {
					h, err := flow.Parse(orig, flow.LinkEthernet)
					if err != nil {
						t.Fatalf("packet %d: %v", i, err)
					}
					ipBefore, tcpBefore := ipValid(orig, h), tcpKindOf(orig, h)
					if ipBefore {
						got.IPValid++
					}
					switch tcpBefore {
					case "valid":
						got.TCPValid++
					case "partial":
						got.TCPPartial++
					default:
						got.TCPInvalid++
					}
					p := bytes.Clone(orig)
					a.Packet(p, h.L3, h.L4, h.IPv6)
					if bytes.Equal(p, orig) {
						t.Errorf("packet %d: unchanged", i)
					}
					if got := ipValid(p, h); !h.IPv6 && got != ipBefore {
						t.Errorf("packet %d: IPv4 checksum valid = %v after, %v before", i, got, ipBefore)
					}
					if got := tcpKindOf(p, h); got != tcpBefore {
						t.Errorf("packet %d: TCP checksum %s after, %s before", i, got, tcpBefore)
					}
				}
				if diff := cmp.Diff(tt.want, got); diff != "" {
					t.Errorf("checksums before anonymization (-want +got):\n%s", diff)
				}
			})
		}
	}
}

// TestPacketShort cuts packets everywhere and checks that Packet neither
// panics nor touches the addresses unless all their bytes are there.
func TestPacketShort(t *testing.T) {
	a := New(Netblock, nil)
	for _, s := range []spec{{src: remote4, dst: remote4b, ipOptions: true}, {src: remote6, dst: remote6b}} {
		orig := build(t, s)
		h := parse(t, orig)
		addrEnd := h.L3 + 20
		if h.IPv6 {
			addrEnd = h.L3 + 40
		}
		for n := range len(orig) {
			p := bytes.Clone(orig[:n])
			a.Packet(p, h.L3, h.L4, h.IPv6)
			if n < addrEnd && !bytes.Equal(p, orig[:n]) {
				t.Errorf("IPv6 %v, cut to %d bytes: changed, want unchanged", h.IPv6, n)
			}
			if n >= addrEnd && bytes.Equal(p, orig[:n]) {
				t.Errorf("IPv6 %v, cut to %d bytes: unchanged, want the addresses anonymized", h.IPv6, n)
			}
		}
	}
}

// FuzzPacket feeds arbitrary bytes and offsets to Packet: it must not panic,
// must change no byte but the addresses, options, extension headers and
// checksums, and must change nothing the second time. It then builds a
// packet from the same bytes (see genPacket: IPv4 options or IPv6 extension
// headers of every kind, the remote address in every place an address goes
// and in data Packet clears) and checks that no copy of the remote address
// (4 or 16 bytes) survives anywhere in the anonymized record, that nothing
// in it depends on the address's host part, and that the checksums stay
// valid (checkGenerated).
func FuzzPacket(f *testing.F) {
	for _, s := range []spec{
		{src: local4, dst: remote4, payload: []byte("x")},
		{src: remote4, dst: local4, ipOptions: true},
		{src: local6, dst: remote6, payload: []byte("xy")},
		{src: netip.AddrFrom16(remote4.As16()), dst: remote6},
	} {
		p := build(f, s)
		h := parse(f, p)
		f.Add(p, h.L3, h.L4, h.IPv6)
		f.Add(p[:h.End], h.L3, h.L4, h.IPv6)
		f.Add(p[:h.L4+17], h.L3, h.L4, h.IPv6)
		f.Add(p[:h.L3+19], h.L3, h.L4, h.IPv6)
		f.Add(p, h.L3, h.L3, h.IPv6)
		f.Add(p, -1, h.L4, h.IPv6)
		f.Add(p, h.L3, 1<<62, h.IPv6)
	}
	// Descriptions for genPacket.
	for i := range byte(16) {
		f.Add(bytes.Repeat([]byte{i}, 96), 0, 0, false)
		f.Add(bytes.Repeat([]byte{i, 2, 3, 1}, 24), 0, 0, true)
	}
	a := New(Netblock, []netip.Addr{local4, local6})
	f.Fuzz(func(t *testing.T, data []byte, l3, l4 int, ipv6 bool) {
		orig := bytes.Clone(data)
		a.Packet(data, l3, l4, ipv6)
		if len(data) != len(orig) {
			t.Fatalf("length changed from %d to %d", len(orig), len(data))
		}
		// The addresses, the IPv4 options or the IPv6 extension
		// headers, the checksums and the TCP options may change.
		ipEnd := l3 + 20
		if ipv6 {
			ipEnd = l4
		} else if l3 >= 0 && l3 < len(orig) {
			ipEnd = l3 + max(20, int(orig[l3]&0x0f)*4)
		}
		mayChange := func(i int) bool {
			in := func(off, n int) bool { return i >= l3+off && i < l3+off+n }
			tcp := i == l4+16 || i == l4+17 || (i >= l4+20 && i < l4+60)
			if ipv6 {
				return in(8, 32) || (i >= l3+40 && i < ipEnd) || tcp
			}
			return in(10, 10) || (i >= l3+20 && i < ipEnd) || tcp
		}
		for i := range data {
			if data[i] != orig[i] && !mayChange(i) {
				t.Fatalf("byte %d changed from %#02x to %#02x (l3 %d, l4 %d)", i, orig[i], data[i], l3, l4)
			}
		}
		once := bytes.Clone(data)
		a.Packet(data, l3, l4, ipv6)
		if !bytes.Equal(once, data) {
			t.Fatalf("second Packet changed the packet (-first +second):\n%s", cmp.Diff(once, data))
		}

		if ipv6 {
			checkGenerated(t, a, orig, remote6, remote6b)
		} else {
			checkGenerated(t, a, orig, remote4, remote4b)
		}
	})
}

func TestPacketAllocs(t *testing.T) {
	a := New(Netblock, []netip.Addr{local4, local6})
	for _, c := range benchCases(t) {
		t.Run(c.name, func(t *testing.T) {
			buf := make([]byte, len(c.pkt))
			allocs := testing.AllocsPerRun(100, func() {
				copy(buf, c.pkt)
				a.Packet(buf, c.h.L3, c.h.L4, c.h.IPv6)
			})
			if allocs != 0 {
				t.Errorf("Packet: %v allocations per run, want 0", allocs)
			}
		})
	}
	t.Run("Addr", func(t *testing.T) {
		allocs := testing.AllocsPerRun(100, func() {
			a.Addr(remote4)
			a.Addr(remote6)
		})
		if allocs != 0 {
			t.Errorf("Addr: %v allocations per run, want 0", allocs)
		}
	})
}

func BenchmarkPacket(b *testing.B) {
	a := New(Netblock, []netip.Addr{local4, local6, netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")})
	for _, c := range benchCases(b) {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			buf := make([]byte, len(c.pkt))
			for b.Loop() {
				// The copy (a few ns) restores the addresses, so that every
				// iteration anonymizes them.
				copy(buf, c.pkt)
				a.Packet(buf, c.h.L3, c.h.L4, c.h.IPv6)
			}
		})
	}
}

type benchCase struct {
	name string
	pkt  []byte
	h    flow.Header
}

// benchCases are packets as the saver sees them: cut after the TCP header.
func benchCases(tb testing.TB) []benchCase {
	var cs []benchCase
	for _, c := range []struct {
		name string
		spec spec
	}{
		{"v4 data", spec{src: local4, dst: remote4, payload: make([]byte, 1400)}},
		{"v4 ack", spec{src: remote4, dst: local4}},
		{"v4 partial", spec{src: local4, dst: remote4, payload: make([]byte, 1400), partial: true}},
		{"v6 data", spec{src: local6, dst: remote6, payload: make([]byte, 1400)}},
		{"v6 ack", spec{src: remote6, dst: local6}},
	} {
		p := build(tb, c.spec)
		h := parse(tb, p)
		cs = append(cs, benchCase{c.name, p[:h.End], h})
	}
	return cs
}

// spec describes a test packet: an Ethernet frame with IPv4 (if src is an
// IPv4 address) or IPv6, TCP with options, and payload.
type spec struct {
	src, dst  netip.Addr
	ipOptions bool // IPv4 only: add 8 bytes of options
	payload   []byte
	partial   bool // store the partial TCP checksum of checksum offload
}

// build serializes s with valid checksums, computed by gopacket.
func build(tb testing.TB, s spec) []byte {
	tb.Helper()
	eth := &layers.Ethernet{
		SrcMAC:       net.HardwareAddr{2, 0, 0, 0, 0, 1},
		DstMAC:       net.HardwareAddr{2, 0, 0, 0, 0, 2},
		EthernetType: layers.EthernetTypeIPv4,
	}
	tcp := &layers.TCP{
		SrcPort: 443, DstPort: 51234, Seq: 0x01020304, Ack: 0x0a0b0c0d,
		ACK: true, PSH: len(s.payload) > 0, Window: 501,
		Options: []layers.TCPOption{
			{OptionType: layers.TCPOptionKindNop, OptionLength: 1},
			{OptionType: layers.TCPOptionKindNop, OptionLength: 1},
			{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: []byte{0, 0, 1, 0, 0, 0, 2, 0}},
		},
	}
	var ip gopacket.SerializableLayer
	if s.src.Is4() {
		ip4 := &layers.IPv4{
			Version: 4, TTL: 64, Id: 0x4242, Flags: layers.IPv4DontFragment,
			Protocol: layers.IPProtocolTCP, SrcIP: s.src.AsSlice(), DstIP: s.dst.AsSlice(),
		}
		if s.ipOptions {
			ip4.Options = []layers.IPv4Option{
				{OptionType: 148, OptionLength: 4, OptionData: []byte{0, 0}}, // router alert
				{OptionType: 1}, {OptionType: 1}, {OptionType: 1}, {OptionType: 0},
			}
		}
		if err := tcp.SetNetworkLayerForChecksum(ip4); err != nil {
			tb.Fatal(err)
		}
		ip = ip4
	} else {
		eth.EthernetType = layers.EthernetTypeIPv6
		ip6 := &layers.IPv6{
			Version: 6, FlowLabel: 0x12345, HopLimit: 64, NextHeader: layers.IPProtocolTCP,
			SrcIP: s.src.AsSlice(), DstIP: s.dst.AsSlice(),
		}
		if err := tcp.SetNetworkLayerForChecksum(ip6); err != nil {
			tb.Fatal(err)
		}
		ip = ip6
	}
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true}
	if err := gopacket.SerializeLayers(buf, opts, eth, ip, tcp, gopacket.Payload(s.payload)); err != nil {
		tb.Fatalf("serialize %+v: %v", s, err)
	}
	p := bytes.Clone(buf.Bytes())
	if s.partial {
		setPartial(p, parse(tb, p))
	}
	return p
}

func parse(tb testing.TB, p []byte) flow.Header {
	tb.Helper()
	h, err := flow.Parse(p, flow.LinkEthernet)
	if err != nil {
		tb.Fatalf("flow.Parse: %v", err)
	}
	return h
}

// internetChecksum returns the Internet checksum (RFC 1071) of the
// concatenation of parts. It is written apart from the package's arithmetic so
// that the tests check it.
func internetChecksum(parts ...[]byte) uint16 {
	b := bytes.Join(parts, nil)
	if len(b)%2 == 1 {
		b = append(b, 0)
	}
	var s uint32
	for i := 0; i < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

func field(p []byte, off int) uint16 { return binary.BigEndian.Uint16(p[off:]) }

// addToField adds v to the 16-bit field at off, making a valid checksum there
// invalid.
func addToField(p []byte, off int, v uint16) {
	binary.BigEndian.PutUint16(p[off:], field(p, off)+v)
}

func ipHeader(p []byte, h flow.Header) []byte {
	return p[h.L3 : h.L3+int(p[h.L3]&0x0f)*4]
}

func ipValid(p []byte, h flow.Header) bool {
	return !h.IPv6 && internetChecksum(ipHeader(p, h)) == 0
}

// ipChecksum returns the IPv4 header checksum computed afresh.
func ipChecksum(p []byte, h flow.Header) uint16 {
	hdr := bytes.Clone(ipHeader(p, h))
	hdr[10], hdr[11] = 0, 0
	return internetChecksum(hdr)
}

// segment returns the TCP pseudo-header and the TCP segment of p, which must
// hold the whole segment.
func segment(p []byte, h flow.Header) (pseudo, seg []byte) {
	src, dst := h.SrcDst(p)
	var end int
	if h.IPv6 {
		end = h.L3 + 40 + int(field(p, h.L3+4))
	} else {
		end = h.L3 + int(field(p, h.L3+2))
	}
	seg = p[h.L4:end]
	pseudo = bytes.Join([][]byte{src, dst}, nil)
	if h.IPv6 {
		pseudo = binary.BigEndian.AppendUint32(pseudo, uint32(len(seg)))
		pseudo = append(pseudo, 0, 0, 0, 6)
	} else {
		pseudo = append(pseudo, 0, 6)
		pseudo = binary.BigEndian.AppendUint16(pseudo, uint16(len(seg)))
	}
	return pseudo, seg
}

func tcpValid(p []byte, h flow.Header) bool {
	pseudo, seg := segment(p, h)
	return internetChecksum(pseudo, seg) == 0
}

// tcpChecksum returns the TCP checksum computed afresh.
func tcpChecksum(p []byte, h flow.Header) uint16 {
	pseudo, seg := segment(p, h)
	seg = bytes.Clone(seg)
	seg[16], seg[17] = 0, 0
	return internetChecksum(pseudo, seg)
}

// partialChecksum returns what the kernel stores in the TCP checksum field of
// a packet it hands to a NIC to finish: the uncomplemented sum of the
// pseudo-header.
func partialChecksum(p []byte, h flow.Header) uint16 {
	pseudo, _ := segment(p, h)
	return ^internetChecksum(pseudo)
}

func setPartial(p []byte, h flow.Header) {
	binary.BigEndian.PutUint16(p[h.L4+16:], partialChecksum(p, h))
}

// tcpKindOf classifies the TCP checksum of p.
func tcpKindOf(p []byte, h flow.Header) string {
	switch {
	case tcpValid(p, h):
		return "valid"
	case field(p, h.L4+16) == partialChecksum(p, h):
		return "partial"
	}
	return "invalid"
}

func ptr(v uint16) *uint16 { return &v }

func addrsString(as []netip.Addr) string {
	if len(as) == 0 {
		return "none"
	}
	return as[0].String()
}

// readPcap returns the records of a classic pcap file, and whether it ends in
// a truncated record. It stands in for gopacket's pcapgo, which on Linux
// imports golang.org/x/net/bpf, a module go.sum does not list.
func readPcap(t *testing.T, path string) (pkts [][]byte, truncated bool) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < 24 {
		t.Fatalf("%s: too short for a pcap header", path)
	}
	var order binary.ByteOrder
	switch binary.LittleEndian.Uint32(b) {
	case 0xa1b2c3d4, 0xa1b23c4d:
		order = binary.LittleEndian
	case 0xd4c3b2a1, 0x4d3cb2a1:
		order = binary.BigEndian
	default:
		t.Fatalf("%s: not a pcap file", path)
	}
	if link := order.Uint32(b[20:]); link != 1 {
		t.Fatalf("%s: link type %d, want Ethernet (1)", path, link)
	}
	for b = b[24:]; len(b) > 0; {
		if len(b) < 16 {
			return pkts, true
		}
		n := int(order.Uint32(b[8:]))
		if len(b) < 16+n {
			return pkts, true
		}
		pkts = append(pkts, b[16:16+n])
		b = b[16+n:]
	}
	return pkts, false
}
