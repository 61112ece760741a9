package flow

import (
	"encoding/binary"
	"errors"
)

// LinkType is the link-layer header type of captured bytes, with the values
// of libpcap's LINKTYPE_ constants.
type LinkType uint16

// The link types the parser understands.
const (
	LinkNull      LinkType = 0   // BSD loopback: 4-byte host-order address family
	LinkEthernet  LinkType = 1   // Ethernet II, with optional 802.1Q/802.1ad tags
	LinkRaw       LinkType = 101 // raw IPv4 or IPv6, no link header
	LinkLoop      LinkType = 108 // OpenBSD loopback: 4-byte network-order family
	LinkLinuxSLL  LinkType = 113 // Linux "cooked" capture v1 (16-byte header)
	LinkLinuxSLL2 LinkType = 276 // Linux "cooked" capture v2 (20-byte header)
	LinkIPv4      LinkType = 228
	LinkIPv6      LinkType = 229
	dltRaw        LinkType = 12 // DLT_RAW on Linux; libpcap maps it to 101
)

// Parse errors. They are package-level values so that returning one does not
// allocate.
var (
	ErrTruncated  = errors.New("packet truncated before the end of the TCP fixed header")
	ErrNotIP      = errors.New("not an IPv4 or IPv6 packet")
	ErrNotTCP     = errors.New("not a TCP packet")
	ErrFragment   = errors.New("non-first IP fragment")
	ErrMalformed  = errors.New("malformed header")
	ErrLinkType   = errors.New("unsupported link type")
	ErrTooManyExt = errors.New("too many IPv6 extension headers or VLAN tags")
)

// Header describes where the headers of one TCP packet lie in its bytes.
// Offsets are from the start of the captured bytes.
type Header struct {
	Key Key
	// L3 is the offset of the IP header, L4 the offset of the TCP header and
	// End where the packet's record ends: just past the TCP header (options
	// included), or at the end of the IP datagram if that comes first, so
	// that Ethernet padding and bytes beyond a (malformed) datagram's length
	// are never part of it. End may be larger than the number of bytes
	// captured when the capture was cut short.
	L3, L4, End int
	// IPv6 is true for IPv6 packets.
	IPv6 bool
}

const (
	etherTypeIPv4  = 0x0800
	etherTypeIPv6  = 0x86DD
	etherTypeVLAN  = 0x8100
	etherTypeQinQ  = 0x88A8
	etherTypeQinQ2 = 0x9100

	ipProtoHopByHop = 0
	ipProtoTCP      = 6
	ipProtoRouting  = 43
	ipProtoFragment = 44
	ipProtoAH       = 51
	ipProtoDstOpts  = 60
	ipProtoMobility = 135

	// maxChain bounds the number of VLAN tags and IPv6 extension headers the
	// parser walks, so that a crafted packet cannot make it loop for long.
	maxChain = 16
)

// Parse locates the IP and TCP headers of one captured packet whose bytes
// start with a header of the given link type. It never allocates and never
// panics on malformed input; it returns one of the package's errors instead.
func Parse(data []byte, link LinkType) (Header, error) {
	var h Header
	l3, ethType, err := linkHeader(data, link)
	if err == nil {
		err = parseIP(&h, data, l3, ethType)
	}
	if err != nil {
		return Header{}, err
	}
	return h, nil
}

// linkHeader returns the offset of the network header and its EtherType.
// ethType is 0 when the link type does not say, and the IP version nibble
// decides.
func linkHeader(data []byte, link LinkType) (int, uint16, error) {
	switch link {
	case LinkEthernet:
		if len(data) < 14 {
			return 0, 0, ErrTruncated
		}
		off := 12
		for i := 0; ; i++ {
			et := binary.BigEndian.Uint16(data[off:])
			switch et {
			case etherTypeVLAN, etherTypeQinQ, etherTypeQinQ2:
				if i >= maxChain {
					return 0, 0, ErrTooManyExt
				}
				off += 4
				if len(data) < off+2 {
					return 0, 0, ErrTruncated
				}
				continue
			case etherTypeIPv4, etherTypeIPv6:
				return off + 2, et, nil
			default:
				return 0, 0, ErrNotIP
			}
		}
	case LinkRaw, dltRaw, LinkIPv4, LinkIPv6:
		return 0, 0, nil
	case LinkNull, LinkLoop:
		// The address family is 4 bytes; its byte order varies, but the
		// IP version nibble says all we need.
		return 4, 0, nil
	case LinkLinuxSLL:
		if len(data) < 16 {
			return 0, 0, ErrTruncated
		}
		et := binary.BigEndian.Uint16(data[14:])
		if et != etherTypeIPv4 && et != etherTypeIPv6 {
			return 0, 0, ErrNotIP
		}
		return 16, et, nil
	case LinkLinuxSLL2:
		if len(data) < 20 {
			return 0, 0, ErrTruncated
		}
		et := binary.BigEndian.Uint16(data[0:])
		if et != etherTypeIPv4 && et != etherTypeIPv6 {
			return 0, 0, ErrNotIP
		}
		return 20, et, nil
	}
	return 0, 0, ErrLinkType
}

