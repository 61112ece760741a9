package anonymize

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/m-lab/packet-headers/flow"
)

// More test addresses, and what netblock makes of each remote one.
var (
	remote4c = netip.MustParseAddr("198.51.100.23") // another remote host
	router4  = netip.MustParseAddr("198.51.100.1")  // a hop of a source route
	remote6c = netip.MustParseAddr("2001:db8:5555:6666:7777:8888:9999:aaaa")

	anonOf = map[netip.Addr]netip.Addr{
		remote4:  netip.MustParseAddr("203.0.113.0"),
		remote4b: netip.MustParseAddr("203.0.113.0"),
		remote4c: netip.MustParseAddr("198.51.100.0"),
		router4:  netip.MustParseAddr("198.51.100.0"),
		remote6:  netip.MustParseAddr("2001:db8:abcd::"),
		remote6b: netip.MustParseAddr("2001:db8:abcd::"),
		remote6c: netip.MustParseAddr("2001:db8:5555::"),
	}
)

// anon returns addr as Packet must leave it: local addresses whole.
func anon(addr netip.Addr) netip.Addr {
	if a, ok := anonOf[addr]; ok {
		return a
	}
	return addr
}

func b4(addrs ...netip.Addr) []byte {
	var b []byte
	for _, a := range addrs {
		b = append(b, a.AsSlice()...)
	}
	return b
}

// ts is a 4-byte timestamp, distinct for each n.
func ts(n byte) []byte { return []byte{0x01, 0x02, 0x03, n} }

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// packet4 is a TCP packet over IPv4 with options.
type packet4 struct {
	src, dst netip.Addr
	opts     []layers.IPv4Option
	padding  []byte // bytes after an End of Options
	tcpOpts  []layers.TCPOption
}

// packet6 is a TCP packet over IPv6 with extension headers.
type packet6 struct {
	src, dst netip.Addr
	ext      []gopacket.SerializableLayer
	tcpOpts  []layers.TCPOption
}

// serialize builds an Ethernet frame of the given layers, with the TCP
// checksum computed by gopacket (with the final destination of a pending
// IPv4 source route; with the IPv6 header's addresses) and payload.
func serialize(tb testing.TB, ip gopacket.SerializableLayer, ext []gopacket.SerializableLayer, tcpOpts []layers.TCPOption, payload []byte) []byte {
	tb.Helper()
	eth := &layers.Ethernet{
		SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2},
		EthernetType: layers.EthernetTypeIPv4,
	}
	tcp := &layers.TCP{
		SrcPort: 443, DstPort: 51234, Seq: 0x01020304, Ack: 0x0a0b0c0d,
		ACK: true, PSH: len(payload) > 0, Window: 501,
		Options: append([]layers.TCPOption{
			{OptionType: layers.TCPOptionKindNop},
			{OptionType: layers.TCPOptionKindNop},
			{OptionType: layers.TCPOptionKindTimestamps, OptionData: []byte{0, 0, 1, 0, 0, 0, 2, 0}},
		}, tcpOpts...),
	}
	if ip6, ok := ip.(*layers.IPv6); ok {
		eth.EthernetType = layers.EthernetTypeIPv6
		ip6.NextHeader = layers.IPProtocolTCP
		next := &ip6.NextHeader
		for _, e := range ext {
			// Chain the headers: each one's next header is the type of
			// the one after.
			var proto layers.IPProtocol
			var nh *layers.IPProtocol
			switch l := e.(type) {
			case *layers.IPv6HopByHop:
				proto, nh = layers.IPProtocolIPv6HopByHop, &l.NextHeader
			case *layers.IPv6Destination:
				proto, nh = layers.IPProtocolIPv6Destination, &l.NextHeader
			case *layers.IPv6Routing:
				proto, nh = layers.IPProtocolIPv6Routing, &l.NextHeader
			case *layers.IPv6Fragment:
				proto, nh = layers.IPProtocolIPv6Fragment, &l.NextHeader
			case rawExt:
				proto, nh = l.proto, new(layers.IPProtocol)
			default:
				tb.Fatalf("unknown extension layer %T", e)
			}
			*next = proto
			next = nh
		}
		*next = layers.IPProtocolTCP
		for i, e := range ext {
			if r, ok := e.(rawExt); ok {
				r.b[0] = byte(layers.IPProtocolTCP)
				if i+1 < len(ext) {
					r.b[0] = byte(nextProto(ext[i+1]))
				}
			}
		}
		if err := tcp.SetNetworkLayerForChecksum(ip6); err != nil {
			tb.Fatal(err)
		}
	} else if err := tcp.SetNetworkLayerForChecksum(ip.(*layers.IPv4)); err != nil {
		tb.Fatal(err)
	}
	ls := []gopacket.SerializableLayer{eth, ip}
	for _, e := range ext {
		if r, ok := e.(rawExt); ok {
			e = r.b
		}
		ls = append(ls, e)
	}
	ls = append(ls, tcp, gopacket.Payload(payload))
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true}, ls...); err != nil {
		tb.Fatalf("serialize: %v", err)
	}
	return bytes.Clone(buf.Bytes())
}

