// Package demuxer owns the flow table: it sends each captured packet to the
// saver of its flow, holds the packets of flows whose UUID is not known yet,
// starts a saver when a flow's UUID arrives, and ends flows that have gone
// idle.
//
// All of the demuxer's state belongs to the one goroutine that runs Run, so
// the per-packet path takes no lock of its own.
package demuxer

import (
	"context"
	"log/slog"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/m-lab/packet-headers/flow"
	phmetrics "github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/saver"
)

// Open says that the flow Key is named UUID, as of Time (tcp-info's Open
// event timestamp, which also dates the flow's file).
type Open struct {
	Key  flow.Key
	UUID string
	Time time.Time
}

// Defaults for the limits that have no flag of the original's.
const (
	// DefaultMaxPending bounds the flows waiting for a UUID. A pending flow
	// costs about 380 bytes of heap (its table entry with one packet, its
	// header bytes, its place in the expiry queue), twice that counting
	// the garbage collector's headroom, so 25,000 of them are about 18 MB:
	// room for 5,000 new flows a second with a five-second UUID wait
	// (measurement hosts see hundreds). A SYN flood beyond that evicts the
	// oldest pending flows, so a real flow, named within milliseconds,
	// survives a flood of 50,000 SYNs a second, and the daemon's peak RSS
	// stays near 120 MB, 64 MiB of it the capture ring (RELIABILITY.md).
	DefaultMaxPending = 25_000
	// DefaultPendingPackets bounds the packets held for one pending flow.
	// tcp-info names a flow one poll (10 ms) or more after it is
	// established, later on a busy host: a bulk flow at 100,000 packets/s
	// sends 4,096 packets in 40 ms, which lost the start of flows in the
	// live benchmark. 65,536 packets hold more than half a second of it.
	DefaultPendingPackets = 65536
	// DefaultMaxPendingPackets bounds the packets held by all pending flows
	// together: about 150 bytes each (the record and its header bytes), so
	// 262,144 are about 40 MB, whatever the number of flows.
	DefaultMaxPendingPackets = 262144
)

// Config holds the demuxer's settings.
type Config struct {
	// FlowTimeout: a flow without packets for one to two FlowTimeouts has
	// ended; its saver publishes its file.
	FlowTimeout time.Duration
	// UUIDWait: a flow whose UUID has not arrived this long after its first
	// packet is dropped, with its packets.
	UUIDWait time.Duration
	// MaxFlows limits the flows in the table; 0 means no limit.
	MaxFlows int
	// MaxHeap: while the Go heap is larger than this many bytes, new flows
	// are refused; 0 means no limit.
	MaxHeap uint64
	// MaxPending limits the flows waiting for a UUID (the oldest is dropped
	// to make room); 0 means DefaultMaxPending.
	MaxPending int
	// PendingPackets limits the packets held per pending flow; 0 means
	// DefaultPendingPackets.
	PendingPackets int
	// MaxPendingPackets limits the packets held by all pending flows; 0
	// means DefaultMaxPendingPackets.
	MaxPendingPackets int

	Saver   *saver.Config
	Metrics *phmetrics.Metrics
	Log     *slog.Logger
	// LogKey formats a flow for logs (for example with anonymized
	// addresses); nil means flow.Key.String.
	LogKey func(flow.Key) string
}

// entry is one flow in the table. A flow is pending (saver is nil, its
// packets are held) until its UUID arrives.
type entry struct {
	saver *saver.Saver
	// named is the Open of a flow named before its first packet: its saver
	// (and goroutine) starts with that packet, so that the Opens tcp-info
	// sends again for every live socket when it restarts cost no goroutine
	// for the sockets that stay idle.
	named *Open
	// The pending packets: first, then more. Most pending flows hold one
	// packet (a SYN, or a SYN flood's spoofed SYN), so it is stored inline,
	// saving an allocation and a slice per pending flow. first.Key is the
	// flow's key while it is pending, also when it holds no packet.
	first flow.Packet
	more  []flow.Packet
	gen   uint64 // the GC generation in which the flow last had a packet
}

// npending returns how many packets a pending flow holds.
func (e *entry) npending() int {
	if e.first.Data == nil {
		return 0
	}
	return 1 + len(e.more)
}

func (e *entry) hold(p flow.Packet) {
	if e.first.Data == nil {
		e.first = p // p.Key is already first.Key
		return
	}
	e.more = append(e.more, p)
}

