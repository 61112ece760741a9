package flow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

// The endpoints of the packets the tests build. The ports differ so that a
// swapped source and destination port would show.
var (
	srcV4 = netip.MustParseAddrPort("192.0.2.1:54321")
	dstV4 = netip.MustParseAddrPort("198.51.100.2:3010")
	srcV6 = netip.MustParseAddrPort("[2001:db8::1]:54321")
	dstV6 = netip.MustParseAddrPort("[2001:db8:ffff::2]:3010")

	keyV4 = KeyFromAddrPorts(srcV4, dstV4)
	keyV6 = KeyFromAddrPorts(srcV6, dstV6)
)

// Every packet the tests build carries payloadLen bytes of payloadByte after
// its TCP header, so that a payload byte in a Packet's Data is easy to spot.
const (
	payloadByte = 0xAB
	payloadLen  = 100
)

// cmpKey lets cmp.Diff look inside Key, whose fields are unexported.
var cmpKey = cmp.AllowUnexported(Key{})

func payload() gopacket.Payload { return bytes.Repeat([]byte{payloadByte}, payloadLen) }

// serialize lays out ls the way a capture would see them, with lengths and
// checksums filled in.
func serialize(tb testing.TB, ls ...gopacket.SerializableLayer) []byte {
	tb.Helper()
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(buf, opts, ls...); err != nil {
		tb.Fatalf("SerializeLayers: %v", err)
	}
	return bytes.Clone(buf.Bytes())
}

func ether(et layers.EthernetType) *layers.Ethernet {
	return &layers.Ethernet{
		SrcMAC:       net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01},
		DstMAC:       net.HardwareAddr{0x02, 0, 0, 0, 0, 0x02},
		EthernetType: et,
	}
}

func vlan(id uint16, et layers.EthernetType) *layers.Dot1Q {
	return &layers.Dot1Q{VLANIdentifier: id, Type: et}
}

func ip4(proto layers.IPProtocol) *layers.IPv4 {
	return &layers.IPv4{
		Version: 4, TTL: 64, Id: 0x1234, Protocol: proto,
		SrcIP: srcV4.Addr().AsSlice(), DstIP: dstV4.Addr().AsSlice(),
	}
}

func ip6(next layers.IPProtocol) *layers.IPv6 {
	return &layers.IPv6{
		Version: 6, HopLimit: 64, NextHeader: next,
		SrcIP: srcV6.Addr().AsSlice(), DstIP: dstV6.Addr().AsSlice(),
	}
}

// tcpOver returns the TCP header of a segment from the source to the
// destination port with optLen bytes of options (a multiple of 4), with its
// checksum computed over nl's pseudo-header.
func tcpOver(tb testing.TB, nl gopacket.NetworkLayer, optLen int) *layers.TCP {
	tb.Helper()
	t := &layers.TCP{
		SrcPort: layers.TCPPort(srcV4.Port()), DstPort: layers.TCPPort(dstV4.Port()),
		Seq: 1000, Ack: 2000, ACK: true, PSH: true, Window: 512,
	}
	switch {
	case optLen == 12:
		// What Linux sends on an established connection.
		ts := make([]byte, 8)
		binary.BigEndian.PutUint32(ts, 7)
		t.Options = []layers.TCPOption{
			{OptionType: layers.TCPOptionKindNop},
			{OptionType: layers.TCPOptionKindNop},
			{OptionType: layers.TCPOptionKindTimestamps, OptionData: ts},
		}
	default:
		for range optLen {
			t.Options = append(t.Options, layers.TCPOption{OptionType: layers.TCPOptionKindNop})
		}
	}
	if err := t.SetNetworkLayerForChecksum(nl); err != nil {
		tb.Fatal(err)
	}
	return t
}

// ext6 is an IPv6 extension header of the generic shape (next header, length
// in 8-byte units beyond the first 8) that gopacket cannot build itself.
func ext6(next layers.IPProtocol, units int) gopacket.Payload {
	h := make([]byte, (units+1)*8)
	h[0] = byte(next)
	h[1] = byte(units)
	return h
}

// sllHeader is a Linux cooked capture v1 header for an outgoing packet.
func sllHeader(et layers.EthernetType) gopacket.Payload {
	h := make([]byte, 16)
	binary.BigEndian.PutUint16(h[0:], 4) // LINUX_SLL_OUTGOING
	binary.BigEndian.PutUint16(h[2:], 1) // ARPHRD_ETHER
	binary.BigEndian.PutUint16(h[4:], 6)
	copy(h[6:], []byte{0x02, 0, 0, 0, 0, 0x01})
	binary.BigEndian.PutUint16(h[14:], uint16(et))
	return h
}

