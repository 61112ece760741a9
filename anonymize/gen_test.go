package anonymize

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/m-lab/packet-headers/flow"
)

// This file builds packets from fuzz input for FuzzPacket: IPv4 packets with
// options and IPv6 packets with extension headers, every one of them well
// formed enough for flow.Parse, with the remote address planted wherever an
// address goes and in data that Packet must clear. Building them here, with
// the addresses' places known, lets the fuzz test check that no copy of the
// remote address survives anywhere in the record.
//
// So that a surviving copy can only be a leak, and not bytes of other
// fields that happen to spell it, every byte the generator chooses for a
// field Packet keeps (pointers, flags, timestamps, option values, other
// addresses, identifiers) avoids the first byte of the remote addresses
// (safe): a copy of the remote address can then only start at an address
// or at bytes Packet clears.

// gen hands out the bytes of a fuzz input, then zeros.
type gen struct{ b []byte }

func (g *gen) byte() byte {
	if len(g.b) == 0 {
		return 0
	}
	c := g.b[0]
	g.b = g.b[1:]
	return c
}

// raw returns n bytes as they come: for data Packet must clear.
func (g *gen) raw(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = g.byte()
	}
	return b
}

// safe returns a byte that is not the first byte of a remote test address
// (203.x.x.x, 2001:...).
func (g *gen) safe() byte {
	c := g.byte()
	if c == 203 || c == 0x20 {
		c ^= 0x80
	}
	return c
}

func (g *gen) safes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = g.safe()
	}
	return b
}

// addr returns an address for a place that holds one: the remote address
// (planted), another remote one, the local one, or an arbitrary one.
func (g *gen) addr(remote netip.Addr) []byte {
	other, local := remote4c, local4
	if remote.Is6() {
		other, local = remote6c, local6
	}
	switch g.byte() % 4 {
	case 0:
		return remote.AsSlice()
	case 1:
		return other.AsSlice()
	case 2:
		return local.AsSlice()
	}
	return g.safes(len(remote.AsSlice()))
}

// genPacket builds a packet from the fuzz input spec, with remote as the
// remote address. The same spec with another remote address gives the same
// packet but for that address's bytes. Its TCP segment has no payload, and
// both checksums are valid (the TCP one with the header's addresses).
func genPacket(tb testing.TB, spec []byte, remote netip.Addr) []byte {
	g := &gen{b: spec}
	v6 := remote.Is6()
	local, other := local4, remote4c
	if v6 {
		local, other = local6, remote6c
	}
	var src, dst netip.Addr
	switch g.byte() % 3 {
	case 0:
		src, dst = remote, local
	case 1:
		src, dst = local, remote
	default:
		src, dst = remote, other
	}
	var ipHdr []byte
	var proto byte = protoTCP
	if v6 {
		var ext []byte
		ext, proto = genExt6(g, remote)
		ipHdr = cat([]byte{0x60, 0x01, 0x23, 0x45, 0, 0, proto, 64}, src.AsSlice(), dst.AsSlice(), ext)
	} else {
		opts := genOptions4(g, remote)
		ipHdr = cat([]byte{byte(0x40 | (20+len(opts))/4), 0, 0, 0, 0x42, 0x42, 0x40, 0, 64, protoTCP, 0, 0}, src.AsSlice(), dst.AsSlice(), opts)
	}
	// The TCP header: Linux's options, or an MPTCP ADD_ADDR.
	tcpOpts := []byte{1, 1, 8, 10, 0, 0, 1, 0, 0, 0, 2, 0}
	if g.byte()%2 == 1 {
		id, a := g.safe(), g.addr(remote)
		o := cat([]byte{tcpOptMPTCP, 0, 0x30, id}, a)
		if g.byte()%2 == 1 {
			o = append(o, g.safes(2)...) // a port
		}
		if g.byte()%2 == 1 {
			o = append(o, g.safes(8)...) // an HMAC
		} else {
			o[2] = 0x31 // an echo
		}
		o[1] = byte(len(o))
		tcpOpts = append(o, 1, 1)
		for len(tcpOpts)%4 != 0 {
			tcpOpts = append(tcpOpts, 0)
		}
	}
	tcp := cat([]byte{0x01, 0xbb, 0xc8, 0x22, 1, 2, 3, 4, 0x0a, 0x0b, 0x0c, 0x0d, byte((20 + len(tcpOpts)) / 4 << 4), 0x10, 0x01, 0xf5, 0, 0, 0, 0}, tcpOpts)
	eth := []byte{2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00}
	if v6 {
		eth[12], eth[13] = 0x86, 0xdd
		binary.BigEndian.PutUint16(ipHdr[4:], uint16(len(ipHdr)-40+len(tcp)))
	} else {
		binary.BigEndian.PutUint16(ipHdr[2:], uint16(len(ipHdr)+len(tcp)))
		binary.BigEndian.PutUint16(ipHdr[10:], internetChecksum(ipHdr))
	}
	p := cat(eth, ipHdr, tcp)
	h, err := flow.Parse(p, flow.LinkEthernet)
	if err != nil {
		tb.Fatalf("generated packet does not parse: %v\n% x", err, p)
	}
	setTCPChecksum(p, h, src.AsSlice(), dst.AsSlice())
	return p
}

