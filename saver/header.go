package saver

import (
	"bytes"
	"encoding/binary"
	"io"

	"github.com/m-lab/packet-headers/flow"
)

// The gzip header of a file (RFC 1952): FNAME is "<UUID>.pcap", so that
// gunzip -N restores the name; MTIME is the flow's first packet, in seconds;
// FCOMMENT is the capture record, one line of JSON (Record), then NUL.
//
// A file whose whole pcap stream fits in one chunk (chunkSize, as most flows
// do) gets its header when it is complete, with the record exactly. A longer
// one must write its first chunk before the flow ends (in stream mode, to its
// file), so its header goes first with a comment of spaces that reserves room
// for the record (reserveHeader); at the end the record is written into that
// room, padded with spaces (JSON allows them after the value), in place: a
// pwrite at its offset in stream mode, a copy into the buffer otherwise. A
// record that does not fit (counts beyond the room reserved for them, see
// reservePackets) gets a header of its own size and the file is rewritten
// behind it. The two modes take the same steps at the same points
// of the stream, so their files stay byte-identical.

// The room a header written before the flow's end reserves is the record
// as it would read with the counts that are not known yet at their reserved
// widths (reserveHeader): a file gets such a header only once its pcap
// stream passes one chunk (128 KiB, a thousand packets or more), so its
// final count is reserved at reservePackets' width, and its kernel drops at
// one digit more than they already are (at least two). Reasons for missed
// packets that are not known yet (duration, backlog) get no room: a record
// that does not fit, as when a long flow is truncated while packets still
// came, costs a rewrite of the file (in the kernel, with copy_file_range)
// but keeps the file's size exact. Room reserved and not used is spaces:
// with 7 digits reserved, a long file's record is at most 3 bytes longer
// than it needs (a count of 1,000 packets, a false fin_or_rst_seen).
const reservePackets = 9_999_999

// TCP flags, in byte 13 of the TCP header.
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
)

// tcpFlags returns p's TCP flags, or 0 if its bytes end before them.
func tcpFlags(p *flow.Packet) byte {
	if i := int(p.L4) + 13; i < len(p.Data) {
		return p.Data[i]
	}
	return 0
}

// source writes p's source address into a and returns its length (4 or 16,
// 0 if p's bytes end before it) and p's source port.
func source(p *flow.Packet, a *[16]byte) (uint8, uint16) {
	l3, l4 := int(p.L3), int(p.L4)
	var port uint16
	if l4+2 <= len(p.Data) {
		port = binary.BigEndian.Uint16(p.Data[l4:])
	}
	off, n := l3+12, 4
	if p.IPv6 {
		off, n = l3+8, 16
	}
	if off+n > len(p.Data) {
		return 0, port
	}
	copy(a[:], p.Data[off:off+n])
	return uint8(n), port
}

// flags notes the SYN, FIN and RST of a packet written, and which side sent
// each FIN.
func (s *Saver) flags(p *flow.Packet, fl byte) {
	if fl&tcpSYN != 0 {
		s.syn = true
	}
	if fl&tcpRST != 0 {
		s.rst = true
	}
	if fl&tcpFIN != 0 {
		var a [16]byte
		n, port := source(p, &a)
		side := 1
		if n == s.srcLen && port == s.srcPort && a == s.src {
			side = 0
		}
		s.fin[side] = true
	}
}

// closedConn reports whether the connection was seen to end: a RST, or a FIN
// from each side.
func (s *Saver) closedConn() bool { return s.rst || s.fin[0] && s.fin[1] }

func (s *Saver) gzipName() string { return s.uuid + ".pcap" }

// mtime is the gzip header's MTIME: the first packet's time, in seconds.
func (s *Saver) mtime() uint32 { return uint32(max(s.first, 0) / 1e9) }

// record returns the file's capture record; backlog is the packets Queue
// dropped for a full backlog.
func (s *Saver) record(why ending, backlog uint64) *Record {
	r := &Record{
		UUID:          s.uuid,
		Version:       s.cfg.Version,
		Source:        s.cfg.Source,
		Anonymization: s.cfg.Anonymization,
		Interfaces:    s.cfg.Interfaces,
		FirstPacket:   FormatRecordTime(s.first),
		LastPacket:    FormatRecordTime(s.last),
		Packets:       uint64(s.w.records),
		MissedPackets: Missed{Duration: s.missedCut, Pending: s.missedPending, Backlog: backlog},
		// Ended by the capture duration before the flow ended: a packet
		// came after it, or the clock ended it while the connection was
		// still open.
		Truncated:    s.cut || s.missedCut > 0 || why == endTimer && !s.closedConn(),
		SYNSeen:      s.syn,
		FINOrRSTSeen: s.fin[0] || s.fin[1] || s.rst,
	}
	if s.cfg.Drops != nil {
		n := s.cfg.Drops.KernelDropsSince(s.first)
		r.KernelDrops = &n
	}
	return r
}