// sll2Header is a Linux cooked capture v2 header for an outgoing packet.
func sll2Header(et layers.EthernetType) gopacket.Payload {
	h := make([]byte, 20)
	binary.BigEndian.PutUint16(h[0:], uint16(et))
	binary.BigEndian.PutUint32(h[4:], 2) // interface index
	binary.BigEndian.PutUint16(h[8:], 1) // ARPHRD_ETHER
	h[10] = 4                            // LINUX_SLL_OUTGOING
	h[11] = 6
	copy(h[12:], []byte{0x02, 0, 0, 0, 0, 0x01})
	return h
}

// loopHeader is an OpenBSD loopback header: the address family in network
// byte order.
func loopHeader(family uint32) gopacket.Payload {
	return binary.BigEndian.AppendUint32(nil, family)
}

// tcp4 and tcp6 are the network and transport layers of the usual test
// packet; the caller puts a link header in front.
func tcp4(tb testing.TB) []gopacket.SerializableLayer {
	ip := ip4(layers.IPProtocolTCP)
	ip.Flags = layers.IPv4DontFragment
	return []gopacket.SerializableLayer{ip, tcpOver(tb, ip, 12), payload()}
}

func tcp6(tb testing.TB) []gopacket.SerializableLayer {
	ip := ip6(layers.IPProtocolTCP)
	return []gopacket.SerializableLayer{ip, tcpOver(tb, ip, 12), payload()}
}

// with appends more layers to a stack of them.
func with(first []gopacket.SerializableLayer, rest ...gopacket.SerializableLayer) []gopacket.SerializableLayer {
	return append(first, rest...)
}

// stack lists layers, outermost first.
func stack(ls ...gopacket.SerializableLayer) []gopacket.SerializableLayer { return ls }

type parseCase struct {
	name string
	link LinkType
	data []byte
	want Header
}

