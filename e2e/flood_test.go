package e2e

import (
	"encoding/binary"
	"errors"
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

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

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

// synFlooder writes spoofed-source SYNs, crafted with gopacket, to the
// client's veth through a raw packet socket made in the client namespace.
type synFlooder struct {
	fd  int
	eth layers.Ethernet
	ip  layers.IPv4
	tcp layers.TCP
	buf gopacket.SerializeBuffer
	rng *rand.Rand
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
	f := &synFlooder{rng: rand.New(rand.NewPCG(1, 2)), buf: gopacket.NewSerializeBuffer()}
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
	f.eth = layers.Ethernet{SrcMAC: srcIf.HardwareAddr, DstMAC: dstIf.HardwareAddr, EthernetType: layers.EthernetTypeIPv4}
	f.ip = layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: make(net.IP, 4), DstIP: net.ParseIP(serverV4).To4()}
	f.tcp = layers.TCP{
		DstPort: layers.TCPPort(dstPort), SYN: true, Window: 64240,
		Options: []layers.TCPOption{{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: []byte{0x05, 0xb4}}},
	}
	if err := f.tcp.SetNetworkLayerForChecksum(&f.ip); err != nil {
		t.Fatal(err)
	}
	return f
}

// send writes one SYN from a random source in floodNet.
func (f *synFlooder) send() error {
	binary.BigEndian.PutUint32(f.ip.SrcIP, 0xC6128000|f.rng.Uint32()&0x7fff) // 198.18.128.0/17
	f.ip.Id = uint16(f.rng.Uint32())
	f.tcp.SrcPort = layers.TCPPort(1024 + f.rng.IntN(60000))
	f.tcp.Seq = f.rng.Uint32()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(f.buf, opts, &f.eth, &f.ip, &f.tcp); err != nil {
		return err
	}
	_, err := unix.Write(f.fd, f.buf.Bytes())
	return err
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
func vmHWM(pid int) (int64, error) { return procStatus(pid, "VmHWM:") }

// procStatus reads one size in kB from /proc/PID/status, in bytes.
func procStatus(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[0] == field {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// TestSYNFlood floods the capture interface with 50,000 spoofed-source SYNs
// a second (-flood.duration, 30 s by default) with the daemon's default
// limits, beside tcp-info: its peak RSS stays under 150 MB, it creates no
// goroutine per SYN, and a real connection made during the flood is saved
// complete.
func TestSYNFlood(t *testing.T) { synFloodTest(t) }

// TestSYNFloodStandalone is TestSYNFlood with the daemon's own UUID source,
// whose socket dumps and destroy notifications must not be swamped by the
// flood's half-open connections.
func TestSYNFloodStandalone(t *testing.T) { synFloodTest(t, standaloneArg) }

func synFloodTest(t *testing.T, daemonArgs ...string) {
	refFilter = "tcp and not src net " + floodNet + " and not dst net " + floodNet
	defer func() { refFilter = "tcp" }()
	e := newEnv(t, daemonArgs...)
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
	// Real connections during the flood, and the daemon's goroutines and
	// heap sampled every half second until the flood ends.
	var conns []conn
	var maxGoroutines, maxHeap float64
	deadline := time.Now().Add(*floodDuration - 2*time.Second)
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	var r result
	for waiting := true; waiting; {
		select {
		case r = <-done:
			waiting = false
		case <-tick.C:
			if len(conns) < 5 && time.Now().Before(deadline) {
				conns = append(conns, e.exchange(e.server.ln4.Addr().String(), 1000))
			}
			maxGoroutines = max(maxGoroutines, e.metric("go_goroutines"))
			maxHeap = max(maxHeap, e.metric("go_memstats_heap_inuse_bytes"))
		}
	}
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
	t.Logf("flood: %d SYNs in %v (%.0f/s); daemon captured %.0f packets, dropped %.0f pending flows; peak RSS %.1f MB, heap in use at most %.1f MB (sampled); at most %.0f goroutines",
		r.sent, *floodDuration, float64(r.sent)/floodDuration.Seconds(), captured, dropped, float64(hwm)/1e6, maxHeap/1e6, maxGoroutines)
	if float64(r.sent) < 0.9*floodRate*floodDuration.Seconds() {
		t.Errorf("sent only %d SYNs", r.sent)
	}
	if hwm > 150e6 {
		t.Errorf("peak RSS %.1f MB, want under 150 MB", float64(hwm)/1e6)
	}
	if maxGoroutines > 100 {
		t.Errorf("%v goroutines during the flood: one per SYN?", maxGoroutines)
	}
	// Where the resident memory is: anonymous (the Go heap and runtime)
	// and file-backed (the binary and the capture ring, mapped from the
	// kernel).
	anon, err1 := procStatus(e.daemon.cmd.Process.Pid, "RssAnon:")
	file, err2 := procStatus(e.daemon.cmd.Process.Pid, "RssFile:")
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	t.Logf("resident at the end of the flood: %.1f MB anonymous, %.1f MB file-backed", float64(anon)/1e6, float64(file)/1e6)
	e.daemon.signal(syscall.SIGTERM)
	if code, ok := e.daemon.wait(30 * time.Second); !ok || code != 0 {
		t.Fatalf("daemon exit %d %v", code, ok)
	}
	ref := e.stopReference()
	for _, c := range conns {
		compareFlow(t, e.fileOf(c.uuid, time.Second), ref[c.key], serverV4, false)
	}
}
