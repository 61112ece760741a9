// Package saver writes one TCP flow's packet headers to its pcap file.
//
// A Saver exists for each flow whose UUID is known. It saves the first
// CaptureDuration of the flow (from its first packet), as gzip around a
// classic nanosecond pcap with link type Ethernet, to
// <Dir>/YYYY/MM/DD/<UUID>.pcap.gz, and publishes the file atomically: the file
// is written unnamed (O_TMPFILE) and linked under its final name only once
// complete, never replacing an existing file.
//
// Each file carries a record of its own capture (Record) in its gzip header,
// where no reader of the pcap stream sees it.
//
// Config is the savers' configuration only. A Pool, built once by the
// daemon, starts the savers (Pool.New) and owns what they share: the metric
// series they update, the rate-limited error log, and the committer that
// makes their files durable in groups (durable.go). The demuxer sees it
// through its own small interface (demuxer.Savers).
package saver

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/metrics"
)

// Anonymizer rewrites the addresses of one packet in place (keeping its
// checksums consistent). *anonymize.Anonymizer implements it.
type Anonymizer interface {
	Packet(data []byte, l3, l4 int, ipv6 bool)
}

// DefaultMaxBacklog is how many packets may wait for a saver before further
// packets of its flow are dropped (and counted in pcap_missed_packets_total).
// At about 100 bytes a queued packet, a full backlog is about 6.5 MB, and it
// holds about 200 ms of a 300,000 packet/s flow: far longer than a saver
// needs to compress a chunk, so only a saver blocked on the disk fills it.
const DefaultMaxBacklog = 1 << 16

// Config is the savers' configuration: values and the services they use.
// NewPool takes a copy.
type Config struct {
	// Dir is the data directory. It should be absolute: a relative Dir is
	// taken relative to the working directory at the time of each write.
	Dir string
	// CaptureDuration is how much of each flow, from its first packet, is
	// saved.
	CaptureDuration time.Duration
	// Stream writes each flow's file as its packets arrive instead of
	// buffering the compressed file in RAM until the flow's end. Both give
	// identical files.
	Stream bool
	// Anon, if not nil, anonymizes every packet before it is written.
	Anon Anonymizer
	// MaxBacklog bounds each saver's queue; 0 means DefaultMaxBacklog.
	MaxBacklog int
	// Level is the gzip compression level, 1 to 9; 0 means DefaultLevel.
	Level int
	// Sync makes every file durable before it is counted as published:
	// its data is synced before it is linked under its name, and its
	// directory (and, the first time, the date directories above it) after,
	// so that a power loss leaves each published file whole and never an
	// empty or partial one. It costs one fsync of the file and one of the
	// directory per file (BENCHMARKS.md, "Durability").
	Sync    bool
	Metrics *metrics.Metrics
	Log     *slog.Logger

	// The daemon's part of each file's capture record (see Record):
	// Version ("v1.2.3+abc1234"), Source ("tcpinfo" or "standalone"),
	// Anonymization ("none" or "netblock") and the capture's Interfaces
	// (["any"], or the -interface names).
	Version       string
	Source        string
	Anonymization string
	Interfaces    []string
	// Drops, if not nil, is the capture's kernel drop counter, for the
	// record's kernel_drops (null without it). *capture.Config implements
	// it.
	Drops DropCounter

	// noRecord writes files without a capture record, as they were before
	// it: tests and benchmarks compare the two.
	noRecord bool
}

// Pool starts the savers of a daemon and owns what they share: their
// configuration, the metric series they update (resolved once), the
// rate-limited error log, and the committer that publishes their files
// durably in groups. The demuxer starts each named flow's saver with New.
type Pool struct {
	Config

	// syncedDir is the date directory whose parents were last synced
	// (syncParents), so that they are synced once, not for every file.
	syncedDir atomic.Pointer[string]
	// committer publishes the files durably, in groups (with Sync).
	committer *committer

	missed  [numStates]prometheus.Counter
	gauges  [numStates]prometheus.Gauge
	errs    [numStates]prometheus.Counter
	lastLog atomic.Int64 // unix ns of the last rate-limited error log
	// incomplete are pcap_saver_files_incomplete_total's series, in the
	// order of IncompleteReasons.
	incomplete []prometheus.Counter
}

