package flow

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// Key must stay comparable: the demuxer keys a map with it. This fails to
// compile otherwise.
var _ = map[Key]struct{}{}

func mustComparable[T comparable]() {}

var _ = mustComparable[Key]

// raw returns an address's bytes as they appear in a packet: 4 for IPv4, 16
// for IPv6.
func raw(ap netip.AddrPort) []byte { return ap.Addr().AsSlice() }

// mapped returns the 16-byte IPv4-mapped form of an IPv4 address.
func mapped(ap netip.AddrPort) []byte { a := ap.Addr().As16(); return a[:] }

func TestMakeKeyDirection(t *testing.T) {
	cases := []struct {
		name string
		a, b netip.AddrPort
	}{
		{"ipv4", srcV4, dstV4},
		{"ipv6", srcV6, dstV6},
		{"same address", netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.1:8080")},
		{"same port", netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.2:80")},
		{"same endpoint", netip.MustParseAddrPort("[::1]:80"), netip.MustParseAddrPort("[::1]:80")},
		{"zero", netip.MustParseAddrPort("0.0.0.0:0"), netip.MustParseAddrPort("255.255.255.255:65535")},
		{"lower address, higher port", netip.MustParseAddrPort("10.0.0.1:65535"), netip.MustParseAddrPort("10.0.0.2:1")},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ab := MakeKey(raw(tc.a), tc.a.Port(), raw(tc.b), tc.b.Port())
			ba := MakeKey(raw(tc.b), tc.b.Port(), raw(tc.a), tc.a.Port())
			if diff := cmp.Diff(ab, ba, cmpKey); diff != "" {
				t.Errorf("MakeKey(a, b) != MakeKey(b, a) (-ab +ba):\n%s", diff)
			}
			if ab != ba {
				t.Errorf("MakeKey(a, b) != MakeKey(b, a) by ==")
			}
			if ab.IsZero() {
				t.Errorf("key of %v-%v IsZero", tc.a, tc.b)
			}
		})
	}
}

func TestMakeKeyIPv4Mapped(t *testing.T) {
	want := MakeKey(raw(srcV4), srcV4.Port(), raw(dstV4), dstV4.Port())
	for name, got := range map[string]Key{
		"16+16":         MakeKey(mapped(srcV4), srcV4.Port(), mapped(dstV4), dstV4.Port()),
		"4+16":          MakeKey(raw(srcV4), srcV4.Port(), mapped(dstV4), dstV4.Port()),
		"16+4":          MakeKey(mapped(srcV4), srcV4.Port(), raw(dstV4), dstV4.Port()),
		"16+4 reversed": MakeKey(mapped(dstV4), dstV4.Port(), raw(srcV4), srcV4.Port()),
	} {
		if got != want {
			t.Errorf("%s: MakeKey = %v, want %v", name, got, want)
		}
	}
}

func TestKeyFromAddrPorts(t *testing.T) {
	cases := []struct {
		name string
		a, b netip.AddrPort
	}{
		{"ipv4", srcV4, dstV4},
		{"ipv4 reversed", dstV4, srcV4},
		{"ipv6", srcV6, dstV6},
		{"ipv6 reversed", dstV6, srcV6},
		{"ipv4-mapped", netip.AddrPortFrom(netip.AddrFrom16(srcV4.Addr().As16()), 1), dstV4},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			want := MakeKey(raw(tc.a), tc.a.Port(), raw(tc.b), tc.b.Port())
			got := KeyFromAddrPorts(tc.a, tc.b)
			if diff := cmp.Diff(want, got, cmpKey); diff != "" {
				t.Errorf("KeyFromAddrPorts mismatch (-MakeKey +KeyFromAddrPorts):\n%s", diff)
			}
		})
	}
}

