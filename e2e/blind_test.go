package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/internal/netns"
	"github.com/m-lab/packet-headers/internal/nsproc"
	"github.com/m-lab/packet-headers/internal/promscrape"
)

// The daemon captures on AF_PACKET sockets, which need CAP_NET_RAW. Without
// it the daemon must not run blind: it exits at start, with status 2 and one
// line that says what is missing.

// capNetRaw is CAP_NET_RAW's bit in /proc/PID/status's capability masks.
const capNetRaw = 13

// dropNetRaw runs a program without CAP_NET_RAW: util-linux's setpriv takes
// it out of the bounding set (so that exec cannot grant it, even to root)
// and clears the inheritable set.
var dropNetRaw = []string{"setpriv", "--inh-caps=-all", "--bounding-set=-net_raw"}

// blindNamespace creates a network namespace with a veth pair in it, one end
// up and the other down, all removed when the test ends.
func blindNamespace(t *testing.T) (ns, up, down string) {
	t.Helper()
	id := os.Getpid() % 100000
	ns = fmt.Sprintf("phblind%d", id)
	up, down = fmt.Sprintf("bup%d", id), fmt.Sprintf("bdn%d", id)
	run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	run(t, "ip", "-n", ns, "link", "set", "lo", "up")
	run(t, "ip", "-n", ns, "link", "add", up, "type", "veth", "peer", "name", down)
	run(t, "ip", "-n", ns, "link", "set", up, "up")
	return ns, up, down
}

// capEff returns the effective capabilities of a process run in ns with
// prefix (a command and its arguments) before it.
func capEff(t *testing.T, ns string, prefix ...string) uint64 {
	t.Helper()
	args := append(append([]string{"netns", "exec", ns}, prefix...), "cat", "/proc/self/status")
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no CapEff in /proc/self/status:\n%s", out)
	return 0
}

func TestRefusesToRunBlind(t *testing.T) {
	requireNetns(t)
	if _, err := exec.LookPath(dropNetRaw[0]); err != nil {
		t.Skip("needs util-linux's setpriv to drop CAP_NET_RAW")
	}
	daemon, _ := binaries(t)
	ns, up, down := blindNamespace(t)
	// The premise: root has CAP_NET_RAW, and dropNetRaw takes it away.
	if c := capEff(t, ns); c&(1<<capNetRaw) == 0 {
		t.Fatalf("CapEff %x: the test runs without CAP_NET_RAW already", c)
	}
	if c := capEff(t, ns, dropNetRaw...); c&(1<<capNetRaw) != 0 {
		t.Fatalf("CapEff %x under %s: CAP_NET_RAW is still there", c, strings.Join(dropNetRaw, " "))
	}

	for _, tt := range []struct {
		name string
		args []string
	}{
		{"every interface", []string{"-tcpinfo.eventsocket=" + filepath.Join(t.TempDir(), "none.sock")}},
		{"every interface, standalone", nil},
		{"named interface", []string{"-interface=" + up, "-tcpinfo.eventsocket=" + filepath.Join(t.TempDir(), "none.sock")}},
		{"named interface, down", []string{"-interface=" + down}},
		{"named interfaces", []string{"-interface=" + up, "-interface=" + down}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dataDir := t.TempDir()
			args := append(append([]string{"netns", "exec", ns}, dropNetRaw...), daemon,
				"-datadir="+dataDir, "-prometheusx.listen-address=127.0.0.1:0", "-sigtermwait=0s")
			args = append(args, tt.args...)
			// A deadline, not a wait: a daemon that starts blind would
			// run until killed.
			ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, "ip", args...)
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			if ctx.Err() != nil {
				t.Fatalf("the daemon did not exit without CAP_NET_RAW (killed after a minute); stderr:\n%s", stderr.String())
			}
			var exit *exec.ExitError
			if !errors.As(err, &exit) {
				t.Fatalf("run: %v; stderr:\n%s", err, stderr.String())
			}
			if code := exit.ExitCode(); code != 2 {
				t.Errorf("exit code %d, want 2", code)
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout: %q, want nothing", stdout.String())
			}
			lines := strings.Split(strings.TrimSuffix(stderr.String(), "\n"), "\n")
			if len(lines) != 1 || !strings.HasPrefix(lines[0], "packet-headers: ") || !strings.Contains(lines[0], "CAP_NET_RAW") {
				t.Errorf("stderr has %d lines, want one that starts with %q and names CAP_NET_RAW:\n%s", len(lines), "packet-headers: ", stderr.String())
			}
			if strings.Contains(stderr.String(), "started") {
				t.Errorf("the daemon started:\n%s", stderr.String())
			}
			if entries, err := os.ReadDir(dataDir); err != nil || len(entries) != 0 {
				t.Errorf("-datadir holds %v (%v), want nothing", entries, err)
			}
		})
	}
}

