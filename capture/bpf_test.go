package capture

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/metrics"
)

// skb is what a socket filter sees of a packet.
type skb struct {
	ifindex  int
	protocol uint16
	net      []byte // from the network header
}

// runFilter interprets the instructions filterProgram emits, as the
// kernel does, and returns the program's result (0: drop).
func runFilter(t *testing.T, prog []unix.SockFilter, p skb) uint32 {
	t.Helper()
	var a uint32
	for pc := 0; pc < len(prog); pc++ {
		in := prog[pc]
		switch in.Code {
		case bpfLdW, bpfLdB:
			k := int32(in.K)
			switch {
			case k == skfAdOff+skfAdIfindex:
				a = uint32(p.ifindex)
			case k == skfAdOff+skfAdProtocol:
				a = uint32(p.protocol)
			case k >= skfNetOff && k < skfNetOff+0x10000:
				off := int(k - skfNetOff)
				n := 4
				if in.Code == bpfLdB {
					n = 1
				}
				if off+n > len(p.net) {
					return 0 // out of bounds: the kernel drops
				}
				if n == 1 {
					a = uint32(p.net[off])
				} else {
					a = binary.BigEndian.Uint32(p.net[off:])
				}
			default:
				t.Fatalf("pc %d: load %#x not expected", pc, in.K)
			}
		case bpfJeq:
			if a == in.K {
				pc += int(in.Jt)
			} else {
				pc += int(in.Jf)
			}
		case bpfJa:
			pc += int(in.K)
		case bpfRet:
			return in.K
		default:
			t.Fatalf("pc %d: opcode %#x not expected", pc, in.Code)
		}
	}
	t.Fatal("program fell off its end")
	return 0
}

// ipPacket builds a TCP (or other protocol) packet from src to dst.
func ipPacket(t *testing.T, src, dst string, proto layers.IPProtocol) skb {
	t.Helper()
	s, d := net.ParseIP(src), net.ParseIP(dst)
	tcp := &layers.TCP{SrcPort: 1, DstPort: 2, SYN: true}
	var l3 gopacket.SerializableLayer
	p := skb{ifindex: 2}
	if s.To4() != nil {
		ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: proto, SrcIP: s, DstIP: d}
		if err := tcp.SetNetworkLayerForChecksum(ip); err != nil {
			t.Fatal(err)
		}
		l3, p.protocol = ip, etherTypeIPv4
	} else {
		ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: proto, SrcIP: s, DstIP: d}
		if err := tcp.SetNetworkLayerForChecksum(ip); err != nil {
			t.Fatal(err)
		}
		l3, p.protocol = ip, etherTypeIPv6
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, l3, tcp); err != nil {
		t.Fatal(err)
	}
	p.net = buf.Bytes()
	return p
}

func addrs(ss ...string) []netip.Addr {
	var as []netip.Addr
	for _, s := range ss {
		as = append(as, netip.MustParseAddr(s))
	}
	return as
}

func TestFilterProgram(t *testing.T) {
	local := addrs("198.18.0.1", "198.18.5.5", "2001:db8::1", "fe80::1")
	prog, all := filterProgram(local, []int{1, 7}, 256)
	if !all {
		t.Fatal("four addresses did not fit")
	}
	arp := skb{ifindex: 2, protocol: 0x0806, net: make([]byte, 28)}
	tests := []struct {
		name string
		p    skb
		keep bool
	}{
		{"v4 to host", ipPacket(t, "198.18.9.9", "198.18.0.1", layers.IPProtocolTCP), true},
		{"v4 from second address", ipPacket(t, "198.18.5.5", "198.18.9.9", layers.IPProtocolTCP), true},
		{"v4 elsewhere", ipPacket(t, "198.18.9.9", "198.18.9.8", layers.IPProtocolTCP), false},
		{"v4 udp to host", ipPacket(t, "198.18.9.9", "198.18.0.1", layers.IPProtocolUDP), false},
		{"v6 to host", ipPacket(t, "2001:db8::9", "2001:db8::1", layers.IPProtocolTCP), true},
		{"v6 link-local from host", ipPacket(t, "fe80::1", "fe80::2", layers.IPProtocolTCP), true},
		{"v6 one word off", ipPacket(t, "2001:db8::9", "2001:db8::2", layers.IPProtocolTCP), false},
		{"v6 routing header to host", ipPacket(t, "2001:db8::9", "2001:db8::1", layers.IPProtocolIPv6Routing), true},
		{"v6 udp", ipPacket(t, "2001:db8::9", "2001:db8::1", layers.IPProtocolUDP), false},
		{"arp", arp, false},
	}
	for _, tt := range tests {
		if got := runFilter(t, prog, tt.p); (got != 0) != tt.keep || (tt.keep && got != 256) {
			t.Errorf("%s: filter returned %d, want keep=%v", tt.name, got, tt.keep)
		}
	}
	// Excluded interfaces: loopback and a bridge port.
	for _, i := range []int{1, 7} {
		p := ipPacket(t, "198.18.9.9", "198.18.0.1", layers.IPProtocolTCP)
		p.ifindex = i
		if runFilter(t, prog, p) != 0 {
			t.Errorf("packet on excluded interface %d kept", i)
		}
	}
	// No address: all TCP.
	prog, _ = filterProgram(nil, nil, 100)
	if runFilter(t, prog, ipPacket(t, "198.18.9.9", "198.18.9.8", layers.IPProtocolTCP)) != 100 {
		t.Error("all-TCP program dropped TCP")
	}
	if runFilter(t, prog, ipPacket(t, "198.18.9.9", "198.18.9.8", layers.IPProtocolUDP)) != 0 {
		t.Error("all-TCP program kept UDP")
	}
}