// rawExt is an IPv6 extension header given as bytes (authentication,
// mobility, routing headers gopacket does not build); its first byte is
// set to the next header.
type rawExt struct {
	proto layers.IPProtocol
	b     gopacket.Payload
}

// SerializeTo and LayerType make rawExt a layer; serialize serializes its
// bytes.
func (r rawExt) SerializeTo(b gopacket.SerializeBuffer, opts gopacket.SerializeOptions) error {
	return r.b.SerializeTo(b, opts)
}
func (r rawExt) LayerType() gopacket.LayerType { return gopacket.LayerTypePayload }

func nextProto(l gopacket.SerializableLayer) layers.IPProtocol {
	switch l := l.(type) {
	case *layers.IPv6HopByHop:
		return layers.IPProtocolIPv6HopByHop
	case *layers.IPv6Destination:
		return layers.IPProtocolIPv6Destination
	case *layers.IPv6Routing:
		return layers.IPProtocolIPv6Routing
	case *layers.IPv6Fragment:
		return layers.IPProtocolIPv6Fragment
	case rawExt:
		return l.proto
	}
	return layers.IPProtocolTCP
}

func (p packet4) build(tb testing.TB, payload []byte) []byte {
	ip := &layers.IPv4{
		Version: 4, TTL: 64, Id: 0x4242, Flags: layers.IPv4DontFragment,
		Protocol: layers.IPProtocolTCP, SrcIP: p.src.AsSlice(), DstIP: p.dst.AsSlice(),
		Options: p.opts, Padding: p.padding,
	}
	return serialize(tb, ip, nil, p.tcpOpts, payload)
}

func (p packet6) build(tb testing.TB, payload []byte) []byte {
	ip := &layers.IPv6{
		Version: 6, FlowLabel: 0x12345, HopLimit: 64,
		SrcIP: p.src.AsSlice(), DstIP: p.dst.AsSlice(),
	}
	return serialize(tb, ip, p.ext, p.tcpOpts, payload)
}

// setTCPChecksum computes the TCP checksum of p, which holds the whole
// segment, afresh with src and dst in the pseudo-header.
func setTCPChecksum(p []byte, h flow.Header, src, dst []byte) {
	_, seg := segment(p, h)
	seg[16], seg[17] = 0, 0
	pseudo := cat(src, dst)
	if h.IPv6 {
		pseudo = binary.BigEndian.AppendUint32(pseudo, uint32(len(seg)))
		pseudo = append(pseudo, 0, 0, 0, 6)
	} else {
		pseudo = append(pseudo, 0, 6)
		pseudo = binary.BigEndian.AppendUint16(pseudo, uint16(len(seg)))
	}
	binary.BigEndian.PutUint16(seg[16:], internetChecksum(pseudo, seg))
}

// pseudoAddrs picks the addresses a sender put in the TCP pseudo-header.
type pseudoAddrs func(p []byte, h flow.Header) (src, dst []byte)

// headerPseudo is the IP header's addresses, as a sender that ignores
// source routes and home addresses has it.
func headerPseudo(p []byte, h flow.Header) (src, dst []byte) { return h.SrcDst(p) }

