package topo

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/internal/netns"
)

// TestNew builds a topology, connects from the client to the server over
// each address family, and removes it.
func TestNew(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	for _, c := range []string{"ip", "ethtool"} {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("needs %s", c)
		}
	}
	tp, err := New("pht", fmt.Sprintf("%dt", os.Getpid()%100000), SegmentationOffloads)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if tp != nil {
			tp.Close()
		}
	}()
	for _, ifc := range []struct{ ns, name string }{{tp.Server, tp.ServerIf}, {tp.Client, tp.ClientIf}} {
		out, err := exec.Command("ip", "netns", "exec", ifc.ns, "ethtool", "-k", ifc.name).Output()
		if err != nil {
			t.Fatal(err)
		}
		if want := "tcp-segmentation-offload: off"; !strings.Contains(string(out), want) {
			t.Errorf("%s: no %q in\n%s", ifc.name, want, out)
		}
	}
	for _, addr := range []string{ServerV4, ServerV6} {
		var ln net.Listener
		if err := netns.Run(tp.ServerNS, func() (err error) {
			ln, err = net.Listen("tcp", net.JoinHostPort(addr, "0"))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		var c net.Conn
		err := netns.Run(tp.ClientNS, func() (err error) {
			c, err = net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
			return err
		})
		ln.Close()
		if err != nil {
			t.Fatalf("dial %s from the client: %v", addr, err)
		}
		c.Close()
	}
	server := tp.Server
	if err := tp.Close(); err != nil {
		t.Fatal(err)
	}
	tp = nil
	if _, err := os.Stat("/var/run/netns/" + server); !os.IsNotExist(err) {
		t.Errorf("namespace %s still there after Close: %v", server, err)
	}
}
