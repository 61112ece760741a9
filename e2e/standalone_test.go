package e2e

import (
	"bytes"
	"net"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/internal/replay"
)

const standaloneMetrics = "127.0.0.1:9993"

// TestStandaloneMatchesTCPInfo runs a second daemon in standalone mode
// beside the one fed by tcp-info, on the same interface: every flow tcp-info
// names has a standalone file with the identical name and packets. Then
// connections shorter than tcp-info's 10 ms poll: standalone mode names at
// least as many (with the kernel's destroy notifications, all of them).
func TestStandaloneMatchesTCPInfo(t *testing.T) {
	e := newEnv(t)
	daemonBin, _ := binaries(t)
	soloDir := filepath.Join(e.dir, "standalone")
	solo := startProc(t, e.tp.server, "packet-headers standalone", daemonBin,
		"-interface="+e.tp.serverIf,
		"-datadir="+soloDir,
		"-uuid-prefix-file="+e.prefix,
		"-flowtimeout=1s",
		"-captureduration=20s",
		"-sigtermwait=200ms",
		"-prometheusx.listen-address="+standaloneMetrics)
	if !solo.log.waitFor("capturing", 1, 10*time.Second) || !solo.log.waitFor("standalone", 1, 10*time.Second) {
		t.Fatalf("standalone daemon did not start:\n%s", solo.log.String())
	}
	soloFile := func(uuid string) string {
		m, err := filepath.Glob(filepath.Join(soloDir, "*", "*", "*", uuid+".pcap.gz"))
		if err != nil || len(m) != 1 {
			return ""
		}
		return m[0]
	}

	// Flows tcp-info names.
	var conns []conn
	for i := 0; i < 3; i++ {
		conns = append(conns, e.exchange(e.server.ln4.Addr().String(), 500))
		conns = append(conns, e.exchange(e.server.ln6.Addr().String(), 500))
	}

	// Short flows: connect, send, close, with no waiting.
	const short = 20
	var shortConns []conn
	for i := 0; i < short; i++ {
		addr := e.server.ln4.Addr().String()
		if i%2 == 1 {
			addr = e.server.ln6.Addr().String()
		}
		c := dial(t, e.tp, addr)
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).CloseWrite()
		buf := make([]byte, 8192)
		for {
			if _, err := c.Read(buf); err != nil {
				break
			}
		}
		shortConns = append(shortConns, newConn(t, e.server, c))
		c.Close()
	}

	// Stop both daemons: each publishes every flow it has a UUID for.
	for _, p := range []*proc{e.daemon, solo} {
		p.signal(syscall.SIGTERM)
		if code, ok := p.wait(20 * time.Second); !ok || code != 0 {
			t.Fatalf("%s: exit %d %v\n%s", p.name, code, ok, p.log.String())
		}
	}

	for _, c := range conns {
		a := e.fileOf(c.uuid, time.Second)
		b := soloFile(c.uuid)
		if b == "" {
			t.Errorf("flow %s named by tcp-info has no standalone file", c.uuid)
			continue
		}
		pa, _, errA := replay.ReadFile(a)
		pb, _, errB := replay.ReadFile(b)
		if errA != nil || errB != nil || len(pa) != len(pb) || len(pa) == 0 {
			t.Errorf("%s: %d packets (%v) beside tcp-info, %d (%v) standalone", c.uuid, len(pa), errA, len(pb), errB)
			continue
		}
		for i := range pa {
			if !bytes.Equal(pa[i].Raw, pb[i].Raw) || pa[i].Len != pb[i].Len {
				t.Errorf("%s packet %d differs between the two modes", c.uuid, i)
				break
			}
		}
	}

	var byTCPInfo, byStandalone int
	for _, c := range shortConns {
		if m, _ := filepath.Glob(filepath.Join(e.dataDir, "*", "*", "*", c.uuid+".pcap.gz")); len(m) == 1 {
			byTCPInfo++
		}
		if soloFile(c.uuid) != "" {
			byStandalone++
		}
	}
	t.Logf("connections shorter than one poll: tcp-info named %d of %d, standalone %d of %d", byTCPInfo, short, byStandalone, short)
	if byStandalone < byTCPInfo {
		t.Errorf("standalone saved %d short flows, fewer than tcp-info's %d", byStandalone, byTCPInfo)
	}
	if solo.log.waitFor("destroy_notifications=true", 1, 0) && byStandalone != short {
		t.Errorf("with destroy notifications, standalone saved %d of %d short flows", byStandalone, short)
	}
}