// release hands the pending packets to fn in order and forgets them.
func (e *entry) release(fn func(flow.Packet)) {
	if e.first.Data != nil && fn != nil {
		fn(e.first)
		for _, p := range e.more {
			fn(p)
		}
	}
	e.first = flow.Packet{Key: e.first.Key}
	clear(e.more)
	e.more = nil
}

// Demuxer is the flow table. Create it with New and run it with Run.
type Demuxer struct {
	cfg      Config
	flows    map[flow.Key]*entry
	fifo     refQueue // pending flows, oldest first; stale refs are skipped
	npending int
	npkts    int // packets held by pending flows
	gen      uint64
	overHeap bool
	wg       sync.WaitGroup
	toWake   []*saver.Saver // savers with packets queued since the last WakeSavers
	// hasPending mirrors npending > 0 for other goroutines; pendingWake
	// receives when a flow becomes pending (see HasPending).
	hasPending  atomic.Bool
	pendingWake chan struct{}
	// epoch is the origin of the pending flows' deadlines, which are
	// monotonic: a step of the wall clock neither drops every pending flow
	// nor keeps them longer.
	epoch time.Time

	missedPending prometheus.Counter
	shedMaxFlows  prometheus.Counter
	shedMaxHeap   prometheus.Counter
	droppedWait   prometheus.Counter
	droppedLimit  prometheus.Counter
	uuidTimedOut  prometheus.Counter
	heapSample    []metrics.Sample
}

// New creates a demuxer.
func New(cfg Config) *Demuxer {
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = DefaultMaxPending
	}
	if cfg.PendingPackets <= 0 {
		cfg.PendingPackets = DefaultPendingPackets
	}
	if cfg.MaxPendingPackets <= 0 {
		cfg.MaxPendingPackets = DefaultMaxPendingPackets
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.LogKey == nil {
		cfg.LogKey = flow.Key.String
	}
	cfg.Saver.Init()
	m := cfg.Metrics
	return &Demuxer{
		cfg:           cfg,
		flows:         make(map[flow.Key]*entry),
		gen:           2, // so that gen-1 never underflows
		missedPending: m.MissedPackets.WithLabelValues("pending"),
		shedMaxFlows:  m.FlowsShed.WithLabelValues("maxflows"),
		shedMaxHeap:   m.FlowsShed.WithLabelValues("maxheap"),
		droppedWait:   m.PendingDropped.WithLabelValues("uuidtimeout"),
		droppedLimit:  m.PendingDropped.WithLabelValues("limit"),
		uuidTimedOut:  m.SaverErrors.WithLabelValues("uuidtimedout"),
		heapSample:    []metrics.Sample{{Name: "/gc/heap/live:bytes"}},
		pendingWake:   make(chan struct{}, 1),
		epoch:         time.Now(),
	}
}

// clock returns t as nanoseconds since the demuxer's epoch, on the monotonic
// clock (t must come from time.Now or a ticker).
func (d *Demuxer) clock(t time.Time) int64 { return int64(t.Sub(d.epoch)) }

// HasPending reports whether any flow is waiting for its UUID. It is safe
// for concurrent use: a UUID source that polls (kernelsource) polls only
// while it is true.
func (d *Demuxer) HasPending() bool { return d.hasPending.Load() }

// PendingWake returns a channel that receives when a flow starts waiting for
// its UUID (at most one value waits in it).
func (d *Demuxer) PendingWake() <-chan struct{} { return d.pendingWake }

// Run demultiplexes until packets is closed: it takes batches of packets
// (and returns each batch to flow.PutBatch) and UUID events, then, once
// packets is closed, ends every flow (savers publish what they have) and waits
// for all savers to finish. Closing packets is how the daemon shuts down: it
// stops capturing first so that no packet with a UUID is lost. ctx only
// stops the waiting for events; events may stay open.
func (d *Demuxer) Run(ctx context.Context, packets <-chan *flow.Batch, events <-chan Open) {
	gc := time.NewTicker(d.cfg.FlowTimeout)
	defer gc.Stop()
	// Pending flows are checked several times per UUIDWait so that one
	// lives at most 25% longer than its wait.
	sweep := time.NewTicker(max(d.cfg.UUIDWait/4, time.Millisecond))
	defer sweep.Stop()
	for {
		select {
		case b, ok := <-packets:
			if !ok {
				d.shutdown()
				return
			}
			for i := range b.Packets {
				d.Packet(b.Packets[i])
			}
			flow.PutBatch(b)
			d.WakeSavers()
		case ev := <-events:
			d.Open(ev)
		case <-gc.C:
			d.GC()
		case now := <-sweep.C:
			d.expirePending(d.clock(now))
			d.checkHeap()
		case <-ctx.Done():
			events = nil
			ctx = context.Background()
		}
	}
}

