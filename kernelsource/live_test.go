package kernelsource

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/metrics"
)

// waitTimeout bounds every wait for the kernel or the Source.
const waitTimeout = 10 * time.Second

// syncBuffer is a bytes.Buffer for a logger used by several goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// harness runs a Source in a test namespace and collects its Opens.
type harness struct {
	s      *Source
	m      *metrics.Metrics
	logs   *syncBuffer
	out    chan flow.Named
	seen   map[string][]flow.Named // by UUID
	cancel context.CancelFunc
	done   chan error
}

// newHarness creates a Source in ns (with New called on a thread of the
// namespace after setup, which may, for example, drop capabilities) and
// starts Run. The test's cleanup stops it and checks that Run returned nil
// and left no goroutine behind.
func newHarness(t *testing.T, ns *testNetns, cfg Config, setup func() error) *harness {
	t.Helper()
	h := &harness{
		m:    metrics.New(prometheus.NewRegistry()),
		logs: &syncBuffer{},
		out:  make(chan flow.Named), // unbuffered: sends block until read
		seen: make(map[string][]flow.Named),
		done: make(chan error, 1),
	}
	cfg.Metrics = h.m
	cfg.Log = slog.New(slog.NewTextHandler(h.logs, nil))
	if cfg.PrefixFile == "" {
		cfg.PrefixFile = filepath.Join(t.TempDir(), "prefix")
		if err := os.WriteFile(cfg.PrefixFile, []byte("kstest.example_1700000000"), 0o444); err != nil {
			t.Fatal(err)
		}
	}
	err := ns.do(func() error {
		if setup != nil {
			if err := setup(); err != nil {
				return err
			}
		}
		var err error
		h.s, err = New(cfg, h.out)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	var ctx context.Context
	ctx, h.cancel = context.WithCancel(context.Background())
	go func() { h.done <- h.s.Run(ctx) }()
	t.Cleanup(func() {
		h.cancel()
		select {
		case err := <-h.done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(waitTimeout):
			t.Fatal("Run did not return after its context was canceled")
		}
		checkNoGoroutines(t)
	})
	return h
}

// polls returns the number of dumps done so far.
func (h *harness) polls(t *testing.T) uint64 {
	t.Helper()
	var m dto.Metric
	if err := h.m.UUIDSourcePoll.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

// waitPolls waits until n more dumps than now have completed, taking the
// Opens sent meanwhile.
func (h *harness) waitPolls(t *testing.T, n uint64) {
	t.Helper()
	want := h.polls(t) + n
	deadline := time.Now().Add(waitTimeout)
	for h.polls(t) < want {
		if time.Now().After(deadline) {
			t.Fatalf("fewer than %d dumps in %v", n, waitTimeout)
		}
		h.take(time.Millisecond)
	}
}

// take collects the Opens sent within d.
func (h *harness) take(d time.Duration) {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case o := <-h.out:
			h.seen[o.UUID] = append(h.seen[o.UUID], o)
		case <-timer.C:
			return
		}
	}
}

// waitOpen waits for the Open of uuid and returns it.
func (h *harness) waitOpen(t *testing.T, uuid string) flow.Named {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for len(h.seen[uuid]) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no Open for %s within %v; got %v", uuid, waitTimeout, h.seen)
		}
		h.take(10 * time.Millisecond)
	}
	return h.seen[uuid][0]
}

// conn is one connection in a test namespace, with the cookies of both of
// its sockets.
type conn struct {
	client, server      *net.TCPConn
	clientCook, srvCook uint64
	key                 flow.Key
}

// connect makes a connection from local to remote, at the port of the
// listener l.
func connect(t *testing.T, ns *testNetns, l net.Listener, local, remote string) *conn {
	t.Helper()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			t.Error(err)
		}
		accepted <- c
	}()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	c, err := ns.dial(local, net.JoinHostPort(remote, port))
	if err != nil {
		t.Fatal(err)
	}
	s := (<-accepted).(*net.TCPConn)
	cn := &conn{
		client: c, server: s,
		clientCook: cookie(t, c), srvCook: cookie(t, s),
		key: flow.KeyFromAddrPorts(c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort()),
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return cn
}

// checkOpen checks that o names the flow key at a time in [after, now].
func checkOpen(t *testing.T, o flow.Named, key flow.Key, after time.Time) {
	t.Helper()
	if o.Key != key {
		t.Errorf("Open %s has key %v, want %v", o.UUID, o.Key, key)
	}
	if o.Time.Location() != time.UTC {
		t.Errorf("Open %s time %v is not UTC", o.UUID, o.Time)
	}
	if o.Time.Before(after) || o.Time.After(time.Now()) {
		t.Errorf("Open %s time %v not between %v and now", o.UUID, o.Time, after)
	}
}

