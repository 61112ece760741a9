package main

import (
	"bufio"
	"compress/gzip"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/saver"
)

const inspectUsage = `Usage: packet-headers inspect [-json] FILE...

Prints the capture record of each file (a .pcap.gz written by packet-headers)
and a one-line summary read from its pcap stream: packets per direction,
duration, and whether the file holds the whole flow, and if not, why. Files
written before capture records were added have none; their summary still
counts their packets. With -json, one JSON object per file and line:
{"file": ..., "record": the record as stored or null, "summary": {...}}.
Exit code 1 if a file could not be read.
`

// runInspect is the inspect subcommand. It returns the exit code: 0, 1 if a
// file could not be read, 2 on bad arguments.
func runInspect(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("packet-headers inspect", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print one JSON object per file: its record and its summary")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), inspectUsage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	out := bufio.NewWriter(stdout)
	code := 0
	for _, path := range fs.Args() {
		fi, err := inspectFile(path)
		if err != nil {
			fmt.Fprintf(stderr, "packet-headers inspect: %v\n", err)
			code = 1
			continue
		}
		if *asJSON {
			b, err := json.Marshal(fi)
			if err != nil {
				fmt.Fprintf(stderr, "packet-headers inspect: %s: %v\n", path, err)
				code = 1
				continue
			}
			out.Write(b)
			out.WriteByte('\n')
		} else {
			fi.writeText(out)
		}
	}
	if err := out.Flush(); err != nil {
		fmt.Fprintf(stderr, "packet-headers inspect: %v\n", err)
		return 1
	}
	return code
}

// fileInfo is what inspect tells of one file.
type fileInfo struct {
	File string `json:"file"`
	// Record is the record as stored in the gzip header (compact), or
	// null.
	Record json.RawMessage `json:"record"`
	// RecordError says why a comment that is there is no record.
	RecordError string `json:"record_error,omitempty"`
	rec         *saver.Record
	// recErr says why there is no record.
	recErr  error
	name    string  // the gzip header's FNAME
	Summary summary `json:"summary"`
}

// summary is what the file's pcap stream and record say together.
type summary struct {
	Packets     int         `json:"packets"`
	Directions  []direction `json:"directions"`
	Unparsed    int         `json:"unparsed,omitempty"` // records that are not TCP over IP
	FirstPacket string      `json:"first_packet,omitempty"`
	LastPacket  string      `json:"last_packet,omitempty"`
	DurationNS  int64       `json:"duration_ns"`
	SYN         bool        `json:"syn"`
	FINOrRST    bool        `json:"fin_or_rst"`
	// Complete is null without a record.
	Complete *bool `json:"complete"`
	// Incomplete are the record's reasons (saver.IncompleteReasons).
	Incomplete []string `json:"incomplete,omitempty"`
	// Warnings are disagreements between the record and the file.
	Warnings []string `json:"warnings,omitempty"`
	first    int64
}

// direction counts the packets sent by one endpoint.
type direction struct {
	From    string `json:"from"`
	To      string `json:"to"`
	Packets int    `json:"packets"`
}

// inspectFile reads path's gzip header and pcap stream.
func inspectFile(path string) (*fileInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	zr, err := gzip.NewReader(bufio.NewReader(f))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	fi := &fileInfo{File: path, name: zr.Name}
	fi.rec, fi.recErr = saver.ParseRecord(zr.Comment)
	switch {
	case fi.recErr == nil:
		fi.Record = json.RawMessage(strings.TrimRight(zr.Comment, " "))
	case !errors.Is(fi.recErr, saver.ErrNoRecord):
		fi.RecordError = fi.recErr.Error()
	}
	if err := fi.Summary.read(zr); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	fi.check()
	return fi, nil
}

// read reads a pcap stream: classic pcap, either byte order, microsecond or
// nanosecond timestamps.
func (s *summary) read(r io.Reader) error {
	var h [24]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return fmt.Errorf("pcap header: %w", err)
	}
	var bo binary.ByteOrder = binary.LittleEndian
	var unit int64
	switch binary.LittleEndian.Uint32(h[:]) {
	case 0xa1b2c3d4:
		unit = 1e3
	case 0xa1b23c4d:
		unit = 1
	case 0xd4c3b2a1:
		bo, unit = binary.BigEndian, 1e3
	case 0x4d3cb2a1:
		bo, unit = binary.BigEndian, 1
	default:
		return fmt.Errorf("not a pcap stream (magic % x)", h[:4])
	}
	link := flow.LinkType(bo.Uint32(h[20:]) & 0xffff)
	seen := map[[2]netip.AddrPort]int{} // index in Directions
	var rh [16]byte
	var data []byte
	for {
		if _, err := io.ReadFull(r, rh[:]); err == io.EOF {
			break
		} else if err != nil {
			return fmt.Errorf("record %d: %w", s.Packets+1, err)
		}
		ts := int64(bo.Uint32(rh[0:]))*1e9 + int64(bo.Uint32(rh[4:]))*unit
		caplen := bo.Uint32(rh[8:])
		if caplen > 1<<18 {
			return fmt.Errorf("record %d: caplen %d", s.Packets+1, caplen)
		}
		if cap(data) < int(caplen) {
			data = make([]byte, caplen)
		}
		data = data[:caplen]
		if _, err := io.ReadFull(r, data); err != nil {
			return fmt.Errorf("record %d: %w", s.Packets+1, err)
		}
		if s.Packets == 0 {
			s.first = ts
			s.FirstPacket = saver.FormatRecordTime(ts)
		}
		s.Packets++
		s.LastPacket = saver.FormatRecordTime(ts)
		s.DurationNS = ts - s.first
		h, err := flow.Parse(data, link)
		if err != nil || h.L4+14 > len(data) {
			s.Unparsed++
			continue
		}
		from, to := endpoints(data, h)
		i, ok := seen[[2]netip.AddrPort{from, to}]
		if !ok {
			i = len(s.Directions)
			seen[[2]netip.AddrPort{from, to}] = i
			s.Directions = append(s.Directions, direction{From: from.String(), To: to.String()})
		}
		s.Directions[i].Packets++
		fl := data[h.L4+13]
		s.SYN = s.SYN || fl&0x02 != 0
		s.FINOrRST = s.FINOrRST || fl&0x05 != 0
	}
	return nil
}

