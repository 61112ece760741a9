package main

import (
	"bufio"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/gopacket/gopacket/pcapgo"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/internal/topo"
)

// record is one packet as compared: its original length and a hash of its
// bytes up to the end of the TCP header. The daemon cuts records there; the
// reference (tcpdump -s 256) has payload after it, which is ignored. A
// 64-bit hash rather than the bytes keeps a bulk run's reference (millions
// of packets) in tens of MB.
type record struct {
	len  uint32
	hash uint64
}

// directions is one flow's packets, each direction in capture order: the
// two ends of a link may see packets crossing in opposite directions in
// different orders, never packets of one direction.
type directions struct {
	up, down []record // client to server, server to client
}

// hashSeed is fixed for the process so that hashes of the reference and of
// the daemon's files compare.
var hashSeed = maphash.MakeSeed()

// pcapStats is what reading one capture found besides its packets.
type pcapStats struct {
	packets int
	bad     int // did not parse as TCP
	// payload counts records holding bytes beyond the TCP header: the
	// daemon must never write one.
	payload int
}

// readPcap streams a pcap file (gzipped if its name ends in .gz) and calls fn
// for every TCP packet with its flow key and direction. It parses packets
// with flow.Parse, as the daemon does. internal/replay.ReadFile would load
// the whole file with every packet's bytes, gigabytes for a bulk reference;
// this keeps 16 bytes per packet.
func readPcap(path string, fn func(k flow.Key, up bool, r record)) (pcapStats, error) {
	var st pcapStats
	f, err := os.Open(path)
	if err != nil {
		return st, err
	}
	defer f.Close()
	var r io.Reader = bufio.NewReaderSize(f, 1<<20)
	if strings.HasSuffix(path, ".gz") {
		zr, err := gzip.NewReader(r)
		if err != nil {
			return st, fmt.Errorf("%s: %w", path, err)
		}
		defer zr.Close()
		r = zr
	}
	pr, err := pcapgo.NewReader(r)
	if err != nil {
		return st, fmt.Errorf("%s: %w", path, err)
	}
	link := flow.LinkType(pr.LinkType())
	for {
		data, ci, err := pr.ReadPacketData()
		// tcpdump killed mid-write can leave a truncated last record.
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return st, nil
		}
		if err != nil {
			return st, fmt.Errorf("%s: %w", path, err)
		}
		h, err := flow.Parse(data, link)
		if err != nil {
			st.bad++
			continue
		}
		st.packets++
		end := min(h.End, len(data))
		if end < len(data) {
			st.payload++
		}
		_, dst := h.SrcDst(data)
		up := isServer(dst)
		fn(h.Key, up, record{len: uint32(ci.Length), hash: maphash.Bytes(hashSeed, data[:end])})
	}
}

var (
	serverV4Bytes = netip.MustParseAddr(topo.ServerV4).As4()
	serverV6Bytes = netip.MustParseAddr(topo.ServerV6).As16()
)

// isServer reports whether a raw IPv4 or IPv6 address is the server's.
func isServer(ip []byte) bool {
	switch len(ip) {
	case 4:
		return [4]byte(ip) == serverV4Bytes
	case 16:
		return [16]byte(ip) == serverV6Bytes
	}
	return false
}

// readFlows reads a capture into per-flow records.
func readFlows(path string) (map[flow.Key]*directions, pcapStats, error) {
	flows := map[flow.Key]*directions{}
	st, err := readPcap(path, func(k flow.Key, up bool, r record) {
		d := flows[k]
		if d == nil {
			d = &directions{}
			flows[k] = d
		}
		if up {
			d.up = append(d.up, r)
		} else {
			d.down = append(d.down, r)
		}
	})
	return flows, st, err
}

// loadFlow is one connection of the load, as phload's server recorded it.
type loadFlow struct {
	Client string `json:"client"`
	Server string `json:"server"`
	Cookie uint64 `json:"cookie"`
}

func readLoadFlows(path string) ([]loadFlow, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var fl []loadFlow
	if err := json.Unmarshal(b, &fl); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return fl, nil
}

// listFiles returns the daemon's published files by UUID.
func listFiles(dataDir string) (map[string]string, error) {
	files := map[string]string{}
	err := filepath.WalkDir(dataDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if uuid, ok := strings.CutSuffix(d.Name(), ".pcap.gz"); ok && !d.IsDir() {
			files[uuid] = p
		}
		return nil
	})
	return files, err
}

// matchResult is the comparison of the daemon's files with the reference.
type matchResult struct {
	Flows       int // connections of the load
	DupTuples   int // load flows whose 4-tuple another load flow reused (not comparable)
	Files       int // files published in all
	FilesOfLoad int // files named after a load flow's UUID
	// Complete counts load flows whose file holds exactly the reference's
	// packets: in each direction the same packets (header bytes and
	// original lengths), none missing, none extra.
	Complete int
	// RefOrder counts complete flows whose packets are also in the
	// reference's order in each direction. Packets of one direction can
	// cross a veth pair in a different order than they were sent (veth
	// queues each packet on the backlog of the sending CPU, and each CPU
	// drains its own), so this may be lower than Complete without any
	// fault of the daemon.
	RefOrder int

	RefPackets  int // reference packets of the load flows
	FilePackets int // packets in the files of the load flows
	Missing     int // reference packets of load flows missing from their file
	Extra       int // packets in files that the reference does not have
	// MissingInFloor counts the missing packets that the floor tcpdump
	// (on the daemon's interface) did see: these reached the server and
	// the daemon lost them, rather than the link.
	MissingInFloor int
	RefBad         int
	FileBad        int
	Payload        int            // records with bytes beyond the TCP header (must be 0)
	Reasons        map[string]int // why flows are not complete, by kind
	Examples       []string       // the first few mismatches, in words
	RefAllPacket   int            // every TCP packet of the reference
}

