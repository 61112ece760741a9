// Package e2e runs the daemon against the real tcp-info in network
// namespaces the tests create, and checks its files against a reference
// capture of the same traffic taken by tcpdump on the other end of the link.
package e2e

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/internal/netns"
	"github.com/m-lab/packet-headers/internal/promscrape"
	"github.com/m-lab/packet-headers/internal/replay"
)

const uuidPrefix = "e2etest_1700000000"

// echoServer runs in the server namespace: it reads a request until the
// client half-closes, answers with respLen bytes and closes. It records the
// socket cookie of every connection by client address.
type echoServer struct {
	ln4, ln6 net.Listener
	respLen  int
	mu       sync.Mutex
	accepted *sync.Cond // signalled when a cookie is recorded
	cookies  map[string]uint64
	wg       sync.WaitGroup
}

func startEchoServer(t *testing.T, tp *topology, respLen int) *echoServer {
	return startEchoServerOn(t, tp.serverNS, serverV4, serverV6, respLen)
}

// startEchoServerOn starts an echo server in namespace ns, listening on v4
// and v6.
func startEchoServerOn(t *testing.T, ns *os.File, v4, v6 string, respLen int) *echoServer {
	s := &echoServer{respLen: respLen, cookies: map[string]uint64{}}
	s.accepted = sync.NewCond(&s.mu)
	err := netns.Run(ns, func() error {
		var err error
		if s.ln4, err = net.Listen("tcp4", v4+":0"); err != nil {
			return err
		}
		s.ln6, err = net.Listen("tcp6", "["+v6+"]:0")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, ln := range []net.Listener{s.ln4, s.ln6} {
		s.wg.Go(func() { s.serve(ln) })
	}
	t.Cleanup(func() {
		s.ln4.Close()
		s.ln6.Close()
		s.wg.Wait()
	})
	return s
}

func (s *echoServer) serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		cookie, err := netns.Cookie(c)
		if err == nil {
			s.mu.Lock()
			s.cookies[c.RemoteAddr().String()] = cookie
			s.accepted.Broadcast()
			s.mu.Unlock()
		}
		s.wg.Go(func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.Copy(io.Discard, c); err != nil {
				return
			}
			c.Write(bytes.Repeat([]byte("R"), s.respLen))
		})
	}
}

// uuidOf returns the UUID of the server's socket for a client, waiting for
// the server to accept it (the client's connect returns before that).
func (s *echoServer) uuidOf(t *testing.T, client string) string {
	t.Helper()
	return s.newUUIDOf(t, client, map[uint64]bool{})
}

// newUUIDOf is uuidOf for a client address that earlier connections used
// too: it waits for a cookie not in seen, and adds it there.
func (s *echoServer) newUUIDOf(t *testing.T, client string, seen map[uint64]bool) string {
	t.Helper()
	timer := time.AfterFunc(10*time.Second, func() {
		s.mu.Lock()
		s.accepted.Broadcast()
		s.mu.Unlock()
	})
	defer timer.Stop()
	deadline := time.Now().Add(10 * time.Second)
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		if cookie, ok := s.cookies[client]; ok && !seen[cookie] {
			seen[cookie] = true
			return fmt.Sprintf("%s_%016X", uuidPrefix, cookie)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new connection accepted from %s", client)
		}
		s.accepted.Wait()
	}
}

// conn is one client connection of the test.
type conn struct {
	key    flow.Key
	client string // client address:port as the server saw it
	uuid   string
}

