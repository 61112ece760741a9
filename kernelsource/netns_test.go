package kernelsource

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

// canceled returns a context that is already done.
func canceled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

// Addresses of the test namespaces: 198.18.0.0/15 (benchmarking) and
// 2001:db8::/32 (documentation) only.
const (
	addrA  = "198.18.0.1"
	addrB  = "198.18.0.2"
	addrA6 = "2001:db8::1"
	addrB6 = "2001:db8::2"
	addrC  = "198.18.0.3" // on the namespace's subnet, but no interface has it
)

var netnsSeq atomic.Int64

// testNetns is a network namespace made for one test with `ip netns add`
// and deleted when it ends. It holds a veth pair, va with addrA and addrA6,
// vb with addrB and addrB6, so that connections between A and B stay inside
// the namespace (the kernel delivers them locally) and use neither loopback
// addresses, which the Source ignores, nor anything outside the test ranges.
//
// Code runs in it through do: an OS thread joins the namespace with setns,
// and the sockets made there stay in the namespace wherever they are used
// afterwards. Running the whole test binary under `ip netns exec` would
// also work, but would take the host's sockets out of no test and would
// need a re-exec; a thread per call is simpler.
type testNetns struct {
	name string
}

// newNetns creates a namespace, or skips the test if it cannot.
func newNetns(tb testing.TB) *testNetns {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root: creates a network namespace with ip netns add")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		tb.Skip("needs iproute2's ip command to create a network namespace")
	}
	n := &testNetns{name: fmt.Sprintf("ksrc-%d-%d", os.Getpid(), netnsSeq.Add(1))}
	ip := func(args ...string) {
		tb.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			tb.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	ip("netns", "add", n.name)
	tb.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", n.name).CombinedOutput(); err != nil {
			tb.Errorf("ip netns del %s: %v\n%s", n.name, err, out)
		}
	})
	ns := []string{"-n", n.name}
	ip(append(ns, "link", "set", "lo", "up")...)
	ip(append(ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")...)
	ip(append(ns, "addr", "add", addrA+"/15", "dev", "va")...)
	ip(append(ns, "addr", "add", addrB+"/15", "dev", "vb")...)
	ip(append(ns, "addr", "add", addrA6+"/64", "dev", "va", "nodad")...)
	ip(append(ns, "addr", "add", addrB6+"/64", "dev", "vb", "nodad")...)
	ip(append(ns, "link", "set", "va", "up")...)
	ip(append(ns, "link", "set", "vb", "up")...)
	return n
}

// do runs f on an OS thread inside the namespace. The thread is never
// given back to other goroutines: the goroutine ends locked to it, so the
// runtime ends the thread, and whatever f changes about the thread (its
// capabilities, say) goes with it.
func (n *testNetns) do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open("/run/netns/"+n.name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			errc <- fmt.Errorf("setns %s: %w", n.name, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// listen opens a listener on addr (host:port) in the namespace.
func (n *testNetns) listen(tb testing.TB, addr string) net.Listener {
	tb.Helper()
	var l net.Listener
	if err := n.do(func() (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { l.Close() })
	return l
}

// dial connects from local (an address without port) to raddr (host:port)
// in the namespace.
func (n *testNetns) dial(local, raddr string) (*net.TCPConn, error) {
	var c net.Conn
	err := n.do(func() (err error) {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}, Timeout: 5 * time.Second}
		c, err = d.Dial("tcp", raddr)
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// cookie returns the socket cookie of c (SO_COOKIE), which names it.
func cookie(tb testing.TB, c syscallConner) uint64 {
	tb.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	var v uint64
	var serr error
	if err := rc.Control(func(fd uintptr) {
		v, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
	}); err != nil {
		tb.Fatal(err)
	}
	if serr != nil {
		tb.Fatalf("getsockopt SO_COOKIE: %v", serr)
	}
	return v
}

type syscallConner interface {
	SyscallConn() (syscall.RawConn, error)
}