// goodCases are packets Parse must accept, with where their headers lie.
// Every one has a 12-byte-option TCP header and payloadLen bytes of payload.
func goodCases(tb testing.TB) []parseCase {
	tb.Helper()
	v4 := func(l3 int) Header { return Header{Key: keyV4, L3: l3, L4: l3 + 20, End: l3 + 52} }
	v6 := func(l3, ext int) Header {
		return Header{Key: keyV6, L3: l3, L4: l3 + 40 + ext, End: l3 + 40 + ext + 32, IPv6: true}
	}

	// IPv4 with 8 bytes of options: router alert and four NOPs.
	ipOpts := ip4(layers.IPProtocolTCP)
	ipOpts.Options = []layers.IPv4Option{
		{OptionType: 0x94, OptionLength: 4, OptionData: []byte{0, 0}},
		{OptionType: 1}, {OptionType: 1}, {OptionType: 1}, {OptionType: 1},
	}
	withOpts := Header{Key: keyV4, L3: 14, L4: 42, End: 74}

	// IPv4 first fragment: more fragments set, offset 0.
	ipMF := ip4(layers.IPProtocolTCP)
	ipMF.Flags = layers.IPv4MoreFragments

	// IPv6 with hop-by-hop (8), destination options (8) and routing (24)
	// extension headers, in RFC 8200's recommended order.
	extIP := ip6(layers.IPProtocolIPv6HopByHop)
	hbh := &layers.IPv6HopByHop{Options: []*layers.IPv6HopByHopOption{{OptionType: 0x1e, OptionData: []byte{1, 2, 3, 4}}}}
	hbh.NextHeader = layers.IPProtocolIPv6Destination
	dst := &layers.IPv6Destination{Options: []*layers.IPv6DestinationOption{{OptionType: 0x1e, OptionData: []byte{5, 6, 7, 8}}}}
	dst.NextHeader = layers.IPProtocolIPv6Routing
	rt := &layers.IPv6Routing{RoutingType: 4, SegmentsLeft: 1, Data: make([]byte, 16)}
	rt.NextHeader = layers.IPProtocolTCP

	// IPv6 first fragment: offset 0, more fragments.
	fragIP := ip6(layers.IPProtocolIPv6Fragment)
	frag := &layers.IPv6Fragment{NextHeader: layers.IPProtocolTCP, MoreFragments: true, Identification: 77}

	// IPv6 with an authentication header: 12 fixed bytes and a 12-byte ICV,
	// its length field in 4-byte units minus 2.
	ahIP := ip6(layers.IPProtocolAH)
	ah := make(gopacket.Payload, 24)
	ah[0], ah[1] = byte(layers.IPProtocolTCP), 24/4-2

	// maxChain IPv6 destination options headers, each 16 bytes long.
	chainIP := ip6(layers.IPProtocolIPv6Destination)
	var chain []gopacket.SerializableLayer
	for i := range maxChain {
		next := layers.IPProtocolIPv6Destination
		if i == maxChain-1 {
			next = layers.IPProtocolTCP
		}
		chain = append(chain, ext6(next, 1))
	}

	// maxChain VLAN tags, alternating the three tag types.
	tags := stack(ether(layers.EthernetTypeQinQ))
	for i := range maxChain {
		next := []layers.EthernetType{layers.EthernetTypeDot1Q, 0x9100, layers.EthernetTypeQinQ}[i%3]
		if i == maxChain-1 {
			next = layers.EthernetTypeIPv4
		}
		tags = append(tags, vlan(uint16(i+1), next))
	}

	cases := []struct {
		name   string
		link   LinkType
		layers []gopacket.SerializableLayer
		want   Header
	}{
		{"ethernet/ipv4", LinkEthernet, with(stack(ether(layers.EthernetTypeIPv4)), tcp4(tb)...), v4(14)},
		{"ethernet/ipv4 options", LinkEthernet, stack(ether(layers.EthernetTypeIPv4), ipOpts, tcpOver(tb, ipOpts, 12), payload()), withOpts},
		{"ethernet/ipv4 first fragment", LinkEthernet, stack(ether(layers.EthernetTypeIPv4), ipMF, tcpOver(tb, ipMF, 12), payload()), v4(14)},
		{"ethernet/ipv6", LinkEthernet, with(stack(ether(layers.EthernetTypeIPv6)), tcp6(tb)...), v6(14, 0)},
		{"ethernet/ipv6 hbh+dst+routing", LinkEthernet, stack(ether(layers.EthernetTypeIPv6), extIP, hbh, dst, rt, tcpOver(tb, extIP, 12), payload()), v6(14, 40)},
		{"ethernet/ipv6 first fragment", LinkEthernet, stack(ether(layers.EthernetTypeIPv6), fragIP, frag, tcpOver(tb, fragIP, 12), payload()), v6(14, 8)},
		{"ethernet/ipv6 AH", LinkEthernet, stack(ether(layers.EthernetTypeIPv6), ahIP, ah, tcpOver(tb, ahIP, 12), payload()), v6(14, 24)},
		{"ethernet/ipv6 maxChain extension headers", LinkEthernet, with(with(stack(ether(layers.EthernetTypeIPv6), chainIP), chain...), tcpOver(tb, chainIP, 12), payload()), v6(14, 16*maxChain)},
		{"802.1Q/ipv4", LinkEthernet, with(stack(ether(layers.EthernetTypeDot1Q), vlan(7, layers.EthernetTypeIPv4)), tcp4(tb)...), v4(18)},
		{"802.1Q/ipv6", LinkEthernet, with(stack(ether(layers.EthernetTypeDot1Q), vlan(7, layers.EthernetTypeIPv6)), tcp6(tb)...), v6(18, 0)},
		{"802.1ad+802.1Q/ipv4", LinkEthernet, with(stack(ether(layers.EthernetTypeQinQ), vlan(100, layers.EthernetTypeDot1Q), vlan(7, layers.EthernetTypeIPv4)), tcp4(tb)...), v4(22)},
		{"0x9100+802.1Q/ipv6", LinkEthernet, with(stack(ether(0x9100), vlan(100, layers.EthernetTypeDot1Q), vlan(7, layers.EthernetTypeIPv6)), tcp6(tb)...), v6(22, 0)},
		{"maxChain VLAN tags", LinkEthernet, with(tags, tcp4(tb)...), v4(14 + 4*maxChain)},
		{"raw/ipv4", LinkRaw, tcp4(tb), v4(0)},
		{"raw/ipv6", LinkRaw, tcp6(tb), v6(0, 0)},
		{"DLT_RAW/ipv4", dltRaw, tcp4(tb), v4(0)},
		{"ipv4", LinkIPv4, tcp4(tb), v4(0)},
		{"ipv6", LinkIPv6, tcp6(tb), v6(0, 0)},
		{"sll/ipv4", LinkLinuxSLL, with(stack(sllHeader(layers.EthernetTypeIPv4)), tcp4(tb)...), v4(16)},
		{"sll/ipv6", LinkLinuxSLL, with(stack(sllHeader(layers.EthernetTypeIPv6)), tcp6(tb)...), v6(16, 0)},
		{"sll2/ipv4", LinkLinuxSLL2, with(stack(sll2Header(layers.EthernetTypeIPv4)), tcp4(tb)...), v4(20)},
		{"sll2/ipv6", LinkLinuxSLL2, with(stack(sll2Header(layers.EthernetTypeIPv6)), tcp6(tb)...), v6(20, 0)},
		{"null/ipv4", LinkNull, with(stack(&layers.Loopback{Family: layers.ProtocolFamilyIPv4}), tcp4(tb)...), v4(4)},
		{"null/ipv6", LinkNull, with(stack(&layers.Loopback{Family: layers.ProtocolFamilyIPv6BSD}), tcp6(tb)...), v6(4, 0)},
		{"loop/ipv4", LinkLoop, with(stack(loopHeader(2)), tcp4(tb)...), v4(4)},
		{"loop/ipv6", LinkLoop, with(stack(loopHeader(24)), tcp6(tb)...), v6(4, 0)},
	}
	out := make([]parseCase, len(cases))
	for i, c := range cases {
		out[i] = parseCase{name: c.name, link: c.link, data: serialize(tb, c.layers...), want: c.want}
	}
	return out
}