// endpoints returns the source and destination of a parsed packet.
func endpoints(data []byte, h flow.Header) (from, to netip.AddrPort) {
	var src, dst netip.Addr
	if h.IPv6 {
		src = netip.AddrFrom16([16]byte(data[h.L3+8 : h.L3+24]))
		dst = netip.AddrFrom16([16]byte(data[h.L3+24 : h.L3+40]))
	} else {
		src = netip.AddrFrom4([4]byte(data[h.L3+12 : h.L3+16]))
		dst = netip.AddrFrom4([4]byte(data[h.L3+16 : h.L3+20]))
	}
	sp := binary.BigEndian.Uint16(data[h.L4:])
	dp := binary.BigEndian.Uint16(data[h.L4+2:])
	return netip.AddrPortFrom(src, sp), netip.AddrPortFrom(dst, dp)
}

// check judges the file's completeness from its record, and notes where the
// record and the file disagree.
func (fi *fileInfo) check() {
	s := &fi.Summary
	r := fi.rec
	if r == nil {
		return
	}
	s.Incomplete = r.Incomplete()
	complete := len(s.Incomplete) == 0
	s.Complete = &complete
	if r.Packets != uint64(s.Packets) {
		s.Warnings = append(s.Warnings, fmt.Sprintf("the record says %d packets, the file holds %d", r.Packets, s.Packets))
	}
	if fi.name != r.UUID+".pcap" {
		s.Warnings = append(s.Warnings, fmt.Sprintf("the gzip header names %q, the record's uuid is %q", fi.name, r.UUID))
	}
	if s.Packets > 0 && (r.FirstPacket != s.FirstPacket || r.LastPacket != s.LastPacket) {
		s.Warnings = append(s.Warnings, fmt.Sprintf("the record's packets span %s to %s, the file's %s to %s", r.FirstPacket, r.LastPacket, s.FirstPacket, s.LastPacket))
	}
}

