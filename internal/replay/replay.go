// Package replay reads pcap files into flow.Packets, for tests, benchmarks and
// offline runs of the pipeline. It exists so that every package's tests read
// captures the same way the daemon parses live packets.
package replay

import (
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/gopacket/gopacket/pcapgo"

	"github.com/m-lab/packet-headers/flow"
)

// Packet is a parsed packet together with the bytes it was parsed from.
type Packet struct {
	flow.Packet
	// Raw is the packet as it was captured (a copy, owned by the caller).
	Raw []byte
}

// ReadFile reads a pcap file, gzipped if its name ends in .gz, and parses
// every packet as the capture goroutine would. Packets that do not parse are
// counted in bad and skipped.
func ReadFile(path string) (pkts []Packet, bad int, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	var r io.Reader = f
	if strings.HasSuffix(path, ".gz") {
		zr, err := gzip.NewReader(f)
		if err != nil {
			return nil, 0, fmt.Errorf("read %s: %w", path, err)
		}
		defer zr.Close()
		r = zr
	}
	return Read(r)
}

// Read reads an uncompressed pcap stream; see ReadFile.
func Read(r io.Reader) (pkts []Packet, bad int, err error) {
	pr, err := pcapgo.NewReader(r)
	if err != nil {
		return nil, 0, err
	}
	link := flow.LinkType(pr.LinkType())
	var b flow.Builder
	for {
		data, ci, err := pr.ReadPacketData()
		// A truncated last record (a capture cut short, as testdata's
		// v6.pcap) ends the file like EOF.
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return pkts, bad, nil
		}
		if err != nil {
			return pkts, bad, err
		}
		p, _, err := b.Build(data, link, ci.Timestamp.UnixNano(), ci.Length)
		if err != nil {
			bad++
			continue
		}
		pkts = append(pkts, Packet{Packet: p, Raw: append([]byte(nil), data...)})
	}
}