const maxExamples = 5

// match compares, for every load flow, the daemon's file named after its
// UUID with the reference's packets of its 4-tuple. The floor capture, when
// floorPath is not empty, tells a packet the link lost from one the daemon
// lost. It is no order reference: two packet sockets on one interface may
// receive packets handled on different CPUs in different orders (adjacent
// swaps within a microsecond are common with two CPUs).
func match(refPath, floorPath, flowsPath, dataDir, prefix string) (*matchResult, error) {
	ref, rst, err := readFlows(refPath)
	if err != nil {
		return nil, fmt.Errorf("reference: %w", err)
	}
	var floor map[flow.Key]*directions
	if floorPath != "" {
		if floor, _, err = readFlows(floorPath); err != nil {
			return nil, fmt.Errorf("floor: %w", err)
		}
	}
	load, err := readLoadFlows(flowsPath)
	if err != nil {
		return nil, err
	}
	files, err := listFiles(dataDir)
	if err != nil {
		return nil, err
	}
	m := &matchResult{Flows: len(load), Files: len(files), RefBad: rst.bad, Reasons: map[string]int{}, RefAllPacket: rst.packets}
	fail := func(kind, detail string) {
		m.Reasons[kind]++
		if len(m.Examples) < maxExamples {
			m.Examples = append(m.Examples, detail)
		}
	}
	keys := map[flow.Key]int{}
	for _, lf := range load {
		k, err := lf.key()
		if err != nil {
			return nil, err
		}
		keys[k]++
	}
	for _, lf := range load {
		k, _ := lf.key()
		want := ref[k]
		if keys[k] > 1 {
			m.DupTuples++
			continue
		}
		if want != nil {
			m.RefPackets += len(want.up) + len(want.down)
		}
		uuid := fmt.Sprintf("%s_%016X", prefix, lf.Cookie)
		path, ok := files[uuid]
		if !ok {
			if want != nil {
				m.Missing += len(want.up) + len(want.down)
			}
			fail("nofile", fmt.Sprintf("%s (%s): no file", uuid, lf.Client))
			continue
		}
		m.FilesOfLoad++
		got := &directions{}
		foreign := 0
		st, err := readPcap(path, func(fk flow.Key, up bool, r record) {
			if fk != k {
				foreign++
				return
			}
			if up {
				got.up = append(got.up, r)
			} else {
				got.down = append(got.down, r)
			}
		})
		if err != nil {
			fail("unreadable", fmt.Sprintf("%s: %v", uuid, err))
			continue
		}
		m.FilePackets += len(got.up) + len(got.down)
		m.FileBad += st.bad
		m.Payload += st.payload
		if foreign > 0 {
			fail("foreign", fmt.Sprintf("%s: %d packets of other flows", uuid, foreign))
			continue
		}
		if want == nil {
			fail("noreference", fmt.Sprintf("%s (%s): not in the reference", uuid, lf.Client))
			continue
		}
		var problems []string
		kind := ""
		for _, d := range []struct {
			name      string
			got, want []record
			floor     func(*directions) []record
		}{
			{"client to server", got.up, want.up, func(d *directions) []record { return d.up }},
			{"server to client", got.down, want.down, func(d *directions) []record { return d.down }},
		} {
			missing, extra := diff(d.got, d.want)
			if len(missing) == 0 && len(extra) == 0 {
				continue
			}
			m.Missing += len(missing)
			m.Extra += len(extra)
			inFloor := 0
			if fd := floor[k]; fd != nil {
				inFloor = len(missing) - len(subtract(missing, d.floor(fd)))
				m.MissingInFloor += inFloor
			}
			if kind == "" || len(missing) > 0 {
				kind = "extra"
				if len(missing) > 0 {
					kind = "missing"
				}
			}
			problems = append(problems, fmt.Sprintf("%s: %d packets, reference %d: %d missing (%d of them seen by the floor tcpdump), %d extra",
				d.name, len(d.got), len(d.want), len(missing), inFloor, len(extra)))
		}
		if len(problems) > 0 {
			fail(kind, fmt.Sprintf("%s (%s): %s", uuid, lf.Client, strings.Join(problems, "; ")))
			continue
		}
		m.Complete++
		if slices.Equal(got.up, want.up) && slices.Equal(got.down, want.down) {
			m.RefOrder++
		}
	}
	return m, nil
}

// diff returns the records of want that got lacks and those of got that
// want lacks, as multisets: order does not matter, repeats count.
func diff(got, want []record) (missing, extra []record) {
	return subtract(want, got), subtract(got, want)
}

// subtract returns the records of a that remain once each record of b has
// cancelled one equal record of a.
func subtract(a, b []record) []record {
	n := make(map[record]int, len(b))
	for _, r := range b {
		n[r]++
	}
	var out []record
	for _, r := range a {
		if n[r] > 0 {
			n[r]--
			continue
		}
		out = append(out, r)
	}
	return out
}

func (lf loadFlow) key() (flow.Key, error) {
	c, err1 := netip.ParseAddrPort(lf.Client)
	s, err2 := netip.ParseAddrPort(lf.Server)
	if err := errors.Join(err1, err2); err != nil {
		return flow.Key{}, fmt.Errorf("load flow %+v: %w", lf, err)
	}
	return flow.KeyFromAddrPorts(c, s), nil
}
