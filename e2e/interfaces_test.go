package e2e

// Tests of the capture on every interface (no -interface) and of named
// interfaces that come and go: many idle interfaces (start-up, idle CPU,
// memory), an interface plugged in after start, bridge and bond ports (each
// packet once), and interfaces created and deleted around the rescans.

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/internal/netns"
	"github.com/m-lab/packet-headers/internal/replay"
)

// ifsBatch runs iproute2 commands (one a line, without the leading "ip")
// in namespace ns with one ip -batch process.
func ifsBatch(t *testing.T, ns string, lines []string) {
	t.Helper()
	if err := ifsTryBatch(t.TempDir(), ns, lines); err != nil {
		t.Fatal(err)
	}
}

// ifsTryBatch is ifsBatch returning its error, for goroutines; the batch
// file is written in dir.
func ifsTryBatch(dir, ns string, lines []string) error {
	f, err := os.CreateTemp(dir, "ip-batch")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	_, err = f.WriteString(strings.Join(lines, "\n") + "\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if out, err := exec.Command("ip", "-n", ns, "-batch", f.Name()).CombinedOutput(); err != nil {
		return fmt.Errorf("ip -n %s -batch (%s): %v\n%s", ns, strings.Join(lines, "; "), err, out)
	}
	return nil
}

// ifsOffloadsOff turns checksum and segmentation offloads off on ifc in ns,
// as newTopology does for its veth, so that the daemon sees the packets
// with the bytes the reference sees.
func ifsOffloadsOff(t *testing.T, ns, ifc string) {
	t.Helper()
	if _, err := exec.LookPath("ethtool"); err == nil {
		run(t, "ip", "netns", "exec", ns, "ethtool", "-K", ifc, "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off")
	}
}

// ifsNamespace creates a network namespace with loopback up, removed when
// the test ends, and returns its file.
func ifsNamespace(t *testing.T, name string) *os.File {
	t.Helper()
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	f, err := os.Open("/var/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// ifsNewEnvTimed is newEnvFor for a daemon without -interface, beside
// tcp-info: it also returns how long after its launch the daemon logged
// that it started.
func ifsNewEnvTimed(t *testing.T, tp *topology) (*env, time.Duration) {
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
	launch := time.Now()
	e.startDaemon() // waits for the first "capturing"
	if !e.daemon.log.waitFor("msg=started", 1, 10*time.Second) {
		t.Fatalf("daemon did not log msg=started:\n%s", e.daemon.log.String())
	}
	startup := time.Since(launch)
	if !e.daemon.log.waitFor("connected to eventsocket", 1, 10*time.Second) {
		t.Fatalf("daemon did not connect to tcp-info:\n%s", e.daemon.log.String())
	}
	e.server = startEchoServer(t, tp, 5000)
	return e, startup
}

// ifsCPU returns the CPU time a process's threads have run: the sum of the
// first field of /proc/PID/task/*/schedstat (nanoseconds), and the number of
// threads.
func ifsCPU(pid int) (time.Duration, int, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return 0, 0, err
	}
	var sum int64
	n := 0
	for _, task := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, task.Name(), "schedstat"))
		if err != nil {
			continue // the thread ended between the listing and the read
		}
		f := strings.Fields(string(b))
		if len(f) < 1 {
			return 0, 0, fmt.Errorf("%s/%s/schedstat: %q", dir, task.Name(), b)
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, 0, err
		}
		sum += ns
		n++
	}
	return time.Duration(sum), n, nil
}

// ifsStatCPU returns utime+stime of /proc/PID/stat (every thread, those
// ended included), in clock ticks of 10 ms.
func ifsStatCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, s)
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, s)
	}
	return time.Duration(u+st) * 10 * time.Millisecond, nil
}

// ifsWaitGauge waits until the daemon's metric equals want.
func (e *env) ifsWaitGauge(name string, want float64, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if e.metric(name) == want {
			return true
		}
		time.Sleep(50 * time.Millisecond) // polling a real process's metrics, with a deadline
	}
	return false
}

