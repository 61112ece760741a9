// Package topo builds the network the end-to-end tests and the live benchmark
// run in: two network namespaces, the server's and the client's, joined by a
// veth pair. Only the benchmarking range 198.18.0.0/15 and the documentation
// range 2001:db8::/32 are ever used, and only inside the namespaces, so no
// packet of a test or benchmark reaches the host's own network.
//
// Names carry an ID that the caller makes from its PID (and a sequence
// number), so that tests and benchmarks running at the same time never
// collide; a topology removes only what it created, by name.
package topo

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"golang.org/x/sys/unix"
)

// The addresses of the two ends. The server's end is where the daemon runs.
const (
	ServerV4 = "198.18.0.1"
	ClientV4 = "198.18.0.2"
	ServerV6 = "2001:db8::1"
	ClientV6 = "2001:db8::2"
)

// ethtool -K features that Veth turns off on both ends of the link.
var (
	// SegmentationOffloads off: the link carries MTU-sized packets, as a
	// NIC would, and a capture sees each one (with them on, veth passes
	// 64 KB super-packets).
	SegmentationOffloads = []string{"tso", "gso", "gro"}
	// AllOffloads adds checksum offloads: packets cross the link with
	// valid checksums, so that both ends see the same bytes.
	AllOffloads = []string{"tso", "gso", "gro", "tx", "rx"}
)

// Topology is the two namespaces and, once Veth has made it, their link.
type Topology struct {
	ID                 string
	Server, Client     string // namespace names
	ServerIf, ClientIf string // the link's ends; empty until Veth
	// ServerNS and ClientNS are the namespaces' files, for netns.Run and
	// setns.
	ServerNS, ClientNS *os.File
	made               []string // namespaces created, to delete
}

// Namespaces creates the namespaces <prefix>s<id> and <prefix>c<id>, with
// loopback up and nothing else. On error, whatever it made is removed; on
// success, Close removes it.
func Namespaces(prefix, id string) (tp *Topology, err error) {
	tp = &Topology{ID: id, Server: prefix + "s" + id, Client: prefix + "c" + id}
	defer func() {
		if err != nil {
			err = errors.Join(err, tp.Close())
			tp = nil
		}
	}()
	for _, ns := range []string{tp.Server, tp.Client} {
		if err := Command("ip", "netns", "add", ns); err != nil {
			return tp, err
		}
		tp.made = append(tp.made, ns)
		if err := Command("ip", "-n", ns, "link", "set", "lo", "up"); err != nil {
			return tp, err
		}
	}
	if tp.ServerNS, err = os.Open("/var/run/netns/" + tp.Server); err != nil {
		return tp, err
	}
	tp.ClientNS, err = os.Open("/var/run/netns/" + tp.Client)
	return tp, err
}

// New is Namespaces and Veth: the whole topology.
func New(prefix, id string, offloadsOff []string) (*Topology, error) {
	tp, err := Namespaces(prefix, id)
	if err != nil {
		return nil, err
	}
	if err := tp.Veth(offloadsOff); err != nil {
		return nil, errors.Join(err, tp.Close())
	}
	return tp, nil
}

// Veth joins the namespaces by the veth pair vs<id> (server) and vc<id>
// (client), gives each end its addresses (IPv4 /24, IPv6 /64 without
// duplicate address detection, so usable at once) and turns the given
// ethtool features off on both. The pair goes away with the namespaces.
func (tp *Topology) Veth(offloadsOff []string) error {
	tp.ServerIf, tp.ClientIf = "vs"+tp.ID, "vc"+tp.ID
	if len(tp.ServerIf) > unix.IFNAMSIZ-1 {
		return fmt.Errorf("interface name %s too long", tp.ServerIf)
	}
	if err := Command("ip", "link", "add", tp.ServerIf, "netns", tp.Server, "type", "veth", "peer", "name", tp.ClientIf, "netns", tp.Client); err != nil {
		return err
	}
	for _, s := range []struct{ ns, ifc, v4, v6 string }{
		{tp.Server, tp.ServerIf, ServerV4, ServerV6},
		{tp.Client, tp.ClientIf, ClientV4, ClientV6},
	} {
		steps := [][]string{
			{"ip", "-n", s.ns, "addr", "add", s.v4 + "/24", "dev", s.ifc},
			{"ip", "-n", s.ns, "addr", "add", s.v6 + "/64", "dev", s.ifc, "nodad"},
			{"ip", "-n", s.ns, "link", "set", s.ifc, "up"},
		}
		if len(offloadsOff) > 0 {
			st := []string{"ip", "netns", "exec", s.ns, "ethtool", "-K", s.ifc}
			for _, f := range offloadsOff {
				st = append(st, f, "off")
			}
			steps = append(steps, st)
		}
		for _, st := range steps {
			if err := Command(st[0], st[1:]...); err != nil {
				return err
			}
		}
	}
	return nil
}

// Close closes the namespaces' files and deletes the namespaces it created
// (and with them every interface in them), newest first.
func (tp *Topology) Close() error {
	var errs []error
	for _, f := range []*os.File{tp.ClientNS, tp.ServerNS} {
		if f != nil {
			errs = append(errs, f.Close())
		}
	}
	tp.ServerNS, tp.ClientNS = nil, nil
	for i := len(tp.made) - 1; i >= 0; i-- {
		errs = append(errs, Command("ip", "netns", "del", tp.made[i]))
	}
	tp.made = nil
	return errors.Join(errs...)
}

// Command runs a setup command and returns its output in the error.
func Command(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