// TestFilterProgramManyAddresses: a host with hundreds of addresses gets a
// program within the kernel's limit that matches the last of them; beyond
// the limit, all TCP.
func TestFilterProgramManyAddresses(t *testing.T) {
	var as []netip.Addr
	for i := range 200 {
		as = append(as, netip.AddrFrom4([4]byte{198, 18, byte(i / 250), byte(i%250 + 1)}))
	}
	for i := range 100 {
		as = append(as, netip.MustParseAddr("2001:db8::"+string(rune('a'+i%6))+":"+itoa(i)))
	}
	prog, all := filterProgram(as, []int{3, 4, 5}, 256)
	if !all || len(prog) > maxInsns {
		t.Fatalf("%d instructions, all=%v", len(prog), all)
	}
	last4, last6 := as[199].String(), as[299].String()
	if runFilter(t, prog, ipPacket(t, "198.19.0.1", last4, layers.IPProtocolTCP)) == 0 {
		t.Error("last IPv4 address not matched")
	}
	if runFilter(t, prog, ipPacket(t, last6, "2001:db8:ffff::1", layers.IPProtocolTCP)) == 0 {
		t.Error("last IPv6 address not matched")
	}
	for i := range 200 {
		as = append(as, netip.MustParseAddr("2001:db8:1::"+itoa(i+1)))
	}
	prog, all = filterProgram(as, nil, 256)
	if all || len(prog) > maxInsns {
		t.Fatalf("%d instructions, all=%v, want the all-TCP fallback", len(prog), all)
	}
	if runFilter(t, prog, ipPacket(t, "198.19.0.1", "198.19.0.2", layers.IPProtocolTCP)) == 0 {
		t.Error("fallback dropped TCP")
	}
}

func itoa(i int) string {
	const hex = "0123456789abcdef"
	s := ""
	for {
		s = string(hex[i%16]) + s
		i /= 16
		if i == 0 {
			return s
		}
	}
}

// TestRealSocketOnLoopback reads a TCP connection on the loopback interface
// through a real packet socket and ring, with the generated filter: the
// kernel accepts the program and the ring layout is read right.
func TestRealSocketOnLoopback(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_RAW)")
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	prog, _ := filterProgram(addrs("127.0.0.1"), nil, 96)
	m := metrics.New(prometheus.NewRegistry())
	c, err := Open("lo", prog, &Config{Snaplen: 96, BufferSize: 1 << 20, Timeout: 20 * time.Millisecond, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	out := make(chan *flow.Batch, 100)
	done := make(chan error)
	go func() { done <- c.Run(t.Context(), out) }()
	go func() {
		s, err := ln.Accept()
		if err == nil {
			s.Write([]byte("hello"))
			s.Close()
		}
	}()
	cl, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var syn *flow.Packet
	for syn == nil {
		b := receive(t, out)
		for i := range b.Packets {
			p := &b.Packets[i]
			tcp := p.Data[p.L4:]
			if binary.BigEndian.Uint16(tcp[2:]) == port && tcp[13]&0x02 != 0 {
				syn = p
				break
			}
		}
	}
	if syn.L3 != 14 || syn.IPv6 || len(syn.Data) > 96 || syn.Time < time.Now().Add(-time.Minute).UnixNano() {
		t.Errorf("SYN read wrong: L3 %d len %d time %d", syn.L3, len(syn.Data), syn.Time)
	}
	c.Stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestFilterAddrs: loopback and link-local addresses, whose flows are never
// named, stay out of the filter.
func TestFilterAddrs(t *testing.T) {
	got := filterAddrs(addrs("127.0.0.1", "::1", "fe80::1", "169.254.1.1", "198.18.0.1", "2001:db8::1"))
	want := addrs("198.18.0.1", "2001:db8::1")
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("filterAddrs = %v, want %v", got, want)
	}
}
