package saver

import (
	"encoding/json"
	"errors"
	"strconv"
	"time"
	"unicode/utf16"
	"unicode/utf8"
)

// Record is a file's record of its own capture: what a researcher needs to
// judge whether the file holds the whole flow. It is one line of JSON in the
// gzip header's comment (FCOMMENT, RFC 1952), which no reader of the
// decompressed pcap stream sees (see README.md, "The capture record", for
// what each field means and its limits).
//
// It holds no address: under -anonymize.ip=netblock nothing in it reveals
// more than the pcap records do.
type Record struct {
	UUID string `json:"uuid"`
	// Version is the daemon's version and commit, as "v1.2.3+abc1234".
	Version string `json:"version"`
	// Source is where the UUID came from: "tcpinfo" or "standalone".
	Source string `json:"source"`
	// Anonymization is the -anonymize.ip method: "none" or "netblock".
	Anonymization string `json:"anonymization"`
	// Interfaces are the capture's interfaces: ["any"] for the socket on
	// every interface, or the -interface names.
	Interfaces []string `json:"interfaces"`
	// FirstPacket and LastPacket are the capture times of the file's first
	// and last records, RFC 3339 in UTC with nanoseconds.
	FirstPacket string `json:"first_packet"`
	LastPacket  string `json:"last_packet"`
	// Packets is the number of records in the file.
	Packets uint64 `json:"packets"`
	// MissedPackets are the packets of the flow that the daemon saw and
	// did not write, by reason.
	MissedPackets Missed `json:"missed_packets"`
	// Truncated is true when -captureduration ended the file before the
	// flow ended.
	Truncated bool `json:"truncated"`
	// KernelDrops is how much the capture sockets' kernel drop counter grew
	// between the flow's first packet and the file's publication: an upper
	// bound of the packets the flow may have lost in the kernel (the
	// counter is per socket, not per flow). nil (null) if unknown.
	KernelDrops *uint64 `json:"kernel_drops"`
	// SYNSeen is true when the file holds a SYN (or SYN-ACK): the
	// connection's start.
	SYNSeen bool `json:"syn_seen"`
	// FINOrRSTSeen is true when the file holds a FIN or a RST.
	FINOrRSTSeen bool `json:"fin_or_rst_seen"`
}

// Missed counts the packets of a flow seen by the daemon and not written to
// its file, by reason. A reason with none is left out of the JSON.
type Missed struct {
	// Duration: packets captured after -captureduration ended the file
	// that reached the saver before the file was published (packets that
	// came later are not counted: see Truncated).
	Duration uint64 `json:"duration,omitempty"`
	// Pending: packets dropped while the flow waited for its UUID, beyond
	// the per-flow or overall pending limits.
	Pending uint64 `json:"pending,omitempty"`
	// Backlog: packets dropped because the saver was too far behind
	// (its backlog was full, as when the disk stalls).
	Backlog uint64 `json:"backlog,omitempty"`
}

// RecordTimeFormat is the format of FirstPacket and LastPacket: RFC 3339 with
// nanoseconds, always nine digits, so that every time has the same width.
const RecordTimeFormat = "2006-01-02T15:04:05.000000000Z07:00"

// FormatRecordTime formats t (Unix ns) as the record does, in UTC.
func FormatRecordTime(t int64) string {
	return time.Unix(0, t).UTC().Format(RecordTimeFormat)
}

// IncompleteReasons are the reasons Record.Incomplete gives, in its order:
// the values of pcap_saver_files_incomplete_total's reason label.
var IncompleteReasons = []string{"truncated", "pending", "backlog", "kerneldrops", "nosyn", "nofinrst"}

// Incomplete returns why the file may not hold the whole flow, in the order
// of IncompleteReasons, or nothing if it holds it all as far as the daemon
// knows:
//
//   - truncated: -captureduration ended the file before the flow ended;
//   - pending, backlog: MissedPackets counts packets for that reason;
//   - kerneldrops: the kernel dropped packets on the capture socket while the
//     flow ran, perhaps some of this flow's (KernelDrops is an upper bound);
//   - nosyn: the file does not hold the connection's start (it began before
//     the capture, or its SYN was lost);
//   - nofinrst: the file holds no FIN or RST and was not truncated: the flow
//     went idle for -flowtimeout, or the daemon stopped, before it ended.
func (r *Record) Incomplete() []string {
	var why []string
	truncated := r.Truncated || r.MissedPackets.Duration > 0
	if truncated {
		why = append(why, "truncated")
	}
	if r.MissedPackets.Pending > 0 {
		why = append(why, "pending")
	}
	if r.MissedPackets.Backlog > 0 {
		why = append(why, "backlog")
	}
	if r.KernelDrops != nil && *r.KernelDrops > 0 {
		why = append(why, "kerneldrops")
	}
	if !r.SYNSeen {
		why = append(why, "nosyn")
	}
	if !r.FINOrRSTSeen && !truncated {
		why = append(why, "nofinrst")
	}
	return why
}

// marshal returns the record as one line of ASCII JSON, as encoding/json
// writes it (keys in the struct's order, no HTML escaping), but written by
// hand, which costs a fifth of the reflection: the gzip comment is ISO
// 8859-1, so every other character is escaped (\uXXXX).
func (r *Record) marshal() ([]byte, error) {
	return r.appendJSON(make([]byte, 0, 384)), nil
}

