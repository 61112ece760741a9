package e2e

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/internal/replay"
)

// restartDaemon stops the env's daemon cleanly.
func (e *env) stopDaemon() {
	e.daemon.signal(syscall.SIGTERM)
	if code, ok := e.daemon.wait(20 * time.Second); !ok || code != 0 {
		e.t.Fatalf("daemon exit %d %v:\n%s", code, ok, e.daemon.log.String())
	}
}

// TestTCPInfoAbsentAtStart: the daemon starts while tcp-info is not
// running, keeps running, connects once tcp-info comes, and saves the flows
// tcp-info names then.
func TestTCPInfoAbsentAtStart(t *testing.T) {
	e := newEnv(t)
	e.stopDaemon()
	e.tcpinfo.signal(syscall.SIGKILL)
	e.tcpinfo.wait(10 * time.Second)
	if err := os.Remove(e.sock); err != nil {
		t.Fatal(err)
	}
	e.startDaemon("-interface=" + e.tp.serverIf)
	if !e.daemon.log.waitFor("cannot connect to eventsocket", 1, 10*time.Second) {
		t.Fatalf("daemon did not report the missing eventsocket:\n%s", e.daemon.log.String())
	}
	if e.metric("pcap_eventsocket_connected") != 0 {
		t.Error("pcap_eventsocket_connected is not 0 without tcp-info")
	}
	e.startTCPInfo()
	if !e.daemon.log.waitFor("connected to eventsocket", 1, 20*time.Second) {
		t.Fatalf("daemon did not connect when tcp-info came:\n%s", e.daemon.log.String())
	}
	c := e.exchange(e.server.ln4.Addr().String(), 100)
	e.fileOf(c.uuid, 20*time.Second)
	e.stopDaemon()
}

// mountTmpfs mounts a tmpfs of the given size at dir for the test.
func mountTmpfs(t *testing.T, dir, size string) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", "-l", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v %s", dir, err, out)
		}
	})
}

// checkNoPartialFiles fails if any file under dir (but skip) does not
// decode completely.
func checkNoPartialFiles(t *testing.T, dir, skip string) {
	t.Helper()
	filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() || p == skip {
			return nil
		}
		if _, _, err := replay.ReadFile(p); err != nil {
			t.Errorf("partial file %s: %v", p, err)
		}
		return nil
	})
}

// TestDiskFullAndReadOnlyMidRun: with the data directory on a small tmpfs,
// a full disk and then a read-only one make flows fail (counted), the
// daemon keeps running, nothing partial is ever visible, and saving resumes
// when space and write access return.
func TestDiskFullAndReadOnlyMidRun(t *testing.T) {
	e := newEnv(t)
	e.stopDaemon()
	e.dataDir = filepath.Join(e.dir, "small")
	mountTmpfs(t, e.dataDir, "256k")
	e.startDaemon("-interface=" + e.tp.serverIf)
	if !e.daemon.log.waitFor("connected to eventsocket", 1, 10*time.Second) {
		t.Fatal("daemon did not connect")
	}
	// Fill the disk.
	filler := filepath.Join(e.dataDir, "filler")
	err := os.WriteFile(filler, bytes.Repeat([]byte{1}, 1<<20), 0o644)
	if err == nil || !strings.Contains(err.Error(), "no space") {
		t.Fatalf("filling the tmpfs: %v", err)
	}
	failed := e.metric(`pcap_saver_errors_total{reason="write"}`)
	c := e.exchange(e.server.ln4.Addr().String(), 100)
	if !e.waitMetric(`pcap_saver_errors_total{reason="write"}`, failed+1, 20*time.Second) {
		t.Fatalf("no write error counted on a full disk; metrics:\n%s", e.pcapMetrics())
	}
	if m, _ := filepath.Glob(filepath.Join(e.dataDir, "*", "*", "*", c.uuid+".pcap.gz")); len(m) != 0 {
		t.Errorf("a file was published on a full disk: %v", m)
	}
	checkNoPartialFiles(t, e.dataDir, filler)
	// Space returns.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	c = e.exchange(e.server.ln6.Addr().String(), 100)
	e.fileOf(c.uuid, 20*time.Second)

	// Read-only, then writable again.
	if out, err := exec.Command("mount", "-o", "remount,ro", e.dataDir).CombinedOutput(); err != nil {
		t.Fatalf("remount ro: %v %s", err, out)
	}
	opens := e.metric(`pcap_saver_errors_total{reason="fileopen"}`) + e.metric(`pcap_saver_errors_total{reason="mkdir"}`)
	c = e.exchange(e.server.ln4.Addr().String(), 100)
	deadline := time.Now().Add(20 * time.Second)
	for e.metric(`pcap_saver_errors_total{reason="fileopen"}`)+e.metric(`pcap_saver_errors_total{reason="mkdir"}`) < opens+1 {
		if time.Now().After(deadline) {
			t.Fatalf("no error counted on a read-only disk; metrics:\n%s", e.pcapMetrics())
		}
		time.Sleep(50 * time.Millisecond) // polling a real process's metrics, with a deadline
	}
	if out, err := exec.Command("mount", "-o", "remount,rw", e.dataDir).CombinedOutput(); err != nil {
		t.Fatalf("remount rw: %v %s", err, out)
	}
	c = e.exchange(e.server.ln4.Addr().String(), 100)
	e.fileOf(c.uuid, 20*time.Second)
	checkNoPartialFiles(t, e.dataDir, "")
	e.stopDaemon()
}

// TestSIGTERMUnderLoad: with many named flows in flight, SIGTERM publishes
// every one of them before the daemon exits, within -sigtermwait plus a few
// seconds.
func TestSIGTERMUnderLoad(t *testing.T) {
	e := newEnv(t, "-sigtermwait=1s", "-flowtimeout=1m")
	const n = 30
	var held []net.Conn
	var conns []conn
	for i := 0; i < n; i++ {
		opens := e.metric(opensMetric)
		addr := e.server.ln4.Addr().String()
		if i%2 == 1 {
			addr = e.server.ln6.Addr().String()
		}
		c := dial(t, e.tp, addr)
		held = append(held, c)
		if !e.waitMetric(opensMetric, opens+1, 10*time.Second) {
			t.Fatal("tcp-info did not name a connection")
		}
		if _, err := c.Write(bytes.Repeat([]byte("S"), 1000)); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, newConn(t, e.server, c))
	}
	start := time.Now()
	e.daemon.signal(syscall.SIGTERM)
	code, ok := e.daemon.wait(30 * time.Second)
	took := time.Since(start)
	for _, c := range held {
		c.Close()
	}
	if !ok || code != 0 {
		t.Fatalf("exit %d %v", code, ok)
	}
	t.Logf("SIGTERM with %d flows in flight: exited 0 after %v (-sigtermwait=1s)", n, took)
	for _, c := range conns {
		e.fileOf(c.uuid, time.Second)
	}
	if took > 1*time.Second+5*time.Second {
		t.Errorf("took %v to stop, want at most -sigtermwait + 5s", took)
	}
}
