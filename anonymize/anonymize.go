// Package anonymize hides the host part of remote IP addresses, in log lines
// and in the captured packet headers written to disk.
//
// It implements the "netblock" method of github.com/m-lab/go/anonymize (the
// rules other M-Lab data share): an IPv4 address keeps its /24, an IPv6
// address its /48, and the host's own addresses are kept whole, since they
// identify the server and not the user. That package is not imported because
// its init registers a global flag and reads the interface addresses.
//
// Unlike the original packet-headers, which zeroed address bytes and left the
// checksums alone, this package also updates the IPv4 header checksum and the
// TCP checksum (whose pseudo-header covers the addresses). The header checksum
// is stored whole in every file, so an unchanged checksum let anyone compute
// the zeroed octet back from it; the same held for the TCP checksum of
// segments without payload, and for the offloaded "partial" TCP checksum of
// every packet the host sent. See [Anonymizer.Packet].
package anonymize

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"sync/atomic"
)

// Method is an anonymization method. The zero value is None. *Method
// implements flag.Value, for the daemon's -anonymize.ip flag.
type Method int

// The anonymization methods. Their String values are the flag values of the
// original daemon's -anonymize.ip flag.
const (
	// None keeps addresses as they are.
	None Method = iota
	// Netblock zeroes the host part of remote addresses: the last octet of
	// IPv4 addresses (keeping the /24) and the last 80 bits of IPv6
	// addresses (keeping the /48).
	Netblock
)

// String returns the flag value of m: "none" or "netblock".
func (m Method) String() string {
	switch m {
	case None:
		return "none"
	case Netblock:
		return "netblock"
	}
	return fmt.Sprintf("Method(%d)", int(m))
}

// Set parses s as by [ParseMethod] and stores it in m.
func (m *Method) Set(s string) error {
	v, err := ParseMethod(s)
	if err != nil {
		return err
	}
	*m = v
	return nil
}

// ParseMethod returns the Method whose String is s.
func ParseMethod(s string) (Method, error) {
	switch s {
	case "none":
		return None, nil
	case "netblock":
		return Netblock, nil
	}
	return None, fmt.Errorf("unknown anonymization method %q (valid: none, netblock)", s)
}

// Anonymizer anonymizes addresses with one Method, sparing the host's own
// addresses. It is safe for concurrent use: the per-packet methods only read
// an immutable set of local addresses, which SetLocal replaces atomically.
//
// A nil *Anonymizer, like one made with None, changes nothing.
type Anonymizer struct {
	method Method
	// local is never nil and never modified once stored: capture and saver
	// goroutines read it for every packet, while SetLocal replaces it only
	// when the host's interfaces change.
	local atomic.Pointer[localSet]
}

// localSet holds the host's addresses in their 16-byte form (IPv4 as
// IPv4-mapped IPv6), so that an IPv4 address and its mapped form match, as
// net.IP.Equal does in the original. Lookups with a [16]byte key neither
// allocate nor hash a zone.
type localSet map[[16]byte]struct{}

// New returns an Anonymizer that uses method m and spares the addresses in
// local (see [Anonymizer.SetLocal]).
//
// Every Method other than None is taken to mean Netblock, so that a value
// outside the enum (which only a conversion can make) fails closed: it hides
// addresses rather than leaking them.
func New(m Method, local []netip.Addr) *Anonymizer {
	if m != None {
		m = Netblock
	}
	a := &Anonymizer{method: m}
	a.SetLocal(local)
	return a
}

// Method returns the method a uses: None for a nil Anonymizer.
func (a *Anonymizer) Method() Method {
	if a == nil {
		return None
	}
	return a.method
}

// SetLocal replaces the set of the host's own addresses, which are never
// anonymized. Zones are ignored, and so are invalid addresses. addrs is not
// retained. Packets being anonymized while SetLocal runs see either the old
// set or the new one.
func (a *Anonymizer) SetLocal(addrs []netip.Addr) {
	if a == nil {
		return
	}
	s := make(localSet, len(addrs))
	for _, addr := range addrs {
		if addr.IsValid() {
			s[addr.As16()] = struct{}{}
		}
	}
	a.local.Store(&s)
}