// WakeSavers wakes the savers that Packet queued packets for. Run calls it
// after each batch; callers that drive the demuxer directly call it after
// their packets (Flush and Open also do).
func (d *Demuxer) WakeSavers() {
	for i, s := range d.toWake {
		s.Wake()
		d.toWake[i] = nil
	}
	d.toWake = d.toWake[:0]
}

// Packet routes one packet. It must only be called from Run's goroutine, or
// in place of Run (tests and offline replays drive the demuxer directly); the
// packet is saved once WakeSavers is called.
func (d *Demuxer) Packet(p flow.Packet) {
	e, ok := d.flows[p.Key]
	if !ok {
		if !d.admit() {
			d.cfg.Metrics.DemuxerIgnored.Inc()
			return
		}
		e = d.newPending(p.Key, d.clock(time.Now()))
	}
	e.gen = d.gen
	if e.named != nil {
		d.startSaver(e, *e.named)
		e.named = nil
	}
	if e.saver != nil {
		if e.saver.Queue(p) {
			d.toWake = append(d.toWake, e.saver)
		}
		return
	}
	if e.npending() >= d.cfg.PendingPackets || d.npkts >= d.cfg.MaxPendingPackets {
		d.missedPending.Inc()
		return
	}
	e.hold(p)
	d.npkts++
}

// admit decides whether a new flow may enter the table.
func (d *Demuxer) admit() bool {
	switch {
	case d.cfg.MaxFlows > 0 && len(d.flows) >= d.cfg.MaxFlows:
		d.shedMaxFlows.Inc()
	case d.overHeap:
		d.shedMaxHeap.Inc()
	default:
		return true
	}
	d.cfg.Metrics.SaverSkipped.Inc()
	return false
}

func (d *Demuxer) newPending(k flow.Key, now int64) *entry {
	if d.npending >= d.cfg.MaxPending {
		d.evictOldestPending()
	}
	e := &entry{first: flow.Packet{Key: k}}
	d.flows[k] = e
	d.fifo.push(pendingRef{e: e, deadline: now + int64(d.cfg.UUIDWait)})
	d.npending++
	d.gauges()
	select {
	case d.pendingWake <- struct{}{}:
	default:
	}
	return e
}

// Open names a flow. It must only be called from Run's goroutine, or in
// place of Run.
func (d *Demuxer) Open(ev Open) {
	d.WakeSavers()
	d.cfg.Metrics.DemuxerUUIDCount.Inc()
	e, ok := d.flows[ev.Key]
	switch {
	case !ok:
		// The UUID arrived before the flow's first packet (or after the
		// flow was dropped, or tcp-info restarted): the flow's saver
		// starts with its first packet.
		if !d.admit() {
			d.cfg.Metrics.MissedUUIDs.WithLabelValues("skipped").Inc()
			return
		}
		d.flows[ev.Key] = &entry{gen: d.gen, named: &ev}
	case e.named != nil:
		if e.named.UUID != ev.UUID {
			// A new socket on the 4-tuple before the old one sent a
			// packet: the old flow ends without packets, and the new
			// one waits as long as a newly named flow.
			d.cfg.Saver.CountNoPackets()
			e.named = &ev
			e.gen = d.gen
		}
	case e.saver == nil:
		d.startSaver(e, ev)
		d.npkts -= e.npending()
		e.release(e.saver.Push)
		d.npending--
	case e.saver.UUID() == ev.UUID:
		// tcp-info sends Open again for every live socket when it
		// restarts: nothing to do.
	default:
		// The 4-tuple was reused by a new socket before the old flow was
		// collected: end the old flow, start the new one.
		e.saver.Close()
		d.startSaver(e, ev)
	}
	d.gauges()
}