// TestNamedInterfaceDownAtStart: an -interface that exists but is down is
// no error at start; its capture resumes when it comes up.
func TestNamedInterfaceDownAtStart(t *testing.T) {
	requireNetns(t)
	daemon, _ := binaries(t)
	id := os.Getpid() % 100000
	server, client := fmt.Sprintf("phdowns%d", id), fmt.Sprintf("phdownc%d", id)
	serverIf, clientIf := fmt.Sprintf("dns%d", id), fmt.Sprintf("dnc%d", id)
	const serverAddr, clientAddr = "198.18.99.1", "198.18.99.2"
	for _, ns := range []string{server, client} {
		run(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		run(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	run(t, "ip", "link", "add", serverIf, "netns", server, "type", "veth", "peer", "name", clientIf, "netns", client)
	run(t, "ip", "-n", server, "addr", "add", serverAddr+"/24", "dev", serverIf)
	run(t, "ip", "-n", client, "addr", "add", clientAddr+"/24", "dev", clientIf)
	run(t, "ip", "-n", client, "link", "set", clientIf, "up")
	// The server's end stays down until the daemon has started.

	const metricsAddr = "127.0.0.1:9994"
	p, err := nsproc.Start(server, "packet-headers", nil, daemon,
		"-datadir="+t.TempDir(), "-interface="+serverIf, "-sigtermwait=0s",
		"-tcpinfo.eventsocket="+filepath.Join(t.TempDir(), "none.sock"),
		"-prometheusx.listen-address="+metricsAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Kill()
		if t.Failed() {
			t.Logf("daemon output:\n%s", p.Out.String())
		}
	})
	if err := p.WaitOutput(t.Context(), "msg=started", 20*time.Second); err != nil {
		t.Fatal(err)
	}
	serverNS, err := os.Open("/var/run/netns/" + server)
	if err != nil {
		t.Fatal(err)
	}
	defer serverNS.Close()
	clientNS, err := os.Open("/var/run/netns/" + client)
	if err != nil {
		t.Fatal(err)
	}
	defer clientNS.Close()
	target := promscrape.Target{NS: serverNS, Addr: metricsAddr}
	series := `pcap_capture_packets_total{interface="` + serverIf + `"}`
	s, err := target.Scrape()
	if err != nil {
		t.Fatal(err)
	}
	if n := s["pcap_muxer_interfaces_with_captures"]; n != 1 {
		t.Errorf("pcap_muxer_interfaces_with_captures = %v while %s is down, want 1", n, serverIf)
	}

	run(t, "ip", "-n", server, "link", "set", serverIf, "up")
	s, ok, err := target.Wait(t.Context(), 100*time.Millisecond, 20*time.Second, func(s promscrape.Samples) bool {
		if s[series] > 0 {
			return true
		}
		// A SYN to a closed port and its RST cross the link.
		netns.Run(clientNS, func() error {
			c, err := net.DialTimeout("tcp", net.JoinHostPort(serverAddr, "9"), time.Second)
			if err == nil {
				c.Close()
			}
			return nil
		})
		return false
	})
	if err != nil {
		t.Fatal(err)
	}
	if !ok {
		t.Errorf("%s = %v 20 s after the interface came up, want packets", series, s[series])
	}
	if err := p.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if code := p.Cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
}