// DropCounter is the capture's kernel drop counter.
type DropCounter interface {
	// KernelDropsSince returns how many packets the kernel dropped on the
	// capture sockets since t (Unix ns), as far as the daemon has read its
	// counters.
	KernelDropsSince(t int64) uint64
}

// NewPool returns the pool of savers configured by cfg. It resolves the
// labelled metrics once, so that the per-packet path never hashes label
// values; it also makes every state's and reason's series exist from the
// start, so dashboards and alerts see zeros rather than nothing.
func NewPool(cfg Config) *Pool {
	c := &Pool{Config: cfg}
	c.committer = newCommitter(func(dir string) error { return c.syncDirs(dir, dateDir(time.Time{})) })
	if c.MaxBacklog <= 0 {
		c.MaxBacklog = DefaultMaxBacklog
	}
	if c.Level < 1 || c.Level > 9 {
		c.Level = DefaultLevel
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	c.initLabels()
	for _, r := range IncompleteReasons {
		c.incomplete = append(c.incomplete, c.Metrics.FilesIncomplete.WithLabelValues(r))
	}
	return c
}

// CountNoPackets counts a flow that was named but ended without a packet, as
// its saver would (pcap_saver_errors_total{reason="nopackets"}), for flows
// whose saver was never started.
func (c *Pool) CountNoPackets() {
	c.errs[NoPacketsError].Inc()
}

// logError logs at most one saver error a second across all savers: when the
// disk is full every flow fails, and the counters say how many.
func (c *Pool) logError(s *Saver, msg string, err error) {
	now := time.Now().UnixNano()
	last := c.lastLog.Load()
	if now-last < int64(time.Second) || !c.lastLog.CompareAndSwap(last, now) {
		return
	}
	c.Log.Error(msg, "uuid", s.uuid, "flow", s.flow, "err", err)
}

// Saver saves one flow. Start, Push, Queue, Wake and Close are called by one
// goroutine (the demuxer); State is safe to call from anywhere.
//
// A saver's goroutine starts only when the saver has work that must not be
// done on the demuxer's goroutine: compressing a full chunk of pcap,
// publishing the file (at Close, or when the capture duration ends),
// or the packets pushed before Start. Until then Queue writes each packet's
// pcap record into the saver's chunk at once, on the caller's goroutine, a
// few hundred nanoseconds of copying. Most flows are short: their saver's
// goroutine runs once, at the end, to compress and publish the file, instead
// of being started at the flow's first packet and woken for every batch of
// it (see README.md, "Layout", for why).
type Saver struct {
	cfg    *Pool
	uuid   string
	opened time.Time
	// flow describes the flow in logs. It is a LogValuer so that the
	// addresses are formatted (and anonymized) only when a line is
	// logged, not for every flow.
	flow slog.LogValuer

	mu      sync.Mutex
	queue   []flow.Packet // packets pushed and not yet taken by run
	closed  bool          // Close was called
	timeUp  bool          // the capture duration's clock has run out
	started bool          // Start was called
	running bool          // run's goroutine was started: Queue only queues
	exited  bool          // run has returned
	wake    chan struct{} // capacity 1: "the queue has packets, or closed or timeUp is set"
	wg      *sync.WaitGroup

	state      atomic.Int32
	discarding atomic.Bool // nothing more will be saved; Push drops silently

	// missedBacklog counts the packets Queue dropped on a full backlog
	// (under mu).
	missedBacklog uint64
	// missedPending is set by MissedPending before Start.
	missedPending uint64

	// Owned by Queue (under mu) until the goroutine starts, then by run.
	spare   []flow.Packet
	w       *pcapWriter
	file    *os.File      // the unnamed file (stream mode: from the first chunk written)
	buf     *bytes.Buffer // the compressed file (buffered mode)
	first   int64         // timestamp of the first packet
	timer   *time.Timer   // the capture duration's clock, from the first packet
	dirPath string
	// What the record says of the flow.
	last      int64    // timestamp of the last packet written
	reserved  int      // the room reserved for the record in the header written early, or 0
	missedCut uint64   // packets past the capture duration dropped before publication
	cut       bool     // a packet past the capture duration came
	syn, rst  bool     // a SYN (or SYN-ACK), a RST was written
	fin       [2]bool  // a FIN was written from the first packet's sender, from the other side
	src       [16]byte // the first packet's source address and port, to tell FINs apart
	srcLen    uint8
	srcPort   uint16
	failed    bool // fail was called
}

// ending is what ends a file.
type ending int

const (
	endClose ending = iota // the flow ended (Close)
	endCut                 // a packet past the capture duration came
	endTimer               // the capture duration's timer fired
)

// New creates the saver of the flow named uuid, whose Open event has the
// timestamp opened (it dates the file's directory); flow, if not nil,
// describes the flow in its log lines. Start it with Start.
func (cfg *Pool) New(uuid string, opened time.Time, flow slog.LogValuer) *Saver {
	if flow == nil {
		flow = noFlow{}
	}
	s := &Saver{
		cfg:    cfg,
		uuid:   uuid,
		opened: opened,
		flow:   flow,
		wake:   make(chan struct{}, 1),
	}
	cfg.gauges[NotStarted].Inc()
	return s
}

type noFlow struct{}

func (noFlow) LogValue() slog.Value { return slog.StringValue("") }

// MissedPending records that n packets of the flow were dropped while it
// waited for its UUID (the demuxer's pending limits), for the capture
// record. It must be called before Start.
func (s *Saver) MissedPending(n uint64) { s.missedPending = n }

// UUID returns the flow's UUID.
func (s *Saver) UUID() string { return s.uuid }

// State returns the saver's current state.
func (s *Saver) State() State { return State(s.state.Load()) }

func (s *Saver) setState(n State) {
	old := State(s.state.Swap(int32(n)))
	if old == n {
		return
	}
	if old != Stopped {
		s.cfg.gauges[old].Dec()
	}
	// As in the original, stopped savers are not counted in any state.
	if n != Stopped {
		s.cfg.gauges[n].Inc()
	}
}

// Push hands a packet of the flow to the saver, which takes ownership of
// p.Data. It never blocks: when the saver has stopped saving the packet is
// dropped silently (it is past the capture duration), and when the backlog is
// full it is dropped and counted in pcap_missed_packets_total.
func (s *Saver) Push(p flow.Packet) {
	if s.Queue(p) {
		s.Wake()
	}
}

// Queue is Push without waking the saver: it reports whether the saver must
// be woken (with Wake) for the packet to be saved. The demuxer queues a
// whole batch of packets and then wakes each saver it touched once, instead
// of switching to a saver's goroutine for every packet. A started saver
// whose goroutine is not running writes the packet at once and needs no
// waking (see Saver).
func (s *Saver) Queue(p flow.Packet) (wake bool) {
	if s.discarding.Load() {
		return false
	}
	s.mu.Lock()
	if s.closed || len(s.queue) >= s.cfg.MaxBacklog {
		if !s.closed {
			s.missedBacklog++
		}
		s.mu.Unlock()
		s.cfg.missed[s.State()].Inc()
		return false
	}
	if s.started && !s.running { // (the clock running out starts it)
		if s.addNow(&p) {
			s.mu.Unlock()
			return false
		}
		// Compressing or cutting is the goroutine's work.
		s.queue = append(s.queue, p)
		s.goLocked()
		s.mu.Unlock()
		return false
	}
	s.queue = append(s.queue, p)
	first := len(s.queue) == 1
	s.mu.Unlock()
	return first
}

// addNow writes p on the caller's goroutine if that costs only a copy: it
// reports false, writing nothing, if p would end the file (it is past the
// capture duration) or fill the chunk (which must then be compressed). It is
// called under mu, before the goroutine runs.
func (s *Saver) addNow(p *flow.Packet) bool {
	if s.w != nil {
		if p.Time-s.first >= int64(s.cfg.CaptureDuration) {
			return false
		}
		if len(s.w.chunk)+recordHeaderLen+min(len(p.Data), s.w.snaplen) >= s.w.chunkLimit() {
			return false
		}
	}
	s.add(p)
	return true
}

// Start lets the saver save: from now on it starts its goroutine when it has
// work for it (see Saver), which counts itself in wg until it returns. The
// packets pushed before Start are saved by the goroutine, started now.
func (s *Saver) Start(wg *sync.WaitGroup) {
	wg.Add(1)
	s.cfg.Metrics.SaversStarted.Inc()
	s.setState(WaitingForPackets)
	s.mu.Lock()
	s.wg, s.started = wg, true
	if len(s.queue) > 0 || s.closed {
		s.goLocked()
	}
	s.mu.Unlock()
}

// goLocked starts the saver's goroutine, once, if Start was called. It is
// called under mu.
func (s *Saver) goLocked() {
	if !s.started || s.running {
		return
	}
	s.running = true
	go s.run()
}

// clockRanOut is the capture duration's timer: the file ends even if no
// packet comes to end it.
func (s *Saver) clockRanOut() {
	s.mu.Lock()
	s.timeUp = true
	running := s.running
	s.goLocked()
	s.mu.Unlock()
	if running {
		s.signal()
	}
}

// Wake wakes the saver to save what Queue queued.
func (s *Saver) Wake() { s.signal() }

func (s *Saver) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Close tells the saver that the flow has ended: it saves what it has,
// publishes the file and stops. Push must not be called after Close.
func (s *Saver) Close() {
	s.mu.Lock()
	s.closed = true
	exited, running := s.exited, s.running
	s.goLocked()
	s.mu.Unlock()
	if exited {
		s.setState(Stopped)
		return
	}
	if running {
		s.signal()
	}
}

// take swaps the queue out for the spare slice.
func (s *Saver) take() (batch []flow.Packet, closed, timeUp bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	batch = s.queue
	s.queue = s.spare[:0]
	s.spare = nil
	timeUp = s.timeUp
	s.timeUp = false
	return batch, s.closed, timeUp
}

// run saves the flow until Close is called or the capture duration is over.
// It is the saver's goroutine, started with work to do.
func (s *Saver) run() {
	defer s.wg.Done()
	defer s.cfg.Metrics.SaversStopped.Inc()
	for {
		batch, closed, timeUp := s.take()
		if timeUp {
			s.finish(endTimer)
		}
		for i := range batch {
			if s.discarding.Load() {
				break
			}
			p := &batch[i]
			if s.w != nil && p.Time-s.first >= int64(s.cfg.CaptureDuration) {
				// This packet and those after it are past the
				// capture duration.
				s.cut = true
				s.missedCut += uint64(len(batch) - i)
				s.finish(endCut)
				break
			}
			s.add(p)
		}
		// Drop the references to the packets' bytes before keeping the
		// slice for reuse. The two slices ping-pong between Queue and run,
		// so a busy flow allocates none; one grown by a long burst
		// (beyond 1.3 MB) is let go.
		clear(batch)
		if cap(batch) <= 16384 {
			s.spare = batch[:0]
		}
		if closed {
			s.finish(endClose)
			s.exit(true)
			return
		}
		if s.discarding.Load() {
			s.exit(false)
			return
		}
		<-s.wake
	}
}

// exit records that run is returning. Savers that stop before their flow
// ends stay in their last state (discarding or an error) until Close.
func (s *Saver) exit(closed bool) {
	if s.timer != nil {
		s.timer.Stop()
	}
	s.mu.Lock()
	s.exited = true
	closed = closed || s.closed
	s.queue = nil
	s.mu.Unlock()
	if closed {
		s.setState(Stopped)
	}
}

// add saves one packet.
func (s *Saver) add(p *flow.Packet) {
	if s.w == nil {
		if err := s.start(p); err != nil {
			return
		}
	}
	// Flags, before the anonymizer rewrites the addresses that tell the
	// directions apart.
	if fl := tcpFlags(p); fl&(tcpSYN|tcpFIN|tcpRST) != 0 {
		s.flags(p, fl)
	}
	if s.cfg.Anon != nil {
		s.cfg.Anon.Packet(p.Data, int(p.L3), int(p.L4), p.IPv6)
	}
	if err := s.w.write(p.Time, int(p.Len), p.Data); err != nil {
		s.fail(WriteError, "write pcap file", err)
		return
	}
	s.last = p.Time
}

// start begins the file at the flow's first packet, which sets the snaplen.
// Nothing is written to disk yet: in stream mode the unnamed file is
// created when the first chunk is written to it.
func (s *Saver) start(p *flow.Packet) error {
	s.first = p.Time
	s.dirPath = filepath.Join(s.cfg.Dir, dateDir(s.opened))
	var out io.Writer = streamWriter{s}
	if !s.cfg.Stream {
		s.buf = new(bytes.Buffer)
		out = spillWriter{s}
	}
	s.srcLen, s.srcPort = source(p, &s.src)
	s.w = newPCAPWriter(out, int(p.L4)+maxTCPHeader, s.cfg.Level, s.reserveHeader)
	s.setState(Streaming)
	// The capture duration is also enforced by the clock, so that a flow
	// that goes quiet is published on time rather than when it is
	// garbage-collected.
	s.timer = time.AfterFunc(s.cfg.CaptureDuration, s.clockRanOut)
	return nil
}

// streamWriter is the stream mode's output: the unnamed file, created at the
// first write.
type streamWriter struct{ s *Saver }

func (w streamWriter) Write(p []byte) (int, error) {
	s := w.s
	if s.file == nil {
		f, err := s.open()
		if err != nil {
			return 0, err
		}
		s.file = f
	}
	return s.file.Write(p)
}

// spillSize is how much of a compressed file the buffered mode holds in
// RAM. A larger file goes to its unnamed file (as in -stream) from then on:
// a bulk flow's file grows by megabytes a second, and growing a buffer that
// large, copy after copy, kept the garbage collector so busy that the
// capture fell behind and the kernel dropped packets (BENCHMARKS.md). Short
// flows, nearly all of them, never reach it and are written at their end in
// one write. The file's bytes are the same either way.
var spillSize = 4 << 20

// spillWriter is the buffered mode's output: the buffer until it would
// exceed spillSize, then the unnamed file, the buffer first.
type spillWriter struct{ s *Saver }

func (w spillWriter) Write(p []byte) (int, error) {
	s := w.s
	if s.file != nil {
		return s.file.Write(p)
	}
	if s.buf.Len()+len(p) <= spillSize {
		return s.buf.Write(p)
	}
	f, err := createDated(s.cfg.Dir, s.dirPath, dateDir(s.opened))
	if err != nil {
		return 0, err
	}
	if _, err := s.buf.WriteTo(f); err != nil {
		f.Close() // unnamed: freed
		return 0, err
	}
	s.buf, s.file = nil, f
	return f.Write(p)
}

// createDated is createHidden in dir (root/rel), creating the date
// directories first if need be.
func createDated(root, dir, rel string) (*os.File, error) {
	f, err := createHidden(dir)
	if err == nil {
		return f, nil
	}
	if err := makeDirs(root, rel); err != nil {
		return nil, err
	}
	return createHidden(dir)
}

// open creates the date directory as needed and the unnamed file in it.
func (s *Saver) open() (*os.File, error) {
	f, err := createHidden(s.dirPath)
	if err != nil {
		// Most likely the date directory does not exist yet (the first
		// flow of a day); any other problem shows again below.
		s.setState(DirCreation)
		if err := makeDirs(s.cfg.Dir, dateDir(s.opened)); err != nil {
			s.fail(MkdirError, "create directory", err)
			return nil, err
		}
		f, err = createHidden(s.dirPath)
	}
	if err != nil {
		s.fail(FileOpenError, "create file", err)
		return nil, err
	}
	return f, nil
}

// finish ends the file and publishes it, once.
func (s *Saver) finish(why ending) {
	if s.discarding.Swap(true) {
		return
	}
	if s.w == nil {
		s.fail(NoPacketsError, "flow ended without packets", nil)
		return
	}
	rec, err := s.endHeader(why)
	if err != nil {
		s.fail(WriteError, "finish pcap file", err)
		return
	}
	if s.file == nil { // buffered, and not spilled
		f, err := s.open()
		if err != nil {
			return
		}
		s.file = f
		if _, err := s.buf.WriteTo(f); err != nil {
			s.fail(WriteError, "write file", err)
			return
		}
		s.buf = nil
	}
	s.setState(Publishing)
	path := filepath.Join(s.dirPath, s.uuid+".pcap.gz")
	if err := s.publish(path); err != nil {
		var se *syncError
		var lns *linkedNotSynced
		st, msg := LinkError, "publish file"
		switch {
		case errors.Is(err, unix.EEXIST):
			st = ExistsError
		case errors.As(err, &lns):
			// The file is whole but its name may not survive a power
			// loss: count it, like a close error.
			st, msg = WriteError, "sync directory"
		case errors.As(err, &se):
			st = WriteError // an I/O error: the file was not linked
		}
		s.fail(st, msg, err)
		return
	}
	err = s.file.Close()
	s.file = nil
	if err != nil {
		// The file is published under its name but its last bytes may not
		// be on disk: count it, it cannot be taken back.
		s.fail(WriteError, "close file", err)
		return
	}
	m := s.cfg.Metrics
	m.FilesPublished.Inc()
	m.BytesWritten.Add(float64(s.w.out.n))
	m.PacketsSaved.Add(float64(s.w.records))
	s.cfg.countRecord(rec)
	s.setState(Discarding)
	s.cfg.Log.Debug("published", "uuid", s.uuid, "flow", s.flow, "path", path, "packets", s.w.records, "bytes", s.w.out.n)
}

// publish gives the finished file its name. With Config.Sync, the
// committer makes it durable first, and its name after, in a group with the
// other files that finish about then (durable.go); the name is durable
// before the uploader hears of it (the close that follows).
func (s *Saver) publish(path string) error {
	if !s.cfg.Sync {
		return linkFile(s.file, path, false)
	}
	return s.cfg.committer.publish(s.file, path, s.dirPath)
}

// syncDirs syncs dir, the date directory rel under c.Dir, and the first
// time, the date directories above it (see syncParents).
func (c *Pool) syncDirs(dir, rel string) error {
	if err := syncDir(dir); err != nil {
		return err
	}
	if p := c.syncedDir.Load(); p != nil && *p == dir {
		return nil
	}
	if err := syncParents(dir, strings.Count(rel, "/")+1); err != nil {
		return err
	}
	c.syncedDir.Store(&dir)
	return nil
}

// fail ends the saver's work on an error: the flow's file, if any, is closed
// unnamed, so the kernel frees it and nothing partial is ever visible.
func (s *Saver) fail(st State, msg string, err error) {
	if s.failed {
		return // counted and logged once, at the first error
	}
	s.failed = true
	s.discarding.Store(true)
	if s.file != nil {
		s.file.Close() // The unnamed file is discarded; its close error means nothing.
		s.file = nil
	}
	s.buf = nil
	s.setState(st)
	s.cfg.errs[st].Inc()
	if err != nil {
		s.cfg.logError(s, msg, err)
	}
}
