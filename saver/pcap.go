package saver

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"io"
	"sync"

	"github.com/klauspost/compress/flate"
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
	// compressing them. Each chunk is compressed with the previous 32 KiB
	// as its dictionary, which costs hashing that window again: with 64 KiB
	// chunks that was a third of the saver's CPU, with 128 KiB it is a
	// fifth (BENCHMARKS.md). A flow's RAM is at most one chunk, one window
	// of dictionary and (buffered mode) its compressed file; a flow only
	// grows its chunk as its packets arrive, so small flows stay small.
	chunkSize = 128 << 10
	// maxChunkShift: a flow's chunks double in size, from chunkSize, up to
	// chunkSize << maxChunkShift (512 KiB) from its third chunk on.
	// Re-hashing the dictionary costs the same for any chunk, so a bulk
	// flow's larger chunks spend less on it: with 128 KiB chunks it was 8%
	// of the daemon's CPU under bulk load. A flow's chunk only grows as its
	// packets come, and only flows that have already written two chunks
	// (384 KiB of pcap, thousands of packets) hold one that large.
	maxChunkShift = 2
	// window is deflate's back-reference window: the dictionary a chunk is
	// compressed with is the last window bytes of the chunks before it.
	window = 32 << 10
	// DefaultLevel is the default compression level. On a 1.5 MB NDT flow
	// (testdata/production) klauspost's level 1 gives 396 KB and level 5
	// 354 KB (as small as the original's files), but level 5 costs about
	// twice the CPU per packet (800 against 420 ns in BenchmarkSaver), and at
	// 300,000 packets/s compression is most of the daemon's work
	// (BENCHMARKS.md). -gziplevel trades one for the other.
	DefaultLevel = 1
)

// deflaters are pooled: a deflate compressor holds about 1 MB of tables (the
// original daemon kept one per flow, which was most of its per-flow memory),
// but a saver needs one only while it compresses a chunk. Carrying the last
// window of data as a dictionary into the next chunk gives the same ratio as
// one compressor kept for the whole flow.
var deflaters [flate.BestCompression + 1]sync.Pool

// getDeflater returns a pooled compressor of the given level (1 to 9).
func getDeflater(level int) *flate.Writer {
	if w, ok := deflaters[level].Get().(*flate.Writer); ok {
		return w
	}
	w, err := flate.NewWriter(io.Discard, level)
	if err != nil {
		panic(err) // Config.Init keeps level within 1 to 9
	}
	return w
}