// optionsCase is a packet, and the packet Packet must make of it, each built
// by gopacket with every checksum computed afresh.
type optionsCase struct {
	name       string
	orig, want func(tb testing.TB, payload []byte) []byte
	// pseudo, if not nil, recomputes the TCP checksum of both packets
	// with these addresses (how some sender computed it).
	pseudo pseudoAddrs
	// choice: the TCP pseudo-header may hold addresses other than the
	// header's, so that a checksum Packet cannot check (over absent
	// payload) becomes 0.
	choice bool
}

// TestPacketOptions anonymizes IPv4 packets with options, IPv6 packets with
// extension headers and MPTCP ADD_ADDR options, and checks every byte of the
// result against the same packet built with the anonymized addresses and
// cleared data: the whole packet (payload included, so that the TCP checksum
// can be checked and must stay valid) and the record cut after the TCP
// header.
func TestPacketOptions(t *testing.T) {
	a := New(Netblock, []netip.Addr{local4, local6})
	for _, tc := range optionsCases() {
		t.Run(tc.name, func(t *testing.T) {
			payload := []byte("GET / HTTP/1.1\r\n")
			orig, want := tc.orig(t, payload), tc.want(t, payload)
			h := parse(t, orig)
			if hw := parse(t, want); hw != (flow.Header{Key: hw.Key, L3: h.L3, L4: h.L4, End: h.End, IPv6: h.IPv6}) {
				t.Fatalf("the wanted packet's layout %+v differs from the packet's %+v", hw, h)
			}
			if tc.pseudo != nil {
				src, dst := tc.pseudo(orig, h)
				setTCPChecksum(orig, h, src, dst)
				src, dst = tc.pseudo(want, h)
				setTCPChecksum(want, h, src, dst)
			}
			if !h.IPv6 && !ipValid(orig, h) {
				t.Fatal("IPv4 checksum of the test packet not valid")
			}

			got := bytes.Clone(orig)
			a.Packet(got, h.L3, h.L4, h.IPv6)
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("whole packet: anonymized mismatch (-want +got):\n%s", diff)
			}
			again := bytes.Clone(got)
			a.Packet(again, h.L3, h.L4, h.IPv6)
			if !bytes.Equal(again, got) {
				t.Errorf("anonymizing again changed the packet:\n%s", cmp.Diff(got, again))
			}

			// The record as the saver has it: cut after the TCP header.
			rec := bytes.Clone(orig[:h.End])
			a.Packet(rec, h.L3, h.L4, h.IPv6)
			wantRec := bytes.Clone(want[:h.End])
			if tc.choice {
				wantRec[h.L4+16], wantRec[h.L4+17] = 0, 0
			}
			if diff := cmp.Diff(wantRec, rec); diff != "" {
				t.Errorf("record: anonymized mismatch (-want +got):\n%s", diff)
			}
			for _, r := range []netip.Addr{remote4, remote4c, remote6, remote6b, remote6c} {
				if bytes.Contains(rec, r.AsSlice()) {
					t.Errorf("record holds remote address %v", r)
				}
			}
		})
	}
}

