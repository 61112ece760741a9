package e2e

import (
	"compress/gzip"
	"encoding/binary"
	"io"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/internal/netns"
)

// newTUNTopology joins the two namespaces with a raw-IP link: a TUN device in
// each (link type "none": libpcap captures it as raw IP, with no link-layer
// header) and a relay in the test process that copies each packet read from
// one device into the other. The kernel of the test machines has no tunnel
// or VLAN drivers, but TUN is always there.
func newTUNTopology(t *testing.T) *topology {
	t.Helper()
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
	tp := newNamespaces(t)
	tp.serverIf, tp.clientIf = "ts"+tp.id, "tc"+tp.id
	server, err := openTUN(tp.serverNS, tp.serverIf)
	if err != nil {
		t.Fatal(err)
	}
	client, err := openTUN(tp.clientNS, tp.clientIf)
	if err != nil {
		server.Close()
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { relay(client, server) })
	wg.Go(func() { relay(server, client) })
	t.Cleanup(func() {
		// Closing the devices ends the relays' reads.
		server.Close()
		client.Close()
		wg.Wait()
	})
	for _, s := range []struct{ ns, ifc, v4, peer4, v6 string }{
		{tp.server, tp.serverIf, serverV4, clientV4, serverV6},
		{tp.client, tp.clientIf, clientV4, serverV4, clientV6},
	} {
		run(t, "ip", "-n", s.ns, "addr", "add", s.v4, "peer", s.peer4, "dev", s.ifc)
		run(t, "ip", "-n", s.ns, "addr", "add", s.v6+"/64", "dev", s.ifc, "nodad")
		run(t, "ip", "-n", s.ns, "link", "set", s.ifc, "up")
	}
	return tp
}

// openTUN creates the TUN device name in a namespace and returns it, non-
// blocking, so that Close interrupts a Read.
func openTUN(ns *os.File, name string) (*os.File, error) {
	var f *os.File
	err := netns.Run(ns, func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		ifr, err := unix.NewIfreq(name)
		if err == nil {
			ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
			err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
		}
		if err == nil {
			err = unix.SetNonblock(fd, true)
		}
		if err != nil {
			unix.Close(fd)
			return err
		}
		f = os.NewFile(uintptr(fd), name)
		return nil
	})
	return f, err
}

// relay copies packets from one TUN device to the other until from is
// closed. A packet the other device refuses (it is not up yet: EIO) is
// dropped, as a link would.
func relay(from, to *os.File) {
	buf := make([]byte, 65536)
	for {
		n, err := from.Read(buf)
		if err != nil {
			return
		}
		to.Write(buf[:n]) // A refused packet is lost, as on a real link.
	}
}

// TestRawIPInterface captures on an interface without a link-layer header:
// the files still hold Ethernet records (a synthetic header, as the
// downstream reader decodes every record as Ethernet) whose IP and TCP
// headers equal the reference's, for IPv4 and IPv6.
func TestRawIPInterface(t *testing.T) {
	e := newEnvFor(t, newTUNTopology(t), true)
	var conns []conn
	for i := 0; i < 2; i++ {
		conns = append(conns, e.exchange(e.server.ln4.Addr().String(), 100+1000*i))
		conns = append(conns, e.exchange(e.server.ln6.Addr().String(), 100+1000*i))
	}
	for _, c := range conns {
		e.fileOf(c.uuid, 20*time.Second)
	}
	e.daemon.signal(syscall.SIGTERM)
	if code, ok := e.daemon.wait(15 * time.Second); !ok || code != 0 {
		t.Fatalf("daemon exit %d %v", code, ok)
	}
	ref := e.stopReference()
	for _, c := range conns {
		path := e.fileOf(c.uuid, time.Second)
		if lt, err := pcapLinkType(path); err != nil || lt != 1 {
			t.Errorf("%s: link type %d, %v; want 1 (Ethernet)", path, lt, err)
		}
		if len(ref[c.key]) == 0 {
			t.Fatalf("the reference has no packets of %v", c.key)
		}
		compareFlow(t, path, ref[c.key], serverAddrOf(c), false)
	}
}

// pcapLinkType reads the link type from a gzipped pcap file's header.
func pcapLinkType(path string) (uint32, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return 0, err
	}
	var h [24]byte
	if _, err := io.ReadFull(zr, h[:]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(h[20:]), nil
}
