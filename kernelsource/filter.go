package kernelsource

import (
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/flow"
)

// excluded reports whether tcp-info would leave the socket unnamed because of
// its addresses or cookie.
//
// tcp-info runs with ExcludeConfig{Local: true} (main.go), so
// MakeArchivalRecord (netlink/archival-record.go) drops every socket whose
// local (Src) or remote (Dst) address isLocal: loopback, link-local unicast,
// multicast or unspecified. Its saver also refuses cookie 0 (Saver.queue).
// Its -exclude-srcport and -exclude-dstip flags, empty by default, have no
// counterpart here.
func excluded(m *sockMsg) bool {
	return m.cookie == 0 || tcpinfoLocal(&m.src) || tcpinfoLocal(&m.dst)
}

// tcpinfoLocal is tcp-info's isLocal applied to an address as tcp-info reads
// it, so that exactly the same sockets are named.
//
// tcp-info turns the 16 address bytes of a sock_diag message into a net.IP
// without looking at the socket's family (inetdiag's ip function): if bytes
// 4 to 15 are all zero it takes the first four bytes as an IPv4 address,
// otherwise all sixteen as IPv6. For the addresses TCP uses this is the
// right reading; the only difference is for IPv6 addresses whose last 96
// bits are zero (fe80::, 7f00::), which are judged as the IPv4 address of
// their first 32 bits. net.IP's predicates treat an IPv4-mapped IPv6
// address (::ffff:127.0.0.1, from a dual-stack socket) as the IPv4 address,
// and so do netip's after Unmap.
func tcpinfoLocal(a *[16]byte) bool {
	var ip netip.Addr
	if [12]byte(a[4:]) == [12]byte{} {
		ip = netip.AddrFrom4([4]byte(a[:4]))
	} else {
		ip = netip.AddrFrom16(*a).Unmap()
	}
	return ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsMulticast() || ip.IsUnspecified()
}

// key is the flow key of the socket. Unlike the filter, it goes by the
// family: IPv4 addresses are the first four bytes of an AF_INET socket's
// addresses, and an AF_INET6 socket's IPv4-mapped addresses give the same
// key as the IPv4 packets on the wire (flow.MakeKey maps 4-byte addresses).
func (m *sockMsg) key() flow.Key {
	if m.family == unix.AF_INET {
		return flow.MakeKey(m.src[:4], m.sport, m.dst[:4], m.dport)
	}
	return flow.MakeKey(m.src[:], m.sport, m.dst[:], m.dport)
}