// Addr returns addr anonymized, for logs; it anonymizes the way Packet does,
// so that log lines can be matched with the files. An IPv4-mapped IPv6
// address is treated as the IPv4 address it maps (only its last byte is
// zeroed) and stays in mapped form. The zone, which names a local interface,
// is kept. Addr does not allocate.
func (a *Anonymizer) Addr(addr netip.Addr) netip.Addr {
	if a == nil || a.method == None || !addr.IsValid() {
		return addr
	}
	s := *a.local.Load()
	var delta uint32
	if addr.Is4() {
		b := addr.As4()
		s.hide(b[:], &delta)
		return netip.AddrFrom4(b)
	}
	b := addr.As16()
	s.hide(b[:], &delta)
	return netip.AddrFrom16(b).WithZone(addr.Zone())
}

// Packet anonymizes, in place, the source and destination addresses of the IP
// header at data[l3:], an IPv6 header if ipv6 is true and IPv4 otherwise; l4
// is the offset of the TCP header. The offsets are those found by flow.Parse,
// which also checked the IP version. The caller must own data (see
// flow.Packet). Packet does not allocate, and it never panics: if data is too
// short to hold both addresses, or the offsets are out of range, it changes
// nothing. Anonymizing an anonymized packet changes nothing.
//
// Packet keeps the checksums in data consistent with the new addresses: the
// IPv4 header checksum if the whole IPv4 header is in data, and the TCP
// checksum (whose pseudo-header holds the addresses) if data reaches it. It
// updates them incrementally by RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'),
// which gives 0x0000 where the new sum is 0xFFFF, as recomputing does, and
// not the 0xFFFF of RFC 1141's eqn. 2. A valid checksum ends up exactly as if
// computed afresh, and an invalid one stays invalid by the same amount, so
// neither says anything about the zeroed bytes.
//
// Two kinds of invalid checksum would reveal the old address if updated that
// way, and are handled apart:
//   - A "partial" TCP checksum, which is what a capture sees on packets the
//     host sends with checksum offload: the kernel stores the uncomplemented
//     sum of the pseudo-header for the NIC to finish. Packet recognizes it
//     by value and updates it as the kernel would have computed it from the
//     new addresses. The original daemon left it as it was, so every packet
//     the server sent carried the client's full address in it.
//   - A zero checksum that is not valid is a placeholder and carries no
//     information. Packet leaves it alone rather than give it some.
//
// A TCP checksum covers the payload, which data usually lacks; then Packet
// cannot check it, and takes it for a full checksum unless it equals the
// partial one, which a valid full checksum does by chance about once in 65535
// packets. Nobody reading data can check such a checksum either.
func (a *Anonymizer) Packet(data []byte, l3, l4 int, ipv6 bool) {
	if a == nil || a.method == None {
		return
	}
	addrOff, addrLen, ipHdrLen := 12, 4, 20 // IPv4
	if ipv6 {
		addrOff, addrLen, ipHdrLen = 8, 16, 40
	}
	if l3 < 0 || l3 > len(data) || len(data)-l3 < ipHdrLen {
		return
	}
	ip := data[l3:]
	addrs := ip[addrOff : addrOff+2*addrLen]

	// Decide how to update each checksum before the addresses change,
	// because whether a checksum is valid depends on the old ones.
	ipCk := ckSkip
	if !ipv6 {
		ipCk = ipv4Kind(ip)
	}
	tcpCk := tcpKind(data, l3, l4, ipHdrLen, addrs, ipv6)

	s := *a.local.Load()
	// delta is the one's-complement sum of ~m + m' over every 16-bit word
	// m that changes to m', as RFC 1624 eqn. 3 wants it. Both checksums
	// take the same delta: the TCP pseudo-header holds the same address
	// words as the IPv4 header.
	var delta uint32
	changed := s.hide(addrs[:addrLen], &delta)
	changed = s.hide(addrs[addrLen:], &delta) || changed
	if !changed {
		return // nor do the checksums
	}
	if ipCk != ckSkip {
		update(ip[10:12], ipCk, delta)
	}
	if tcpCk != ckSkip {
		update(data[l4+16:l4+18], tcpCk, delta)
	}
}

// checksumKind says how to update a checksum when words it covers change.
type checksumKind uint8

const (
	// ckSkip: absent, or a placeholder to leave alone.
	ckSkip checksumKind = iota
	// ckFull: the complement of the one's-complement sum, as on the wire.
	ckFull
	// ckPartial: the uncomplemented sum of the TCP pseudo-header only, left
	// for the NIC to finish by transmit checksum offload.
	ckPartial
)