func TestParse(t *testing.T) {
	for _, tc := range goodCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(tc.data, tc.link)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if diff := cmp.Diff(tc.want, got, cmpKey); diff != "" {
				t.Errorf("Parse mismatch (-want +got):\n%s", diff)
			}
			// The test's own arithmetic: the payload starts right at End.
			if rest := tc.data[got.End:]; !bytes.Equal(rest, payload()) {
				t.Errorf("bytes after End = % x, want the payload", rest)
			}
		})
	}
}

// TestParseAgreesWithGopacket checks the test packets themselves, and Parse,
// against gopacket's decoder: the TCP header it finds must lie where Parse
// says, and carry the ports of the key.
func TestParseAgreesWithGopacket(t *testing.T) {
	// Packets gopacket does not decode down to TCP.
	skip := map[string]string{
		"ethernet/ipv4 first fragment": "gopacket stops at an IPv4 fragment",
		"ethernet/ipv6 first fragment": "gopacket stops at an IPv6 fragment",
		"0x9100+802.1Q/ipv6":           "gopacket does not know the 0x9100 tag",
		"maxChain VLAN tags":           "gopacket does not know the 0x9100 tag",
	}
	for _, tc := range goodCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			if why, ok := skip[tc.name]; ok {
				t.Skip(why)
			}
			checkAgainstGopacket(t, tc.data, tc.link)
		})
	}
}

// gopacketDecoder is how gopacket decodes bytes of the given link type.
func gopacketDecoder(data []byte, link LinkType) gopacket.Decoder {
	switch link {
	case LinkRaw, dltRaw, LinkIPv4, LinkIPv6:
		if len(data) > 0 && data[0]>>4 == 6 {
			return layers.LayerTypeIPv6
		}
		return layers.LayerTypeIPv4
	}
	return layers.LinkType(link)
}

func checkAgainstGopacket(t *testing.T, data []byte, link LinkType) {
	t.Helper()
	h, err := Parse(data, link)
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	p := gopacket.NewPacket(data, gopacketDecoder(data, link), gopacket.NoCopy)
	if el := p.ErrorLayer(); el != nil {
		t.Fatalf("gopacket: %v", el.Error())
	}
	tcp, _ := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
	if tcp == nil {
		t.Fatalf("gopacket found no TCP layer in %v", p)
	}
	// The layers are subslices of data: their offset is the capacity lost.
	l4 := cap(data) - cap(tcp.Contents)
	got := Header{Key: h.Key, L3: h.L3, L4: l4, End: l4 + len(tcp.Contents), IPv6: h.IPv6}
	if net := p.NetworkLayer(); net != nil {
		got.L3 = cap(data) - cap(net.LayerContents())
		src, _ := netip.AddrFromSlice(net.NetworkFlow().Src().Raw())
		dst, _ := netip.AddrFromSlice(net.NetworkFlow().Dst().Raw())
		got.Key = KeyFromAddrPorts(netip.AddrPortFrom(src, uint16(tcp.SrcPort)), netip.AddrPortFrom(dst, uint16(tcp.DstPort)))
		got.IPv6 = net.LayerType() == layers.LayerTypeIPv6
	}
	if diff := cmp.Diff(got, h, cmpKey); diff != "" {
		t.Errorf("Parse disagrees with gopacket (-gopacket +Parse):\n%s", diff)
	}
}

// readPcap returns the packets of a pcap file under the module's testdata.
func readPcap(tb testing.TB, name string) (LinkType, [][]byte) {
	tb.Helper()
	f, err := os.Open(filepath.Join("..", "testdata", name))
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		tb.Fatalf("%s: %v", name, err)
	}
	var pkts [][]byte
	for {
		data, _, err := r.ReadPacketData()
		if err != nil {
			break
		}
		pkts = append(pkts, data)
	}
	if len(pkts) == 0 {
		tb.Fatalf("%s: no packets", name)
	}
	return LinkType(r.LinkType()), pkts
}