// reserveHeader returns the gzip header written before the flow's end, whose
// comment reserves room for the record: the record with the counts not
// known yet at their reserved widths, and each flag that can still change at
// its longer word (false). syn_seen cannot: a SYN comes first.
func (s *Saver) reserveHeader() []byte {
	if s.cfg.noRecord {
		return plainGzipHeader[:]
	}
	r := Record{
		UUID:          s.uuid,
		Version:       s.cfg.Version,
		Source:        s.cfg.Source,
		Anonymization: s.cfg.Anonymization,
		Interfaces:    s.cfg.Interfaces,
		FirstPacket:   FormatRecordTime(s.first),
		LastPacket:    FormatRecordTime(s.first), // every time has the same width
		Packets:       max(reservePackets, uint64(s.w.records)),
		// Known already: the demuxer set it before Run.
		MissedPackets: Missed{Pending: s.missedPending},
		SYNSeen:       s.syn,
	}
	if s.cfg.Drops != nil {
		n := max(99, s.cfg.Drops.KernelDropsSince(s.first)*10+9)
		r.KernelDrops = &n
	}
	b, err := r.marshal()
	if err != nil {
		// Nothing in a Record fails to marshal; should it, the record
		// is written at the end, behind a header of its own size.
		b = nil
	}
	s.reserved = len(b)
	return gzipHeader(s.mtime(), s.gzipName(), nil, s.reserved)
}

// endHeader ends the file's gzip member with the capture record in its
// header, and returns the record (nil without one). It counts as missed for
// the capture duration the packets still queued, which will be dropped.
func (s *Saver) endHeader(why ending) (*Record, error) {
	s.mu.Lock()
	s.missedCut += uint64(len(s.queue))
	backlog := s.missedBacklog
	s.mu.Unlock()
	if s.cfg.noRecord {
		return nil, s.w.close(plainGzipHeader[:])
	}
	rec := s.record(why, backlog)
	comment, err := rec.marshal()
	if err != nil {
		return nil, err
	}
	if s.w.head == nil {
		// Nothing written yet: the header is the final one.
		return rec, s.w.close(gzipHeader(s.mtime(), s.gzipName(), comment, len(comment)))
	}
	if err := s.w.close(nil); err != nil {
		return nil, err
	}
	if len(comment) <= s.reserved {
		room := append(comment, bytes.Repeat([]byte{' '}, s.reserved-len(comment))...)
		return rec, s.fillIn(commentOffset(s.gzipName()), room)
	}
	return rec, s.rewrite(gzipHeader(s.mtime(), s.gzipName(), comment, len(comment)))
}

// fillIn writes b at offset off of the file.
func (s *Saver) fillIn(off int, b []byte) error {
	if s.file == nil {
		copy(s.buf.Bytes()[off:], b)
		return nil
	}
	_, err := s.file.WriteAt(b, int64(off))
	return err
}

// rewrite replaces the header written early with head, of another size: the
// buffer is copied behind it, or the unnamed file into a new one (the kernel
// copies, with copy_file_range).
func (s *Saver) rewrite(head []byte) error {
	old := len(s.w.head)
	if s.file == nil {
		b := bytes.NewBuffer(make([]byte, 0, len(head)+s.buf.Len()-old))
		b.Write(head)
		b.Write(s.buf.Bytes()[old:])
		s.buf = b
	} else {
		f, err := createHidden(s.dirPath)
		if err != nil {
			return err
		}
		_, err = f.Write(head)
		if err == nil {
			_, err = s.file.Seek(int64(old), io.SeekStart)
		}
		if err == nil {
			_, err = io.Copy(f, s.file)
		}
		if err != nil {
			f.Close() // unnamed: the kernel frees it
			return err
		}
		s.file.Close() // the old unnamed file, freed; its close error means nothing
		s.file = f
	}
	s.w.out.n += int64(len(head) - old)
	s.w.head = head
	return nil
}

// countRecord exports what a published file's record says: its kernel drops
// and why it is incomplete.
func (c *Pool) countRecord(r *Record) {
	if r == nil {
		return
	}
	if r.KernelDrops != nil {
		c.Metrics.FileKernelDrops.Observe(float64(*r.KernelDrops))
	}
	for _, why := range r.Incomplete() {
		for i, reason := range IncompleteReasons {
			if why == reason {
				c.incomplete[i].Inc()
			}
		}
	}
}
