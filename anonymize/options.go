package anonymize

import "bytes"

// IPv4 option types (RFC 791, and IANA's registry) that Packet keeps or
// anonymizes; the data of every other option is cleared.
const (
	optEOL         = 0
	optNOP         = 1
	optRecordRoute = 7   // type, length, pointer, addresses
	optTimestamp   = 68  // type, length, pointer, overflow and flags, data
	optLSRR        = 131 // as Record Route
	optSSRR        = 137 // as Record Route
	optRouterAlert = 148 // type, length 4, a 2-byte value
)

// IPv6 extension headers (next header values) and options.
const (
	protoHopByHop = 0
	protoTCP      = 6
	protoRouting  = 43
	protoFragment = 44
	protoAH       = 51
	protoDstOpts  = 60
	protoMobility = 135

	opt6Pad1        = 0
	opt6PadN        = 1
	opt6TunnelLimit = 4    // Tunnel Encapsulation Limit, 1 byte (RFC 2473)
	opt6RouterAlert = 5    // 2 bytes (RFC 2711)
	opt6Jumbo       = 0xC2 // 4 bytes (RFC 2675)
	opt6HomeAddress = 0xC9 // 16 bytes (RFC 6275), destination options only

	routingType0   = 0 // a list of addresses (RFC 5095 deprecates it)
	routingType2   = 2 // one address, the home address (RFC 6275)
	routingTypeSRH = 4 // segment routing: a list of addresses, then TLVs (RFC 8754)
)

// options4 anonymizes the IPv4 options in opts, the header's bytes after the
// fixed 20, and reports whether anything changed. Every address in a Record
// Route, Loose or Strict Source Route option, or in a Timestamp option with
// addresses (flags 1 and 3), is anonymized like the header's; timestamps,
// pointers, flags and the Router Alert value are kept; the data of every
// other option is cleared (its type and length are kept, so that the header
// still parses), and so is everything after an End of Options or from a
// malformed option on.
func (s localSet) options4(opts []byte) bool {
	changed := false
	for i := 0; i < len(opts); {
		switch opts[i] {
		case optEOL:
			return zero(opts[i+1:]) || changed
		case optNOP:
			i++
			continue
		}
		if i+1 >= len(opts) || opts[i+1] < 2 || int(opts[i+1]) > len(opts)-i {
			// No length, or one that does not fit: nothing after it can
			// be read.
			return zero(opts[i:]) || changed
		}
		o := opts[i : i+int(opts[i+1])]
		i += len(o)
		switch o[0] {
		case optRecordRoute, optLSRR, optSSRR:
			if len(o) < 3 {
				continue // no room for the pointer, nor for data
			}
			changed = s.addrs(o[3:], 4, 0) || changed
		case optTimestamp:
			if len(o) < 4 {
				changed = zero(o[2:]) || changed
				continue
			}
			switch o[3] & 0x0f {
			case 0: // timestamps only
				changed = zero(o[4+(len(o)-4)/4*4:]) || changed
			case 1, 3: // (address, timestamp) pairs
				changed = s.addrs(o[4:], 4, 4) || changed
			default:
				changed = zero(o[4:]) || changed
			}
		case optRouterAlert:
			if len(o) != 4 {
				changed = zero(o[2:]) || changed
			}
		default:
			changed = zero(o[2:]) || changed
		}
	}
	return changed
}

// addrs anonymizes the addresses of n bytes in b, each followed by skip
// bytes that are kept; bytes at the end too few for an address and what
// follows it are cleared.
func (s localSet) addrs(b []byte, n, skip int) bool {
	changed := false
	var delta uint32 // unused: the callers compare the bytes
	for len(b) >= n+skip {
		changed = s.hide(b[:n], &delta) || changed
		b = b[n+skip:]
	}
	return zero(b) || changed
}

