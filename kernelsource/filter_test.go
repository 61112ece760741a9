package kernelsource

import (
	"net/netip"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
	tcpinfonetlink "github.com/m-lab/tcp-info/netlink"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/flow"
)

// diagAddr returns the 16 address bytes of a sock_diag message for a: an IPv4
// address in the first four bytes (AF_INET), anything else as is.
func diagAddr(a netip.Addr) (b [16]byte) {
	if a.Is4() {
		v4 := a.As4()
		copy(b[:], v4[:])
		return b
	}
	return a.As16()
}

func diagBytes(a string) []byte {
	b := diagAddr(netip.MustParseAddr(a))
	return b[:]
}

func family(a netip.Addr) uint8 {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// tcpinfoExcludes runs tcp-info's own filter (MakeArchivalRecord with the
// ExcludeConfig of tcp-info's main) on the message and reports whether it
// drops the socket.
func tcpinfoExcludes(t *testing.T, m sockMsg) bool {
	t.Helper()
	msg := &tcpinfonetlink.NetlinkMessage{
		Header: syscall.NlMsghdr{Type: unix.SOCK_DIAG_BY_FAMILY},
		Data:   encodeInetDiagMsg(m),
	}
	rec, err := tcpinfonetlink.MakeArchivalRecord(msg, &tcpinfonetlink.ExcludeConfig{Local: true})
	if err != nil {
		t.Fatalf("tcp-info's MakeArchivalRecord: %v", err)
	}
	return rec == nil
}

func TestExcluded(t *testing.T) {
	const peer = "198.18.0.9"
	tests := []struct {
		name     string
		src, dst string
		want     bool
	}{
		{"v4 benchmarking", "198.18.0.1", peer, false},
		{"v6 documentation", "2001:db8::1", "2001:db8::9", false},
		{"v4-mapped", "::ffff:198.18.0.1", "::ffff:198.18.0.9", false},

		{"v4 loopback", "127.0.0.1", "127.0.0.1", true},
		{"v4 loopback 127/8", "198.18.0.1", "127.1.2.3", true},
		{"v6 loopback", "::1", "::1", true},
		{"v4-mapped loopback", "::ffff:127.0.0.1", "::ffff:198.18.0.9", true},
		{"v4 link-local", "169.254.1.1", peer, true},
		{"v6 link-local", "fe80::1", "2001:db8::9", true},
		{"v4-mapped link-local", "::ffff:198.18.0.1", "::ffff:169.254.0.7", true},
		{"v4 multicast", "198.18.0.1", "224.0.0.1", true},
		{"v6 multicast", "2001:db8::1", "ff02::1", true},
		{"v4 unspecified", "0.0.0.0", peer, true},
		{"v4 unspecified remote", "198.18.0.1", "0.0.0.0", true},
		{"v6 unspecified", "::", "2001:db8::9", true},
		{"v4-mapped unspecified", "::ffff:0.0.0.0", "::ffff:198.18.0.9", true},

		// tcp-info reads an IPv6 address whose last 96 bits are zero as
		// the IPv4 address of its first 32 bits.
		{"v6 read as v4 127.0.0.0", "7f00::", "2001:db8::9", true},
		{"v6 read as v4, not local", "2001:db8::", "2001:db8::9", false},
		{"v6 link-local read as v4 254.128.0.0", "fe80::", "2001:db8::9", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src, dst := netip.MustParseAddr(tt.src), netip.MustParseAddr(tt.dst)
			m := sockMsg{family: family(src), sport: 443, dport: 50000,
				src: diagAddr(src), dst: diagAddr(dst), cookie: 7}
			if got := excluded(&m); got != tt.want {
				t.Errorf("excluded(%s -> %s) = %v, want %v", tt.src, tt.dst, got, tt.want)
			}
			if got := tcpinfoExcludes(t, m); got != tt.want {
				t.Errorf("tcp-info excludes %s -> %s: %v, want %v", tt.src, tt.dst, got, tt.want)
			}
		})
	}
	t.Run("cookie 0", func(t *testing.T) {
		m := sockMsg{family: unix.AF_INET, src: diagAddr(netip.MustParseAddr("198.18.0.1")),
			dst: diagAddr(netip.MustParseAddr(peer))}
		if !excluded(&m) {
			t.Error("a socket with cookie 0 is not excluded; tcp-info's saver refuses it")
		}
	})
}

// FuzzExcludedMatchesTCPInfo: our filter and tcp-info's agree on every pair
// of addresses.
func FuzzExcludedMatchesTCPInfo(f *testing.F) {
	for _, a := range []string{"198.18.0.1", "127.0.0.1", "::1", "fe80::1", "::ffff:127.0.0.1", "ff02::1", "::", "0.0.0.0", "7f00::", "fe80::", "224.1.2.3"} {
		f.Add(diagBytes(a), diagBytes("198.18.0.2"))
	}
	f.Fuzz(func(t *testing.T, src, dst []byte) {
		if len(src) != 16 || len(dst) != 16 {
			return
		}
		m := sockMsg{family: unix.AF_INET6, cookie: 1, src: [16]byte(src), dst: [16]byte(dst)}
		if got, want := excluded(&m), tcpinfoExcludes(t, m); got != want {
			t.Errorf("excluded(%x -> %x) = %v, tcp-info says %v", src, dst, got, want)
		}
	})
}

func TestKey(t *testing.T) {
	tests := []struct {
		name     string
		family   uint8
		src, dst string
		want     flow.Key
	}{
		{"v4", unix.AF_INET, "198.18.0.1", "198.18.0.2",
			flow.KeyFromAddrPorts(netip.MustParseAddrPort("198.18.0.1:443"), netip.MustParseAddrPort("198.18.0.2:50000"))},
		{"v6", unix.AF_INET6, "2001:db8::1", "2001:db8::2",
			flow.KeyFromAddrPorts(netip.MustParseAddrPort("[2001:db8::1]:443"), netip.MustParseAddrPort("[2001:db8::2]:50000"))},
		// A dual-stack socket's IPv4 connection has the key of its IPv4
		// packets.
		{"v4-mapped", unix.AF_INET6, "::ffff:198.18.0.1", "::ffff:198.18.0.2",
			flow.KeyFromAddrPorts(netip.MustParseAddrPort("198.18.0.1:443"), netip.MustParseAddrPort("198.18.0.2:50000"))},
		// An IPv6 address with 96 zero bits is not read as IPv4 here.
		{"v6 with zero tail", unix.AF_INET6, "2001:db8::", "2001:db8::2",
			flow.KeyFromAddrPorts(netip.MustParseAddrPort("[2001:db8::]:443"), netip.MustParseAddrPort("[2001:db8::2]:50000"))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := sockMsg{family: tt.family, sport: 443, dport: 50000,
				src: diagAddr(netip.MustParseAddr(tt.src)), dst: diagAddr(netip.MustParseAddr(tt.dst))}
			if diff := cmp.Diff(tt.want.String(), m.key().String()); diff != "" || m.key() != tt.want {
				t.Errorf("key (-want +got):\n%s", diff)
			}
		})
	}
}