func TestEndpoints(t *testing.T) {
	cases := []struct {
		name           string
		a, b           netip.AddrPort
		wantLo, wantHi netip.AddrPort
	}{
		{"ipv4", dstV4, srcV4, srcV4, dstV4},
		{"ipv6", dstV6, srcV6, srcV6, dstV6},
		// An IPv4-mapped address comes back as a plain 4-byte IPv4 one.
		{"ipv4-mapped", netip.AddrPortFrom(netip.AddrFrom16(dstV4.Addr().As16()), dstV4.Port()), srcV4, srcV4, dstV4},
		{"same address", netip.MustParseAddrPort("10.0.0.1:443"), netip.MustParseAddrPort("10.0.0.1:80"),
			netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.1:443")},
		{"ipv4 sorts before ipv6", srcV6, srcV4, srcV4, srcV6},
	}
	cmpAddrPort := cmp.Comparer(func(x, y netip.AddrPort) bool { return x == y })
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			lo, hi := KeyFromAddrPorts(tc.a, tc.b).Endpoints()
			want := []netip.AddrPort{tc.wantLo, tc.wantHi}
			if diff := cmp.Diff(want, []netip.AddrPort{lo, hi}, cmpAddrPort); diff != "" {
				t.Errorf("Endpoints mismatch (-want +got):\n%s", diff)
			}
			if lo.Addr().Is4In6() || hi.Addr().Is4In6() {
				t.Errorf("Endpoints = %v, %v: IPv4 came back mapped", lo, hi)
			}
			// The round trip: a key made from the endpoints is the key.
			if k, k2 := KeyFromAddrPorts(tc.a, tc.b), KeyFromAddrPorts(lo, hi); k != k2 {
				t.Errorf("KeyFromAddrPorts(Endpoints()) = %v, want %v", k2, k)
			}
		})
	}
}

func TestKeysDistinct(t *testing.T) {
	a := netip.MustParseAddr("10.0.0.1")
	b := netip.MustParseAddr("10.0.0.2")
	ap := netip.AddrPortFrom
	keys := []struct {
		name string
		key  Key
	}{
		{"a:1-b:2", KeyFromAddrPorts(ap(a, 1), ap(b, 2))},
		{"a:2-b:1 (same ports, swapped addresses)", KeyFromAddrPorts(ap(a, 2), ap(b, 1))},
		{"a:1-b:3 (same addresses, other port)", KeyFromAddrPorts(ap(a, 1), ap(b, 3))},
		{"a:3-b:2", KeyFromAddrPorts(ap(a, 3), ap(b, 2))},
		{"a:1-a:2", KeyFromAddrPorts(ap(a, 1), ap(a, 2))},
		{"b:1-b:2", KeyFromAddrPorts(ap(b, 1), ap(b, 2))},
		{"a:256-b:2 (port bytes swapped)", KeyFromAddrPorts(ap(a, 256), ap(b, 2))},
		{"::ffff:10.0.0.1 as plain ipv6", MakeKey(append(make([]byte, 12), 10, 0, 0, 1), 1, append(make([]byte, 12), 10, 0, 0, 2), 2)},
		{"ipv6", KeyFromAddrPorts(srcV6, dstV6)},
		{"ipv6 other port", KeyFromAddrPorts(ap(srcV6.Addr(), srcV6.Port()+1), dstV6)},
	}
	seen := map[Key]string{}
	for _, k := range keys {
		if prev, ok := seen[k.key]; ok {
			t.Errorf("%s and %s have the same key %v", prev, k.name, k.key)
		}
		seen[k.key] = k.name
	}
	if len(seen) != len(keys) {
		t.Errorf("map holds %d keys, want %d", len(seen), len(keys))
	}
	// And the map finds each by a key built from the other direction.
	for _, k := range keys {
		lo, hi := k.key.Endpoints()
		if got := seen[KeyFromAddrPorts(hi, lo)]; got != k.name {
			t.Errorf("lookup of reversed %s found %q", k.name, got)
		}
	}
}

