package e2e

import (
	"bufio"
	"context"
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

	"github.com/m-lab/packet-headers/internal/nsproc"
	"github.com/m-lab/packet-headers/internal/topo"
)

// Addresses of the test topology (internal/topo): the server (where the
// daemon and tcp-info run) and the client, joined by a veth pair. Only the
// benchmarking and documentation ranges are ever used.
const (
	serverV4 = topo.ServerV4
	clientV4 = topo.ClientV4
	serverV6 = topo.ServerV6
	clientV6 = topo.ClientV6
)

// topology is two network namespaces joined by a veth pair (or, in
// newTUNTopology, by two TUN devices and a relay): internal/topo's, in the
// names the tests use.
type topology struct {
	id                 string
	server, client     string // namespace names
	serverIf, clientIf string // the link's ends
	serverNS, clientNS *os.File
	nt                 *topo.Topology // what made the namespaces, if anything
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
// segmentation offloads off (where ethtool is installed) so that both ends
// see the same packets, with valid checksums. Everything is removed when the
// test ends.
func newTopology(t testing.TB) *topology {
	t.Helper()
	tp := newNamespaces(t)
	off := topo.AllOffloads
	if _, err := exec.LookPath("ethtool"); err != nil {
		off = nil
	}
	if err := tp.nt.Veth(off); err != nil {
		t.Fatal(err)
	}
	tp.serverIf, tp.clientIf = tp.nt.ServerIf, tp.nt.ClientIf
	return tp
}

// newNamespaces creates the server and client namespaces, phs<id> and
// phc<id>, with loopback up and nothing else; they are removed when the test
// ends.
func newNamespaces(t testing.TB) *topology {
	t.Helper()
	requireNetns(t)
	topoSeq++
	nt, err := topo.Namespaces("ph", fmt.Sprintf("%d%d", os.Getpid()%100000, topoSeq))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := nt.Close(); err != nil {
			t.Logf("remove the namespaces: %v", err)
		}
	})
	return &topology{id: nt.ID, server: nt.Server, client: nt.Client, serverNS: nt.ServerNS, clientNS: nt.ClientNS, nt: nt}
}

// proc is a process the test started in a namespace (internal/nsproc); it
// is stopped by PID when the test ends.
type proc struct {
	*nsproc.Proc
	t    testing.TB
	name string
	cmd  *exec.Cmd
	log  *logBuffer
	done <-chan struct{}
	err  error // how it ended, valid once done is closed
}

// logBuffer is a process's output, which the test can wait on.
type logBuffer struct{ *nsproc.Output }

// waitFor waits until the output contains s at least n times, or d passes.
func (l *logBuffer) waitFor(s string, n int, d time.Duration) bool {
	return l.WaitForWithin(s, n, d)
}

func startProc(t testing.TB, ns, name string, bin string, args ...string) *proc {
	t.Helper()
	np, err := nsproc.Start(ns, name, nil, bin, args...)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	p := &proc{Proc: np, t: t, name: name, cmd: np.Cmd, log: &logBuffer{np.Out}, done: done}
	go func() {
		<-np.Done()
		p.err = np.Err()
		close(done)
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
	if err := p.Signal(sig); err != nil {
		p.t.Error(err)
	}
}

// wait waits for the process to exit and returns its exit code.
func (p *proc) wait(d time.Duration) (int, bool) {
	if err := p.Wait(context.Background(), d); err != nil {
		return -1, false
	}
	<-p.done
	return p.cmd.ProcessState.ExitCode(), true
}

func (p *proc) kill() {
	p.Kill()
	<-p.done
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

// TestMain removes the binaries the tests built.
func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
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