// finalHop4 returns the final destination of a pending source route in the
// IPv4 options opts: the last address of the first Loose or Strict Source
// Route option whose pointer does not lie past its end (RFC 791), which the
// TCP pseudo-header holds in place of the header's destination (RFC 9293,
// 3.1); nil if there is none. It reads the options as options4 does.
func finalHop4(opts []byte) []byte {
	for i := 0; i < len(opts); {
		switch opts[i] {
		case optEOL:
			return nil
		case optNOP:
			i++
			continue
		}
		if i+1 >= len(opts) || opts[i+1] < 2 || int(opts[i+1]) > len(opts)-i {
			return nil
		}
		o := opts[i : i+int(opts[i+1])]
		i += len(o)
		if (o[0] == optLSRR || o[0] == optSSRR) && len(o) >= 7 {
			if int(o[2]) > len(o) {
				return nil // the route is complete: the header holds the destination
			}
			last := 3 + (len(o)-3)/4*4 - 4
			return o[last : last+4]
		}
	}
	return nil
}

// ext6Result is what ext6 found in the IPv6 extension headers.
type ext6Result struct {
	// home is the address of the Home Address option, final the final
	// destination of a routing header with segments left: each, if not
	// nil, is the address the TCP pseudo-header holds in place of the
	// header's source or destination.
	home, final []byte
	// ambiguous says that the pseudo-header may hold an address Packet
	// cannot read (a routing header of a type it does not know, with
	// segments left) or that there are two candidates for one.
	ambiguous bool
	changed   bool
}

// ext6 walks the IPv6 extension headers between the fixed header at l3 and
// the TCP header at l4, as flow.Parse found them. With modify it anonymizes
// them: the addresses of routing headers of types 0, 2 and 4 (segment
// routing) and of the Home Address destination option like the header's;
// the Router Alert, Jumbo Payload and Tunnel Encapsulation Limit options,
// fragment and authentication headers are kept; the data of every other
// option and routing header, the reserved bytes of routing headers, the
// TLVs of segment routing headers and the messages of mobility headers are
// cleared, and so is every byte the walk cannot account for (a header cut
// off or running past l4, an unknown header). Without modify it only finds
// the addresses the pseudo-header may hold.
func (s localSet) ext6(r *ext6Result, data []byte, l3, l4 int, modify bool) {
	*r = ext6Result{}
	end := min(l4, len(data))
	wipe := func(b []byte) {
		if modify {
			r.changed = zero(b) || r.changed
		}
	}
	next := data[l3+6]
	for off := l3 + 40; off < end; {
		if end-off < 2 {
			wipe(data[off:end])
			break
		}
		var n int
		switch next {
		case protoHopByHop, protoDstOpts, protoRouting, protoMobility:
			n = (int(data[off+1]) + 1) * 8
		case protoAH:
			n = (int(data[off+1]) + 2) * 4
		case protoFragment:
			n = 8
		default:
			// An unknown header or protocol before the TCP header.
			wipe(data[off:end])
			return
		}
		if n > end-off {
			// Cut off, or running into the TCP header: keep what says
			// where it ends.
			wipe(data[off+2 : end])
			break
		}
		h := data[off : off+n]
		switch next {
		case protoHopByHop, protoDstOpts:
			s.options6(r, h[2:], next == protoDstOpts, modify)
		case protoRouting:
			s.routing6(r, h, modify)
		case protoMobility:
			wipe(h[3:]) // keep the payload protocol, length and message type
		}
		next = h[0]
		off += n
	}
}

// options6 handles the options of a hop-by-hop or destination options
// header (see ext6).
func (s localSet) options6(r *ext6Result, opts []byte, dst, modify bool) {
	for i := 0; i < len(opts); {
		if opts[i] == opt6Pad1 {
			i++
			continue
		}
		if len(opts)-i < 2 || int(opts[i+1]) > len(opts)-i-2 {
			if modify {
				r.changed = zero(opts[i:]) || r.changed
			}
			return
		}
		o := opts[i : i+2+int(opts[i+1])]
		i += len(o)
		data := o[2:]
		switch {
		case o[0] == opt6RouterAlert && len(data) == 2,
			o[0] == opt6Jumbo && len(data) == 4,
			o[0] == opt6TunnelLimit && len(data) == 1:
		case o[0] == opt6HomeAddress && len(data) == 16 && dst:
			if r.home != nil {
				r.ambiguous = true
			}
			r.home = data
			if modify {
				var delta uint32
				r.changed = s.hide(data, &delta) || r.changed
			}
		default: // PadN included: its bytes should be zero
			if modify {
				r.changed = zero(data) || r.changed
			}
		}
	}
}