// The parse functions fill h in place: Header is about 70 bytes, and
// returning it by value through each layer cost more than the parsing.
func parseIP(h *Header, data []byte, l3 int, ethType uint16) error {
	if len(data) < l3+1 {
		return ErrTruncated
	}
	version := data[l3] >> 4
	switch {
	case version == 4 && (ethType == 0 || ethType == etherTypeIPv4):
		return parseIPv4(h, data, l3)
	case version == 6 && (ethType == 0 || ethType == etherTypeIPv6):
		return parseIPv6(h, data, l3)
	case ethType == 0:
		return ErrNotIP
	}
	return ErrMalformed
}

func parseIPv4(h *Header, data []byte, l3 int) error {
	if len(data) < l3+20 {
		return ErrTruncated
	}
	ihl := int(data[l3]&0x0f) * 4
	if ihl < 20 {
		return ErrMalformed
	}
	if data[l3+9] != ipProtoTCP {
		return ErrNotTCP
	}
	if binary.BigEndian.Uint16(data[l3+6:])&0x1fff != 0 {
		return ErrFragment
	}
	if err := parseTCP(h, data, l3+ihl, datagramEnd(l3, binary.BigEndian.Uint16(data[l3+2:]))); err != nil {
		return err
	}
	h.Key = MakeKey(data[l3+12:l3+16], h.srcPort(data), data[l3+16:l3+20], h.dstPort(data))
	h.L3 = l3
	return nil
}

func parseIPv6(h *Header, data []byte, l3 int) error {
	if len(data) < l3+40 {
		return ErrTruncated
	}
	next := data[l3+6]
	off := l3 + 40
	for i := 0; next != ipProtoTCP; i++ {
		if i >= maxChain {
			return ErrTooManyExt
		}
		if len(data) < off+8 {
			return ErrTruncated
		}
		switch next {
		case ipProtoHopByHop, ipProtoRouting, ipProtoDstOpts, ipProtoMobility:
			next = data[off]
			off += (int(data[off+1]) + 1) * 8
		case ipProtoAH:
			next = data[off]
			off += (int(data[off+1]) + 2) * 4
		case ipProtoFragment:
			// Only the first fragment (offset 0) carries the TCP header.
			if binary.BigEndian.Uint16(data[off+2:])&0xfff8 != 0 {
				return ErrFragment
			}
			next = data[off]
			off += 8
		default:
			// ESP, no-next-header, or another transport.
			return ErrNotTCP
		}
	}
	if err := parseTCP(h, data, off, datagramEnd(l3+40, binary.BigEndian.Uint16(data[l3+4:]))); err != nil {
		return err
	}
	h.Key = MakeKey(data[l3+8:l3+24], h.srcPort(data), data[l3+24:l3+40], h.dstPort(data))
	h.L3 = l3
	h.IPv6 = true
	return nil
}

// datagramEnd returns the offset where an IP datagram ends, from the offset
// its length field counts from and the field's value; -1 if the field is 0,
// which says nothing: Linux writes 0 in the IPv4 total length and in the IPv6
// payload length of GSO packets over 64 KiB (BIG TCP), and an IPv6 jumbogram
// carries its length in a hop-by-hop option instead.
func datagramEnd(from int, length uint16) int {
	if length == 0 {
		return -1
	}
	return from + int(length)
}

// parseTCP checks the TCP fixed header at l4 and fills L4 and End. ipEnd is
// where the IP datagram ends (see datagramEnd). A datagram too short to hold
// the TCP fixed header is malformed: the ports and the checksum would be read
// from bytes that are not part of it (Ethernet padding, or nothing).
func parseTCP(h *Header, data []byte, l4, ipEnd int) error {
	if len(data) < l4+20 {
		return ErrTruncated
	}
	doff := int(data[l4+12]>>4) * 4
	if doff < 20 {
		return ErrMalformed
	}
	end := l4 + doff
	if ipEnd >= 0 {
		if ipEnd < l4+20 {
			return ErrMalformed
		}
		// A data offset that reaches past the datagram (into the padding
		// of a short Ethernet frame, say) does not take the record with
		// it.
		end = min(end, ipEnd)
	}
	h.L4, h.End = l4, end
	return nil
}

func (h *Header) srcPort(data []byte) uint16 { return binary.BigEndian.Uint16(data[h.L4:]) }
func (h *Header) dstPort(data []byte) uint16 { return binary.BigEndian.Uint16(data[h.L4+2:]) }

// SrcDst returns the source and destination addresses of a packet whose
// headers h describes, as slices into data (4 or 16 bytes each).
func (h *Header) SrcDst(data []byte) (src, dst []byte) {
	if h.IPv6 {
		return data[h.L3+8 : h.L3+24], data[h.L3+24 : h.L3+40]
	}
	return data[h.L3+12 : h.L3+16], data[h.L3+16 : h.L3+20]
}
