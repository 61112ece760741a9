package flow

import (
	"encoding/binary"
	"sync"
)

// Packet is one captured TCP packet on its way from capture to a saver.
//
// Data always holds an Ethernet frame (a synthetic Ethernet header is put in
// front of packets captured on other link types, because the downstream
// reader decodes every record as Ethernet), from its first byte through the
// end of the TCP header at most, and never past the end of the IP datagram
// (Header.End): never a byte of TCP payload, nor of Ethernet padding. Ownership of
// Data passes with the Packet: whoever receives it may modify it in place (the
// saver anonymizes addresses there) and nobody else touches it afterwards.
type Packet struct {
	Key Key
	// Time is the capture timestamp in nanoseconds since the Unix epoch.
	Time int64
	// Len is the packet's original length on the wire as an Ethernet frame.
	Len uint32
	// Data is the header bytes; see the type's comment.
	Data []byte
	// L3 and L4 are the offsets of the IP and TCP headers in Data.
	L3, L4 uint16
	// IPv6 is true for IPv6 packets.
	IPv6 bool
}

// slabSize is how much header memory a Builder allocates at a time. At about
// 70-130 bytes of headers per packet, one slab serves 500-900 packets, so the
// allocation per packet rounds to zero, and a slab pinned by one long-lived
// packet wastes at most 64 KiB.
const slabSize = 64 << 10

// Builder turns captured bytes into Packets. It copies only the header bytes,
// into slabs it allocates and never reuses (each Packet owns its bytes, and
// the garbage collector frees a slab once all its Packets are gone).
//
// A Builder is not safe for concurrent use; each capture goroutine has its own.
type Builder struct {
	slab []byte
}

// Build parses one captured packet whose bytes start with a link-layer header
// of the given type. ts is the capture time in nanoseconds since the epoch and
// origLen the packet's length on the wire. data is only read, never retained.
func (b *Builder) Build(data []byte, link LinkType, ts int64, origLen int) (Packet, Header, error) {
	var p Packet
	h, err := b.BuildInto(&p, data, link, ts, origLen)
	return p, h, err
}

// BuildInto is Build writing the Packet into *p (a slot of a batch, say),
// which saves copying it at several hundred thousand packets a second. *p is
// left unchanged when the packet cannot be parsed.
func (b *Builder) BuildInto(p *Packet, data []byte, link LinkType, ts int64, origLen int) (Header, error) {
	h, err := Parse(data, link)
	if err != nil {
		return h, err
	}
	// h.End is already cut at the end of the IP datagram.
	end := min(h.End, len(data))
	ethHdr := 0
	if link != LinkEthernet {
		ethHdr = 14
	}
	n := ethHdr + end - h.L3
	if link == LinkEthernet {
		n = end
	}
	if len(b.slab) < n {
		b.slab = make([]byte, max(slabSize, n))
	}
	buf := b.slab[:n:n]
	b.slab = b.slab[n:]
	shift := 0
	if link == LinkEthernet {
		copy(buf, data[:end])
	} else {
		// Synthetic Ethernet header: zero MAC addresses and the EtherType
		// of the IP version.
		clear(buf[:12])
		et := uint16(etherTypeIPv4)
		if h.IPv6 {
			et = etherTypeIPv6
		}
		binary.BigEndian.PutUint16(buf[12:], et)
		copy(buf[14:], data[h.L3:end])
		shift = 14 - h.L3
		origLen += shift
	}
	*p = Packet{
		Key:  h.Key,
		Time: ts,
		Len:  uint32(max(origLen, n)),
		Data: buf,
		L3:   uint16(h.L3 + shift),
		L4:   uint16(h.L4 + shift),
		IPv6: h.IPv6,
	}
	return h, nil
}

// BatchSize is the most packets a Batch carries. Handing packets from the
// capture goroutine to the demuxer a batch at a time costs one channel
// operation per batch instead of per packet.
const BatchSize = 128

// Batch is a group of packets handed from a capture goroutine to the
// demuxer. Get one with GetBatch; the receiver returns it with PutBatch once
// it has taken the packets out.
type Batch struct {
	Packets []Packet
}

var batchPool = sync.Pool{New: func() any { return &Batch{Packets: make([]Packet, 0, BatchSize)} }}

// GetBatch returns an empty batch from a pool.
func GetBatch() *Batch { return batchPool.Get().(*Batch) }

// PutBatch returns a batch to the pool. Its packets' references are cleared
// so that the pool does not pin their bytes.
func PutBatch(b *Batch) {
	clear(b.Packets)
	b.Packets = b.Packets[:0]
	batchPool.Put(b)
}
