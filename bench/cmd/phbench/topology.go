package main

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"

	"github.com/m-lab/packet-headers/internal/topo"
)

// newTopology creates the two namespaces and the veth pair between them
// (internal/topo): namespaces phbs<id> and phbc<id>, interfaces vs<id> and
// vc<id>, segmentation offloads off unless offloads. id carries the PID and
// the run number so that concurrent benchmarks and tests never collide. It
// is removed by cleanup.
func newTopology(id string, offloads bool, cleanup *stack) (*topo.Topology, error) {
	off := topo.SegmentationOffloads
	if offloads {
		off = nil
	}
	tp, err := topo.New("phb", id, off)
	if err != nil {
		return nil, err
	}
	cleanup.push("delete namespaces "+tp.Server+" and "+tp.Client, tp.Close)
	return tp, nil
}

// addIdleInterfaces adds n idle veth pairs, up, to namespace ns, with one
// ip -batch; they go with the namespace.
func addIdleInterfaces(ns string, n int) error {
	if n <= 0 {
		return nil
	}
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "link add idla%d type veth peer name idlb%d\nlink set idla%d up\nlink set idlb%d up\n", i, i, i, i)
	}
	cmd := exec.Command("ip", "-n", ns, "-batch", "-")
	cmd.Stdin = strings.NewReader(b.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("add %d idle interfaces: %v: %s", n, err, out)
	}
	return nil
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
