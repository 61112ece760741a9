package saver

import (
	"encoding/binary"
	"io"

	"github.com/klauspost/compress/gzip"
)

// The classic pcap file format, as M-Lab's ETL reads it: nanosecond magic,
// version 2.4, link type Ethernet, little-endian (as the original's files).
const (
	pcapMagicNanos   = 0xa1b23c4d
	pcapVersionMajor = 2
	pcapVersionMinor = 4
	linkTypeEthernet = 1
	fileHeaderLen    = 24
	recordHeaderLen  = 16

	// maxTCPHeader is the largest TCP header (data offset 15 words). The
	// snaplen of a file is the first packet's bytes before TCP plus this,
	// as in the original: 94 for plain IPv4, 114 for plain IPv6.
	maxTCPHeader = 60

	// chunkSize is how many uncompressed pcap bytes a saver gathers before
	// compressing them. Stateless deflate works on blocks of up to 32 KiB,
	// so larger chunks gain nothing in ratio, while a smaller one would cost
	// more compressor calls; a flow's RAM is at most one chunk plus what
	// it has compressed.
	chunkSize = 32 << 10
)

// pcapWriter encodes packet records into a pcap stream and compresses it
// into gzip, a chunk at a time, into out.
//
// The compressor is stateless (klauspost's StatelessCompression level): it
// keeps no window between chunks, so an idle flow holds no compressor memory
// (the standard library's gzip writer holds about 1 MB per flow, which is
// where the original's per-flow memory went). The output is a single gzip
// member and depends only on the records, so streaming and buffered modes
// produce identical bytes.
//
// A pcapWriter is not safe for concurrent use.
type pcapWriter struct {
	snaplen int
	chunk   []byte
	zw      *gzip.Writer
	out     *countingWriter
	records int
}

// countingWriter counts the bytes written through it and remembers the first
// error, so that no write error can be dropped.
type countingWriter struct {
	w   io.Writer
	n   int64
	err error
}

func (c *countingWriter) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	if err != nil {
		c.err = err
	}
	return n, err
}

// newPCAPWriter starts a pcap stream with the given snaplen.
func newPCAPWriter(out io.Writer, snaplen int) (*pcapWriter, error) {
	cw := &countingWriter{w: out}
	zw, err := gzip.NewWriterLevel(cw, gzip.StatelessCompression)
	if err != nil {
		return nil, err
	}
	w := &pcapWriter{snaplen: snaplen, zw: zw, out: cw, chunk: make([]byte, 0, 1024)}
	var h [fileHeaderLen]byte
	binary.LittleEndian.PutUint32(h[0:], pcapMagicNanos)
	binary.LittleEndian.PutUint16(h[4:], pcapVersionMajor)
	binary.LittleEndian.PutUint16(h[6:], pcapVersionMinor)
	// thiszone and sigfigs stay zero.
	binary.LittleEndian.PutUint32(h[16:], uint32(snaplen))
	binary.LittleEndian.PutUint32(h[20:], linkTypeEthernet)
	w.chunk = append(w.chunk, h[:]...)
	return w, nil
}

// write appends one record. data is cut at the snaplen; origLen is the
// packet's length on the wire. ts is in nanoseconds since the epoch.
func (w *pcapWriter) write(ts int64, origLen int, data []byte) error {
	if len(data) > w.snaplen {
		data = data[:w.snaplen]
	}
	origLen = max(origLen, len(data))
	var h [recordHeaderLen]byte
	binary.LittleEndian.PutUint32(h[0:], uint32(ts/1e9))
	binary.LittleEndian.PutUint32(h[4:], uint32(ts%1e9))
	binary.LittleEndian.PutUint32(h[8:], uint32(len(data)))
	binary.LittleEndian.PutUint32(h[12:], uint32(origLen))
	w.chunk = append(w.chunk, h[:]...)
	w.chunk = append(w.chunk, data...)
	w.records++
	if len(w.chunk) >= chunkSize {
		return w.flush()
	}
	return nil
}

// flush compresses the gathered chunk into out.
func (w *pcapWriter) flush() error {
	if len(w.chunk) == 0 {
		return nil
	}
	_, err := w.zw.Write(w.chunk)
	w.chunk = w.chunk[:0]
	if err != nil {
		return err
	}
	return w.out.err
}

// close flushes the rest and ends the gzip stream. It does not close out.
func (w *pcapWriter) close() error {
	if err := w.flush(); err != nil {
		return err
	}
	if err := w.zw.Close(); err != nil {
		return err
	}
	w.chunk = nil
	return w.out.err
}