// writeText prints the record one field a line, then the summary.
func (fi *fileInfo) writeText(w io.Writer) {
	fmt.Fprintln(w, fi.File)
	field := func(k, v string) { fmt.Fprintf(w, "  %-16s %s\n", k, v) }
	if r := fi.rec; r != nil {
		field("uuid", r.UUID)
		field("version", r.Version)
		field("source", r.Source)
		field("anonymization", r.Anonymization)
		field("interfaces", strings.Join(r.Interfaces, ","))
		field("first_packet", r.FirstPacket)
		field("last_packet", r.LastPacket)
		field("packets", strconv.FormatUint(r.Packets, 10))
		m := r.MissedPackets
		missed := "none"
		if m != (saver.Missed{}) {
			missed = fmt.Sprintf("duration %d, pending %d, backlog %d", m.Duration, m.Pending, m.Backlog)
		}
		field("missed_packets", missed)
		field("truncated", strconv.FormatBool(r.Truncated))
		kd := "unknown"
		if r.KernelDrops != nil {
			kd = strconv.FormatUint(*r.KernelDrops, 10) + " (on the capture socket, not only this flow's)"
		}
		field("kernel_drops", kd)
		field("syn_seen", strconv.FormatBool(r.SYNSeen))
		field("fin_or_rst_seen", strconv.FormatBool(r.FINOrRSTSeen))
	} else if errors.Is(fi.recErr, saver.ErrNoRecord) {
		field("record", "none: written before capture records, or by another program")
	} else {
		field("record", "unreadable: "+fi.recErr.Error())
	}
	field("summary", fi.summaryLine())
	for _, warn := range fi.Summary.Warnings {
		field("warning", warn)
	}
}

// summaryLine is the one-line summary: packets per direction, duration,
// complete or not and why.
func (fi *fileInfo) summaryLine() string {
	s := &fi.Summary
	var b strings.Builder
	fmt.Fprintf(&b, "%d packets", s.Packets)
	if len(s.Directions) > 0 {
		parts := make([]string, 0, len(s.Directions))
		for i, d := range s.Directions {
			if i == 1 && len(s.Directions) == 2 && d.From == s.Directions[0].To && d.To == s.Directions[0].From {
				parts = append(parts, fmt.Sprintf("%d back", d.Packets))
				continue
			}
			parts = append(parts, fmt.Sprintf("%d %s > %s", d.Packets, d.From, d.To))
		}
		if s.Unparsed > 0 {
			parts = append(parts, fmt.Sprintf("%d not TCP/IP", s.Unparsed))
		}
		fmt.Fprintf(&b, " (%s)", strings.Join(parts, ", "))
	}
	fmt.Fprintf(&b, ", %v", time.Duration(s.DurationNS))
	switch {
	case s.Complete == nil:
		seen := "no SYN"
		if s.SYN {
			seen = "a SYN"
		}
		if s.FINOrRST {
			seen += " and a FIN or RST"
		} else {
			seen += " and no FIN or RST"
		}
		fmt.Fprintf(&b, ", completeness unknown (no record; the pcap holds %s)", seen)
	case *s.Complete:
		b.WriteString(", complete")
	default:
		word := "incomplete"
		if len(s.Incomplete) == 1 && s.Incomplete[0] == "kerneldrops" {
			word = "possibly incomplete"
		}
		why := make([]string, 0, len(s.Incomplete))
		for _, reason := range s.Incomplete {
			why = append(why, explain(fi.rec, reason))
		}
		fmt.Fprintf(&b, ", %s: %s", word, strings.Join(why, "; "))
	}
	return b.String()
}

// explain says what an incompleteness reason means for the record r.
func explain(r *saver.Record, reason string) string {
	m := r.MissedPackets
	switch reason {
	case "truncated":
		if m.Duration > 0 {
			return fmt.Sprintf("truncated by -captureduration (%d later packets seen and not written)", m.Duration)
		}
		return "truncated by -captureduration"
	case "pending":
		return fmt.Sprintf("%d packets dropped while the flow waited for its UUID", m.Pending)
	case "backlog":
		return fmt.Sprintf("%d packets dropped because the saver fell behind", m.Backlog)
	case "kerneldrops":
		return fmt.Sprintf("the kernel dropped %d packets on the capture socket meanwhile, perhaps some of this flow's", *r.KernelDrops)
	case "nosyn":
		return "no SYN: the connection's start is missing"
	case "nofinrst":
		return "no FIN or RST: the flow went idle for -flowtimeout, or the daemon stopped, before its end"
	}
	return reason
}