func TestParseRealCaptures(t *testing.T) {
	for _, name := range []string{"v4.pcap", "v6.pcap", "large-ndt.pcap"} {
		t.Run(name, func(t *testing.T) {
			link, pkts := readPcap(t, name)
			keys := map[Key]int{}
			for _, data := range pkts {
				checkAgainstGopacket(t, data, link)
				h, _ := Parse(data, link)
				keys[h.Key]++
			}
			// Each file holds one connection, seen in both directions.
			if len(keys) != 1 {
				t.Errorf("%d flows, want 1: %v", len(keys), keys)
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	// Patch returns data with f applied to a copy.
	patch := func(data []byte, f func([]byte)) []byte {
		data = bytes.Clone(data)
		f(data)
		return data
	}
	ethV4 := serialize(t, with(stack(ether(layers.EthernetTypeIPv4)), tcp4(t)...)...)
	ethV6 := serialize(t, with(stack(ether(layers.EthernetTypeIPv6)), tcp6(t)...)...)

	type errCase struct {
		name string
		link LinkType
		data []byte
		want error
	}
	cases := []errCase{
		{"unknown link type 802.11", 105, ethV4, ErrLinkType},
		{"unknown link type 2", 2, ethV4, ErrLinkType},
		{"unknown link type 65535", 65535, ethV4, ErrLinkType},
		{"ethertype IPv4, version 6", LinkEthernet, serialize(t, with(stack(ether(layers.EthernetTypeIPv4)), tcp6(t)...)...), ErrMalformed},
		{"ethertype IPv6, version 4", LinkEthernet, serialize(t, with(stack(ether(layers.EthernetTypeIPv6)), tcp4(t)...)...), ErrMalformed},
		{"ethertype IPv4, version 0", LinkEthernet, patch(ethV4, func(b []byte) { b[14] = 0x05 }), ErrMalformed},
		{"sll IPv6, version 4", LinkLinuxSLL, serialize(t, with(stack(sllHeader(layers.EthernetTypeIPv6)), tcp4(t)...)...), ErrMalformed},
		{"sll2 IPv4, version 6", LinkLinuxSLL2, serialize(t, with(stack(sll2Header(layers.EthernetTypeIPv4)), tcp6(t)...)...), ErrMalformed},
		{"raw version 5", LinkRaw, patch(ethV4[14:], func(b []byte) { b[0] = 0x55 }), ErrNotIP},
		{"null version 0", LinkNull, append([]byte{2, 0, 0, 0}, make([]byte, 60)...), ErrNotIP},
		{"ARP", LinkEthernet, serialize(t, ether(layers.EthernetTypeARP), &layers.ARP{
			AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4, HwAddressSize: 6, ProtAddressSize: 4,
			Operation: layers.ARPRequest, SourceHwAddress: make([]byte, 6), SourceProtAddress: srcV4.Addr().AsSlice(),
			DstHwAddress: make([]byte, 6), DstProtAddress: dstV4.Addr().AsSlice(),
		}), ErrNotIP},
		{"802.1Q ARP", LinkEthernet, serialize(t, ether(layers.EthernetTypeDot1Q), vlan(7, layers.EthernetTypeARP), payload()), ErrNotIP},
		{"LLDP", LinkEthernet, serialize(t, ether(layers.EthernetTypeLinkLayerDiscovery), payload()), ErrNotIP},
		{"sll ARP", LinkLinuxSLL, serialize(t, sllHeader(layers.EthernetTypeARP), payload()), ErrNotIP},
		{"sll2 ARP", LinkLinuxSLL2, serialize(t, sll2Header(layers.EthernetTypeARP), payload()), ErrNotIP},
		{"too many VLAN tags", LinkEthernet, func() []byte {
			ls := stack(ether(layers.EthernetTypeDot1Q))
			for range maxChain {
				ls = append(ls, vlan(1, layers.EthernetTypeDot1Q))
			}
			return serialize(t, with(append(ls, vlan(1, layers.EthernetTypeIPv4)), tcp4(t)...)...)
		}(), ErrTooManyExt},
		{"too many IPv6 extension headers", LinkEthernet, func() []byte {
			ip := ip6(layers.IPProtocolIPv6Destination)
			ls := stack(ether(layers.EthernetTypeIPv6), ip)
			for i := range maxChain + 1 {
				next := layers.IPProtocolIPv6Destination
				if i == maxChain {
					next = layers.IPProtocolTCP
				}
				ls = append(ls, ext6(next, 0))
			}
			return serialize(t, append(ls, tcpOver(t, ip, 12), payload())...)
		}(), ErrTooManyExt},
	}

	udp4 := ip4(layers.IPProtocolUDP)
	udp6 := ip6(layers.IPProtocolUDP)
	udp := func(nl gopacket.NetworkLayer) *layers.UDP {
		u := &layers.UDP{SrcPort: 53, DstPort: 53}
		_ = u.SetNetworkLayerForChecksum(nl)
		return u
	}
	icmp6 := ip6(layers.IPProtocolICMPv6)
	cases = append(cases, []errCase{
		{"ipv4 UDP", LinkEthernet, serialize(t, ether(layers.EthernetTypeIPv4), udp4, udp(udp4), payload()), ErrNotTCP},
		{"ipv6 UDP", LinkEthernet, serialize(t, ether(layers.EthernetTypeIPv6), udp6, udp(udp6), payload()), ErrNotTCP},
		{"ipv6 ICMPv6", LinkEthernet, serialize(t, ether(layers.EthernetTypeIPv6), icmp6, payload()), ErrNotTCP},
		{"ipv6 no next header", LinkEthernet, serialize(t, ether(layers.EthernetTypeIPv6), ip6(layers.IPProtocolNoNextHeader), payload()), ErrNotTCP},
		{"ipv6 ESP", LinkEthernet, serialize(t, ether(layers.EthernetTypeIPv6), ip6(layers.IPProtocolESP), payload()), ErrNotTCP},
		{"ipv6 hop-by-hop then UDP", LinkEthernet, serialize(t, ether(layers.EthernetTypeIPv6), ip6(layers.IPProtocolIPv6HopByHop), ext6(layers.IPProtocolUDP, 0), payload()), ErrNotTCP},
	}...)

	for _, fo := range []uint16{1, 185, 0x1fff} {
		for _, mf := range []bool{false, true} {
			name := "non-first fragment"
			ip := ip4(layers.IPProtocolTCP)
			ip.FragOffset = fo
			if mf {
				ip.Flags = layers.IPv4MoreFragments
				name += " MF"
			}
			frag6 := &layers.IPv6Fragment{NextHeader: layers.IPProtocolTCP, FragmentOffset: fo, MoreFragments: mf, Identification: 77}
			cases = append(cases,
				errCase{"ipv4 " + name, LinkEthernet, serialize(t, ether(layers.EthernetTypeIPv4), ip, payload()), ErrFragment},
				errCase{"ipv6 " + name, LinkEthernet, serialize(t, ether(layers.EthernetTypeIPv6), ip6(layers.IPProtocolIPv6Fragment), frag6, payload()), ErrFragment},
				errCase{"ipv6 hop-by-hop then " + name, LinkEthernet, serialize(t, ether(layers.EthernetTypeIPv6), ip6(layers.IPProtocolIPv6HopByHop), ext6(layers.IPProtocolIPv6Fragment, 0), frag6, payload()), ErrFragment},
			)
		}
	}
	for ihl := range byte(5) {
		cases = append(cases, errCase{fmt.Sprintf("IHL %d", ihl), LinkEthernet, patch(ethV4, func(b []byte) { b[14] = 0x40 | ihl }), ErrMalformed})
	}
	for doff := range byte(5) {
		cases = append(cases,
			errCase{fmt.Sprintf("ipv4 TCP data offset %d", doff), LinkEthernet, patch(ethV4, func(b []byte) { b[34+12] = doff << 4 }), ErrMalformed},
			errCase{fmt.Sprintf("ipv6 TCP data offset %d", doff), LinkEthernet, patch(ethV6, func(b []byte) { b[54+12] = doff << 4 }), ErrMalformed},
		)
	}

	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(tc.data, tc.link)
			if !errors.Is(err, tc.want) {
				t.Errorf("Parse error = %v, want %v", err, tc.want)
			}
			if diff := cmp.Diff(Header{}, got, cmpKey); diff != "" {
				t.Errorf("Parse returned a header with an error (-want +got):\n%s", diff)
			}
		})
	}
}

// TestParseTruncated cuts every good packet at every length up to the end of
// its TCP header: Parse must say ErrTruncated until the TCP fixed header is
// complete, and from then on return the whole packet's header, End included.
func TestParseTruncated(t *testing.T) {
	for _, tc := range goodCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			for n := 0; n <= tc.want.End; n++ {
				// A fresh slice of exactly n bytes, so that reading past
				// it would fault under the race detector's checks.
				data := bytes.Clone(tc.data[:n])
				got, err := Parse(data, tc.link)
				if n < tc.want.L4+20 {
					if !errors.Is(err, ErrTruncated) {
						t.Errorf("%d bytes: Parse = %+v, %v; want ErrTruncated", n, got, err)
					}
					continue
				}
				if err != nil {
					t.Errorf("%d bytes: Parse: %v", n, err)
					continue
				}
				if diff := cmp.Diff(tc.want, got, cmpKey); diff != "" {
					t.Errorf("%d bytes: Parse mismatch (-want +got):\n%s", n, diff)
				}
			}
		})
	}
}