func (r *Record) appendJSON(b []byte) []byte {
	b = append(b, `{"uuid":`...)
	b = appendJSONString(b, r.UUID)
	b = append(b, `,"version":`...)
	b = appendJSONString(b, r.Version)
	b = append(b, `,"source":`...)
	b = appendJSONString(b, r.Source)
	b = append(b, `,"anonymization":`...)
	b = appendJSONString(b, r.Anonymization)
	b = append(b, `,"interfaces":[`...)
	for i, n := range r.Interfaces {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendJSONString(b, n)
	}
	b = append(b, `],"first_packet":`...)
	b = appendJSONString(b, r.FirstPacket)
	b = append(b, `,"last_packet":`...)
	b = appendJSONString(b, r.LastPacket)
	b = append(b, `,"packets":`...)
	b = strconv.AppendUint(b, r.Packets, 10)
	b = append(b, `,"missed_packets":{`...)
	sep := ""
	for _, m := range [...]struct {
		key string
		n   uint64
	}{{"duration", r.MissedPackets.Duration}, {"pending", r.MissedPackets.Pending}, {"backlog", r.MissedPackets.Backlog}} {
		if m.n == 0 {
			continue
		}
		b = append(b, sep...)
		b = append(b, '"')
		b = append(b, m.key...)
		b = append(b, `":`...)
		b = strconv.AppendUint(b, m.n, 10)
		sep = ","
	}
	b = append(b, `},"truncated":`...)
	b = strconv.AppendBool(b, r.Truncated)
	b = append(b, `,"kernel_drops":`...)
	if r.KernelDrops == nil {
		b = append(b, "null"...)
	} else {
		b = strconv.AppendUint(b, *r.KernelDrops, 10)
	}
	b = append(b, `,"syn_seen":`...)
	b = strconv.AppendBool(b, r.SYNSeen)
	b = append(b, `,"fin_or_rst_seen":`...)
	b = strconv.AppendBool(b, r.FINOrRSTSeen)
	return append(b, '}')
}

// appendJSONString appends s as a JSON string of ASCII characters: quotes,
// backslashes and control characters escaped as encoding/json escapes them,
// every non-ASCII character as \uXXXX (a surrogate pair beyond the BMP),
// and invalid UTF-8 as \ufffd.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c < utf8.RuneSelf && c != '"' && c != '\\' {
			b = append(b, c)
			i++
			continue
		}
		if c < utf8.RuneSelf {
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, `\n`...)
			case '\r':
				b = append(b, `\r`...)
			case '\t':
				b = append(b, `\t`...)
			default:
				b = appendU(b, rune(c))
			}
			i++
			continue
		}
		r, n := utf8.DecodeRuneInString(s[i:])
		i += n
		if r1, r2 := utf16.EncodeRune(r); r1 != utf8.RuneError {
			b = appendU(appendU(b, r1), r2)
		} else {
			b = appendU(b, r)
		}
	}
	return append(b, '"')
}

func appendU(b []byte, r rune) []byte {
	const hex = "0123456789abcdef"
	return append(b, '\\', 'u', hex[r>>12&0xf], hex[r>>8&0xf], hex[r>>4&0xf], hex[r&0xf])
}

// ErrNoRecord is returned by ParseRecord for a gzip comment that holds no
// capture record: a file written before records were added has none.
var ErrNoRecord = errors.New("no capture record in the gzip header")

// ParseRecord parses the record in a gzip header's comment (Go's
// gzip.Reader gives it as Header.Comment). Unknown fields are ignored, so
// that records of later versions still read.
func ParseRecord(comment string) (*Record, error) {
	if comment == "" {
		return nil, ErrNoRecord
	}
	var r Record
	if err := json.Unmarshal([]byte(comment), &r); err != nil {
		return nil, err
	}
	if r.UUID == "" {
		return nil, ErrNoRecord
	}
	return &r, nil
}

// gzip header flags (RFC 1952).
const (
	gzipFNAME    = 1 << 3
	gzipFCOMMENT = 1 << 4
)

// plainGzipHeader is a gzip member header with no name, time or comment, as
// files were written before the capture record.
var plainGzipHeader = [10]byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3}

// gzipHeader returns a gzip member header (deflate, OS Unix) with the
// modification time mtime (Unix seconds), the original file name name
// (FNAME) and the comment (FCOMMENT) padded with spaces to size bytes, which
// JSON allows after its value. name and comment must hold no NUL.
func gzipHeader(mtime uint32, name string, comment []byte, size int) []byte {
	b := make([]byte, 0, 10+len(name)+1+max(size, len(comment))+1)
	b = append(b, 0x1f, 0x8b, 8, gzipFNAME|gzipFCOMMENT,
		byte(mtime), byte(mtime>>8), byte(mtime>>16), byte(mtime>>24), 0, 3)
	b = append(b, name...)
	b = append(b, 0)
	b = append(b, comment...)
	for range size - len(comment) {
		b = append(b, ' ')
	}
	return append(b, 0)
}

// commentOffset is where the comment starts in a header from gzipHeader.
func commentOffset(name string) int { return 10 + len(name) + 1 }