func TestKeyString(t *testing.T) {
	cases := []struct {
		name string
		a, b netip.AddrPort
	}{
		{"ipv4", dstV4, srcV4},
		{"ipv6", srcV6, dstV6},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := KeyFromAddrPorts(tc.a, tc.b).String()
			for _, ep := range []netip.AddrPort{tc.a, tc.b} {
				if !strings.Contains(s, ep.String()) {
					t.Errorf("String() = %q, does not contain %s", s, ep)
				}
			}
			if want := srcFirst(tc.a, tc.b); s != want {
				t.Errorf("String() = %q, want %q", s, want)
			}
		})
	}
}

// srcFirst formats two endpoints the way Key.String does, smaller first.
func srcFirst(a, b netip.AddrPort) string {
	if b.Compare(a) < 0 {
		a, b = b, a
	}
	return a.String() + "<->" + b.String()
}

func TestIsZero(t *testing.T) {
	if !(Key{}).IsZero() {
		t.Error("Key{}.IsZero() = false")
	}
	if keyV4.IsZero() || keyV6.IsZero() {
		t.Error("a real key IsZero")
	}
}

func TestMakeKeyAllocs(t *testing.T) {
	a, b := raw(srcV6), raw(dstV6)
	var k Key
	if allocs := testing.AllocsPerRun(1000, func() { k = MakeKey(a, 1, b, 2) }); allocs != 0 {
		t.Errorf("MakeKey allocates %v times, want 0", allocs)
	}
	_ = k
}

// TestKeyMapLookupAllocs pins the demuxer's per-packet work: parse a packet
// and look its key up in a map of flows, without allocating.
func TestKeyMapLookupAllocs(t *testing.T) {
	tc := findCase(t, "ethernet/ipv6")
	flows := map[Key]*struct{}{}
	for _, k := range manyKeys(10000) {
		flows[k] = &struct{}{}
	}
	h, _ := Parse(tc.data, tc.link)
	flows[h.Key] = &struct{}{}
	var found bool
	allocs := testing.AllocsPerRun(1000, func() {
		h, _ := Parse(tc.data, tc.link)
		_, found = flows[h.Key]
	})
	if !found {
		t.Fatal("lookup missed")
	}
	if allocs != 0 {
		t.Errorf("parse and lookup allocate %v times, want 0", allocs)
	}
}

// manyKeys returns n distinct keys, a mix of IPv4 and IPv6.
func manyKeys(n int) []Key {
	keys := make([]Key, n)
	for i := range keys {
		port := uint16(1024 + i%50000)
		var a, b netip.Addr
		if i%2 == 0 {
			a = netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
			b = netip.AddrFrom4([4]byte{192, 0, 2, 1})
		} else {
			a = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 12: byte(i >> 24), 13: byte(i >> 16), 14: byte(i >> 8), 15: byte(i)})
			b = netip.MustParseAddr("2001:db8::ffff")
		}
		keys[i] = KeyFromAddrPorts(netip.AddrPortFrom(a, port), netip.AddrPortFrom(b, 443))
	}
	return keys
}

func BenchmarkKeyMapLookup(b *testing.B) {
	keys := manyKeys(10000)
	flows := make(map[Key]*struct{}, len(keys))
	for _, k := range keys {
		flows[k] = &struct{}{}
	}
	if len(flows) != len(keys) {
		b.Fatalf("%d flows, want %d", len(flows), len(keys))
	}
	b.ReportAllocs()
	b.ResetTimer()
	var hits int
	for i := range b.N {
		if flows[keys[i%len(keys)]] != nil {
			hits++
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/pkt")
	if hits != b.N {
		b.Fatalf("%d hits in %d lookups", hits, b.N)
	}
}

func BenchmarkMakeKey(b *testing.B) {
	x, y := raw(srcV6), raw(dstV6)
	var k Key
	b.ReportAllocs()
	for range b.N {
		k = MakeKey(x, 1, y, 2)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N), "ns/pkt")
	_ = k
}