// ipv4Kind returns how to update the checksum of the IPv4 header that starts
// ip, which holds at least the 20-byte fixed header.
func ipv4Kind(ip []byte) checksumKind {
	ihl := int(ip[0]&0x0f) * 4
	if ihl < 20 || len(ip) < ihl {
		// Options are cut off (or the length is nonsense): nobody can
		// check this checksum, and updating it would not help.
		return ckSkip
	}
	if fold(sum(0, ip[:ihl])) == 0xffff {
		return ckFull
	}
	if binary.BigEndian.Uint16(ip[10:]) == 0 {
		return ckSkip
	}
	return ckFull
}

// tcpKind returns how to update the TCP checksum at data[l4+16:], or ckSkip if
// data does not reach it or l4 does not lie past the IP fixed header. addrs
// holds the source and destination addresses, which start the pseudo-header.
func tcpKind(data []byte, l3, l4, ipHdrLen int, addrs []byte, ipv6 bool) checksumKind {
	if l4 < 0 || l4-l3 < ipHdrLen || l4 > len(data) || len(data)-l4 < 18 {
		return ckSkip
	}
	// The pseudo-header's TCP length, from the IP length fields. A zero
	// length field (IPv4 BIG TCP, IPv6 jumbograms) gives none, and then a
	// partial checksum cannot be recognized.
	end := l3 + int(binary.BigEndian.Uint16(data[l3+2:]))
	if ipv6 {
		end = l3 + ipHdrLen + int(binary.BigEndian.Uint16(data[l3+4:]))
	}
	var pseudo uint64
	known := end-l4 >= 20
	if known {
		pseudo = sum(uint64(6+end-l4), addrs) // protocol 6, then the length
		if end <= len(data) && fold(sum(pseudo, data[l4:end])) == 0xffff {
			return ckFull
		}
	}
	ck := binary.BigEndian.Uint16(data[l4+16:])
	switch {
	case ck == 0:
		return ckSkip
	case known && ck == fold(pseudo):
		// The kernel stores the folded sum, never 0x0000 for a sum that
		// includes the protocol, so one comparison suffices.
		return ckPartial
	}
	return ckFull
}

// update applies delta to the checksum field ck (2 bytes) of the given kind.
func update(ck []byte, kind checksumKind, delta uint32) {
	hc := binary.BigEndian.Uint16(ck)
	switch kind {
	case ckFull:
		// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m').
		hc = ^fold(uint64(^hc) + uint64(delta))
	case ckPartial:
		// The field holds the sum itself, so the change is added.
		hc = fold(uint64(hc) + uint64(delta))
	default:
		return
	}
	binary.BigEndian.PutUint16(ck, hc)
}

// hide zeroes the host part of ip, a 4- or 16-byte address as it appears in a
// packet, unless it is a local address. It adds ~m + m' to *delta for each
// 16-bit word m that changes to m', and reports whether any did.
func (s localSet) hide(ip []byte, delta *uint32) bool {
	var key [16]byte
	if len(ip) == 4 {
		key[10], key[11] = 0xff, 0xff
		copy(key[12:], ip)
	} else {
		copy(key[:], ip)
	}
	if _, ok := s[key]; ok {
		return false
	}
	// IPv6: zero bytes 6..15, keeping the /48. IPv4, and IPv4-mapped IPv6
	// (as net.IP.To4 sees it in the original): zero the last byte, keeping
	// the /24.
	start, keep := 6, uint16(0)
	if len(ip) == 4 || netip.AddrFrom16(key).Is4In6() {
		start, keep = len(ip)-2, 0xff00
	}
	changed := false
	for i := start; i < len(ip); i += 2 {
		m := binary.BigEndian.Uint16(ip[i:])
		m2 := m & keep
		if m2 != m {
			*delta += uint32(^m) + uint32(m2)
			binary.BigEndian.PutUint16(ip[i:], m2)
			changed = true
		}
	}
	return changed
}

// sum adds the big-endian 16-bit words of b to acc, the last byte of an odd
// length padded with zero, as the Internet checksum does (RFC 1071). A
// uint64 cannot overflow: even 64 KiB of 0xFFFF words add up to under 2^32.
func sum(acc uint64, b []byte) uint64 {
	for len(b) >= 2 {
		acc += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint64(b[0]) << 8
	}
	return acc
}

// fold reduces a sum to 16 bits with end-around carry. The result is zero only
// if the sum was.
func fold(s uint64) uint16 {
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}
