package flow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

var parseErrors = []error{ErrTruncated, ErrNotIP, ErrNotTCP, ErrFragment, ErrMalformed, ErrLinkType, ErrTooManyExt}

// FuzzParse feeds Parse and Build arbitrary bytes of every link type: they
// face whatever arrives on the wire. Beyond not panicking, a success must
// describe headers that lie inside the bytes, and Build must copy no payload
// and make a record that parses back to the same flow.
//
// The committed corpus under testdata/fuzz/FuzzParse runs with plain go test;
// f.Add adds the real captures and the table tests' packets.
func FuzzParse(f *testing.F) {
	for _, name := range []string{"v4.pcap", "v6.pcap"} {
		link, pkts := readPcap(f, name)
		for _, data := range pkts {
			f.Add(data, uint16(link))
		}
	}
	for _, tc := range goodCases(f) {
		f.Add(tc.data, uint16(tc.link))
		// The same packet cut inside its TCP header, and under a link
		// type that does not fit it.
		f.Add(tc.data[:tc.want.End-1], uint16(tc.link))
		f.Add(tc.data, uint16(LinkLinuxSLL2))
	}
	f.Add([]byte{}, uint16(LinkEthernet))
	f.Add([]byte{0x45}, uint16(LinkRaw))
	f.Add([]byte{0x60}, uint16(LinkIPv6))
	f.Add(bytes.Repeat([]byte{0x81, 0x00}, 64), uint16(LinkEthernet))
	f.Add(bytes.Repeat([]byte{0x60, 0, 0, 0, 0, 0, 0, 0}, 64), uint16(LinkNull))

	// One Builder for the process, as in a capture goroutine: the fuzz
	// function runs sequentially within each worker, and a Builder per
	// input would allocate a slab per input.
	var b Builder
	f.Fuzz(func(t *testing.T, data []byte, link uint16) {
		// No spare capacity, so that the race detector's checks would see
		// a read past the end.
		data = data[:len(data):len(data)]
		orig := bytes.Clone(data)
		h, err := Parse(data, LinkType(link))
		if !bytes.Equal(orig, data) {
			t.Fatal("Parse modified its input")
		}
		p, bh, berr := b.Build(data, LinkType(link), 1, len(data))
		if !errors.Is(berr, err) {
			t.Fatalf("Parse error %v, Build error %v", err, berr)
		}
		if err != nil {
			known := false
			for _, e := range parseErrors {
				known = known || err == e
			}
			if !known {
				t.Fatalf("Parse returned unknown error %v", err)
			}
			if h != (Header{}) || bh != (Header{}) || p.Data != nil || p.Key != (Key{}) {
				t.Fatalf("error %v with a header %+v / packet %+v", err, h, p)
			}
			return
		}

		// The header lies inside the bytes, the TCP fixed header at least.
		if !(0 <= h.L3 && h.L3 < h.L4 && h.L4 < h.End) {
			t.Fatalf("offsets out of order: %+v", h)
		}
		if h.L4+20 > len(data) {
			t.Fatalf("TCP fixed header at %d past the %d bytes: %+v", h.L4, len(data), h)
		}
		ipLen := 20
		if h.IPv6 {
			ipLen = 40
		}
		// End is the end of the TCP header, or of the IP datagram if that
		// comes first, and the datagram holds the TCP fixed header.
		tcpEnd := h.L4 + int(data[h.L4+12]>>4)*4
		lenField := binary.BigEndian.Uint16(data[h.L3+2:])
		ipEnd := h.L3 + int(lenField)
		if h.IPv6 {
			lenField = binary.BigEndian.Uint16(data[h.L3+4:])
			ipEnd = h.L3 + 40 + int(lenField)
		}
		wantEnd := tcpEnd
		if lenField != 0 { // 0: no length (BIG TCP, jumbograms)
			if ipEnd < h.L4+20 {
				t.Fatalf("IP datagram ends at %d, inside the TCP fixed header: %+v", ipEnd, h)
			}
			wantEnd = min(tcpEnd, ipEnd)
		}
		if h.End != wantEnd || h.End-h.L4 < 20 || h.End-h.L4 > 60 {
			t.Fatalf("End %d, want %d (TCP header to %d, IP datagram to %d): %+v", h.End, wantEnd, tcpEnd, ipEnd, h)
		}
		if h.L4-h.L3 < ipLen {
			t.Fatalf("IP header of %d bytes: %+v", h.L4-h.L3, h)
		}
		src, dst := h.SrcDst(data)
		want := MakeKey(src, binary.BigEndian.Uint16(data[h.L4:]), dst, binary.BigEndian.Uint16(data[h.L4+2:]))
		if h.Key != want {
			t.Fatalf("Key %v, want %v from the packet's addresses and ports", h.Key, want)
		}

		// Build: the same header, and never a payload byte.
		if bh != h {
			t.Fatalf("Build header %+v, Parse header %+v", bh, h)
		}
		// An Ethernet record keeps its VLAN tags; any other gets a
		// 14-byte Ethernet header in place of its own.
		linkLen := 14
		if LinkType(link) == LinkEthernet {
			linkLen = h.L3
		}
		if limit := h.End - h.L3 + linkLen; len(p.Data) > limit {
			t.Fatalf("len(Data) = %d > %d: payload copied; %+v", len(p.Data), limit, h)
		}
		if got, want := len(p.Data), min(h.End, len(data))-h.L3+linkLen; got != want {
			t.Fatalf("len(Data) = %d, want %d", got, want)
		}
		if !bytes.Equal(p.Data[p.L3:], data[h.L3:min(h.End, len(data))]) {
			t.Fatalf("Data from L3 is not the captured IP and TCP headers")
		}
		if int(p.Len) < len(p.Data) {
			t.Fatalf("Len %d < len(Data) %d", p.Len, len(p.Data))
		}
		// The record is an Ethernet frame that parses to the same flow.
		rh, err := Parse(p.Data, LinkEthernet)
		if err != nil {
			t.Fatalf("record does not parse: %v", err)
		}
		wantRH := Header{Key: h.Key, L3: int(p.L3), L4: int(p.L4), End: int(p.L4) + h.End - h.L4, IPv6: h.IPv6}
		if rh != wantRH {
			t.Fatalf("record parses to %+v, want %+v", rh, wantRH)
		}
	})
}
