package flow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
	"unsafe"

	"github.com/google/go-cmp/cmp"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

const testTime = int64(1_700_000_000_123_456_789)

// wantPacket is the Packet Build must make of the first n bytes of tc's
// packet, captured from a wire packet of origLen bytes.
func wantPacket(tc parseCase, n, origLen int) Packet {
	h := tc.want
	end := min(h.End, n)
	if tc.link == LinkEthernet {
		return Packet{
			Key: h.Key, Time: testTime, Len: uint32(origLen),
			Data: bytes.Clone(tc.data[:end]),
			L3:   uint16(h.L3), L4: uint16(h.L4), IPv6: h.IPv6,
		}
	}
	eth := make([]byte, 14)
	binary.BigEndian.PutUint16(eth[12:], 0x0800)
	if h.IPv6 {
		binary.BigEndian.PutUint16(eth[12:], 0x86DD)
	}
	return Packet{
		Key: h.Key, Time: testTime, Len: uint32(origLen - h.L3 + 14),
		Data: append(eth, tc.data[h.L3:end]...),
		L3:   14, L4: uint16(h.L4 - h.L3 + 14), IPv6: h.IPv6,
	}
}

func TestBuild(t *testing.T) {
	var b Builder
	for _, tc := range goodCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			input := bytes.Clone(tc.data)
			p, h, err := b.Build(input, tc.link, testTime, len(tc.data))
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			if diff := cmp.Diff(tc.want, h, cmpKey); diff != "" {
				t.Errorf("Build header mismatch (-want +got):\n%s", diff)
			}
			want := wantPacket(tc, len(tc.data), len(tc.data))
			if diff := cmp.Diff(want, p, cmpKey); diff != "" {
				t.Errorf("Build packet mismatch (-want +got):\n%s", diff)
			}
			// Never a payload byte: Data ends where the TCP header does.
			if got, want := len(p.Data), int(p.L4)+(h.End-h.L4); got != want {
				t.Errorf("len(Data) = %d, want %d (the end of the TCP header)", got, want)
			}
			if tc.link == LinkEthernet && len(p.Data) != h.End {
				t.Errorf("len(Data) = %d, want End = %d", len(p.Data), h.End)
			}
			if cap(p.Data) != len(p.Data) {
				t.Errorf("cap(Data) = %d, want len(Data) = %d so that appending cannot reach another packet", cap(p.Data), len(p.Data))
			}
			// Data is a copy: the capture buffer may be reused at once.
			clear(input)
			if diff := cmp.Diff(want.Data, p.Data); diff != "" {
				t.Errorf("Data changed with the input (-want +got):\n%s", diff)
			}
			checkEthernetRecord(t, p, tc.want.Key)
		})
	}
}

// checkEthernetRecord decodes p.Data as the downstream reader does, as an
// Ethernet frame, and checks that it finds the flow's TCP header where p
// says, and no payload.
func checkEthernetRecord(t *testing.T, p Packet, key Key) {
	t.Helper()
	g := gopacket.NewPacket(p.Data, layers.LayerTypeEthernet, gopacket.NoCopy)
	tcp, _ := g.Layer(layers.LayerTypeTCP).(*layers.TCP)
	if tcp == nil {
		// gopacket does not decode fragments or 0x9100 tags to TCP;
		// TestParseAgreesWithGopacket says which.
		t.Logf("gopacket found no TCP layer in %v", g)
		return
	}
	if l4 := cap(p.Data) - cap(tcp.Contents); l4 != int(p.L4) {
		t.Errorf("gopacket finds TCP at %d, Packet.L4 = %d", l4, p.L4)
	}
	if len(tcp.Payload) != 0 {
		t.Errorf("record carries %d bytes of payload: % x", len(tcp.Payload), tcp.Payload)
	}
	nl := g.NetworkLayer()
	if l3 := cap(p.Data) - cap(nl.LayerContents()); l3 != int(p.L3) {
		t.Errorf("gopacket finds IP at %d, Packet.L3 = %d", l3, p.L3)
	}
	src, dst := nl.NetworkFlow().Endpoints()
	got := MakeKey(src.Raw(), uint16(tcp.SrcPort), dst.Raw(), uint16(tcp.DstPort))
	if got != key {
		t.Errorf("record's flow is %v, want %v", got, key)
	}
}