func optionsCases() []optionsCase {
	// v4 builds both packets of an IPv4 case: orig with the given
	// options, want with the options wantOpts and the addresses
	// anonymized.
	v4 := func(name string, src, dst netip.Addr, opts, wantOpts []layers.IPv4Option) optionsCase {
		return optionsCase{
			name: "v4/" + name,
			orig: func(tb testing.TB, pl []byte) []byte { return packet4{src: src, dst: dst, opts: opts}.build(tb, pl) },
			want: func(tb testing.TB, pl []byte) []byte {
				return packet4{src: anon(src), dst: anon(dst), opts: wantOpts}.build(tb, pl)
			},
		}
	}
	opt := func(typ byte, data ...[]byte) layers.IPv4Option {
		d := cat(data...)
		return layers.IPv4Option{OptionType: typ, OptionLength: uint8(len(d) + 2), OptionData: d}
	}
	nop := layers.IPv4Option{OptionType: 1}
	ptr := func(p byte) []byte { return []byte{p} }

	var cases []optionsCase
	cases = append(cases,
		v4("record route", remote4, local4,
			[]layers.IPv4Option{nop, opt(7, ptr(16), b4(remote4c, local4, remote4))},
			[]layers.IPv4Option{nop, opt(7, ptr(16), b4(anon(remote4c), local4, anon(remote4)))}),
		v4("record route with room left", remote4, local4,
			[]layers.IPv4Option{opt(7, ptr(8), b4(remote4c, remote4b, netip.IPv4Unspecified()))},
			[]layers.IPv4Option{opt(7, ptr(8), b4(anon(remote4c), anon(remote4b), netip.IPv4Unspecified()))}),
		v4("record route, odd length", remote4, local4,
			// One address and three bytes of another: the three are cleared.
			[]layers.IPv4Option{opt(7, ptr(12), b4(remote4c), []byte{203, 0, 113}), nop},
			[]layers.IPv4Option{opt(7, ptr(12), b4(anon(remote4c)), []byte{0, 0, 0}), nop}),
		v4("loose source route used up", remote4, local4,
			[]layers.IPv4Option{opt(131, ptr(12), b4(remote4c, router4)), nop},
			[]layers.IPv4Option{opt(131, ptr(12), b4(anon(remote4c), anon(router4))), nop}),
		v4("timestamps only", remote4, local4,
			[]layers.IPv4Option{opt(68, ptr(13), []byte{0x10}, ts(1), ts(2))},
			[]layers.IPv4Option{opt(68, ptr(13), []byte{0x10}, ts(1), ts(2))}),
		v4("timestamps with addresses", remote4, local4,
			[]layers.IPv4Option{opt(68, ptr(21), []byte{0x01}, b4(remote4), ts(1), b4(local4), ts(2)), nop, nop, nop},
			[]layers.IPv4Option{opt(68, ptr(21), []byte{0x01}, b4(anon(remote4)), ts(1), b4(local4), ts(2)), nop, nop, nop}),
		v4("timestamps of prespecified addresses", local4, remote4,
			[]layers.IPv4Option{opt(68, ptr(5), []byte{0x03}, b4(remote4c), ts(0), b4(remote4), ts(0)), nop, nop, nop},
			[]layers.IPv4Option{opt(68, ptr(5), []byte{0x03}, b4(anon(remote4c)), ts(0), b4(anon(remote4)), ts(0)), nop, nop, nop}),
		v4("timestamps, unknown flag", remote4, local4,
			[]layers.IPv4Option{opt(68, ptr(5), []byte{0x02}, b4(remote4), ts(1)), nop, nop, nop},
			[]layers.IPv4Option{opt(68, ptr(5), []byte{0x02}, make([]byte, 8)), nop, nop, nop}),
		v4("router alert and unknown options", remote4, local4,
			[]layers.IPv4Option{
				opt(148, []byte{0, 0}),
				opt(82, []byte{0x12, 0x34, 0, 1, 0, 2}, b4(remote4)), // traceroute: an originator address
				opt(130, []byte{0xab, 0xcd, 203, 0, 113, 77, 1, 2, 3}),
				nop, nop, nop,
			},
			[]layers.IPv4Option{
				opt(148, []byte{0, 0}),
				opt(82, make([]byte, 10)),
				opt(130, make([]byte, 9)),
				nop, nop, nop,
			}),
		optionsCase{
			name: "v4/bytes after the end of options",
			orig: func(tb testing.TB, pl []byte) []byte {
				return packet4{src: remote4, dst: local4, opts: []layers.IPv4Option{nop, {OptionType: 0}}, padding: cat(b4(remote4), []byte{1, 2})}.build(tb, pl)
			},
			want: func(tb testing.TB, pl []byte) []byte {
				return packet4{src: anon(remote4), dst: local4, opts: []layers.IPv4Option{nop, {OptionType: 0}}, padding: make([]byte, 6)}.build(tb, pl)
			},
		},
	)
	// A pending strict source route: the server sends to the first hop,
	// and the TCP checksum holds the final destination, the client (as
	// RFC 9293 and gopacket have it), or the header's (as a sender
	// ignoring the option would).
	ssrr := func(name string, pseudo pseudoAddrs) optionsCase {
		c := v4(name, local4, router4,
			[]layers.IPv4Option{opt(137, ptr(4), b4(remote4c, remote4)), nop},
			[]layers.IPv4Option{opt(137, ptr(4), b4(anon(remote4c), anon(remote4))), nop})
		c.pseudo, c.choice = pseudo, true
		return c
	}
	cases = append(cases,
		ssrr("pending strict source route", nil),
		ssrr("pending strict source route, header pseudo-header", headerPseudo),
	)

	// IPv6.
	v6 := func(name string, src, dst netip.Addr, ext, wantExt func() []gopacket.SerializableLayer) optionsCase {
		return optionsCase{
			name: "v6/" + name,
			orig: func(tb testing.TB, pl []byte) []byte { return packet6{src: src, dst: dst, ext: ext()}.build(tb, pl) },
			want: func(tb testing.TB, pl []byte) []byte {
				return packet6{src: anon(src), dst: anon(dst), ext: wantExt()}.build(tb, pl)
			},
		}
	}
	tlv := func(typ byte, data ...[]byte) *layers.IPv6DestinationOption {
		return &layers.IPv6DestinationOption{OptionType: typ, OptionData: cat(data...)}
	}
	hbh := func(opts ...*layers.IPv6DestinationOption) *layers.IPv6HopByHop {
		h := &layers.IPv6HopByHop{}
		for _, o := range opts {
			h.Options = append(h.Options, (*layers.IPv6HopByHopOption)(o))
		}
		return h
	}
	dsto := func(opts ...*layers.IPv6DestinationOption) *layers.IPv6Destination {
		return &layers.IPv6Destination{Options: opts}
	}
	exts := func(ls ...gopacket.SerializableLayer) func() []gopacket.SerializableLayer {
		return func() []gopacket.SerializableLayer { return ls }
	}
	cases = append(cases,
		v6("hop-by-hop options", remote6, local6,
			exts(hbh(tlv(5, []byte{0, 0}), tlv(1, []byte{0xde, 0xad, 0xbe, 0xef}), tlv(0x3e, a16(remote6)), tlv(0xc9, a16(remote6)))),
			exts(hbh(tlv(5, []byte{0, 0}), tlv(1, make([]byte, 4)), tlv(0x3e, make([]byte, 16)), tlv(0xc9, make([]byte, 16))))),
		v6("destination options: tunnel limit, padding", remote6, local6,
			exts(dsto(tlv(4, []byte{4}), tlv(1, []byte{1}))),
			exts(dsto(tlv(4, []byte{4}), tlv(1, []byte{0})))),
		v6("routing header type 0, used up", remote6, local6,
			exts(&layers.IPv6Routing{RoutingType: 0, SegmentsLeft: 0, Reserved: []byte{1, 2, 3, 4}, SourceRoutingIPs: []net.IP{remote6c.AsSlice(), local6.AsSlice()}}),
			exts(&layers.IPv6Routing{RoutingType: 0, SegmentsLeft: 0, Reserved: []byte{0, 0, 0, 0}, SourceRoutingIPs: []net.IP{anon(remote6c).AsSlice(), local6.AsSlice()}})),
		v6("fragment and authentication headers", remote6, local6,
			exts(&layers.IPv6Fragment{Identification: 0xcafe},
				rawExt{layers.IPProtocolAH, cat([]byte{0, 4, 0, 0}, []byte{0, 0, 1, 0}, ts(1), make([]byte, 12))}),
			exts(&layers.IPv6Fragment{Identification: 0xcafe},
				rawExt{layers.IPProtocolAH, cat([]byte{0, 4, 0, 0}, []byte{0, 0, 1, 0}, ts(1), make([]byte, 12))})),
		v6("mobility header", remote6, local6,
			exts(rawExt{135, cat([]byte{0, 2, 7, 1, 0xab, 0xcd}, a16(remote6), []byte{1, 2})}),
			exts(rawExt{135, cat([]byte{0, 2, 7}, make([]byte, 21))})),
		v6("segment routing header, used up", remote6, local6,
			exts(&layers.IPv6Routing{RoutingType: 4, SegmentsLeft: 0, Reserved: []byte{1, 0x80, 0, 7},
				Data: cat(a16(local6, remote6c), []byte{5, 6}, a16(remote6)[:6])}),
			exts(&layers.IPv6Routing{RoutingType: 4, SegmentsLeft: 0, Reserved: []byte{1, 0x80, 0, 7},
				Data: cat(a16(local6, anon(remote6c)), make([]byte, 8))})),
	)
	// The home address option: the mobile node sends from its care-of
	// address (remote6) with its home address (remote6b) in the option,
	// which the TCP pseudo-header holds (RFC 6275), or not.
	hao := func(name string, pseudo pseudoAddrs) optionsCase {
		c := v6(name, remote6, local6,
			exts(dsto(tlv(1, make([]byte, 2)), tlv(0xc9, a16(remote6b)))),
			exts(dsto(tlv(1, make([]byte, 2)), tlv(0xc9, a16(anon(remote6b))))))
		c.pseudo, c.choice = pseudo, true
		return c
	}
	haoPseudo := func(p []byte, h flow.Header) (src, dst []byte) {
		_, dst = h.SrcDst(p)
		return p[h.L4-16 : h.L4], dst
	}
	cases = append(cases, hao("home address option", haoPseudo), hao("home address option, header pseudo-header", nil))
	// A type 2 routing header: the server sends to the care-of address
	// (remote6), the final destination is the home address (remote6b).
	rh2 := func(name string, pseudo pseudoAddrs) optionsCase {
		c := v6(name, local6, remote6,
			exts(&layers.IPv6Routing{RoutingType: 2, SegmentsLeft: 1, Reserved: make([]byte, 4), Data: a16(remote6b)}),
			exts(&layers.IPv6Routing{RoutingType: 2, SegmentsLeft: 1, Reserved: make([]byte, 4), Data: a16(anon(remote6b))}))
		c.pseudo, c.choice = pseudo, true
		return c
	}
	lastPseudo := func(p []byte, h flow.Header) (src, dst []byte) {
		src, _ = h.SrcDst(p)
		return src, p[h.L4-16 : h.L4]
	}
	cases = append(cases, rh2("routing header type 2", lastPseudo), rh2("routing header type 2, header pseudo-header", nil))
	// Segment routing with segments left: the final destination is
	// Segment List[0].
	srh := v6("segment routing header, segments left", local6, remote6c,
		exts(&layers.IPv6Routing{RoutingType: 4, SegmentsLeft: 1, Reserved: []byte{1, 0, 0, 0}, Data: a16(remote6b, remote6c)}),
		exts(&layers.IPv6Routing{RoutingType: 4, SegmentsLeft: 1, Reserved: []byte{1, 0, 0, 0}, Data: a16(anon(remote6b), anon(remote6c))}))
	srh.pseudo = func(p []byte, h flow.Header) (src, dst []byte) {
		src, _ = h.SrcDst(p)
		return src, p[h.L4-32 : h.L4-16]
	}
	srh.choice = true
	cases = append(cases, srh)
	// A routing header of a type Packet does not read (3, RPL), with
	// segments left: its data is cleared, and where the TCP checksum
	// cannot be checked, it is too.
	rpl := v6("routing header type 3, segments left", remote6, local6,
		exts(&layers.IPv6Routing{RoutingType: 3, SegmentsLeft: 2, Reserved: []byte{0x88, 0, 0, 0}, Data: a16(remote6)}),
		exts(&layers.IPv6Routing{RoutingType: 3, SegmentsLeft: 2, Reserved: make([]byte, 4), Data: make([]byte, 16)}))
	rpl.choice = true
	cases = append(cases, rpl)

	// MPTCP ADD_ADDR: the client advertises another address of its own.
	addAddr := func(name string, src, dst netip.Addr, data, wantData []byte) optionsCase {
		o := func(d []byte) []layers.TCPOption { return []layers.TCPOption{{OptionType: 30, OptionData: d}} }
		if src.Is4() {
			return optionsCase{
				name: "mptcp/" + name,
				orig: func(tb testing.TB, pl []byte) []byte {
					return packet4{src: src, dst: dst, tcpOpts: o(data)}.build(tb, pl)
				},
				want: func(tb testing.TB, pl []byte) []byte {
					return packet4{src: anon(src), dst: anon(dst), tcpOpts: o(wantData)}.build(tb, pl)
				},
			}
		}
		return optionsCase{
			name: "mptcp/" + name,
			orig: func(tb testing.TB, pl []byte) []byte {
				return packet6{src: src, dst: dst, tcpOpts: o(data)}.build(tb, pl)
			},
			want: func(tb testing.TB, pl []byte) []byte {
				return packet6{src: anon(src), dst: anon(dst), tcpOpts: o(wantData)}.build(tb, pl)
			},
		}
	}
	hmac := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	cases = append(cases,
		addAddr("v4 with HMAC", remote4, local4, cat([]byte{0x30, 1}, b4(remote4c), hmac), cat([]byte{0x30, 1}, b4(anon(remote4c)), make([]byte, 8))),
		addAddr("v4 with port and HMAC", remote4, local4, cat([]byte{0x30, 1}, b4(remote4), []byte{0x1f, 0x90}, hmac), cat([]byte{0x30, 1}, b4(anon(remote4)), []byte{0x1f, 0x90}, make([]byte, 8))),
		addAddr("v4 echo", local4, remote4, cat([]byte{0x31, 1}, b4(remote4c)), cat([]byte{0x31, 1}, b4(anon(remote4c)))),
		addAddr("v4 local", local4, remote4, cat([]byte{0x30, 2}, b4(local4), hmac), cat([]byte{0x30, 2}, b4(local4), hmac)),
		addAddr("v6 with HMAC", remote6, local6, cat([]byte{0x30, 1}, a16(remote6c), hmac), cat([]byte{0x30, 1}, a16(anon(remote6c)), make([]byte, 8))),
		addAddr("v6 echo with port", local6, remote6, cat([]byte{0x31, 1}, a16(remote6b), []byte{0, 80}), cat([]byte{0x31, 1}, a16(anon(remote6b)), []byte{0, 80})),
		addAddr("remove address", remote4, local4, []byte{0x40, 1, 2, 3}, []byte{0x40, 1, 2, 3}),
	)
	return cases
}

