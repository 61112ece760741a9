package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Addresses of the test topology: the server (where the daemon and tcp-info
// run) and the client, joined by a veth pair. Only the benchmarking and
// documentation ranges are ever used.
const (
	serverV4 = "198.18.0.1"
	clientV4 = "198.18.0.2"
	serverV6 = "2001:db8::1"
	clientV6 = "2001:db8::2"
)

// topology is two network namespaces joined by a veth pair (or, in
// newTUNTopology, by two TUN devices and a relay).
type topology struct {
	id                 string
	server, client     string // namespace names
	serverIf, clientIf string // the link's ends
	serverNS, clientNS *os.File
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// requireNetns skips the test where namespaces cannot be made (not root, no
// iproute2). CI runs as root with iproute2 installed.
func requireNetns(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("end-to-end tests need root to create network namespaces")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("end-to-end tests need iproute2's ip command (the README's test command installs it)")
	}
}

var topoSeq int

// newTopology creates the namespaces and the veth pair, with checksum and
// segmentation offloads off so that both ends see the same packets, with
// valid checksums. Everything is removed when the test ends.
func newTopology(t testing.TB) *topology {
	t.Helper()
	tp := newNamespaces(t)
	tp.serverIf, tp.clientIf = "vs"+tp.id, "vc"+tp.id
	run(t, "ip", "link", "add", tp.serverIf, "netns", tp.server, "type", "veth", "peer", "name", tp.clientIf, "netns", tp.client)
	for _, s := range []struct{ ns, ifc, v4, v6 string }{
		{tp.server, tp.serverIf, serverV4, serverV6},
		{tp.client, tp.clientIf, clientV4, clientV6},
	} {
		run(t, "ip", "-n", s.ns, "addr", "add", s.v4+"/24", "dev", s.ifc)
		run(t, "ip", "-n", s.ns, "addr", "add", s.v6+"/64", "dev", s.ifc, "nodad")
		run(t, "ip", "-n", s.ns, "link", "set", s.ifc, "up")
		if _, err := exec.LookPath("ethtool"); err == nil {
			run(t, "ip", "netns", "exec", s.ns, "ethtool", "-K", s.ifc, "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off")
		}
	}
	return tp
}

// newNamespaces creates the server and client namespaces, with loopback up
// and nothing else; they are removed when the test ends.
func newNamespaces(t testing.TB) *topology {
	t.Helper()
	requireNetns(t)
	topoSeq++
	id := fmt.Sprintf("%d%d", os.Getpid()%100000, topoSeq)
	tp := &topology{id: id, server: "phs" + id, client: "phc" + id}
	for _, ns := range []string{tp.server, tp.client} {
		run(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		run(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	var err error
	if tp.serverNS, err = os.Open("/var/run/netns/" + tp.server); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.serverNS.Close() })
	if tp.clientNS, err = os.Open("/var/run/netns/" + tp.client); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tp.clientNS.Close() })
	return tp
}

// proc is a process the test started in a namespace; it is stopped by PID
// when the test ends.
type proc struct {
	t    testing.TB
	name string
	cmd  *exec.Cmd
	log  *logBuffer
	done chan struct{}
	err  error
}

// logBuffer collects a process's output and lets the test wait for a line.
type logBuffer struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	cond *sync.Cond
}

func newLogBuffer() *logBuffer {
	l := &logBuffer{}
	l.cond = sync.NewCond(&l.mu)
	return l
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	l.cond.Broadcast()
	return len(p), nil
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// waitFor waits until the output contains s at least n times, or the
// deadline passes.
func (l *logBuffer) waitFor(s string, n int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	timer := time.AfterFunc(d, func() {
		l.mu.Lock()
		l.cond.Broadcast()
		l.mu.Unlock()
	})
	defer timer.Stop()
	l.mu.Lock()
	defer l.mu.Unlock()
	for strings.Count(l.buf.String(), s) < n {
		if time.Now().After(deadline) {
			return false
		}
		l.cond.Wait()
	}
	return true
}

func startProc(t testing.TB, ns, name string, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, name: name, log: newLogBuffer(), done: make(chan struct{})}
	// ip netns exec execs the program: the PID is the program's.
	p.cmd = exec.Command("ip", append([]string{"netns", "exec", ns, bin}, args...)...)
	p.cmd.Stdout = p.log
	p.cmd.Stderr = p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("output of %s:\n%s", name, p.log.String())
		}
	})
	return p
}

// signal sends sig to the process by its PID.
func (p *proc) signal(sig syscall.Signal) {
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		p.t.Errorf("signal %s: %v", p.name, err)
	}
}

// wait waits for the process to exit and returns its exit code.
func (p *proc) wait(d time.Duration) (int, bool) {
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode(), true
	case <-time.After(d):
		return -1, false
	}
}

func (p *proc) kill() {
	select {
	case <-p.done:
	default:
		p.cmd.Process.Kill()
		<-p.done
	}
}

// waitForFile waits until path exists.
func waitForFile(path string, d time.Duration) bool {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	for {
		if _, err := os.Stat(path); err == nil {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// buildOnce builds the daemon and tcp-info for all tests of the package.
var (
	buildMu  sync.Mutex
	binDir   string
	buildErr error
)

func binaries(t testing.TB) (daemon, tcpinfo string) {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if binDir == "" && buildErr == nil {
		dir, err := os.MkdirTemp("", "packet-headers-e2e-bin")
		if err != nil {
			t.Fatal(err)
		}
		binDir = dir
		for _, b := range []struct{ out, pkg string }{
			{"packet-headers", "github.com/m-lab/packet-headers/cmd/packet-headers"},
			{"tcp-info", "github.com/m-lab/tcp-info"},
		} {
			out, err := exec.Command("go", "build", "-o", filepath.Join(dir, b.out), b.pkg).CombinedOutput()
			if err != nil {
				buildErr = fmt.Errorf("go build %s: %v\n%s", b.pkg, err, out)
				break
			}
		}
	}
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, "packet-headers"), filepath.Join(binDir, "tcp-info")
}

// scanLines is bufio.ScanLines over a string.
func scanLines(s string) []string {
	var out []string
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		out = append(out, sc.Text())
	}
	return out
}

var _ = io.Discard