// genOptions4 returns IPv4 options, at most 40 bytes, padded to a multiple
// of 4. An End of Options, or an option of any length (malformed, or one
// that runs over others), ends them; so does the 40-byte limit, which may
// cut an option short.
func genOptions4(g *gen, remote netip.Addr) []byte {
	var opts []byte
	for n := g.byte() % 6; n > 0 && len(opts) < 40; n-- {
		switch g.byte() % 8 {
		case 0:
			opts = append(opts, optNOP)
		case 1: // End of Options, then anything
			opts = append(opts, optEOL)
			opts = append(opts, g.raw(int(g.byte()%8))...)
			n = 1
		case 2: // a route: Record Route, Loose or Strict Source Route
			o := []byte{[]byte{optRecordRoute, optLSRR, optSSRR}[g.byte()%3], 0, g.safe()}
			for k := g.byte() % 4; k > 0; k-- {
				o = append(o, g.addr(remote)...)
			}
			o = append(o, g.raw(int(g.byte()%4))...) // bytes too few for an address
			o[1] = byte(len(o))
			opts = append(opts, o...)
		case 3: // a timestamp option
			flag := []byte{0, 1, 3, 2}[g.byte()%4]
			o := []byte{optTimestamp, 0, g.safe(), g.safe()&0xf0 | flag}
			for k := g.byte() % 4; k > 0; k-- {
				switch flag {
				case 0:
					o = append(o, g.safes(4)...)
				case 1, 3:
					o = append(o, g.addr(remote)...)
					o = append(o, g.safes(4)...)
				default:
					o = append(o, g.raw(4)...)
				}
			}
			o[1] = byte(len(o))
			opts = append(opts, o...)
		case 4:
			opts = append(opts, optRouterAlert, 4, g.safe(), g.safe())
		case 5: // an option Packet does not know
			typ := g.safe()
			switch typ {
			case optEOL, optNOP, optRecordRoute, optTimestamp, optLSRR, optSSRR, optRouterAlert:
				typ = 0x99
			}
			d := g.raw(int(g.byte() % 10))
			if g.byte()%2 == 1 {
				d = append(d, remote.AsSlice()...)
			}
			opts = append(opts, typ, byte(2+len(d)))
			opts = append(opts, d...)
		case 6: // any length: last
			opts = append(opts, []byte{optRecordRoute, optTimestamp, optLSRR, optRouterAlert, 0x99}[g.byte()%5], g.byte())
			opts = append(opts, g.safes(int(g.byte()%6))...)
			n = 1
		case 7:
			opts = append(opts, optNOP, optNOP)
		}
	}
	opts = opts[:min(len(opts), 40)]
	for len(opts)%4 != 0 {
		opts = append(opts, optEOL)
	}
	return opts
}

