package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"golang.org/x/sys/unix"
)

// Addresses of the benchmark's link: the server (daemon, tcp-info, floor
// tcpdump, phload serve) and the client (phload's client, reference
// tcpdump). Only the benchmarking range 198.18.0.0/15 and the documentation
// range 2001:db8::/32 are ever used, and only inside the namespaces.
const (
	serverV4 = "198.18.0.1"
	clientV4 = "198.18.0.2"
	serverV6 = "2001:db8::1"
	clientV6 = "2001:db8::2"
)

// topology is two network namespaces joined by a veth pair.
type topology struct {
	server, client     string // namespace names
	serverIf, clientIf string // veth ends
	serverNS           *os.File
}

// newTopology creates the namespaces and the link. Names carry the PID and
// the run number so that concurrent benchmarks and tests never collide.
// Whatever was created is registered on cleanup before the next step, so an
// error half-way leaves nothing behind.
func newTopology(id string, offloads bool, cleanup *stack) (*topology, error) {
	tp := &topology{
		server:   "phbs" + id,
		client:   "phbc" + id,
		serverIf: "vs" + id,
		clientIf: "vc" + id,
	}
	if len(tp.serverIf) > unix.IFNAMSIZ-1 {
		return nil, fmt.Errorf("interface name %s too long", tp.serverIf)
	}
	for _, ns := range []string{tp.server, tp.client} {
		if err := command("ip", "netns", "add", ns); err != nil {
			return nil, err
		}
		cleanup.push("delete namespace "+ns, func() error { return command("ip", "netns", "del", ns) })
	}
	// The veth pair goes away with the namespaces.
	if err := command("ip", "link", "add", tp.serverIf, "netns", tp.server, "type", "veth", "peer", "name", tp.clientIf, "netns", tp.client); err != nil {
		return nil, err
	}
	for _, s := range []struct{ ns, ifc, v4, v6 string }{
		{tp.server, tp.serverIf, serverV4, serverV6},
		{tp.client, tp.clientIf, clientV4, clientV6},
	} {
		steps := [][]string{
			{"ip", "-n", s.ns, "link", "set", "lo", "up"},
			{"ip", "-n", s.ns, "addr", "add", s.v4 + "/24", "dev", s.ifc},
			// nodad: the address is usable at once rather than after
			// duplicate address detection (a second or more).
			{"ip", "-n", s.ns, "addr", "add", s.v6 + "/64", "dev", s.ifc, "nodad"},
			{"ip", "-n", s.ns, "link", "set", s.ifc, "up"},
		}
		if !offloads {
			// Segmentation offloads off: the wire carries MTU-sized
			// packets as a NIC would, and the capture sees each one
			// (with them on, veth passes 64 KB super-packets).
			steps = append(steps, []string{"ip", "netns", "exec", s.ns, "ethtool", "-K", s.ifc, "tso", "off", "gso", "off", "gro", "off"})
		}
		for _, st := range steps {
			if err := command(st[0], st[1:]...); err != nil {
				return nil, err
			}
		}
	}
	f, err := os.Open("/var/run/netns/" + tp.server)
	if err != nil {
		return nil, err
	}
	tp.serverNS = f
	cleanup.push("close namespace handle", f.Close)
	return tp, nil
}

// command runs a setup command and returns its output in the error.
func command(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// stack is a list of cleanup steps run last-in first-out. It is not safe for
// concurrent use.
type stack struct {
	steps []cleanupStep
}

type cleanupStep struct {
	what string
	fn   func() error
}

func (s *stack) push(what string, fn func() error) {
	s.steps = append(s.steps, cleanupStep{what, fn})
}

// run runs every step, newest first, and returns their errors joined.
func (s *stack) run() error {
	var errs []error
	for i := len(s.steps) - 1; i >= 0; i-- {
		if err := s.steps[i].fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.steps[i].what, err))
		}
	}
	s.steps = nil
	return errors.Join(errs...)
}

// linkStats are an interface's kernel counters.
type linkStats struct {
	RX struct {
		Packets uint64 `json:"packets"`
		Dropped uint64 `json:"dropped"`
	} `json:"rx"`
	TX struct {
		Packets uint64 `json:"packets"`
		Dropped uint64 `json:"dropped"`
	} `json:"tx"`
}

// readLinkStats reads the counters of interface ifc in namespace ns. They
// count every packet that crossed the link whatever any capture dropped,
// which makes them the denominator of the per-packet figures.
func readLinkStats(ns, ifc string) (linkStats, error) {
	out, err := exec.Command("ip", "-n", ns, "-s", "-j", "link", "show", "dev", ifc).Output()
	if err != nil {
		return linkStats{}, fmt.Errorf("ip -n %s -s -j link show dev %s: %w", ns, ifc, err)
	}
	var links []struct {
		Stats linkStats `json:"stats64"`
	}
	if err := json.Unmarshal(out, &links); err != nil || len(links) != 1 {
		return linkStats{}, fmt.Errorf("ip link show %s: unexpected output %q: %v", ifc, out, err)
	}
	return links[0].Stats, nil
}
