package e2e

import (
	"encoding/binary"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/internal/netns"
	"golang.org/x/sys/unix"
)

var floodDuration = flag.Duration("flood.duration", 30*time.Second, "how long TestSYNFlood floods")

const (
	floodRate = 50000 // SYNs per second
	// floodNet holds the spoofed sources: inside 198.18.0.0/15, outside
	// the test's own /24s.
	floodNet = "198.18.128.0/17"
)

// synFlooder writes spoofed-source SYNs to the client's veth through a raw
// packet socket made in the client namespace.
type synFlooder struct {
	fd    int
	frame []byte
	rng   *rand.Rand
}

func newSYNFlooder(t *testing.T, tp *topology, dstPort uint16) *synFlooder {
	srcIf, err := interfaceIn(tp.clientNS, tp.clientIf)
	if err != nil {
		t.Fatal(err)
	}
	dstIf, err := interfaceIn(tp.serverNS, tp.serverIf)
	if err != nil {
		t.Fatal(err)
	}
	f := &synFlooder{rng: rand.New(rand.NewPCG(1, 2))}
	err = netns.Run(tp.clientNS, func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		f.fd = fd
		return unix.Bind(fd, &unix.SockaddrLinklayer{Ifindex: srcIf.Index})
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(f.fd) })
	// Ethernet + IPv4 + TCP SYN with an MSS option.
	fr := make([]byte, 14+20+24)
	copy(fr[0:6], dstIf.HardwareAddr)
	copy(fr[6:12], srcIf.HardwareAddr)
	binary.BigEndian.PutUint16(fr[12:], 0x0800)
	ip := fr[14:34]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], 44)
	ip[8] = 64
	ip[9] = 6
	copy(ip[16:20], net.ParseIP(serverV4).To4())
	tcp := fr[34:]
	binary.BigEndian.PutUint16(tcp[2:], dstPort)
	tcp[12] = 6 << 4
	tcp[13] = 0x02 // SYN
	binary.BigEndian.PutUint16(tcp[14:], 64240)
	copy(tcp[20:], []byte{2, 4, 0x05, 0xb4})
	f.frame = fr
	return f
}

// interfaceIn looks up an interface inside a namespace.
func interfaceIn(ns *os.File, name string) (*net.Interface, error) {
	var ifc *net.Interface
	err := netns.Run(ns, func() error {
		var err error
		ifc, err = net.InterfaceByName(name)
		return err
	})
	return ifc, err
}

// send writes one SYN from a random source in floodNet.
func (f *synFlooder) send() error {
	fr := f.frame
	ip, tcp := fr[14:34], fr[34:]
	src := 0xC6128000 | f.rng.Uint32()&0x7fff // 198.18.128.0/17
	binary.BigEndian.PutUint32(ip[12:], src)
	binary.BigEndian.PutUint16(ip[4:], uint16(f.rng.Uint32()))
	ip[10], ip[11] = 0, 0
	binary.BigEndian.PutUint16(ip[10:], ^fold(sum16(ip)))
	binary.BigEndian.PutUint16(tcp[0:], uint16(1024+f.rng.IntN(60000)))
	binary.BigEndian.PutUint32(tcp[4:], f.rng.Uint32())
	tcp[16], tcp[17] = 0, 0
	pseudo := sum16(ip[12:20]) + 6 + uint32(len(tcp))
	binary.BigEndian.PutUint16(tcp[16:], ^fold(pseudo+sum16(tcp)))
	_, err := unix.Write(f.fd, fr)
	return err
}

// flood sends rate SYNs per second for d, in bursts every millisecond, and
// returns how many it sent. It stops by itself.
func (f *synFlooder) flood(rate int, d time.Duration) (int, error) {
	start := time.Now()
	sent := 0
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for now := start; now.Sub(start) < d; now = <-tick.C {
		due := int(float64(rate) * now.Sub(start).Seconds())
		for ; sent < due; sent++ {
			if err := f.send(); err != nil {
				if err == unix.ENOBUFS {
					continue
				}
				return sent, err
			}
		}
	}
	return sent, nil
}

// vmHWM reads a process's peak resident set size in bytes.
func vmHWM(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[0] == "VmHWM:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmHWM in /proc/%d/status", pid)
}

// TestSYNFlood floods the capture interface with 50,000 spoofed-source SYNs
// a second (-flood.duration, 30 s by default) with the daemon's default
// limits: its peak RSS stays under 150 MB, it creates no goroutine per SYN,
// and a real connection made during the flood is saved complete.
func TestSYNFlood(t *testing.T) {
	refFilter = "tcp and not src net " + floodNet + " and not dst net " + floodNet
	defer func() { refFilter = "tcp" }()
	e := newEnv(t)
	f := newSYNFlooder(t, e.tp, uint16(e.server.ln4.Addr().(*net.TCPAddr).Port))
	type result struct {
		sent int
		err  error
	}
	done := make(chan result, 1)
	go func() {
		n, err := f.flood(floodRate, *floodDuration)
		done <- result{n, err}
	}()
	// Real connections during the flood.
	var conns []conn
	maxGoroutines := 0.0
	deadline := time.Now().Add(*floodDuration)
	for time.Now().Before(deadline.Add(-2 * time.Second)) {
		conns = append(conns, e.exchange(e.server.ln4.Addr().String(), 1000))
		maxGoroutines = max(maxGoroutines, e.metric("go_goroutines"))
		if len(conns) >= 5 {
			break
		}
	}
	r := <-done
	if r.err != nil {
		t.Fatalf("flood: %v after %d SYNs", r.err, r.sent)
	}
	maxGoroutines = max(maxGoroutines, e.metric("go_goroutines"))
	hwm, err := vmHWM(e.daemon.cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	captured := e.metric(`pcap_capture_packets_total{interface="` + e.tp.serverIf + `"}`)
	dropped := e.metric(`pcap_demuxer_pending_dropped_total{reason="limit"}`) + e.metric(`pcap_demuxer_pending_dropped_total{reason="uuidtimeout"}`)
	t.Logf("flood: %d SYNs in %v (%.0f/s); daemon captured %.0f packets, dropped %.0f pending flows; peak RSS %.1f MB; at most %.0f goroutines",
		r.sent, *floodDuration, float64(r.sent)/floodDuration.Seconds(), captured, dropped, float64(hwm)/1e6, maxGoroutines)
	if float64(r.sent) < 0.9*floodRate*floodDuration.Seconds() {
		t.Errorf("sent only %d SYNs", r.sent)
	}
	if hwm > 150e6 {
		t.Errorf("peak RSS %.1f MB, want under 150 MB", float64(hwm)/1e6)
	}
	if maxGoroutines > 100 {
		t.Errorf("%v goroutines during the flood: one per SYN?", maxGoroutines)
	}
	e.daemon.signal(syscall.SIGTERM)
	if code, ok := e.daemon.wait(30 * time.Second); !ok || code != 0 {
		t.Fatalf("daemon exit %d %v", code, ok)
	}
	ref := e.stopReference()
	for _, c := range conns {
		compareFlow(t, e.fileOf(c.uuid, time.Second), ref[c.key], serverV4, false)
	}
}
