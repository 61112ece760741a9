// Package flow defines the flow key that identifies a TCP connection
// independently of direction, the Packet record that carries one packet's
// header bytes from capture to saver, and the parser that turns raw link-layer
// bytes into both.
//
// It is its own package because capture, demuxer, saver and tcpeventsocket
// all speak in flow keys and packets, and none of them should import another
// just for these types.
package flow

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Key identifies a TCP flow regardless of the direction of a packet: the two
// endpoints are stored in a canonical order (the smaller address/port pair
// first). IPv4 addresses are stored in their IPv4-mapped IPv6 form, so a key
// made from a 4-byte address equals the key made from its 16-byte form.
//
// Key is a packed, comparable value with no pointers so that map lookups on
// the hot path neither allocate nor chase pointers.
type Key struct {
	lo, hi         [16]byte
	loPort, hiPort uint16
}

// v4InV6Prefix is the ::ffff:0:0/96 prefix of IPv4-mapped IPv6 addresses.
var v4InV6Prefix = [12]byte{10: 0xff, 11: 0xff}

// to16 writes a 4- or 16-byte address into a 16-byte array.
func to16(dst *[16]byte, ip []byte) {
	if len(ip) == 4 {
		copy(dst[:12], v4InV6Prefix[:])
		copy(dst[12:], ip)
		return
	}
	copy(dst[:], ip)
}

// compare16 orders two addresses as bytes.Compare would, in two word
// comparisons.
func compare16(a, b *[16]byte) int {
	a0, b0 := binary.BigEndian.Uint64(a[:8]), binary.BigEndian.Uint64(b[:8])
	if a0 != b0 {
		if a0 < b0 {
			return -1
		}
		return 1
	}
	a1, b1 := binary.BigEndian.Uint64(a[8:]), binary.BigEndian.Uint64(b[8:])
	switch {
	case a1 < b1:
		return -1
	case a1 > b1:
		return 1
	}
	return 0
}

// MakeKey builds the key of the flow between (a, aPort) and (b, bPort). The
// addresses are raw bytes, each 4 (IPv4) or 16 (IPv6) long, as they appear in
// a packet. It does not allocate.
func MakeKey(a []byte, aPort uint16, b []byte, bPort uint16) Key {
	var ka, kb [16]byte
	to16(&ka, a)
	to16(&kb, b)
	c := compare16(&ka, &kb)
	if c < 0 || (c == 0 && aPort <= bPort) {
		return Key{lo: ka, hi: kb, loPort: aPort, hiPort: bPort}
	}
	return Key{lo: kb, hi: ka, loPort: bPort, hiPort: aPort}
}

// KeyFromAddrPorts builds the key of the flow between a and b.
func KeyFromAddrPorts(a, b netip.AddrPort) Key {
	a16 := a.Addr().As16()
	b16 := b.Addr().As16()
	return MakeKey(a16[:], a.Port(), b16[:], b.Port())
}

// Endpoints returns the two endpoints in canonical order. IPv4 endpoints are
// returned as 4-byte addresses.
func (k Key) Endpoints() (netip.AddrPort, netip.AddrPort) {
	return netip.AddrPortFrom(netip.AddrFrom16(k.lo).Unmap(), k.loPort),
		netip.AddrPortFrom(netip.AddrFrom16(k.hi).Unmap(), k.hiPort)
}

// String formats the key for logs, as "a:p<->b:q". It allocates; never call
// it per packet.
func (k Key) String() string {
	a, b := k.Endpoints()
	return fmt.Sprintf("%s<->%s", a, b)
}

// IsZero reports whether k is the zero key.
func (k Key) IsZero() bool { return k == Key{} }
