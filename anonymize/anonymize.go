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
//
// # Options and extension headers
//
// A record keeps every byte from the link header to the end of the TCP
// header, IPv4 options and IPv6 extension headers included, and some of
// them carry full addresses. Packet anonymizes these addresses by the same
// rule as the header's (the host's own are kept): those of IPv4 Record
// Route, Loose and Strict Source Route options and of Timestamp options with
// addresses (flags 1 and 3); those of IPv6 routing headers of type 0, 2
// (Mobile IPv6) and 4 (segment routing), and of the Home Address destination
// option; and that of an MPTCP ADD_ADDR option, whose HMAC it clears, since
// the keys it is computed with are in the same file (the handshake's
// MP_CAPABLE options), so that it would let anyone test each candidate
// address.
//
// It keeps only what it knows carries no address: the IPv4 Router Alert
// option, timestamps, pointers and flags; the IPv6 Router Alert, Jumbo
// Payload and Tunnel Encapsulation Limit options, fragment and
// authentication headers (whose ICV is keyed, and says nothing without the
// key), the segment list's last entry, flags and tag. The data of every
// other option is cleared, its type and length kept so that the header
// still parses: options carry addresses that no list of known ones would
// cover (the traceroute option's originator, the address extension and
// selective directed broadcast options, experimental and vendor options
// without public specifications), and the kept ones are what a reader of
// headers wants. So are cleared: the bytes after an IPv4 End of Options, or
// from a malformed option on (nothing after it can be read); padding
// (PadN), whose bytes should be zero anyway; the reserved bytes and
// segment-routing TLVs of routing headers, the data of routing headers of
// other types (RPL's compressed addresses); mobility headers after their
// type (their messages carry addresses, and their checksum covers them);
// and any byte between the IPv6 header and the TCP header that the walk
// cannot account for.
//
// The IPv4 header checksum covers the options, and is updated for every
// byte that changes. The TCP checksum covers the addresses of its
// pseudo-header, which may be those of an option (the final destination of
// a pending source route, the home address): see [Anonymizer.Packet].
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

// Packet anonymizes, in place, the IP header at data[l3:], an IPv6 header if
// ipv6 is true and IPv4 otherwise; l4 is the offset of the TCP header. The
// offsets are those found by flow.Parse, which also checked the IP version.
// The caller must own data (see flow.Packet). Packet does not allocate, and
// it never panics: it changes nothing it cannot find whole (an address cut
// off, offsets out of range). Anonymizing an anonymized packet changes
// nothing.
//
// It anonymizes every address the record carries, not only the source and
// destination: those in IPv4 options and IPv6 extension headers, and the
// one of an MPTCP ADD_ADDR option; it clears what it does not know to be
// free of addresses (see the package documentation, "Options and extension
// headers").
//
// Packet keeps the checksums in data consistent with the new bytes: the
// IPv4 header checksum (which covers the options) if the whole IPv4 header
// is in data, and the TCP checksum (whose pseudo-header holds two of the
// addresses) if data reaches it. It updates them incrementally by RFC 1624
// eqn. 3, HC' = ~(~HC + ~m + m'), which gives 0x0000 where the new sum is
// 0xFFFF, as recomputing does, and not the 0xFFFF of RFC 1141's eqn. 2. A
// valid checksum ends up exactly as if computed afresh, and an invalid one
// stays invalid by the same amount, so neither says anything about the
// zeroed bytes.
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
//
// The pseudo-header holds the final destination, which a pending source
// route (IPv4 LSRR or SSRR with addresses left, an IPv6 routing header with
// segments left) carries in the option rather than in the header, and for
// IPv6 the home address of a Home Address option in place of the source
// (RFC 6275); senders do not all agree. When a packet has such a choice,
// Packet updates the TCP checksum for the pseudo-header under which it is
// valid or partial, and if it cannot tell (a checksum over absent payload, or
// an invalid one, or a routing header whose addresses it cannot read), it
// sets it to 0, the placeholder, which says nothing.
func (a *Anonymizer) Packet(data []byte, l3, l4 int, ipv6 bool) {
	if a == nil || a.method == None {
		return
	}
	s := *a.local.Load()
	if ipv6 {
		s.packet6(data, l3, l4)
	} else {
		s.packet4(data, l3, l4)
	}
}