// TestParseTCPOptions checks End for every TCP data offset from 5 to 15.
func TestParseTCPOptions(t *testing.T) {
	for doff := 5; doff <= 15; doff++ {
		for _, v6 := range []bool{false, true} {
			var ls []gopacket.SerializableLayer
			var ip gopacket.NetworkLayer
			want := Header{Key: keyV4, L3: 14, L4: 34}
			if v6 {
				ip = ip6(layers.IPProtocolTCP)
				ls = stack(ether(layers.EthernetTypeIPv6), ip.(gopacket.SerializableLayer))
				want = Header{Key: keyV6, L3: 14, L4: 54, IPv6: true}
			} else {
				ip = ip4(layers.IPProtocolTCP)
				ls = stack(ether(layers.EthernetTypeIPv4), ip.(gopacket.SerializableLayer))
			}
			want.End = want.L4 + 4*doff
			tcp := tcpOver(t, ip, 4*(doff-5))
			data := serialize(t, append(ls, tcp, payload())...)
			name := "ipv4"
			if v6 {
				name = "ipv6"
			}
			t.Run(fmt.Sprintf("%s data offset %d", name, doff), func(t *testing.T) {
				if tcp.DataOffset != uint8(doff) {
					t.Fatalf("built data offset %d, want %d", tcp.DataOffset, doff)
				}
				got, err := Parse(data, LinkEthernet)
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				if diff := cmp.Diff(want, got, cmpKey); diff != "" {
					t.Errorf("Parse mismatch (-want +got):\n%s", diff)
				}
			})
		}
	}
}