// TestPacketMalformedOptions: an IPv4 option whose length does not fit
// clears the options from there on, and an IPv6 extension header that runs
// into the TCP header or is unknown clears what the walk cannot account for.
func TestPacketMalformedOptions(t *testing.T) {
	a := New(Netblock, []netip.Addr{local4, local6})
	t.Run("v4 option too long", func(t *testing.T) {
		opts := []layers.IPv4Option{{OptionType: 1}, {OptionType: 0x99, OptionLength: 6, OptionData: b4(remote4)}, {OptionType: 1}, {OptionType: 1}}
		p := packet4{src: remote4, dst: local4, opts: opts}.build(t, nil)
		h := parse(t, p)
		p[h.L3+20+2] = 40 // the length of option 0x99
		fixIPChecksum(p, h)
		want := bytes.Clone(p)
		copy(want[h.L3+12:], b4(anon(remote4)))
		clear(want[h.L3+21 : h.L4])
		fixIPChecksum(want, h)
		setTCPChecksum(want, h, want[h.L3+12:h.L3+16], want[h.L3+16:h.L3+20])
		a.Packet(p, h.L3, h.L4, h.IPv6)
		if diff := cmp.Diff(want, p); diff != "" {
			t.Errorf("(-want +got):\n%s", diff)
		}
	})
	t.Run("v6 unknown header before TCP", func(t *testing.T) {
		// A destination options header whose next header says UDP (17)
		// while the TCP header follows: from the "UDP" header on, all is
		// cleared up to l4.
		p := packet6{src: remote6, dst: local6, ext: []gopacket.SerializableLayer{
			&layers.IPv6Destination{Options: []*layers.IPv6DestinationOption{{OptionType: 1, OptionData: make([]byte, 4)}}},
			rawExt{layers.IPProtocolIPv6Destination, cat([]byte{0, 1}, make([]byte, 4), a16(remote6)[:10])},
		}}.build(t, nil)
		h := parse(t, p)
		p[h.L3+40] = 17
		want := bytes.Clone(p)
		copy(want[h.L3+8:], a16(anon(remote6)))
		clear(want[h.L3+48 : h.L4])
		setTCPChecksum(want, h, want[h.L3+8:h.L3+24], want[h.L3+24:h.L3+40])
		a.Packet(p, h.L3, h.L4, h.IPv6)
		if diff := cmp.Diff(want, p); diff != "" {
			t.Errorf("(-want +got):\n%s", diff)
		}
	})
}

func a16(addrs ...netip.Addr) []byte { return b4(addrs...) }

func fixIPChecksum(p []byte, h flow.Header) {
	binary.BigEndian.PutUint16(p[h.L3+10:], ipChecksum(p, h))
}