func (s localSet) packet4(data []byte, l3, l4 int) {
	if l3 < 0 || l3 > len(data) || len(data)-l3 < 20 {
		return
	}
	ip := data[l3:]
	ihl := int(ip[0]&0x0f) * 4
	var opts []byte // the options there are: those cut off are not
	if ihl > 20 {
		opts = ip[20:min(ihl, len(ip))]
	}

	// Decide how to update each checksum before anything changes,
	// because whether a checksum is valid depends on the old bytes.
	ipCk := ipv4Kind(ip)
	src, dst := ip[12:16], ip[16:20]
	end := -1
	if n := int(binary.BigEndian.Uint16(ip[2:])); n != 0 {
		end = l3 + n
	}
	var final []byte
	if opts != nil {
		final = finalHop4(opts)
	}
	var tcp tcpPlan
	tcp.plan(data, l4, l3+max(ihl, 20), end, src, nil, dst, final, false)

	// srcDelta and dstDelta are the one's-complement sums of ~m + m' over
	// every 16-bit word m of the address that changes to m', as RFC 1624
	// eqn. 3 wants them, for both checksums: the TCP pseudo-header holds
	// the same address words as the IPv4 header (at even offsets in both).
	var srcDelta, dstDelta uint32
	srcChanged := s.hide(src, &srcDelta)
	dstChanged := s.hide(dst, &dstDelta)
	ipDelta, changed := srcDelta+dstDelta, srcChanged || dstChanged
	if opts != nil {
		var old [40]byte
		copy(old[:], opts)
		if s.options4(opts) {
			// The options start at an even offset of the header.
			d, _ := wordDelta(old[:len(opts)], opts)
			ipDelta, changed = ipDelta+d, true
		}
	}
	optsDelta, optsChanged := s.tcpOptions(data, l4, l3+max(ihl, 20))
	if !changed && !optsChanged {
		return // nor do the checksums
	}
	if changed {
		update(ip[10:12], ipCk, ipDelta)
	}
	tcp.apply(srcDelta, dstDelta, srcChanged, dstChanged, changed, optsDelta, optsChanged)
}