// TestSrcDst checks that SrcDst returns the packet's addresses in packet
// order, 4 bytes long for IPv4 and 16 for IPv6.
func TestSrcDst(t *testing.T) {
	for _, tc := range goodCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			h, err := Parse(tc.data, tc.link)
			if err != nil {
				t.Fatal(err)
			}
			src, dst := h.SrcDst(tc.data)
			want := [][]byte{srcV4.Addr().AsSlice(), dstV4.Addr().AsSlice()}
			if h.IPv6 {
				want = [][]byte{srcV6.Addr().AsSlice(), dstV6.Addr().AsSlice()}
			}
			if diff := cmp.Diff(want, [][]byte{src, dst}); diff != "" {
				t.Errorf("SrcDst mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseAllocs(t *testing.T) {
	for _, name := range []string{"ethernet/ipv4", "ethernet/ipv6", "ethernet/ipv6 hbh+dst+routing", "802.1ad+802.1Q/ipv4", "sll2/ipv6"} {
		tc := findCase(t, name)
		t.Run(name, func(t *testing.T) {
			var err error
			allocs := testing.AllocsPerRun(1000, func() { _, err = Parse(tc.data, tc.link) })
			if err != nil {
				t.Fatal(err)
			}
			if allocs != 0 {
				t.Errorf("Parse allocates %v times per packet, want 0", allocs)
			}
		})
	}
	t.Run("error", func(t *testing.T) {
		data := make([]byte, 10)
		allocs := testing.AllocsPerRun(1000, func() { _, _ = Parse(data, LinkEthernet) })
		if allocs != 0 {
			t.Errorf("Parse allocates %v times per truncated packet, want 0", allocs)
		}
	})
}

func findCase(tb testing.TB, name string) parseCase {
	tb.Helper()
	for _, tc := range goodCases(tb) {
		if tc.name == name {
			return tc
		}
	}
	tb.Fatalf("no case %q", name)
	return parseCase{}
}

func benchmarkParse(b *testing.B, name string) {
	link, pkts := readPcap(b, name)
	for _, data := range pkts {
		if _, err := Parse(data, link); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		for _, data := range pkts {
			_, _ = Parse(data, link)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(pkts)), "ns/pkt")
}

// BenchmarkParseIPv4 parses each packet of a real IPv4 connection per op.
func BenchmarkParseIPv4(b *testing.B) { benchmarkParse(b, "v4.pcap") }

// BenchmarkParseIPv6 parses each packet of a real IPv6 connection per op.
func BenchmarkParseIPv6(b *testing.B) { benchmarkParse(b, "v6.pcap") }

// TestParseDatagramEnd checks that a record ends where the IP datagram ends
// when the TCP data offset reaches past it (Ethernet padding of a short
// frame, a trailer, or a malformed length), and that a datagram too short
// for the TCP fixed header is refused rather than read from the padding.
func TestParseDatagramEnd(t *testing.T) {
	const pad = 0xEE // the padding bytes, to spot them in a record
	// frame returns an Ethernet frame of an IPv4 or IPv6 TCP packet with
	// optLen bytes of TCP options and no payload, followed by trailer
	// bytes of padding, and the offset of its TCP header.
	frame := func(v6 bool, optLen, trailer int) ([]byte, int) {
		var ls []gopacket.SerializableLayer
		var ip gopacket.NetworkLayer
		l4 := 34
		if v6 {
			ip, l4 = ip6(layers.IPProtocolTCP), 54
			ls = stack(ether(layers.EthernetTypeIPv6), ip.(gopacket.SerializableLayer))
		} else {
			ip = ip4(layers.IPProtocolTCP)
			ls = stack(ether(layers.EthernetTypeIPv4), ip.(gopacket.SerializableLayer))
		}
		data := serialize(t, append(ls, tcpOver(t, ip, optLen))...)
		// gopacket pads a short frame to 60 bytes with zeros; the test
		// pads it itself, with bytes it can spot.
		data = data[:l4+20+optLen]
		return append(data, bytes.Repeat([]byte{pad}, trailer)...), l4
	}
	// setDoff sets the TCP data offset, in bytes.
	setDoff := func(data []byte, l4, doff int) { data[l4+12] = byte(doff/4) << 4 }
	// setLen sets the IPv4 total length or the IPv6 payload length.
	setLen := func(data []byte, v6 bool, n int) {
		if v6 {
			binary.BigEndian.PutUint16(data[14+4:], uint16(n))
		} else {
			binary.BigEndian.PutUint16(data[14+2:], uint16(n))
		}
	}

	type testCase struct {
		name    string
		data    []byte
		wantEnd int   // End, if wantErr is nil
		wantErr error // nil: parses
	}
	var cases []testCase
	for _, v6 := range []bool{false, true} {
		name := "ipv4 "
		ipLen := 20 // the IP header; the length field's base is 0 for IPv4
		lenBase := 0
		if v6 {
			name, ipLen, lenBase = "ipv6 ", 40, 40
		}
		// A short packet in a 60-byte frame (IPv4: 54 bytes and 6 of
		// padding; IPv6 frames are never short, so a 6-byte trailer as
		// a capture with the FCS or a NIC trailer has), its data offset
		// 24 bytes: 4 bytes into the padding.
		{
			data, l4 := frame(v6, 0, 6)
			setDoff(data, l4, 24)
			if !v6 && len(data) != 60 {
				t.Fatalf("padded frame of %d bytes, want 60", len(data))
			}
			cases = append(cases, testCase{name + "data offset into the padding", data, l4 + 20, nil})
		}
		// The largest data offset, 60, past the end of the frame.
		{
			data, l4 := frame(v6, 0, 6)
			setDoff(data, l4, 60)
			cases = append(cases, testCase{name + "data offset 60 past the frame", data, l4 + 20, nil})
		}
		// Well-formed, padded: the record is the whole TCP header.
		{
			data, l4 := frame(v6, 0, 6)
			cases = append(cases, testCase{name + "padded, well-formed", data, l4 + 20, nil})
		}
		// A length that ends inside the TCP options cuts them there.
		{
			data, l4 := frame(v6, 12, 6)
			setLen(data, v6, ipLen+24-lenBase)
			cases = append(cases, testCase{name + "length ends inside the TCP options", data, l4 + 24, nil})
		}
		// A length past the captured bytes (a capture cut by the snaplen,
		// or a lie) does not matter: the TCP header ends first.
		{
			data, l4 := frame(v6, 12, 0)
			setLen(data, v6, 1400)
			cases = append(cases, testCase{name + "length past the captured bytes", data, l4 + 32, nil})
		}
		// A zero length (BIG TCP GSO packets, IPv6 jumbograms) says
		// nothing; the data offset decides.
		{
			data, l4 := frame(v6, 12, 6)
			setLen(data, v6, 0)
			cases = append(cases, testCase{name + "zero length", data, l4 + 32, nil})
		}
		// Lengths too short for the TCP fixed header: malformed.
		for _, n := range []int{ipLen + 19, ipLen + 1, ipLen, 1} {
			if n-lenBase <= 0 {
				continue
			}
			data, _ := frame(v6, 0, 6)
			setLen(data, v6, n-lenBase)
			cases = append(cases, testCase{fmt.Sprintf("%slength %d", name, n-lenBase), data, 0, ErrMalformed})
		}
	}
	// IPv6: a payload length that ends inside the extension headers.
	{
		ip := ip6(layers.IPProtocolIPv6Destination)
		data := serialize(t, ether(layers.EthernetTypeIPv6), ip, ext6(layers.IPProtocolTCP, 1), tcpOver(t, ip, 0))
		binary.BigEndian.PutUint16(data[14+4:], 16+10)
		cases = append(cases, testCase{"ipv6 length ends inside the TCP fixed header after extension headers", data, 0, ErrMalformed})
	}

	var b Builder
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h, err := Parse(tc.data, LinkEthernet)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Parse error = %v, want %v", err, tc.wantErr)
			}
			p, _, berr := b.Build(tc.data, LinkEthernet, testTime, len(tc.data))
			if !errors.Is(berr, tc.wantErr) {
				t.Fatalf("Build error = %v, want %v", berr, tc.wantErr)
			}
			if err != nil {
				return
			}
			if h.End != tc.wantEnd {
				t.Errorf("End = %d, want %d", h.End, tc.wantEnd)
			}
			// The record is the frame up to End, every byte of it, and
			// has no padding byte in it.
			if diff := cmp.Diff(tc.data[:tc.wantEnd], p.Data); diff != "" {
				t.Errorf("record mismatch (-want +got):\n%s", diff)
			}
			if bytes.IndexByte(p.Data, pad) >= 0 {
				t.Errorf("record % x holds padding", p.Data)
			}
			if int(p.Len) != len(tc.data) {
				t.Errorf("Len = %d, want the frame's %d", p.Len, len(tc.data))
			}
			// It parses back to the same header.
			rh, err := Parse(p.Data, LinkEthernet)
			if err != nil {
				t.Fatalf("record does not parse: %v", err)
			}
			if diff := cmp.Diff(h, rh, cmpKey); diff != "" {
				t.Errorf("record parses to another header (-first +record):\n%s", diff)
			}
		})
	}
}
