package capture

import (
	"net/netip"
	"slices"

	"golang.org/x/sys/unix"
)

// The socket filter is a classic BPF program built here rather than
// compiled by libpcap, because one packet socket may see every interface of
// the host, each with its own link-layer header (Ethernet, none for a TUN
// device, ...). The program reads the network header through the kernel's
// SKF_NET_OFF window and the packet's protocol and interface through its
// ancillary loads, so the same program fits every link type. It keeps what
// libpcap's "tcp and (host A or host B ...)" keeps, except that IPv6 packets
// whose first extension header is hop-by-hop, routing, fragment or
// destination options also pass on to the parser (libpcap's "tcp" looks
// through a fragment header only), and it drops the packets of the
// interfaces in the exclude list (loopback, bridge and bond ports).
const (
	bpfLdW = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
	bpfLdB = unix.BPF_LD | unix.BPF_B | unix.BPF_ABS
	bpfJeq = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
	bpfJa  = unix.BPF_JMP | unix.BPF_JA
	bpfRet = unix.BPF_RET | unix.BPF_K

	// Offsets of the kernel's special loads (linux/filter.h).
	skfAdOff      = -0x1000
	skfAdProtocol = 0
	skfAdIfindex  = 8
	skfNetOff     = -0x100000

	// maxInsns is the kernel's limit on a classic BPF program
	// (BPF_MAXINSNS).
	maxInsns = 4096

	etherTypeIPv4 = 0x0800
	etherTypeIPv6 = 0x86dd
	protoTCP      = 6
)

// ipv6ExtHeaders are the IPv6 next-header values after which TCP may still
// follow, which the parser walks.
var ipv6ExtHeaders = []uint32{0, 43, 44, 60}

// prog assembles a classic BPF program with forward jumps to labels.
type prog struct {
	ins    []unix.SockFilter
	labels map[string]int
	jumps  map[int]string // index of a "ja" -> its label
}

func (p *prog) emit(code uint16, jt, jf uint8, k uint32) {
	p.ins = append(p.ins, unix.SockFilter{Code: code, Jt: jt, Jf: jf, K: k})
}

// ja jumps to label, placed later.
func (p *prog) ja(label string) {
	p.jumps[len(p.ins)] = label
	p.emit(bpfJa, 0, 0, 0)
}

// ifEq jumps to label when the accumulator equals k.
func (p *prog) ifEq(k uint32, label string) {
	p.emit(bpfJeq, 0, 1, k)
	p.ja(label)
}

func (p *prog) label(name string) { p.labels[name] = len(p.ins) }

func (p *prog) load(code uint16, off int32) { p.emit(code, 0, 0, uint32(off)) }

func (p *prog) resolve() []unix.SockFilter {
	for i, l := range p.jumps {
		p.ins[i].K = uint32(p.labels[l] - i - 1)
	}
	return p.ins
}

// filterProgram returns the socket filter that keeps the TCP packets to or
// from addrs (all TCP when addrs is empty), except those on the interfaces
// in exclude, cut to snaplen bytes. When the addresses do not fit in the
// kernel's limit on a program, it keeps all TCP and returns false: the
// demuxer then drops the packets of flows no UUID ever names.
func filterProgram(addrs []netip.Addr, exclude []int, snaplen int) ([]unix.SockFilter, bool) {
	if p := buildProgram(addrs, exclude, snaplen); len(p) <= maxInsns {
		return p, true
	}
	return buildProgram(nil, exclude, snaplen), false
}

func buildProgram(addrs []netip.Addr, exclude []int, snaplen int) []unix.SockFilter {
	p := &prog{labels: map[string]int{}, jumps: map[int]string{}}
	var v4, v6 []netip.Addr
	for _, a := range addrs {
		if a.Is4() {
			v4 = append(v4, a)
		} else {
			v6 = append(v6, a)
		}
	}
	if len(exclude) > 0 {
		p.load(bpfLdW, skfAdOff+skfAdIfindex)
		ex := slices.Clone(exclude)
		slices.Sort(ex)
		for _, i := range slices.Compact(ex) {
			p.ifEq(uint32(i), "reject")
		}
	}
	p.load(bpfLdW, skfAdOff+skfAdProtocol)
	p.ifEq(etherTypeIPv4, "v4")
	p.ifEq(etherTypeIPv6, "v6")
	p.ja("reject")

	p.label("v4")
	p.load(bpfLdB, skfNetOff+9)
	p.emit(bpfJeq, 1, 0, protoTCP)
	p.ja("reject")
	if len(addrs) == 0 {
		p.ja("accept")
	}
	for _, off := range []int32{12, 16} {
		p.load(bpfLdW, skfNetOff+off)
		for _, a := range v4 {
			b := a.As4()
			p.ifEq(uint32(b[0])<<24|uint32(b[1])<<16|uint32(b[2])<<8|uint32(b[3]), "accept")
		}
	}
	p.ja("reject")

	p.label("v6")
	p.load(bpfLdB, skfNetOff+6)
	p.ifEq(protoTCP, "v6addr")
	for _, x := range ipv6ExtHeaders {
		p.ifEq(x, "v6addr")
	}
	p.ja("reject")
	p.label("v6addr")
	if len(addrs) == 0 {
		p.ja("accept")
	}
	for _, off := range []int32{8, 24} {
		for _, a := range v6 {
			b := a.As16()
			// Four words; a mismatch skips the rest of this address.
			for w := range 4 {
				p.load(bpfLdW, skfNetOff+off+int32(4*w))
				k := uint32(b[4*w])<<24 | uint32(b[4*w+1])<<16 | uint32(b[4*w+2])<<8 | uint32(b[4*w+3])
				p.emit(bpfJeq, 0, uint8(2*(3-w)+1), k)
			}
			p.ja("accept")
		}
	}
	// Every jump goes forward: the two ends are last.
	p.label("reject")
	p.emit(bpfRet, 0, 0, 0)
	p.label("accept")
	p.emit(bpfRet, 0, 0, uint32(snaplen))
	return p.resolve()
}