// checkNoGoroutines fails if a goroutine of a Source is still running.
func checkNoGoroutines(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var leaked []string
		for g := range strings.SplitSeq(string(buf), "\n\n") {
			if strings.Contains(g, "kernelsource.(*Source)") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("goroutines of a Source still running after Run returned:\n%s", strings.Join(leaked, "\n\n"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestRunNamesSockets(t *testing.T) {
	ns := newNetns(t)
	start := time.Now()
	h := newHarness(t, ns, Config{Interval: 10 * time.Millisecond}, nil)
	if got, want := h.s.Prefix(), "kstest.example_1700000000"; got != want {
		t.Fatalf("Prefix() = %q, want %q", got, want)
	}

	conns := map[string]*conn{
		"ipv4": connect(t, ns, ns.listen(t, addrB+":0"), addrA, addrB),
		"ipv6": connect(t, ns, ns.listen(t, "["+addrB6+"]:0"), addrA6, addrB6),
		// A dual-stack listener: the accepted socket is AF_INET6 with
		// IPv4-mapped addresses, the client's is AF_INET.
		"v4-mapped": connect(t, ns, ns.listen(t, "[::]:0"), addrA, addrB),
	}
	for name, c := range conns {
		// Both ends are sockets of this host: each is named, with the
		// same flow key and its own cookie.
		for _, ck := range []uint64{c.clientCook, c.srvCook} {
			o := h.waitOpen(t, UUID(h.s.Prefix(), ck))
			t.Logf("%s: %s %v", name, o.UUID, o.Key)
			checkOpen(t, o, c.key, start)
		}
	}

	// A connecting socket, in SYN_SENT: tcp-info names it, so we do too.
	// Nobody answers ARP for addrC, so the SYN never leaves the host.
	var synFD int
	var synCookie uint64
	var synKey flow.Key
	err := ns.do(func() error {
		var err error
		if synFD, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		a, c := mustAddr(addrA).As4(), mustAddr(addrC).As4()
		if err := unix.Bind(synFD, &unix.SockaddrInet4{Addr: a}); err != nil {
			return err
		}
		if err := unix.Connect(synFD, &unix.SockaddrInet4{Addr: c, Port: 9}); err != unix.EINPROGRESS {
			return fmt.Errorf("connect to %s: %v, want EINPROGRESS", addrC, err)
		}
		sa, err := unix.Getsockname(synFD)
		if err != nil {
			return err
		}
		local := netip.AddrPortFrom(netip.AddrFrom4(a), uint16(sa.(*unix.SockaddrInet4).Port))
		synKey = flow.KeyFromAddrPorts(local, netip.AddrPortFrom(netip.AddrFrom4(c), 9))
		synCookie, err = unix.GetsockoptUint64(synFD, unix.SOL_SOCKET, unix.SO_COOKIE)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	checkOpen(t, h.waitOpen(t, UUID(h.s.Prefix(), synCookie)), synKey, start)
	unix.Close(synFD)

	// A socket that has left the dumps (reset, so in CLOSE, but still held
	// by its application) and is destroyed only later must not be named a
	// second time by its destroy notification.
	c := conns["ipv4"]
	if err := c.server.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	c.server.Close() // sends a reset; the server socket is destroyed now
	h.waitPolls(t, 5)
	for _, c := range conns {
		c.client.Close()
		c.server.Close()
	}
	// Enough dumps for the destroy notifications to have been handled:
	// Run takes them between dumps.
	h.waitPolls(t, 20)

	if !h.s.NotifiesDestroy() {
		t.Log("destroy notifications unavailable: only polling was tested")
	}
	for uuid, opens := range h.seen {
		if len(opens) != 1 {
			t.Errorf("%s named %d times: %v", uuid, len(opens), opens)
		}
	}
	if got, want := len(h.seen), 2*len(conns)+1; got != want {
		t.Errorf("%d sockets named, want %d: %v", got, want, h.seen)
	}
	if got := testutilCount(t, h.m.UUIDSourceIssued); got != float64(len(h.seen)) {
		t.Errorf("UUIDSourceIssued = %v, want %d", got, len(h.seen))
	}
	if got := testutilCount(t, h.m.UUIDSourceSockets); got < float64(len(h.seen)) {
		t.Errorf("UUIDSourceSockets = %v, want at least %d", got, len(h.seen))
	}
}

func testutilCount(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// TestShortFlowNamedByDestroy: a flow that opens and closes between two
// dumps is named from its destroy notification. The interval is an hour, so
// after the first dump only a notification can name anything.
func TestShortFlowNamedByDestroy(t *testing.T) {
	ns := newNetns(t)
	for _, tc := range []struct{ name, listen, local string }{
		{"ipv4", addrB + ":0", addrA},
		{"ipv6", "[" + addrB6 + "]:0", addrA6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := ns.listen(t, tc.listen)
			h := newHarness(t, ns, Config{Interval: time.Hour}, nil)
			if !h.s.NotifiesDestroy() {
				t.Fatalf("no destroy notifications though running as root; log:\n%s", h.logs)
			}
			h.waitPolls(t, 1) // the one dump of the test is over

			// The server reads the byte, then closes.
			srv := make(chan uint64, 1)
			go func() {
				c, err := l.Accept()
				if err != nil {
					t.Error(err)
					srv <- 0
					return
				}
				srv <- cookie(t, c.(*net.TCPConn))
				io.Copy(io.Discard, c)
				c.Close()
			}()
			var (
				ck      uint64
				key     flow.Key
				elapsed time.Duration
			)
			err := ns.do(func() error {
				begin := time.Now()
				d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(tc.local)}}
				c, err := d.Dial("tcp", l.Addr().String())
				if err != nil {
					return err
				}
				tcpc := c.(*net.TCPConn)
				rc, _ := tcpc.SyscallConn()
				rc.Control(func(fd uintptr) { ck, err = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE) })
				if err != nil {
					return err
				}
				if _, err := c.Write([]byte{1}); err != nil {
					return err
				}
				err = c.Close()
				elapsed = time.Since(begin)
				key = flow.KeyFromAddrPorts(tcpc.LocalAddr().(*net.TCPAddr).AddrPort(), tcpc.RemoteAddr().(*net.TCPAddr).AddrPort())
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("connect, send one byte, close: %v", elapsed)
			srvCookie := <-srv

			for _, c := range []uint64{ck, srvCookie} {
				checkOpen(t, h.waitOpen(t, UUID(h.s.Prefix(), c)), key, time.Now().Add(-waitTimeout))
			}
			if n := h.polls(t); n != 1 {
				t.Errorf("%d dumps; the Opens must have come from notifications", n)
			}
		})
	}
}

// TestSubscribeRefusedPollsOnly: the kernel lets anyone subscribe to destroy
// notifications, so a refusal comes from a policy. A seccomp filter on the
// thread that creates the Source (and on no other) makes bind(2) fail with
// EPERM: the Source says so once and still names sockets by polling.
func TestSubscribeRefusedPollsOnly(t *testing.T) {
	ns := newNetns(t)
	h := newHarness(t, ns, Config{Interval: 10 * time.Millisecond}, refuseBind)
	if h.s.NotifiesDestroy() {
		t.Fatal("subscribed to destroy notifications though bind fails")
	}
	logs := h.logs.String()
	if n := strings.Count(logs, "level=WARN"); n != 1 || !strings.Contains(logs, "polling only") || !strings.Contains(logs, "operation not permitted") {
		t.Errorf("want one warning about polling only, with the error; log:\n%s", logs)
	}
	c := connect(t, ns, ns.listen(t, addrB+":0"), addrA, addrB)
	checkOpen(t, h.waitOpen(t, UUID(h.s.Prefix(), c.clientCook)), c.key, time.Now().Add(-waitTimeout))
	checkOpen(t, h.waitOpen(t, UUID(h.s.Prefix(), c.srvCook)), c.key, time.Now().Add(-waitTimeout))
}

// refuseBind installs a seccomp filter on the calling thread that fails
// every bind(2) with EPERM. The dump socket is connected, not bound, so only
// the subscription is refused. Go creates new threads from a clean template
// thread, never from a locked one, so the filter stays on this thread.
func refuseBind() error {
	filter := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: 0}, // seccomp_data.nr
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: unix.SYS_BIND, Jt: 0, Jf: 1},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ALLOW},
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return err
	}
	return unix.Prctl(unix.PR_SET_SECCOMP, unix.SECCOMP_MODE_FILTER, uintptr(unsafe.Pointer(&prog)), 0, 0)
}

func TestRunTwice(t *testing.T) {
	ns := newNetns(t)
	var s *Source
	if err := ns.do(func() (err error) {
		s, err = New(Config{PrefixFile: os.DevNull}, make(chan flow.Named))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.Run(canceled()); err != nil {
		t.Errorf("Run with a done context: %v, want nil", err)
	}
	if err := s.Run(canceled()); err == nil {
		t.Error("second Run returned nil")
	}
	checkNoGoroutines(t)
}

// TestFailedDumpsAreRetried: a dump that fails is logged, rate-limited, and
// tried again at the next tick; Run goes on until its context is done.
func TestFailedDumpsAreRetried(t *testing.T) {
	ns := newNetns(t)
	logs := &syncBuffer{}
	m := metrics.New(prometheus.NewRegistry())
	var s *Source
	if err := ns.do(func() (err error) {
		s, err = New(Config{PrefixFile: os.DevNull, Interval: time.Millisecond, Metrics: m,
			Log: slog.New(slog.NewTextHandler(logs, nil))}, make(chan flow.Named))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	// Every dump request now fails: an unconnected UDP socket cannot
	// send (EDESTADDRREQ). Run closes it as it would the netlink socket.
	udp, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(s.dumper.fd)
	s.dumper.fd = udp

	h := &harness{m: m}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	want := h.polls(t) + 20
	for deadline := time.Now().Add(waitTimeout); h.polls(t) < want; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("Run stopped polling after failed dumps; log:\n%s", logs)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
	checkNoGoroutines(t)
	if n := strings.Count(logs.String(), "socket dump failed"); n != 1 || !strings.Contains(logs.String(), "destination address required") {
		t.Errorf("%d logs of failed dumps, want 1 (at most one a minute), with the error; log:\n%s", n, logs)
	}
}