// TestBuildTruncated builds packets whose capture ends inside the TCP
// header: Data is what was captured, and Len still the wire length.
func TestBuildTruncated(t *testing.T) {
	var b Builder
	for _, tc := range goodCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			for n := 0; n < tc.want.End; n++ {
				p, _, err := b.Build(bytes.Clone(tc.data[:n]), tc.link, testTime, len(tc.data))
				if n < tc.want.L4+20 {
					if !errors.Is(err, ErrTruncated) {
						t.Errorf("%d bytes: Build error = %v, want ErrTruncated", n, err)
					}
					if diff := cmp.Diff(Packet{}, p, cmpKey); diff != "" {
						t.Errorf("%d bytes: Build returned a packet with an error (-want +got):\n%s", n, diff)
					}
					continue
				}
				if err != nil {
					t.Fatalf("%d bytes: Build: %v", n, err)
				}
				if diff := cmp.Diff(wantPacket(tc, n, len(tc.data)), p, cmpKey); diff != "" {
					t.Errorf("%d bytes: Build mismatch (-want +got):\n%s", n, diff)
				}
			}
		})
	}
}

// TestBuildLen checks Len when the stated wire length is smaller than what
// was captured, which a well-formed capture never says: Len is never less
// than the record's length.
func TestBuildLen(t *testing.T) {
	var b Builder
	for _, name := range []string{"ethernet/ipv4", "raw/ipv6", "sll2/ipv4", "null/ipv6"} {
		tc := findCase(t, name)
		t.Run(name, func(t *testing.T) {
			p, _, err := b.Build(tc.data, tc.link, testTime, 0)
			if err != nil {
				t.Fatal(err)
			}
			if int(p.Len) != len(p.Data) {
				t.Errorf("Len = %d with origLen 0, want len(Data) = %d", p.Len, len(p.Data))
			}
		})
	}
}

func TestBuildErrors(t *testing.T) {
	ip := ip4(layers.IPProtocolUDP)
	udp := &layers.UDP{SrcPort: 1, DstPort: 2}
	if err := udp.SetNetworkLayerForChecksum(ip); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		link LinkType
		data []byte
		want error
	}{
		{"udp", LinkEthernet, serialize(t, ether(layers.EthernetTypeIPv4), ip, udp, payload()), ErrNotTCP},
		{"link type", 9999, findCase(t, "ethernet/ipv4").data, ErrLinkType},
		{"empty", LinkRaw, nil, ErrTruncated},
	}
	var b Builder
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, h, err := b.Build(tc.data, tc.link, testTime, len(tc.data))
			if !errors.Is(err, tc.want) {
				t.Errorf("Build error = %v, want %v", err, tc.want)
			}
			if diff := cmp.Diff(Packet{}, p, cmpKey); diff != "" {
				t.Errorf("Build returned a packet with an error (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(Header{}, h, cmpKey); diff != "" {
				t.Errorf("Build returned a header with an error (-want +got):\n%s", diff)
			}
		})
	}
	if len(b.slab) != 0 {
		t.Errorf("failed Builds took a slab of %d bytes", len(b.slab))
	}
}

// TestBuilderSlab checks that consecutive packets share a slab without
// sharing bytes.
func TestBuilderSlab(t *testing.T) {
	var b Builder
	v4 := findCase(t, "ethernet/ipv4")
	v6 := findCase(t, "raw/ipv6")
	p1, _, err1 := b.Build(v4.data, v4.link, testTime, len(v4.data))
	p2, _, err2 := b.Build(v6.data, v6.link, testTime, len(v6.data))
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	// The second packet's bytes follow the first's in the same slab.
	if next := unsafe.Add(unsafe.Pointer(unsafe.SliceData(p1.Data)), len(p1.Data)); next != unsafe.Pointer(unsafe.SliceData(p2.Data)) {
		t.Errorf("consecutive packets are not adjacent in one slab")
	}
	want1, want2 := bytes.Clone(p1.Data), bytes.Clone(p2.Data)

	// Writing all of one, or appending to it, leaves the other alone.
	for i := range p1.Data {
		p1.Data[i] = 0xEE
	}
	_ = append(p1.Data, 1, 2, 3, 4)
	if diff := cmp.Diff(want2, p2.Data); diff != "" {
		t.Errorf("writing packet 1 changed packet 2 (-want +got):\n%s", diff)
	}
	for i := range p2.Data {
		p2.Data[i] = 0xDD
	}
	if !bytes.Equal(p1.Data, bytes.Repeat([]byte{0xEE}, len(want1))) {
		t.Errorf("writing packet 2 changed packet 1: % x", p1.Data)
	}
}