// ifsStop checks that the daemon is still running, stops it with SIGTERM
// and checks that it exits 0.
func (e *env) ifsStop() {
	t := e.t
	t.Helper()
	select {
	case <-e.daemon.done:
		t.Fatalf("the daemon is no longer running: %v\n%s", e.daemon.err, e.daemon.log.String())
	default:
	}
	e.daemon.signal(syscall.SIGTERM)
	if code, ok := e.daemon.wait(20 * time.Second); !ok || code != 0 {
		t.Fatalf("daemon after SIGTERM: exited=%v code=%d\n%s", ok, code, e.daemon.log.String())
	}
}

// ifsFirstIsSYN reports whether the first packet of a file is a SYN from
// the client (the flow's handshake is there).
func ifsFirstIsSYN(t *testing.T, path string) bool {
	pkts, _, err := replay.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(pkts) == 0 {
		return false
	}
	h, err := flow.Parse(pkts[0].Raw, flow.LinkEthernet)
	if err != nil || len(pkts[0].Raw) < h.L4+14 {
		return false
	}
	flags := pkts[0].Raw[h.L4+13]
	return flags&0x02 != 0 && flags&0x10 == 0 // SYN, not SYN-ACK
}

// ifsRecords is the number of records in a file.
func ifsRecords(t *testing.T, path string) int {
	pkts, _, err := replay.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return len(pkts)
}