func (d *Demuxer) startSaver(e *entry, ev Open) {
	e.saver = saver.New(d.cfg.Saver, ev.UUID, ev.Time, flowLog{ev.Key, d.cfg.LogKey})
	d.wg.Go(e.saver.Run)
}

// flowLog formats a flow for a log line only when the line is logged.
type flowLog struct {
	k      flow.Key
	format func(flow.Key) string
}

func (f flowLog) LogValue() slog.Value { return slog.StringValue(f.format(f.k)) }

// GC ends flows without packets since the previous call: their savers
// publish. Run calls it every FlowTimeout, so a flow is ended after one to two
// FlowTimeouts of silence.
func (d *Demuxer) GC() {
	start := time.Now()
	for k, e := range d.flows {
		if e.gen >= d.gen {
			continue
		}
		switch {
		case e.saver != nil:
			e.saver.Close()
			d.cfg.Metrics.DemuxerSaversGCed.Inc()
		case e.named != nil:
			d.cfg.Saver.CountNoPackets()
		default:
			d.dropPending(e, d.droppedWait)
		}
		delete(d.flows, k)
	}
	d.gen++
	d.fifo.shrink()
	d.gauges()
	d.cfg.Metrics.DemuxerGCLatency.Observe(time.Since(start).Seconds())
}

// expirePending drops the flows that have waited UUIDWait for their UUID.
func (d *Demuxer) expirePending(now int64) {
	for d.fifo.len() > 0 {
		r := d.fifo.front()
		if d.isPending(r) && r.deadline > now {
			break
		}
		d.popPending(d.droppedWait)
	}
	d.fifo.shrink()
	d.gauges()
}

func (d *Demuxer) evictOldestPending() {
	for d.fifo.len() > 0 {
		// Stale refs (flows named or collected since) are skipped; the
		// first live one is dropped.
		live := d.isPending(d.fifo.front())
		d.popPending(d.droppedLimit)
		if live {
			return
		}
	}
}

// isPending reports whether a FIFO ref still denotes a pending flow in the
// table (the flow may have been named or collected since).
func (d *Demuxer) isPending(r pendingRef) bool {
	if r.e.saver != nil {
		return false
	}
	e, ok := d.flows[r.e.first.Key]
	return ok && e == r.e
}

// popPending removes the oldest FIFO ref, dropping its flow if still pending.
func (d *Demuxer) popPending(reason prometheus.Counter) {
	r := d.fifo.front()
	d.fifo.pop()
	if d.isPending(r) {
		d.dropPending(r.e, reason)
		delete(d.flows, r.e.first.Key)
	}
}

func (d *Demuxer) dropPending(e *entry, reason prometheus.Counter) {
	reason.Inc()
	if reason == d.droppedWait {
		// The original counted a flow that never got its UUID as a
		// saver error with this reason; dashboards watch it.
		d.uuidTimedOut.Inc()
	}
	d.cfg.Metrics.DemuxerIgnored.Add(float64(e.npending()))
	d.npkts -= e.npending()
	e.release(nil)
	d.npending--
}

// checkHeap samples the heap for the -maxheap limit: the live heap as of the
// last garbage collection, which, unlike the heap in use, does not swing
// with garbage not yet collected. Reading one runtime metric is cheap (no
// stop-the-world, unlike runtime.ReadMemStats).
func (d *Demuxer) checkHeap() {
	if d.cfg.MaxHeap == 0 {
		return
	}
	metrics.Read(d.heapSample)
	d.overHeap = d.heapSample[0].Value.Uint64() > d.cfg.MaxHeap
}

func (d *Demuxer) gauges() {
	d.cfg.Metrics.DemuxerSaversActive.Set(float64(len(d.flows)))
	d.cfg.Metrics.PendingFlows.Set(float64(d.npending))
	d.hasPending.Store(d.npending > 0)
}

// Flush ends every flow now and waits for the savers to publish. Run calls
// it when packets is closed.
func (d *Demuxer) Flush() { d.shutdown() }

func (d *Demuxer) shutdown() {
	d.WakeSavers()
	for k, e := range d.flows {
		switch {
		case e.saver != nil:
			e.saver.Close()
		case e.named != nil:
			d.cfg.Saver.CountNoPackets()
		default:
			d.dropPending(e, d.droppedWait)
		}
		delete(d.flows, k)
	}
	d.fifo.reset()
	d.gauges()
	d.wg.Wait()
}