// dial connects from the client namespace to addr.
func dial(t *testing.T, tp *topology, addr string) net.Conn {
	var c net.Conn
	err := netns.Run(tp.clientNS, func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

const (
	opensMetric = `pcap_eventsocket_events_total{event="open"}`
	// issuedMetric counts the flows the built-in source named.
	issuedMetric = `pcap_uuidsource_uuids_issued_total`
)

// namedMetric is the daemon's count of flows named by its UUID source.
func (e *env) namedMetric() string {
	if e.standalone {
		return issuedMetric
	}
	return opensMetric
}

// exchange makes one complete connection: connect, wait until tcp-info has
// named it (it polls every 10 ms, so a connection shorter than that may
// never be named), request, half-close, response, close.
func (e *env) exchange(addr string, reqLen int) conn {
	t, s := e.t, e.server
	named := e.namedMetric()
	opens := e.metric(named)
	c := dial(t, e.tp, addr)
	defer c.Close()
	if !e.waitMetric(named, opens+1, 10*time.Second) {
		t.Fatalf("the UUID source did not name the connection from %s", c.LocalAddr())
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(bytes.Repeat([]byte("Q"), reqLen)); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	n, err := io.Copy(io.Discard, c)
	if err != nil || int(n) != s.respLen {
		t.Fatalf("read %d bytes, %v; want %d", n, err, s.respLen)
	}
	return newConn(t, s, c)
}

func newConn(t *testing.T, s *echoServer, c net.Conn) conn {
	la := c.LocalAddr().(*net.TCPAddr).AddrPort()
	ra := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	return conn{
		key:    flow.KeyFromAddrPorts(la, ra),
		client: c.LocalAddr().String(),
		uuid:   s.uuidOf(t, c.LocalAddr().String()),
	}
}

// env is a running topology with tcp-info, the daemon and a reference
// tcpdump.
type env struct {
	t        *testing.T
	tp       *topology
	dir      string
	dataDir  string
	sock     string
	prefix   string
	tcpinfo  *proc
	daemon   *proc
	tcpdump  *proc
	refPath  string
	server   *echoServer
	tcpinfoN int
	// standalone: the daemon names flows with its own UUID source.
	standalone bool
}

func newEnv(t *testing.T, daemonArgs ...string) *env {
	return newEnvOn(t, true, daemonArgs...)
}

// refFilter is the reference tcpdump's filter. The flood test narrows it to
// leave out its spoofed packets.
var refFilter = "tcp"

// newEnvOn starts the environment; with allInterfaces false the daemon is
// given -interface for the server's veth, else it captures on every
// interface of the server namespace.
func newEnvOn(t *testing.T, named bool, daemonArgs ...string) *env {
	return newEnvFor(t, newTopology(t), named, daemonArgs...)
}

// newEnvFor is newEnvOn on a given topology.
func newEnvFor(t *testing.T, tp *topology, named bool, daemonArgs ...string) *env {
	e := &env{t: t, tp: tp, dir: t.TempDir()}
	e.dataDir = filepath.Join(e.dir, "data")
	e.sock = filepath.Join(e.dir, "tcpinfo.sock")
	e.prefix = filepath.Join(e.dir, "prefix")
	e.refPath = filepath.Join(e.dir, "ref.pcap")
	if err := os.WriteFile(e.prefix, []byte(uuidPrefix), 0o644); err != nil {
		t.Fatal(err)
	}
	e.startTCPInfo()
	if _, err := os.Stat("/usr/bin/tcpdump"); err != nil {
		t.Skip("tcpdump is not installed (the README's test command installs it)")
	}
	e.tcpdump = startProc(t, tp.client, "tcpdump", "/usr/bin/tcpdump", "-i", tp.clientIf, "-n", "-U", "--immediate-mode", "-s", "256", "-w", e.refPath, refFilter)
	if !e.tcpdump.log.waitFor("listening on", 1, 10*time.Second) {
		t.Fatalf("tcpdump did not start: %s", e.tcpdump.log.String())
	}
	if named {
		daemonArgs = append([]string{"-interface=" + tp.serverIf}, daemonArgs...)
	}
	e.startDaemon(daemonArgs...)
	e.standalone = slices.Contains(daemonArgs, standaloneArg)
	if e.standalone {
		if !e.daemon.log.waitFor("standalone", 1, 10*time.Second) {
			t.Fatalf("daemon did not start its own UUID source:\n%s", e.daemon.log.String())
		}
	} else if !e.daemon.log.waitFor("connected to eventsocket", 1, 10*time.Second) {
		t.Fatalf("daemon did not connect to tcp-info:\n%s", e.daemon.log.String())
	}
	e.server = startEchoServer(t, tp, 5000)
	return e
}

// standaloneArg, last among a daemon's flags, overrides the test's
// -tcpinfo.eventsocket: the daemon names flows with its own UUID source.
const standaloneArg = "-tcpinfo.eventsocket="

// startDaemon starts the daemon in the server namespace with the test's
// usual flags and extra args, and waits until it captures.
func (e *env) startDaemon(extra ...string) {
	daemonBin, _ := binaries(e.t)
	args := append([]string{
		"-datadir=" + e.dataDir,
		"-tcpinfo.eventsocket=" + e.sock,
		"-flowtimeout=1s",
		"-captureduration=20s",
		"-sigtermwait=200ms",
		"-prometheusx.listen-address=" + daemonMetrics,
		"-uuid-prefix-file=" + e.prefix,
	}, extra...)
	e.daemon = startProc(e.t, e.tp.server, "packet-headers", daemonBin, args...)
	if !e.daemon.log.waitFor("capturing", 1, 10*time.Second) {
		e.t.Fatalf("daemon did not start:\n%s", e.daemon.log.String())
	}
}

func (e *env) startTCPInfo() {
	_, tcpinfoBin := binaries(e.t)
	e.tcpinfoN++
	e.tcpinfo = startProc(e.t, e.tp.server, fmt.Sprintf("tcp-info #%d", e.tcpinfoN), tcpinfoBin,
		"-tcpinfo.eventsocket="+e.sock,
		"-output="+filepath.Join(e.dir, "tcpinfo"),
		"-prometheusx.listen-address=127.0.0.1:9992",
		"-uuid-prefix-file="+e.prefix)
	// tcp-info removes a stale socket file and then listens on it.
	if !waitForFileFresh(e.sock, e.tcpinfo, 10*time.Second) {
		e.t.Fatalf("tcp-info did not create its eventsocket:\n%s", e.tcpinfo.log.String())
	}
}

// waitForFileFresh waits for path to exist, or for p to exit.
func waitForFileFresh(path string, p *proc, d time.Duration) bool {
	return p.WaitFile(context.Background(), path, d) == nil
}

// daemonMetrics is the daemon's /metrics address in the server namespace.
const daemonMetrics = "127.0.0.1:9991"

// metric reads one metric's value from the daemon's /metrics.
func (e *env) metric(name string) float64 { return e.metricAt(daemonMetrics, name) }

// metricAt reads one series' value (`name` or `name{label="v"}`, as
// exported) from the /metrics at addr in the server namespace.
func (e *env) metricAt(addr, name string) float64 {
	s, err := e.target(addr).Scrape()
	if err != nil {
		e.t.Fatalf("scrape metrics: %v", err)
	}
	v, ok := s[name]
	if !ok {
		e.t.Fatalf("metric %s not found", name)
	}
	return v
}

// target is the /metrics at addr in the server namespace (internal/promscrape
// dials it from a thread in the namespace).
func (e *env) target(addr string) promscrape.Target {
	return promscrape.Target{NS: e.tp.serverNS, Addr: addr}
}

// scrape reads the daemon's /metrics.
func (e *env) scrape() ([]byte, error) { return e.scrapeAt(daemonMetrics) }

// scrapeAt reads /metrics at addr in the server namespace.
func (e *env) scrapeAt(addr string) ([]byte, error) { return e.target(addr).Body() }

// pcapMetrics returns the daemon's non-zero pcap_ metrics, one a line, for
// failure messages.
func (e *env) pcapMetrics() string {
	s, err := e.target(daemonMetrics).Scrape()
	if err != nil {
		return err.Error()
	}
	var out []string
	for k, v := range s.NonZero("pcap_") {
		out = append(out, k+" "+strconv.FormatFloat(v, 'g', -1, 64))
	}
	slices.Sort(out)
	return strings.Join(out, "\n")
}

// waitMetric waits until the metric reaches at least want.
func (e *env) waitMetric(name string, want float64, d time.Duration) bool {
	missing := false
	_, ok, err := e.target(daemonMetrics).Wait(context.Background(), 50*time.Millisecond, d, func(s promscrape.Samples) bool {
		v, found := s[name]
		missing = !found
		return missing || v >= want
	})
	switch {
	case err != nil:
		e.t.Fatalf("scrape metrics: %v", err)
	case missing:
		e.t.Fatalf("metric %s not found", name)
	}
	return ok
}

// fileOf returns the path of a flow's file, waiting for it to appear.
func (e *env) fileOf(uuid string, d time.Duration) string {
	deadline := time.Now().Add(d)
	for {
		m, err := filepath.Glob(filepath.Join(e.dataDir, "*", "*", "*", uuid+".pcap.gz"))
		if err != nil {
			e.t.Fatal(err)
		}
		if len(m) == 1 {
			return m[0]
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("no file for flow %s after %v; files: %v\nmetrics:\n%s", uuid, d, e.files(), e.pcapMetrics())
		}
		time.Sleep(20 * time.Millisecond) // polling the file system, with a deadline
	}
}

func (e *env) files() []string {
	var out []string
	filepath.Walk(e.dataDir, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			out = append(out, p)
		}
		return nil
	})
	return out
}

// stopReference stops tcpdump and returns the reference packets by flow.
func (e *env) stopReference() map[flow.Key][]replay.Packet {
	e.tcpdump.signal(syscall.SIGTERM)
	if _, ok := e.tcpdump.wait(10 * time.Second); !ok {
		e.t.Fatal("tcpdump did not stop")
	}
	pkts, bad, err := replay.ReadFile(e.refPath)
	if err != nil || bad != 0 {
		e.t.Fatalf("read reference: %d bad, %v", bad, err)
	}
	byFlow := map[flow.Key][]replay.Packet{}
	for _, p := range pkts {
		byFlow[p.Key] = append(byFlow[p.Key], p)
	}
	return byFlow
}

// record is a packet as compared: its direction, length and header bytes.
type record struct {
	toServer bool
	length   uint32
	data     string
}

func records(t *testing.T, pkts []replay.Packet, serverIP net.IP, fromFile bool) (up, down []record) {
	for _, p := range pkts {
		// A file's records are compared as written. A reference packet is
		// compared as the daemon should write it: its headers, after an
		// Ethernet header (synthetic if the link has none).
		raw := p.Raw
		if !fromFile {
			raw = p.Data
		}
		h, err := flow.Parse(raw, flow.LinkEthernet)
		if err != nil {
			t.Fatal(err)
		}
		_, dst := h.SrcDst(raw)
		n := min(h.End, len(raw))
		data := raw[:n]
		if fromFile && len(raw) != n {
			t.Errorf("a record holds %d bytes beyond the TCP header", len(raw)-n)
		}
		r := record{toServer: net.IP(dst).Equal(serverIP), length: p.Len, data: fmt.Sprintf("%x", data)}
		if r.toServer {
			up = append(up, r)
		} else {
			down = append(down, r)
		}
	}
	return up, down
}

// compareFlow checks that a flow's file holds exactly the reference's
// packets in each direction, each once (in the reference's order, unless the
// veth reordered them; see below). With prefix, the file may end early (the
// daemon stopped during the flow).
func compareFlow(t *testing.T, path string, ref []replay.Packet, serverIP string, prefix bool) {
	t.Helper()
	got, bad, err := replay.ReadFile(path)
	if err != nil || bad != 0 {
		t.Fatalf("%s: %d bad, %v", path, bad, err)
	}
	sip := net.ParseIP(serverIP)
	gu, gd := records(t, got, sip, true)
	ru, rd := records(t, ref, sip, false)
	for _, c := range []struct {
		name      string
		got, want []record
	}{{"client to server", gu, ru}, {"server to client", gd, rd}} {
		want := c.want
		if prefix && len(c.got) <= len(want) {
			want = want[:len(c.got)]
		}
		if len(c.got) != len(want) {
			t.Errorf("%s: %s: %d packets, reference has %d", filepath.Base(path), c.name, len(c.got), len(want))
			continue
		}
		if slices.Equal(c.got, want) {
			continue
		}
		// The same packets in another order: the reference is captured
		// as the client sends, the daemon captures as the server
		// receives, and veth queues each packet on the backlog of the CPU
		// that sent it, so two packets of one direction sent from
		// different CPUs (an ACK from a softirq, the next from the
		// process) can arrive swapped. Every packet must be there, once.
		g, w := slices.Clone(c.got), slices.Clone(want)
		slices.SortFunc(g, compareRecords)
		slices.SortFunc(w, compareRecords)
		if slices.Equal(g, w) {
			t.Logf("%s: %s: the reference's packets, in another order", filepath.Base(path), c.name)
			continue
		}
		for i := range w {
			if g[i] != w[i] {
				t.Errorf("%s: %s: packets differ from the reference (sorted, at %d):\n got %+v\nwant %+v", filepath.Base(path), c.name, i, g[i], w[i])
				break
			}
		}
	}
}

func compareRecords(a, b record) int {
	if c := cmp.Compare(a.data, b.data); c != 0 {
		return c
	}
	return cmp.Compare(a.length, b.length)
}

func serverAddrOf(c conn) string {
	a, b := c.key.Endpoints()
	if a.Addr().String() == serverV4 || a.Addr().String() == serverV6 {
		return a.Addr().String()
	}
	return b.Addr().String()
}

// TestEndToEnd runs the daemon beside the real tcp-info and checks, against
// a reference capture: one file per flow tcp-info named, named with its UUID,
// holding exactly the reference's packets and no payload; flows named after a
// tcp-info restart are saved; SIGTERM during a flow publishes it and exits 0.
func TestEndToEnd(t *testing.T) {
	e := newEnv(t)
	addr4 := e.server.ln4.Addr().String()
	addr6 := e.server.ln6.Addr().String()
	var conns []conn
	for i := 0; i < 3; i++ {
		conns = append(conns, e.exchange(addr4, 100+1000*i))
		conns = append(conns, e.exchange(addr6, 100+1000*i))
	}
	for _, c := range conns {
		e.fileOf(c.uuid, 20*time.Second)
	}

	// tcp-info restarts: the daemon reconnects and later flows are saved.
	e.tcpinfo.signal(syscall.SIGKILL)
	e.tcpinfo.wait(10 * time.Second)
	e.startTCPInfo()
	if !e.daemon.log.waitFor("connected to eventsocket", 2, 20*time.Second) {
		t.Fatalf("daemon did not reconnect to the restarted tcp-info:\n%s", e.daemon.log.String())
	}
	for i := 0; i < 2; i++ {
		conns = append(conns, e.exchange(addr4, 2000))
		conns = append(conns, e.exchange(addr6, 2000))
	}
	for _, c := range conns {
		e.fileOf(c.uuid, 20*time.Second)
	}

	// SIGTERM during a flow: once tcp-info has named it, the daemon stops,
	// publishes it, and exits 0.
	named := e.metric("pcap_demuxer_uuids_total")
	long := dial(t, e.tp, addr4)
	if _, err := long.Write(bytes.Repeat([]byte("L"), 3000)); err != nil {
		t.Fatal(err)
	}
	longConn := newConn(t, e.server, long)
	if !e.waitMetric("pcap_demuxer_uuids_total", named+1, 10*time.Second) {
		t.Fatal("tcp-info did not name the long flow")
	}
	e.daemon.signal(syscall.SIGTERM)
	code, ok := e.daemon.wait(15 * time.Second)
	if !ok || code != 0 {
		t.Fatalf("daemon after SIGTERM: exited=%v code=%d\n%s", ok, code, e.daemon.log.String())
	}
	long.Close()
	longPath := e.fileOf(longConn.uuid, time.Second)

	ref := e.stopReference()
	for _, c := range conns {
		compareFlow(t, e.fileOf(c.uuid, time.Second), ref[c.key], serverAddrOf(c), false)
	}
	compareFlow(t, longPath, ref[longConn.key], serverV4, true)

	// Every file is a flow tcp-info named: none for anything else.
	if got, want := len(e.files()), len(conns)+1; got != want {
		t.Errorf("%d files, want %d: %v", got, want, e.files())
	}
	for _, f := range e.files() {
		if fi, err := os.Stat(f); err != nil || fi.Mode().Perm() != 0o664 {
			t.Errorf("%s: mode %v, %v", f, fi.Mode(), err)
		}
	}
}

// TestEndToEndNetblock checks anonymized files: the client's address keeps
// only its /24 or /48, the server's is untouched, checksums stay valid, and
// everything else equals the reference.
func TestEndToEndNetblock(t *testing.T) {
	e := newEnv(t, "-anonymize.ip=netblock")
	var conns []conn
	conns = append(conns, e.exchange(e.server.ln4.Addr().String(), 100))
	conns = append(conns, e.exchange(e.server.ln6.Addr().String(), 100))
	for _, c := range conns {
		e.fileOf(c.uuid, 20*time.Second)
	}
	ref := e.stopReference()
	for _, c := range conns {
		got, _, err := replay.ReadFile(e.fileOf(c.uuid, time.Second))
		if err != nil {
			t.Fatal(err)
		}
		gu, gd := byDirection(t, got, serverAddrOf(c))
		wu, wd := byDirection(t, ref[c.key], serverAddrOf(c))
		checkAnonymized(t, c.uuid, gu, wu)
		checkAnonymized(t, c.uuid, gd, wd)
	}
	if strings.Contains(e.daemon.log.String(), clientV4) || strings.Contains(e.daemon.log.String(), clientV6+"]") {
		t.Errorf("daemon log shows the client's address:\n%s", e.daemon.log.String())
	}
}

// byDirection splits a flow's packets into those to the server and those
// from it, each in capture order (the two ends of a link can see packets
// crossing in opposite directions in different orders).
func byDirection(t *testing.T, pkts []replay.Packet, server string) (up, down []replay.Packet) {
	sip := net.ParseIP(server)
	for _, p := range pkts {
		h, err := flow.Parse(p.Raw, flow.LinkEthernet)
		if err != nil {
			t.Fatal(err)
		}
		if _, dst := h.SrcDst(p.Raw); net.IP(dst).Equal(sip) {
			up = append(up, p)
		} else {
			down = append(down, p)
		}
	}
	return up, down
}

// checkAnonymized compares anonymized packets with the reference's.
func checkAnonymized(t *testing.T, uuid string, got, want []replay.Packet) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s: %d packets, reference %d", uuid, len(got), len(want))
		return
	}
	for i, p := range got {
		h, err := flow.Parse(p.Raw, flow.LinkEthernet)
		if err != nil {
			t.Fatal(err)
		}
		src, dst := h.SrcDst(p.Raw)
		for _, a := range [][]byte{src, dst} {
			switch ip := net.IP(a); ip.String() {
			case serverV4, serverV6, "198.18.0.0", "2001:db8::":
			default:
				t.Errorf("%s packet %d: address %s is neither the server's nor anonymized", uuid, i, ip)
			}
		}
		if !h.IPv6 && !checksumOK(p.Raw[h.L3:h.L4]) {
			t.Errorf("%s packet %d: IPv4 header checksum invalid", uuid, i)
		}
		if int(p.Len) == len(p.Raw) && !tcpChecksumOK(p.Raw, h) {
			t.Errorf("%s packet %d: TCP checksum invalid on a complete packet", uuid, i)
		}
		// Everything but addresses and checksums is the reference's.
		w := want[i].Raw[:min(h.End, len(want[i].Raw))]
		if len(w) != len(p.Raw) || p.Len != want[i].Len {
			t.Errorf("%s packet %d: %d/%d bytes, reference %d/%d", uuid, i, len(p.Raw), p.Len, len(w), want[i].Len)
			continue
		}
		if diffOutside(p.Raw, w, h) {
			t.Errorf("%s packet %d differs from the reference outside addresses and checksums", uuid, i)
		}
	}
}