// TestManyInterfaces runs the daemon without -interface on a host with 100
// idle interfaces (50 veth pairs, all up) besides the link to the client:
// it starts within 2 s, costs at most 5 ms of CPU a second when idle and at
// most 300 MB of peak RSS, and saves a flow through the client link whole.
func TestManyInterfaces(t *testing.T) {
	const pairs = 50
	tp := newTopology(t)
	var lines []string
	for i := range pairs {
		lines = append(lines, fmt.Sprintf("link add mi%da type veth peer name mi%db", i, i))
	}
	for i := range pairs {
		lines = append(lines, fmt.Sprintf("link set mi%da up", i), fmt.Sprintf("link set mi%db up", i))
	}
	made := time.Now()
	ifsBatch(t, tp.server, lines)
	t.Logf("%d veth pairs made and up in %v", pairs, time.Since(made).Round(time.Millisecond))

	e, startup := ifsNewEnvTimed(t, tp)
	want := 2*pairs + 1 // every veth end and the client link; not lo
	t.Logf("start-up with %d interfaces to capture (%d idle veth ends, the client link): msg=started %v after launch", want, 2*pairs, startup.Round(time.Millisecond))
	if startup > 2*time.Second {
		t.Errorf("msg=started %v after launch, want within 2 s", startup)
	}
	// Settled: every interface is covered, and the daemon says so.
	if !e.daemon.log.waitFor("socket=any", want, 10*time.Second) {
		t.Fatalf("%d interfaces logged as captured, want %d:\n%s", strings.Count(e.daemon.log.String(), "socket=any"), want, e.daemon.log.String())
	}
	if !e.ifsWaitGauge("pcap_muxer_interfaces_with_captures", float64(want), 10*time.Second) {
		t.Fatalf("pcap_muxer_interfaces_with_captures = %v, want %d", e.metric("pcap_muxer_interfaces_with_captures"), want)
	}

	// Idle CPU over 5 s (no metric scrape in between: it would count).
	pid := e.daemon.cmd.Process.Pid
	const window = 5 * time.Second
	cpu0, threads0, err := ifsCPU(pid)
	if err != nil {
		t.Fatal(err)
	}
	stat0, err := ifsStatCPU(pid)
	if err != nil {
		t.Fatal(err)
	}
	w0 := time.Now()
	time.Sleep(window) // the measurement window
	cpu1, threads1, err := ifsCPU(pid)
	if err != nil {
		t.Fatal(err)
	}
	stat1, err := ifsStatCPU(pid)
	if err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(w0)
	perSec := time.Duration(float64(cpu1-cpu0) / elapsed.Seconds())
	t.Logf("idle CPU with %d interfaces captured, over %v: %v (%v a second; %d threads, then %d); utime+stime %v",
		want, elapsed.Round(time.Millisecond), (cpu1 - cpu0).Round(time.Microsecond), perSec.Round(time.Microsecond),
		threads0, threads1, stat1-stat0)
	if threads1 < threads0 {
		t.Logf("%d threads ended during the window: their CPU time is not in the sum", threads0-threads1)
	}
	if perSec > 5*time.Millisecond {
		t.Errorf("idle CPU %v a second, want at most 5 ms", perSec)
	}

	// A flow through the client link is saved whole.
	c := e.exchange(e.server.ln4.Addr().String(), 2000)
	c6 := e.exchange(e.server.ln6.Addr().String(), 2000)
	p4, p6 := e.fileOf(c.uuid, 20*time.Second), e.fileOf(c6.uuid, 20*time.Second)
	hwm, err := vmHWM(pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("peak RSS (VmHWM) with %d interfaces captured: %.1f MB", want, float64(hwm)/1e6)
	if hwm > 300e6 {
		t.Errorf("peak RSS %.1f MB, want at most 300 MB", float64(hwm)/1e6)
	}
	e.ifsStop()
	ref := e.stopReference()
	compareFlow(t, p4, ref[c.key], serverV4, false)
	compareFlow(t, p6, ref[c6.key], serverV6, false)
}

// TestHotPlug runs the daemon without -interface; after it started, a new
// link to a new client namespace, with new addresses, comes up, and a flow
// that starts 3 s later over it is saved whole, its handshake included.
func TestHotPlug(t *testing.T) {
	const (
		hotServerV4 = "198.18.7.1"
		hotClientV4 = "198.18.7.2"
		hotServerV6 = "2001:db8:7::1"
		hotClientV6 = "2001:db8:7::2"
	)
	e := newEnvOn(t, false)
	if !e.daemon.log.waitFor("msg=started", 1, 10*time.Second) {
		t.Fatalf("daemon did not log msg=started:\n%s", e.daemon.log.String())
	}
	// The new client, its link to the server and the server's new address.
	hot := &topology{
		id:       e.tp.id,
		server:   e.tp.server,
		client:   "phh" + e.tp.id,
		serverIf: "vhs" + e.tp.id,
		clientIf: "vhc" + e.tp.id,
		serverNS: e.tp.serverNS,
	}
	hot.clientNS = ifsNamespace(t, hot.client)
	run(t, "ip", "link", "add", hot.serverIf, "netns", hot.server, "type", "veth", "peer", "name", hot.clientIf, "netns", hot.client)
	ifsBatch(t, hot.server, []string{
		"addr add " + hotServerV4 + "/24 dev " + hot.serverIf,
		"addr add " + hotServerV6 + "/64 dev " + hot.serverIf + " nodad",
	})
	ifsBatch(t, hot.client, []string{
		"addr add " + hotClientV4 + "/24 dev " + hot.clientIf,
		"addr add " + hotClientV6 + "/64 dev " + hot.clientIf + " nodad",
	})
	ifsOffloadsOff(t, hot.server, hot.serverIf)
	ifsOffloadsOff(t, hot.client, hot.clientIf)
	run(t, "ip", "-n", hot.server, "link", "set", hot.serverIf, "up")
	run(t, "ip", "-n", hot.client, "link", "set", hot.clientIf, "up")
	up := time.Now()

	// The reference on the new client's end, and a server on the new
	// addresses.
	h := *e
	h.tp = hot
	h.refPath = filepath.Join(e.dir, "ref-hotplug.pcap")
	h.tcpdump = startProc(t, hot.client, "tcpdump on the new link", "/usr/bin/tcpdump", "-i", hot.clientIf, "-n", "-U", "--immediate-mode", "-s", "256", "-w", h.refPath, "tcp")
	if !h.tcpdump.log.waitFor("listening on", 1, 10*time.Second) {
		t.Fatalf("tcpdump did not start: %s", h.tcpdump.log.String())
	}
	h.server = startEchoServerOn(t, e.tp.serverNS, hotServerV4, hotServerV6, 5000)

	// The scenario: the flows start 3 s after the link came up.
	time.Sleep(time.Until(up.Add(3 * time.Second)))
	c4 := h.exchange(h.server.ln4.Addr().String(), 1500)
	c6 := h.exchange(h.server.ln6.Addr().String(), 1500)
	t.Logf("flows started %v after the link came up", time.Since(up).Round(time.Millisecond))
	p4, p6 := e.fileOf(c4.uuid, 20*time.Second), e.fileOf(c6.uuid, 20*time.Second)
	if !strings.Contains(e.daemon.log.String(), "msg=capturing interface="+hot.serverIf+" socket=any") {
		t.Errorf("the daemon did not log capturing %s:\n%s", hot.serverIf, e.daemon.log.String())
	}
	e.ifsStop()
	ref := h.stopReference()
	for _, f := range []struct {
		path   string
		c      conn
		server string
	}{{p4, c4, hotServerV4}, {p6, c6, hotServerV6}} {
		if len(ref[f.c.key]) == 0 {
			t.Fatalf("the reference has no packet of %s", f.c.client)
		}
		if !ifsFirstIsSYN(t, f.path) {
			t.Errorf("%s: the first record is not the client's SYN", filepath.Base(f.path))
		}
		compareFlow(t, f.path, ref[f.c.key], f.server, false)
	}
}

// TestBridgeEachPacketOnce puts the server's address on a bridge (or a
// bond) whose port is the veth to the client. Without -interface, the
// daemon captures the bridge and not its port: each packet is in the file
// once. With -interface naming the port, the port is captured, also once.
// Bonds need the bonding driver; without it their cases are skipped.
func TestBridgeEachPacketOnce(t *testing.T) {
	for _, kind := range []string{"bridge", "bond"} {
		for _, named := range []bool{false, true} {
			name := kind + "/every interface"
			if named {
				name = kind + "/-interface=port"
			}
			t.Run(name, func(t *testing.T) { masterEachPacketOnce(t, kind, named) })
		}
	}
}

func masterEachPacketOnce(t *testing.T, kind string, named bool) {
	tp := newTopology(t)
	master := "br-" + tp.id
	if kind == "bond" {
		master = "bo-" + tp.id
	}
	if out, err := exec.Command("ip", "-n", tp.server, "link", "add", master, "type", kind).CombinedOutput(); err != nil {
		if kind == "bond" {
			t.Skipf("cannot create a bond (no bonding driver?): %v: %s", err, strings.TrimSpace(string(out)))
		}
		t.Fatalf("ip link add %s type %s: %v: %s", master, kind, err, out)
	}
	// The port's addresses move to the master; the port goes down to be
	// enslaved (bonds require it) and up again.
	ifsBatch(t, tp.server, []string{
		"addr del " + serverV4 + "/24 dev " + tp.serverIf,
		"addr del " + serverV6 + "/64 dev " + tp.serverIf,
		"link set " + tp.serverIf + " down",
		"link set " + tp.serverIf + " master " + master,
		"addr add " + serverV4 + "/24 dev " + master,
		"addr add " + serverV6 + "/64 dev " + master + " nodad",
		"link set " + master + " up",
		"link set " + tp.serverIf + " up",
	})
	ifsOffloadsOff(t, tp.server, master)

	e := newEnvFor(t, tp, named)
	if named {
		if !e.daemon.log.waitFor("msg=capturing interface="+tp.serverIf+" ", 1, 10*time.Second) {
			t.Fatalf("the named port %s is not captured:\n%s", tp.serverIf, e.daemon.log.String())
		}
	} else {
		if !e.daemon.log.waitFor("msg=capturing interface="+master+" socket=any", 1, 10*time.Second) {
			t.Fatalf("the %s %s is not captured:\n%s", kind, master, e.daemon.log.String())
		}
		if strings.Contains(e.daemon.log.String(), "msg=capturing interface="+tp.serverIf+" ") {
			t.Errorf("the %s port %s is logged as captured:\n%s", kind, tp.serverIf, e.daemon.log.String())
		}
	}
	var conns []conn
	for i := range 2 {
		conns = append(conns, e.exchange(e.server.ln4.Addr().String(), 1000+1000*i))
		conns = append(conns, e.exchange(e.server.ln6.Addr().String(), 1000+1000*i))
	}
	paths := map[string]string{}
	for _, c := range conns {
		paths[c.uuid] = e.fileOf(c.uuid, 20*time.Second)
	}
	e.ifsStop()
	ref := e.stopReference()
	for _, c := range conns {
		t.Logf("%s: %d records, the reference %d packets", c.client, ifsRecords(t, paths[c.uuid]), len(ref[c.key]))
		if len(ref[c.key]) == 0 {
			t.Fatalf("the reference has no packet of %s", c.client)
		}
		compareFlow(t, paths[c.uuid], ref[c.key], serverAddrOf(c), false)
	}
}

// TestVanishingInterfacesAroundRescans: with 80 IPv4 and 80 IPv6 addresses
// on the host, a veth pair is created and deleted every 0.9 s for 20 s (as
// containers come and go; every eighth time it lives, then stays away, 2.5 s)
// while a flow crosses the real link every second.
// Every flow is saved whole, the daemon keeps running and exits 0 on
// SIGTERM, and the vanishing interface is captured again each time it comes
// back: without -interface and with -interface naming it beside the real
// link.
func TestVanishingInterfacesAroundRescans(t *testing.T) {
	t.Run("every interface", func(t *testing.T) { vanishingInterfaces(t, false) })
	t.Run("named", func(t *testing.T) { vanishingInterfaces(t, true) })
}

func vanishingInterfaces(t *testing.T, named bool) {
	const (
		tmp      = "vtmp1"
		peer     = "vtmp1p"
		tmpV4    = "198.18.6.1"
		peerV4   = "198.18.6.2"
		tmpV6    = "2001:db8:6::1"
		churnFor = 20 * time.Second
		upFor    = 600 * time.Millisecond
		downFor  = 300 * time.Millisecond
		// longWindow is longer than the daemon's rescan interval (2 s).
		longWindow = 2500 * time.Millisecond
	)
	tp := newTopology(t)
	var lines []string
	for i := 1; i <= 80; i++ {
		lines = append(lines,
			fmt.Sprintf("addr add 198.18.100.%d/24 dev %s", i, tp.serverIf),
			fmt.Sprintf("addr add 2001:db8:100::%x/64 dev %s nodad", i, tp.serverIf))
	}
	ifsBatch(t, tp.server, lines)
	batchDir := t.TempDir()
	create := func() error {
		err := ifsTryBatch(batchDir, tp.server, []string{
			"link add " + tmp + " type veth peer name " + peer + " netns " + tp.client,
			"addr add " + tmpV4 + "/24 dev " + tmp,
			"addr add " + tmpV6 + "/64 dev " + tmp + " nodad",
			"link set " + tmp + " up",
		})
		if err != nil {
			return err
		}
		return ifsTryBatch(batchDir, tp.client, []string{
			"addr add " + peerV4 + "/24 dev " + peer,
			"link set " + peer + " up",
		})
	}
	del := func() error {
		if out, err := exec.Command("ip", "-n", tp.server, "link", "del", tmp).CombinedOutput(); err != nil {
			return fmt.Errorf("ip link del %s: %v: %s", tmp, err, out)
		}
		return nil
	}
	var args []string
	if named {
		// The named vanishing interface exists at start, so that the
		// daemon starts.
		if err := create(); err != nil {
			t.Fatal(err)
		}
		args = append(args, "-interface="+tp.serverIf+","+tmp)
	}
	e := newEnvFor(t, tp, false, args...)
	if !e.daemon.log.waitFor("msg=started", 1, 10*time.Second) {
		t.Fatalf("daemon did not log msg=started:\n%s", e.daemon.log.String())
	}
	capturing := "msg=capturing interface=" + tmp + " socket=any"
	gone := `msg="interface gone" interface=` + tmp + "\n"
	if named {
		capturing = "msg=capturing interface=" + tmp + " filter="
		gone = `msg="capture ended" interface=` + tmp + " "
	}

	// The churn: the pair is created, lives upFor, is deleted and stays
	// away downFor, again and again for churnFor; it ends with the pair
	// present. Every eighth time the pair lives, and then stays away,
	// longWindow (a container that lives longer, one that takes long to
	// restart): longer than a rescan, so that the daemon sees it come and
	// go at least that often, whatever the phase of its rescans.
	stop := make(chan struct{})
	churned := make(chan struct{})
	var churnErr error
	cycles := 0
	go func() {
		defer close(churned)
		present := named
		start := time.Now()
		stopped := false
		pause := func(d time.Duration) bool {
			select {
			case <-stop:
				stopped = true
				return false
			case <-time.After(d):
				return true
			}
		}
		defer func() {
			if churnErr == nil && !present && !stopped {
				churnErr = create()
			}
		}()
		for ; cycles < 40 && time.Since(start) < churnFor; cycles++ {
			up, down := upFor, downFor
			if cycles%8 == 2 {
				up, down = longWindow, longWindow
			}
			if !present {
				if churnErr = create(); churnErr != nil {
					return
				}
				present = true
			}
			if !pause(up) {
				return
			}
			if churnErr = del(); churnErr != nil {
				return
			}
			present = false
			if !pause(down) {
				return
			}
		}
	}()
	var stopOnce sync.Once
	stopChurn := func() {
		stopOnce.Do(func() { close(stop) })
		<-churned
	}
	t.Cleanup(stopChurn)

	// A flow over the real link every second while the churn goes on.
	var conns []conn
	begin := time.Now()
flows:
	for i := 0; i < 30; i++ {
		addr := e.server.ln4.Addr().String()
		if i%2 == 1 {
			addr = e.server.ln6.Addr().String()
		}
		conns = append(conns, e.exchange(addr, 1000))
		select {
		case <-churned:
			break flows
		case <-time.After(time.Until(begin.Add(time.Duration(i+1) * time.Second))):
		}
	}
	stopChurn()
	if churnErr != nil {
		t.Fatalf("churn, cycle %d: %v", cycles, churnErr)
	}
	log := e.daemon.log.String()
	t.Logf("%d create/delete cycles of %s in %v, %d flows; the daemon logged %q %d times and %q %d times",
		cycles, tmp, time.Since(begin).Round(time.Millisecond), len(conns),
		capturing, strings.Count(log, capturing), gone, strings.Count(log, gone))
	if cycles < 10 {
		t.Errorf("only %d churn cycles", cycles)
	}
	wantCaptures := 2
	if named {
		wantCaptures = 3 // at start, then after two returns at least
	}
	if n := strings.Count(log, capturing); n < wantCaptures {
		t.Errorf("%q logged %d times, want at least %d", capturing, n, wantCaptures)
	}
	if n := strings.Count(log, gone); n < 2 {
		t.Errorf("%q logged %d times, want at least 2", gone, n)
	}
	select {
	case <-e.daemon.done:
		t.Fatalf("the daemon ended during the churn: %v\n%s", e.daemon.err, log)
	default:
	}

	// Once more, step by step: the pair goes, the capture of it ends, the
	// pair comes back, it is captured again, with the new address in the
	// filter: a connection attempt over it is captured.
	if err := del(); err != nil {
		t.Fatal(err)
	}
	const captured = 1 // the real link alone (the peer is in the client's namespace)
	if !e.ifsWaitGauge("pcap_muxer_interfaces_with_captures", captured, 10*time.Second) {
		t.Fatalf("after %s went: pcap_muxer_interfaces_with_captures = %v, want %v", tmp, e.metric("pcap_muxer_interfaces_with_captures"), captured)
	}
	before := strings.Count(e.daemon.log.String(), capturing)
	if err := create(); err != nil {
		t.Fatal(err)
	}
	if !e.daemon.log.waitFor(capturing, before+1, 10*time.Second) {
		t.Fatalf("%s is not captured again after it came back:\n%s", tmp, e.daemon.log.String())
	}
	if !e.ifsWaitGauge("pcap_muxer_interfaces_with_captures", captured+1, 10*time.Second) {
		t.Fatalf("after %s came back: pcap_muxer_interfaces_with_captures = %v, want %v", tmp, e.metric("pcap_muxer_interfaces_with_captures"), captured+1)
	}
	socketName := "any"
	if named {
		socketName = tmp
	}
	packets := `pcap_capture_packets_total{interface="` + socketName + `"}`
	p0 := e.metric(packets)
	// Nothing listens on port 9: SYN and RST, both captured.
	for attempt := 0; attempt < 3; attempt++ {
		netns.Run(tp.clientNS, func() error {
			c, err := net.DialTimeout("tcp4", tmpV4+":9", 2*time.Second)
			if err == nil {
				c.Close()
			}
			return nil
		})
		if e.waitMetric(packets, p0+2, 2*time.Second) {
			break
		}
	}
	if got := e.metric(packets); got < p0+2 {
		t.Errorf("a connection attempt over %s: %s went from %v to %v, want +2", tmp, packets, p0, got)
	}

	// Every flow over the real link is saved whole.
	paths := map[string]string{}
	for _, c := range conns {
		paths[c.uuid] = e.fileOf(c.uuid, 20*time.Second)
	}
	e.ifsStop()
	ref := e.stopReference()
	for _, c := range conns {
		compareFlow(t, paths[c.uuid], ref[c.key], serverAddrOf(c), false)
	}
	if n := len(e.files()); n != len(conns) {
		t.Errorf("%d files, want %d (one per flow)", n, len(conns))
	}
}