// genExt6 returns IPv6 extension headers and the next header of the fixed
// header: up to four, each well formed.
func genExt6(g *gen, remote netip.Addr) ([]byte, byte) {
	type hdr struct {
		proto byte
		b     []byte // byte 0 is set to the next header
	}
	var hs []hdr
	pad8 := func(b []byte) []byte {
		// A PadN, or a Pad1, to a multiple of 8.
		switch n := (8 - len(b)%8) % 8; {
		case n == 1:
			b = append(b, opt6Pad1)
		case n > 1:
			b = append(b, opt6PadN, byte(n-2))
			b = append(b, make([]byte, n-2)...)
		}
		return b
	}
	for n := g.byte() % 5; n > 0; n-- {
		switch g.byte() % 8 {
		case 0, 1: // hop-by-hop or destination options
			proto := byte(protoHopByHop)
			if g.byte()%2 == 1 {
				proto = protoDstOpts
			}
			b := []byte{0, 0}
			for k := g.byte() % 4; k > 0; k-- {
				switch g.byte() % 6 {
				case 0:
					b = append(b, opt6Pad1)
				case 1:
					d := g.raw(int(g.byte() % 8))
					b = append(b, opt6PadN, byte(len(d)))
					b = append(b, d...)
				case 2:
					b = append(b, opt6RouterAlert, 2, g.safe(), g.safe())
				case 3:
					b = append(b, opt6TunnelLimit, 1, g.safe())
				case 4: // home address (cleared in a hop-by-hop header)
					b = append(b, opt6HomeAddress, 16)
					b = append(b, g.addr(remote)...)
				default: // unknown
					typ := g.safe()
					switch typ {
					case opt6Pad1, opt6PadN, opt6RouterAlert, opt6TunnelLimit, opt6Jumbo, opt6HomeAddress:
						typ = 0x3e
					}
					d := g.raw(int(g.byte() % 8))
					if g.byte()%2 == 1 {
						d = append(d, remote.AsSlice()...)
					}
					b = append(b, typ, byte(len(d)))
					b = append(b, d...)
				}
			}
			b = pad8(b)
			b[1] = byte(len(b)/8 - 1)
			hs = append(hs, hdr{proto, b})
		case 2: // routing header, type 0, 2 or 4
			typ := []byte{routingType0, routingType2, routingTypeSRH}[g.byte()%3]
			k := int(g.byte()%3) + 1
			if typ == routingType2 {
				k = 1
			}
			b := []byte{0, byte(2 * k), typ, g.byte() % byte(k+1)}
			if typ == routingTypeSRH {
				b = append(b, byte(k-1), g.safe(), g.safe(), g.safe())
			} else {
				b = append(b, g.raw(4)...) // reserved
			}
			for range k {
				b = append(b, g.addr(remote)...)
			}
			if typ == routingTypeSRH && g.byte()%2 == 1 {
				tlv := append(g.raw(4), remote.AsSlice()...)
				tlv = append(tlv, g.raw(4)...)
				b = append(b, tlv...) // TLVs: 24 bytes
				b[1] += 3
			}
			hs = append(hs, hdr{protoRouting, b})
		case 3: // routing header of another type
			typ := g.safe()
			switch typ {
			case routingType0, routingType2, routingTypeSRH:
				typ = 3
			}
			b := append([]byte{0, 2, typ, g.byte() % 3}, g.raw(4)...)
			b = append(b, remote.AsSlice()...)
			hs = append(hs, hdr{protoRouting, b})
		case 4: // first fragment
			hs = append(hs, hdr{protoFragment, cat([]byte{0, g.safe(), 0, g.byte() % 2}, g.safes(4))})
		case 5: // authentication header
			n := []int{1, 3}[g.byte()%2]
			hs = append(hs, hdr{protoAH, cat([]byte{0, byte(n)}, g.safes((n+2)*4-2))})
		case 6: // mobility header
			b := cat([]byte{0, 2, g.safe()}, g.raw(5), remote.AsSlice())
			hs = append(hs, hdr{protoMobility, b})
		}
	}
	var ext []byte
	first := byte(protoTCP)
	for i := len(hs) - 1; i >= 0; i-- {
		hs[i].b[0] = first
		first = hs[i].proto
		ext = append(hs[i].b, ext...)
	}
	return ext, first
}

// checkGenerated builds the packet spec describes twice, with remote and
// with remote2 (which differs from it only in the bytes anonymization
// zeroes), anonymizes both, and checks that the results are the same byte
// for byte, that neither holds its remote address anywhere, that both
// checksums are still valid, and that anonymizing again changes nothing.
func checkGenerated(t *testing.T, a *Anonymizer, spec []byte, remote, remote2 netip.Addr) {
	t.Helper()
	var got [2][]byte
	for i, r := range []netip.Addr{remote, remote2} {
		p := genPacket(t, spec, r)
		h := parse(t, p)
		a.Packet(p, h.L3, h.L4, h.IPv6)
		if i := bytes.Index(p, r.AsSlice()); i >= 0 {
			t.Fatalf("%v survives at byte %d of the anonymized packet % x", r, i, p)
		}
		if !h.IPv6 && !ipValid(p, h) {
			t.Fatalf("IPv4 header checksum not valid after: % x", p)
		}
		if !tcpValid(p, h) {
			t.Fatalf("TCP checksum not valid after: % x", p)
		}
		again := bytes.Clone(p)
		a.Packet(again, h.L3, h.L4, h.IPv6)
		if !bytes.Equal(again, p) {
			t.Fatalf("anonymizing again changed the packet:\n%s", cmp.Diff(p, again))
		}
		got[i] = p
	}
	if !bytes.Equal(got[0], got[1]) {
		t.Fatalf("anonymized packets from %v and %v differ (-first +second):\n%s", remote, remote2, cmp.Diff(got[0], got[1]))
	}
}