func (s localSet) packet6(data []byte, l3, l4 int) {
	if l3 < 0 || l3 > len(data) || len(data)-l3 < 40 {
		return
	}
	ip := data[l3:]
	src, dst := ip[8:24], ip[24:40]
	// Extension headers: where the alternative addresses are, if any.
	hasExt := l4 != l3+40 || ip[6] != protoTCP
	var ext ext6Result
	if hasExt {
		s.ext6(&ext, data, l3, l4, false)
	}
	end := -1
	if n := int(binary.BigEndian.Uint16(ip[4:])); n != 0 {
		end = l3 + 40 + n
	}
	var tcp tcpPlan
	tcp.plan(data, l4, l3+40, end, src, ext.home, dst, ext.final, ext.ambiguous)

	var srcDelta, dstDelta uint32
	srcChanged := s.hide(src, &srcDelta)
	dstChanged := s.hide(dst, &dstDelta)
	changed := srcChanged || dstChanged
	if hasExt {
		s.ext6(&ext, data, l3, l4, true)
		changed = ext.changed || changed
	}
	optsDelta, optsChanged := s.tcpOptions(data, l4, l3+40)
	if !changed && !optsChanged {
		return
	}
	tcp.apply(srcDelta, dstDelta, srcChanged, dstChanged, changed, optsDelta, optsChanged)
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
	// ckZero: a TCP checksum whose pseudo-header Packet cannot tell; it
	// becomes 0, the placeholder, if anything in the packet changes.
	ckZero
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

// tcpPlan is how Packet updates a TCP checksum, decided before anything
// changes.
type tcpPlan struct {
	kind checksumKind
	ck   []byte // the checksum field
	// altSrc and altDst, if not nil, are the addresses the pseudo-header
	// is taken to hold in place of the header's source or destination;
	// oldSrc and oldDst hold their bytes before the change.
	altSrc, altDst []byte
	oldSrc, oldDst [16]byte
}

// plan decides how to update the TCP checksum at data[l4+16:]: ckSkip if
// data does not reach it or l4 lies before minL4 (the end of the IP header).
// end is where the IP datagram ends, -1 if its length field says nothing
// (IPv4 BIG TCP, IPv6 jumbograms): then a partial checksum cannot be
// recognized. The pseudo-header holds src or altSrc, and dst or altDst (a
// nil alternative is no choice); ambiguous says that it may hold an address
// Packet cannot read.
func (p *tcpPlan) plan(data []byte, l4, minL4, end int, src, altSrc, dst, altDst []byte, ambiguous bool) {
	if l4 < minL4 || l4 > len(data) || len(data)-l4 < 18 {
		return
	}
	p.ck = data[l4+16 : l4+18]
	known := end-l4 >= 20
	complete := known && end <= len(data)
	var seg uint64 // the segment's sum, if it is all there
	if complete {
		seg = sum(0, data[l4:end])
	}
	length := uint64(6 + end - l4) // protocol 6, then the TCP length
	ck := binary.BigEndian.Uint16(p.ck)
	if altSrc == nil && altDst == nil && !ambiguous {
		// One pseudo-header, as nearly always.
		pseudo := sum(sum(length, src), dst)
		switch {
		case complete && fold(pseudo+seg) == 0xffff:
			p.kind = ckFull
		case ck == 0:
		case known && ck == fold(pseudo):
			// The kernel stores the folded sum, never 0x0000 for a sum
			// that includes the protocol, so one comparison suffices.
			p.kind = ckPartial
		default:
			p.kind = ckFull
		}
		return
	}
	p.altSrc, p.altDst = altSrc, altDst
	srcs, dsts := [2][]byte{src, altSrc}, [2][]byte{dst, altDst}
	for i, s := range srcs {
		for j, d := range dsts {
			if complete && s != nil && d != nil && fold(sum(sum(length+seg, s), d)) == 0xffff {
				p.use(ckFull, i == 1, j == 1)
				return
			}
		}
	}
	if ck == 0 {
		return
	}
	if known {
		for i, s := range srcs {
			for j, d := range dsts {
				if s != nil && d != nil && ck == fold(sum(sum(length, s), d)) {
					p.use(ckPartial, i == 1, j == 1)
					return
				}
			}
		}
	}
	p.kind = ckZero
}

// use records the pseudo-header chosen: the alternative source and
// destination if altS and altD.
func (p *tcpPlan) use(kind checksumKind, altS, altD bool) {
	p.kind = kind
	if !altS {
		p.altSrc = nil
	}
	if !altD {
		p.altDst = nil
	}
	copy(p.oldSrc[:], p.altSrc)
	copy(p.oldDst[:], p.altDst)
}

// apply updates the checksum after the change. srcDelta, dstDelta,
// srcChanged and dstChanged say how the header's addresses changed (see
// hide); changed whether any byte of the IP header (addresses, options,
// extension headers) did, and optsDelta and optsChanged what changed in the
// TCP options (see wordDelta).
func (p *tcpPlan) apply(srcDelta, dstDelta uint32, srcChanged, dstChanged, changed bool, optsDelta uint32, optsChanged bool) {
	switch p.kind {
	case ckZero:
		if changed || optsChanged {
			p.ck[0], p.ck[1] = 0, 0
		}
		return
	case ckSkip:
		return
	}
	if p.altSrc != nil {
		srcDelta, srcChanged = wordDelta(p.oldSrc[:len(p.altSrc)], p.altSrc)
	}
	if p.altDst != nil {
		dstDelta, dstChanged = wordDelta(p.oldDst[:len(p.altDst)], p.altDst)
	}
	delta, any := srcDelta+dstDelta, srcChanged || dstChanged
	if p.kind == ckFull && optsChanged {
		// The TCP header is in the full checksum, not in the partial one.
		delta, any = delta+optsDelta, true
	}
	if any {
		update(p.ck, p.kind, delta)
	}
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

// wordDelta returns the sum of ~m + m' over every 16-bit word m of old that
// is m' in cur, which hold the same bytes before and after a change and
// start at an even offset of what the checksum covers (a last odd byte is
// the high byte of a word), and whether any word changed.
func wordDelta(old, cur []byte) (delta uint32, changed bool) {
	for i := 0; i < len(cur); i += 2 {
		m, m2 := uint16(old[i])<<8, uint16(cur[i])<<8
		if i+1 < len(cur) {
			m, m2 = m|uint16(old[i+1]), m2|uint16(cur[i+1])
		}
		if m != m2 {
			delta += uint32(^m) + uint32(m2)
			changed = true
		}
	}
	return delta, changed
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

// zero clears b and reports whether it held anything.
func zero(b []byte) bool {
	changed := false
	for i := range b {
		if b[i] != 0 {
			b[i] = 0
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