// scratches are the buffers chunks are compressed into.
var scratches = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// pcapWriter encodes packet records into a pcap stream and compresses it
// into a gzip file, a chunk at a time, into out.
//
// The gzip member is written by hand around the deflate stream: a header,
// the deflate blocks of each chunk (each chunk ends with a sync flush, so a
// chunk's blocks end on a byte boundary and the next compressor continues the
// stream), and the CRC-32 and length trailer. The header, which carries the
// capture record, is written with the first compressed chunk: if that is
// the last (the whole flow fits in one chunk, as most do), it is the final
// header, given to close; if not, it is the one reserve returns, whose
// comment reserves room for the record, which the saver fills in at the end.
// The output depends only on the records (and the saver's header), so
// streaming and buffered modes produce identical bytes.
//
// A pcapWriter is not safe for concurrent use.
type pcapWriter struct {
	snaplen int
	level   int
	chunk   []byte
	dict    []byte // the last window bytes compressed
	crc     uint32
	size    uint32 // uncompressed length mod 2^32, as gzip's ISIZE
	out     *countingWriter
	records int
	chunks  int // chunks compressed
	// head is the gzip header as written (nil until the first chunk is).
	// reserve returns the header to write when a chunk is written before
	// close; final is the one close writes.
	head    []byte
	reserve func() []byte
	final   []byte
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

// newPCAPWriter starts a pcap stream with the given snaplen. reserve returns
// the gzip header to write if a chunk must be written before close (see
// pcapWriter). Nothing is written to out until then.
func newPCAPWriter(out io.Writer, snaplen, level int, reserve func() []byte) *pcapWriter {
	cw := &countingWriter{w: out}
	w := &pcapWriter{snaplen: snaplen, level: level, out: cw, chunk: make([]byte, 0, 1024), reserve: reserve}
	var h [fileHeaderLen]byte
	binary.LittleEndian.PutUint32(h[0:], pcapMagicNanos)
	binary.LittleEndian.PutUint16(h[4:], pcapVersionMajor)
	binary.LittleEndian.PutUint16(h[6:], pcapVersionMinor)
	// thiszone and sigfigs stay zero.
	binary.LittleEndian.PutUint32(h[16:], uint32(snaplen))
	binary.LittleEndian.PutUint32(h[20:], linkTypeEthernet)
	w.chunk = append(w.chunk, h[:]...)
	return w
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
	if len(w.chunk) >= w.chunkLimit() {
		return w.flush()
	}
	return nil
}

// chunkLimit is the size at which the current chunk is compressed.
func (w *pcapWriter) chunkLimit() int { return chunkSize << min(w.chunks, maxChunkShift) }

// flush compresses the gathered chunk into out.
func (w *pcapWriter) flush() error {
	if len(w.chunk) == 0 {
		return nil
	}
	w.crc = crc32.Update(w.crc, crc32.IEEETable, w.chunk)
	w.size += uint32(len(w.chunk))
	// Compress into a scratch buffer, then write it out at once: the
	// compressor writes in pieces of a few hundred bytes, and each would
	// be a system call on a streamed file.
	scratch := scratches.Get().(*bytes.Buffer)
	scratch.Reset()
	fw := getDeflater(w.level)
	fw.ResetDict(scratch, w.dict)
	_, err := fw.Write(w.chunk)
	if err == nil {
		err = fw.Flush()
	}
	fw.Reset(io.Discard) // let go of the buffer and the dictionary
	deflaters[w.level].Put(fw)
	if err == nil {
		err = w.writeHead()
	}
	if err == nil {
		_, err = w.out.Write(scratch.Bytes())
	}
	scratches.Put(scratch)
	if err != nil {
		return err
	}
	// Keep the last window of data as the next chunk's dictionary.
	tail := w.chunk[max(0, len(w.chunk)-window):]
	if len(tail) < window && len(w.dict) > 0 {
		keep := w.dict[max(0, len(w.dict)-(window-len(tail))):]
		w.dict = append(append(make([]byte, 0, window), keep...), tail...)
	} else {
		w.dict = append(w.dict[:0], tail...)
	}
	w.chunk = w.chunk[:0]
	w.chunks++
	return w.out.err
}

// writeHead writes the gzip header before the first compressed chunk.
func (w *pcapWriter) writeHead() error {
	if w.head != nil {
		return nil
	}
	h := w.final
	if h == nil {
		h = w.reserve()
	}
	w.head = h
	_, err := w.out.Write(h)
	return err
}

// finalBlock is an empty final deflate block (fixed Huffman, end of block):
// it ends the deflate stream after the last sync-flushed chunk.
var finalBlock = [2]byte{0x03, 0x00}

// close flushes the rest and ends the gzip member; final is the gzip header
// if none was written yet. It does not close out.
func (w *pcapWriter) close(final []byte) error {
	w.final = final
	if err := w.flush(); err != nil {
		return err
	}
	if err := w.writeHead(); err != nil {
		return err
	}
	var trailer [10]byte
	copy(trailer[:], finalBlock[:])
	binary.LittleEndian.PutUint32(trailer[2:], w.crc)
	binary.LittleEndian.PutUint32(trailer[6:], w.size)
	if _, err := w.out.Write(trailer[:]); err != nil {
		return err
	}
	w.chunk, w.dict = nil, nil
	return w.out.err
}