func sum16(b []byte) uint32 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	return s
}

func fold(s uint32) uint16 {
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

func checksumOK(hdr []byte) bool { return fold(sum16(hdr)) == 0xffff }

func tcpChecksumOK(pkt []byte, h flow.Header) bool {
	src, dst := h.SrcDst(pkt)
	seg := pkt[h.L4:]
	var pseudo uint32
	pseudo += sum16(src) + sum16(dst) + 6 + uint32(len(seg))
	return fold(pseudo+sum16(seg)) == 0xffff
}

// diffOutside reports whether a and b differ anywhere but in the IP
// addresses and the IP and TCP checksums.
func diffOutside(a, b []byte, h flow.Header) bool {
	skip := map[int]bool{}
	mark := func(off, n int) {
		for i := off; i < off+n; i++ {
			skip[i] = true
		}
	}
	if h.IPv6 {
		mark(h.L3+8, 32)
	} else {
		mark(h.L3+10, 2)
		mark(h.L3+12, 8)
	}
	mark(h.L4+16, 2)
	for i := range a {
		if !skip[i] && a[i] != b[i] {
			return true
		}
	}
	return false
}

// TestInterfacesComeAndGo runs the daemon without -interface: an interface
// added later is captured within a few seconds, and one removed ends its
// capture and nothing else.
func TestInterfacesComeAndGo(t *testing.T) {
	e := newEnvOn(t, false)
	if !e.daemon.log.waitFor("interface="+e.tp.serverIf, 1, 10*time.Second) {
		t.Fatalf("not capturing on %s:\n%s", e.tp.serverIf, e.daemon.log.String())
	}
	// A new veth pair inside the server namespace.
	a, b := "va"+e.tp.serverIf[2:], "vb"+e.tp.serverIf[2:]
	run(t, "ip", "-n", e.tp.server, "link", "add", a, "type", "veth", "peer", "name", b)
	run(t, "ip", "-n", e.tp.server, "addr", "add", "198.18.1.1/24", "dev", a)
	run(t, "ip", "-n", e.tp.server, "link", "set", a, "up")
	run(t, "ip", "-n", e.tp.server, "link", "set", b, "up")
	if !e.daemon.log.waitFor("msg=capturing interface="+a, 1, 15*time.Second) {
		t.Fatalf("new interface %s not captured:\n%s", a, e.daemon.log.String())
	}
	run(t, "ip", "-n", e.tp.server, "link", "del", a)
	if !e.daemon.log.waitFor(`msg="interface gone" interface=`+a, 1, 15*time.Second) {
		t.Fatalf("capture on the removed interface %s did not end:\n%s", a, e.daemon.log.String())
	}
	// The original interface still works: a flow is saved.
	c := e.exchange(e.server.ln4.Addr().String(), 100)
	e.fileOf(c.uuid, 20*time.Second)
	e.daemon.signal(syscall.SIGTERM)
	if code, ok := e.daemon.wait(15 * time.Second); !ok || code != 0 {
		t.Fatalf("exit %d %v", code, ok)
	}
}

// TestKill9LeavesNothingPartial kills the daemon with SIGKILL while flows are
// being written (-stream: their files are open): nothing may remain under the
// data directory but complete files.
func TestKill9LeavesNothingPartial(t *testing.T) {
	e := newEnv(t, "-stream", "-flowtimeout=1m")
	// Flows in flight: named, with packets, not ended.
	var held []net.Conn
	for i := 0; i < 3; i++ {
		opens := e.metric(opensMetric)
		c := dial(t, e.tp, e.server.ln4.Addr().String())
		held = append(held, c)
		if !e.waitMetric(opensMetric, opens+1, 10*time.Second) {
			t.Fatal("tcp-info did not name the connection")
		}
		if _, err := c.Write(bytes.Repeat([]byte("K"), 2000)); err != nil {
			t.Fatal(err)
		}
	}
	if !e.waitMetric("pcap_saver_starts_total", 3, 10*time.Second) {
		t.Fatal("savers did not start")
	}
	e.daemon.signal(syscall.SIGKILL)
	e.daemon.wait(10 * time.Second)
	for _, c := range held {
		c.Close()
	}
	for _, f := range e.files() {
		// Any file present must be complete: it decodes to the end.
		if _, _, err := replay.ReadFile(f); err != nil {
			t.Errorf("partial file %s left after kill -9: %v", f, err)
		}
	}
	if n := len(e.files()); n != 0 {
		t.Errorf("%d files after kill -9 of flows that were not finished: %v", n, e.files())
	}
}