// routing6 handles a routing header h (see ext6).
func (s localSet) routing6(r *ext6Result, h []byte, modify bool) {
	segLeft := h[3] > 0
	var list []byte // the addresses
	switch h[2] {
	case routingType0, routingType2:
		list = h[8:]
		if modify {
			r.changed = zero(h[4:8]) || r.changed
		}
		if segLeft && len(list) >= 16 {
			r.setFinal(list[(len(list)/16-1)*16:][:16])
		}
	case routingTypeSRH:
		list = h[8:]
		if n := (int(h[4]) + 1) * 16; n < len(list) {
			if modify {
				r.changed = zero(list[n:]) || r.changed // the TLVs
			}
			list = list[:n]
		}
		if segLeft && len(list) >= 16 {
			r.setFinal(list[:16]) // Segment List[0]
		}
	default:
		if modify {
			r.changed = zero(h[4:]) || r.changed
		}
		if segLeft {
			r.ambiguous = true
		}
		return
	}
	if modify {
		r.changed = s.addrs(list, 16, 0) || r.changed
	}
}

func (r *ext6Result) setFinal(a []byte) {
	if r.final != nil {
		r.ambiguous = true
	}
	r.final = a
}

// MPTCP (RFC 8684): option kind and the ADD_ADDR subtype.
const (
	tcpOptMPTCP   = 30
	mptcpAddAddr  = 3
	tcpOptEOL     = 0
	tcpOptNOP     = 1
	addAddrHeader = 4 // kind, length, subtype and flags, address ID
)

// tcpOptions anonymizes the address of each MPTCP ADD_ADDR option in the
// TCP header at l4 (not before minL4) and clears its HMAC, which is keyed
// with the keys of the connection's handshake, in the same file, and would
// otherwise let anyone test each candidate address. It returns the change
// to the TCP checksum (see wordDelta) and whether anything changed.
func (s localSet) tcpOptions(data []byte, l4, minL4 int) (uint32, bool) {
	if l4 < minL4 || l4 > len(data) || len(data)-l4 < 20 {
		return 0, false
	}
	doff := int(data[l4+12]>>4) * 4
	if doff <= 20 {
		return 0, false // no options (or a data offset under 5)
	}
	opts := data[l4+20 : min(l4+doff, len(data))]
	if bytes.IndexByte(opts, tcpOptMPTCP) < 0 {
		return 0, false // no MPTCP option, as nearly always
	}
	var old [40]byte
	changed := false
	for i := 0; i < len(opts); {
		switch opts[i] {
		case tcpOptEOL:
			i = len(opts)
			continue
		case tcpOptNOP:
			i++
			continue
		}
		if len(opts)-i < 2 || opts[i+1] < 2 || int(opts[i+1]) > len(opts)-i {
			break
		}
		o := opts[i : i+int(opts[i+1])]
		i += len(o)
		if o[0] != tcpOptMPTCP || len(o) < 3 || o[2]>>4 != mptcpAddAddr {
			continue
		}
		// The address family is in the length: 4 + 4 or 16 bytes, then
		// an optional port (2) and an optional HMAC (8).
		var addr, hmac []byte
		switch len(o) {
		case 8, 10, 16, 18:
			addr = o[addAddrHeader : addAddrHeader+4]
		case 20, 22, 28, 30:
			addr = o[addAddrHeader : addAddrHeader+16]
		default:
			continue
		}
		if len(o) == 16 || len(o) == 18 || len(o) == 28 || len(o) == 30 {
			hmac = o[len(o)-8:]
		}
		if !changed {
			copy(old[:], opts)
		}
		var delta uint32 // the caller compares the bytes
		if s.hide(addr, &delta) {
			zero(hmac)
			changed = true
		}
	}
	if !changed {
		return 0, false
	}
	return wordDelta(old[:len(opts)], opts)
}