// TestBuilderManySlabs keeps every packet of several slabs' worth and checks
// that none was overwritten by a later one.
func TestBuilderManySlabs(t *testing.T) {
	var b Builder
	cases := goodCases(t)
	var (
		pkts  []Packet
		wants []Packet
		total int
	)
	for i := 0; total < 3*slabSize; i++ {
		tc := cases[i%len(cases)]
		data := bytes.Clone(tc.data)
		// Make each packet's bytes unique: i in the TCP sequence number.
		binary.BigEndian.PutUint32(data[tc.want.L4+4:], uint32(i))
		p, _, err := b.Build(data, tc.link, int64(i), len(data))
		if err != nil {
			t.Fatalf("packet %d (%s): %v", i, tc.name, err)
		}
		want := wantPacket(parseCase{link: tc.link, data: data, want: tc.want}, len(data), len(data))
		want.Time = int64(i)
		pkts = append(pkts, p)
		wants = append(wants, want)
		total += len(p.Data)
	}
	for i := range pkts {
		if diff := cmp.Diff(wants[i], pkts[i], cmpKey); diff != "" {
			t.Fatalf("packet %d changed after later Builds (-want +got):\n%s", i, diff)
		}
	}
}

func TestBuildAllocs(t *testing.T) {
	for _, name := range []string{"ethernet/ipv4", "ethernet/ipv6", "raw/ipv6", "sll/ipv4"} {
		tc := findCase(t, name)
		t.Run(name, func(t *testing.T) {
			var b Builder
			var err error
			// AllocsPerRun averages: one slab per ~700-1000 packets
			// rounds down to zero.
			allocs := testing.AllocsPerRun(1000, func() {
				_, _, err = b.Build(tc.data, tc.link, testTime, len(tc.data))
			})
			if err != nil {
				t.Fatal(err)
			}
			if allocs != 0 {
				t.Errorf("Build allocates %v times per packet, want 0", allocs)
			}
		})
	}
}

func TestBatch(t *testing.T) {
	b := GetBatch()
	if len(b.Packets) != 0 || cap(b.Packets) != BatchSize {
		t.Fatalf("GetBatch: len %d cap %d, want 0 and %d", len(b.Packets), cap(b.Packets), BatchSize)
	}
	var bld Builder
	tc := findCase(t, "ethernet/ipv4")
	for range BatchSize {
		p, _, err := bld.Build(tc.data, tc.link, testTime, len(tc.data))
		if err != nil {
			t.Fatal(err)
		}
		b.Packets = append(b.Packets, p)
	}
	if cap(b.Packets) != BatchSize {
		t.Fatalf("a full batch grew to cap %d", cap(b.Packets))
	}
	held := b.Packets
	PutBatch(b)
	if len(b.Packets) != 0 {
		t.Errorf("PutBatch left len %d", len(b.Packets))
	}
	// The pool must not pin the packets' slabs.
	for i, p := range held {
		if diff := cmp.Diff(Packet{}, p, cmpKey); diff != "" {
			t.Fatalf("packet %d still referenced after PutBatch (-want +got):\n%s", i, diff)
		}
	}
	b2 := GetBatch()
	if len(b2.Packets) != 0 || cap(b2.Packets) != BatchSize {
		t.Errorf("GetBatch after PutBatch: len %d cap %d, want 0 and %d", len(b2.Packets), cap(b2.Packets), BatchSize)
	}
	PutBatch(b2)
}

// BenchmarkBuild builds the packets of real IPv4 and IPv6 connections, one
// per op, as a capture goroutine does.
func BenchmarkBuild(b *testing.B) {
	link4, v4 := readPcap(b, "v4.pcap")
	link6, v6 := readPcap(b, "v6.pcap")
	if link4 != link6 {
		b.Fatalf("link types %d and %d", link4, link6)
	}
	pkts := append(v4, v6...)
	var bld Builder
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		data := pkts[i%len(pkts)]
		if _, _, err := bld.Build(data, link4, testTime, len(data)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/pkt")
}
