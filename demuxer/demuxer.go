// Package demuxer owns the flow table: it sends each captured packet to the
// saver of its flow, holds the packets of flows whose UUID is not known yet,
// starts a saver when a flow's UUID arrives, and ends flows that have gone
// idle. A flow is one TCP connection: a new connection on a 4-tuple still in
// the table gets its own flow (see conn.go).
//
// All of the demuxer's state belongs to the one goroutine that runs Run, so
// the per-packet path takes no lock of its own.
//
// # Timing
//
// The demuxer's clock is monotonic and its times are those at which a packet
// or an Open reaches it (is taken from its channel), so that the delays of
// the stages before it (capture hands a packet on at most a few hundred
// milliseconds after capturing it, the eventsocket client an Open 50 ms after
// tcp-info sent it) do not eat into its timeouts. What it holds, and for how
// long at most:
//
//   - A packet of a flow with a UUID: queued to the flow's saver at once; the
//     saver is woken after the packet's batch (at most 128 packets).
//   - A packet of a flow without a UUID: held until the UUID arrives, at most
//     UUIDWait after the flow's first packet reached the demuxer plus the time
//     to the next sweep (every UUIDWait/4), so at most 1.25 UUIDWait; then it
//     is dropped. At most PendingPackets per flow and MaxPendingPackets in all
//     are held. An earlier connection that a new one replaced on its 4-tuple
//     keeps its own deadline.
//   - An Open: applied at once. An Open that comes before its flow's first
//     packet waits in the table for that packet, one to two FlowTimeouts (as
//     an idle flow does), then counts as a UUID without packets. An Open of a
//     new connection on a 4-tuple whose flow is still in the table waits in
//     that flow for the new connection's SYN (capture hands it on within a few
//     hundred milliseconds), at most until the flow is collected, then as an
//     Open before its first packet.
//   - Idle flows (GC): a flow ends when no packet of it has reached the
//     demuxer for at least one FlowTimeout, and at most two FlowTimeouts plus
//     the time the loop takes to reach its timer. Each GC ends the flows
//     without a packet since the previous GC, and a GC comes a full
//     FlowTimeout after the previous one ended, however late that ran. With a
//     capture delay of at most D, a flow whose packets are captured less than
//     FlowTimeout-D apart is never ended.
//   - Before a GC or a sweep the loop handles the packets and Opens already
//     waiting in its channels (up to maxDrain), so that neither ends a flow
//     whose packet or UUID has already reached the demuxer.
//   - Capture duration is the saver's: it ends a file at the first packet
//     captured CaptureDuration or more after the flow's first packet, by their
//     capture timestamps, which the demuxer hands on unchanged and in order.
//     (The saver also ends a file by its own timer, CaptureDuration after it
//     got its first packet; a packet that capture held up to D longer than
//     that first one can then miss the last D of the flow's file.)
package demuxer

import (
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

// Open names a flow: the value either UUID source sends on the demuxer's
// events channel.
type Open = flow.Named

// Savers is what the demuxer needs of the savers' side: *saver.Pool.
type Savers interface {
	// New creates the saver of the flow named uuid, whose Open event is
	// dated opened; flow describes it in logs.
	New(uuid string, opened time.Time, flow slog.LogValuer) *saver.Saver
	// CountNoPackets counts a named flow that ended without a packet, as
	// its saver would.
	CountNoPackets()
}

// Defaults for the limits that have no flag of the original's.
const (
	// DefaultMaxPending bounds the flows waiting for a UUID. A pending flow
	// costs about 410 bytes of heap (its table entry with one packet, its
	// header bytes, its place in the expiry queue), twice that counting
	// the garbage collector's headroom, so 25,000 of them are about 20 MB:
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
	// FlowTimeout: a flow none of whose packets has reached the demuxer
	// for one to two FlowTimeouts has ended; its saver publishes its file.
	FlowTimeout time.Duration
	// UUIDWait: a flow whose UUID has not arrived this long after its first
	// packet reached the demuxer (checked every UUIDWait/4) is dropped,
	// with its packets.
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

	// Savers starts the saver of each named flow (a *saver.Pool).
	Savers  Savers
	Metrics *phmetrics.Metrics
	Log     *slog.Logger
	// LogKey formats a flow for logs (for example with anonymized
	// addresses); nil means flow.Key.String.
	LogKey func(flow.Key) string
}

// entry is one flow in the table: one TCP connection. A flow is pending
// (saver is nil, its packets are held) until its UUID arrives.
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
	conn  conn   // what is known of the connection's handshake and end
	// pending is true while the flow waits for its UUID (it is counted in
	// npending and referenced by the FIFO).
	pending bool
	// missed counts the packets of the flow dropped while it waited for
	// its UUID, beyond the pending limits: its file's record says so.
	missed uint32
	// x is the state of a reused 4-tuple; nil for almost every flow.
	x *reuse
}

// reuse is what an entry knows of the other connections on its 4-tuple.
type reuse struct {
	// next are the Opens that arrived for later connections on the
	// 4-tuple (their UUIDs differ from this connection's), oldest first.
	// The first packet of the next connection takes one of them.
	next []Open
	// prev is the connection this one replaced on the 4-tuple when that
	// one was still waiting for its UUID, so that a late Open still names
	// it. Each links to the one it replaced, up to maxChain.
	prev *entry
	// recent are the UUIDs of the last connections on the 4-tuple, so
	// that an Open of one of them again (tcp-info restarted, or late) is
	// not taken for a new connection's.
	recent []string
}

// Bounds of the reuse state of one 4-tuple.
const (
	maxQueued = 8 // Opens waiting for a later connection
	maxChain  = 8 // earlier connections still waiting for their UUIDs
	maxRecent = 4 // UUIDs of earlier connections remembered
)

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
	// now is time.Now; tests replace it to drive the demuxer's clock.
	now func() time.Time

	missedPending prometheus.Counter
	shedMaxFlows  prometheus.Counter
	shedMaxHeap   prometheus.Counter
	droppedWait   prometheus.Counter
	droppedLimit  prometheus.Counter
	uuidTimedOut  prometheus.Counter
	// waitEnded counts the flows dropped while they wait for their UUID
	// at the end of their wait (uuidTimedOut), or uuidChanClosed while GC
	// collects idle flows.
	waitEnded      prometheus.Counter
	uuidChanClosed prometheus.Counter
	// waiting is pcap_saver_states{state="uuidwait"}: the pending flows.
	waiting    prometheus.Gauge
	heapSample []metrics.Sample
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
	m := cfg.Metrics
	d := &Demuxer{
		cfg:   cfg,
		flows: make(map[flow.Key]*entry),
		gen:   2, // so that gen-1 never underflows
		// A pending flow is in the original's saver state uuidwait.
		missedPending:  m.MissedPackets.WithLabelValues(saver.UUIDWait),
		waiting:        m.SaverCount.WithLabelValues(saver.UUIDWait),
		shedMaxFlows:   m.FlowsShed.WithLabelValues("maxflows"),
		shedMaxHeap:    m.FlowsShed.WithLabelValues("maxheap"),
		droppedWait:    m.PendingDropped.WithLabelValues("uuidtimeout"),
		droppedLimit:   m.PendingDropped.WithLabelValues("limit"),
		uuidTimedOut:   m.SaverErrors.WithLabelValues(saver.UUIDTimedOut),
		uuidChanClosed: m.SaverErrors.WithLabelValues(saver.UUIDChanClosed),
		heapSample:     []metrics.Sample{{Name: "/gc/heap/live:bytes"}},
		pendingWake:    make(chan struct{}, 1),
		epoch:          time.Now(),
		now:            time.Now,
	}
	d.waitEnded = d.uuidTimedOut
	return d
}

// clock returns t as nanoseconds since the demuxer's epoch, on the monotonic
// clock (t must come from d.now).
func (d *Demuxer) clock(t time.Time) int64 { return int64(t.Sub(d.epoch)) }

// HasPending reports whether any flow is waiting for its UUID. It is safe
// for concurrent use: a UUID source that polls (kernelsource) polls only
// while it is true.
func (d *Demuxer) HasPending() bool { return d.hasPending.Load() }

// PendingWake returns a channel that receives when a flow starts waiting for
// its UUID (at most one value waits in it).
func (d *Demuxer) PendingWake() <-chan struct{} { return d.pendingWake }

// Run demultiplexes until packets is closed: it takes batches of packets
// (and returns each batch to flow.PutBatch) and UUID events. Closing packets
// is how the daemon shuts down, in this order: it stops capturing (so that
// every packet captured reaches the demuxer), then its UUID sources (which
// deliver what they have already received), then closes packets. Run then
// applies the Opens still waiting in events, ends every flow (savers publish
// what they have) and waits for all savers to finish. events may stay open.
func (d *Demuxer) Run(packets <-chan *flow.Batch, events <-chan Open) {
	gc := time.NewTimer(d.cfg.FlowTimeout)
	defer gc.Stop()
	// Pending flows are checked several times per UUIDWait so that one
	// lives at most 25% longer than its wait.
	sweep := time.NewTicker(max(d.cfg.UUIDWait/4, time.Millisecond))
	defer sweep.Stop()
	d.run(packets, events, ticks{
		gc:    gc.C,
		sweep: sweep.C,
		// The next GC is a full FlowTimeout after this one ended,
		// however late this one was.
		gcDone: func() { gc.Reset(d.cfg.FlowTimeout) },
	})
}

// ticks are the clock events of Run's loop. Tests drive the loop with their
// own.
type ticks struct {
	gc, sweep <-chan time.Time
	// gcDone and sweepDone, if not nil, are called after each GC and
	// each sweep.
	gcDone, sweepDone func()
}

func (d *Demuxer) run(packets <-chan *flow.Batch, events <-chan Open, t ticks) {
	for {
		select {
		case b, ok := <-packets:
			if !ok {
				d.finishEvents(events)
				d.shutdown()
				return
			}
			d.batch(b)
		case ev, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			d.Open(ev)
		case <-t.gc:
			if !d.drain(packets, events) {
				d.finishEvents(events)
				d.shutdown()
				return
			}
			d.GC()
			if t.gcDone != nil {
				t.gcDone()
			}
		case <-t.sweep:
			if !d.drain(packets, events) {
				d.finishEvents(events)
				d.shutdown()
				return
			}
			d.expirePending(d.clock(d.now()))
			d.checkHeap()
			if t.sweepDone != nil {
				t.sweepDone()
			}
		}
	}
}

// finishEvents applies the Opens waiting in events when packets closes: the
// UUID sources have stopped by then, and what they delivered names its flows
// before the flows end.
func (d *Demuxer) finishEvents(events <-chan Open) {
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return
			}
			d.Open(ev)
		default:
			return
		}
	}
}

// maxDrain bounds the batches and Opens drain takes, so that a GC or a sweep
// is not put off for long under a flood: 256 batches of 128 packets take a
// few milliseconds.
const maxDrain = 256

// drain handles the batches and Opens that are already waiting in the
// channels, up to maxDrain of them: a GC or a sweep that comes at the same
// time as they do (select takes ready cases in random order) must not end a
// flow whose packet or UUID has already reached the demuxer. It reports
// false if packets is closed.
func (d *Demuxer) drain(packets <-chan *flow.Batch, events <-chan Open) bool {
	for range maxDrain {
		select {
		case b, ok := <-packets:
			if !ok {
				return false
			}
			d.batch(b)
		case ev, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			d.Open(ev)
		default:
			return true
		}
	}
	return true
}

// batch routes a batch of packets and returns it to the pool.
func (d *Demuxer) batch(b *flow.Batch) {
	for i := range b.Packets {
		d.Packet(b.Packets[i])
	}
	flow.PutBatch(b)
	d.WakeSavers()
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
		e = d.newPending(p.Key, d.clock(d.now()))
	}
	e.gen = d.gen
	// Only a connection's first packet, and SYNs, RSTs and FINs, can
	// change which connection a packet belongs to.
	if fl := tcpFlags(&p); fl&(tcpSYN|tcpRST|tcpFIN) != 0 || e.conn.flags&connSeen == 0 {
		e = d.track(e, &p, fl)
	}
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
		e.missed++
		return
	}
	e.hold(p)
	d.npkts++
}

// track follows the connection of e with p, and returns the entry p belongs
// to: e, or a new entry if p starts a new connection on the 4-tuple. It also
// chooses the UUID of a connection named before its first packet.
func (d *Demuxer) track(e *entry, p *flow.Packet, fl byte) *entry {
	s := readTCP(p, fl)
	if e.conn.startsNew(s) {
		e = d.split(e, p, fl)
	} else if e.conn.flags&connSeen == 0 && e.named != nil && e.x != nil && len(e.x.next) > 0 {
		// Several Opens came before the first packet.
		d.pick(e, p, fl)
	}
	e.conn.record(s, p.Time)
	return e
}

// split ends the connection of c, whose 4-tuple p (a SYN or SYN-ACK) reuses
// for a new connection, and returns the new connection's entry, which takes
// c's place in the table. c's saver publishes; c, if it still waits for its
// UUID, waits on aside for a late Open until its deadline.
func (d *Demuxer) split(c *entry, p *flow.Packet, fl byte) *entry {
	n := &entry{first: flow.Packet{Key: p.Key}, gen: d.gen}
	x := &reuse{}
	if c.x != nil {
		x.next, x.prev, x.recent = c.x.next, c.x.prev, c.x.recent
		c.x.next, c.x.recent = nil, nil
	}
	switch {
	case c.saver != nil:
		x.recent = addRecent(x.recent, c.saver.UUID())
		c.saver.Close()
	case c.pending:
		x.prev = c
	}
	// Keep at most maxChain earlier connections waiting.
	i := 0
	for r := x.prev; r != nil; r = r.prevConn() {
		if i++; i == maxChain && r.x != nil {
			r.x.prev = nil
		}
	}
	n.x = x
	d.flows[p.Key] = n
	if len(x.next) > 0 {
		d.pick(n, p, fl)
	}
	if n.named == nil {
		d.addPending(n, d.clock(d.now()))
	}
	d.cfg.Log.Debug("4-tuple reused by a new connection", "flow", flowLog{p.Key, d.cfg.LogKey})
	return n
}

func addRecent(recent []string, uuid string) []string {
	if len(recent) == maxRecent {
		copy(recent, recent[1:])
		recent = recent[:maxRecent-1]
	}
	return append(recent, uuid)
}

// pick chooses, among the Opens that arrived for e's 4-tuple before the
// first packet p of e's connection (e.named, then e.x.next), the one of e's
// connection (see pickIndex); the older ones were of connections that ended
// without a packet seen, the younger ones wait for later connections.
func (d *Demuxer) pick(e *entry, p *flow.Packet, fl byte) {
	var cands []Open
	if e.named != nil {
		cands = append(cands, *e.named)
	}
	cands = append(cands, e.x.next...)
	i := pickIndex(len(cands), func(i int) time.Time { return cands[i].Time }, p.Time, fl&tcpSYN != 0)
	for range i {
		d.cfg.Savers.CountNoPackets()
	}
	e.named = &cands[i]
	e.x.next = cands[i+1:]
	if len(e.x.next) == 0 {
		e.x.next = nil
	}
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
	e := &entry{first: flow.Packet{Key: k}}
	d.flows[k] = e
	d.addPending(e, now)
	return e
}

// addPending makes e wait for its UUID until UUIDWait after now.
func (d *Demuxer) addPending(e *entry, now int64) {
	if d.npending >= d.cfg.MaxPending {
		d.evictOldestPending()
	}
	e.pending = true
	d.fifo.push(pendingRef{e: e, deadline: now + int64(d.cfg.UUIDWait)})
	d.npending++
	d.gauges()
	select {
	case d.pendingWake <- struct{}{}:
	default:
	}
}

// Open names a flow. It must only be called from Run's goroutine, or in
// place of Run.
func (d *Demuxer) Open(ev Open) {
	d.WakeSavers()
	d.cfg.Metrics.DemuxerUUIDCount.Inc()
	e, ok := d.flows[ev.Key]
	if !ok {
		// The UUID arrived before the flow's first packet (or after the
		// flow was dropped, or tcp-info restarted): the flow's saver
		// starts with its first packet.
		if !d.admit() {
			d.cfg.Metrics.MissedUUIDs.WithLabelValues("skipped").Inc()
			return
		}
		d.flows[ev.Key] = &entry{gen: d.gen, named: &ev, first: flow.Packet{Key: ev.Key}}
		d.gauges()
		return
	}
	if e.knows(ev.UUID) {
		// tcp-info sends Open again for every live socket when it
		// restarts; an Open may also come late, after a new connection
		// took the 4-tuple: nothing to do.
		return
	}
	switch {
	case e.conn.flags&connSeen == 0:
		// Named before its first packet, and named again: a new socket
		// on the 4-tuple, or several. The first packet chooses (pick),
		// and the flow waits as long as a newly named flow.
		d.queue(e, ev)
		e.gen = d.gen
	case e.conn.before(ev.Time):
		// The socket was there before the flow's connection started:
		// ev is of an earlier connection on the 4-tuple.
		switch {
		case d.nameEarlier(e, ev):
		case e.pending && !e.conn.refused():
			// None is known: the connection's first SYN was
			// perhaps not captured, and ev is its UUID after all.
			d.name(e, ev)
		default:
			d.cfg.Savers.CountNoPackets()
		}
	case e.pending && !e.conn.refused():
		d.name(e, ev)
	default:
		// The flow has another UUID (or never had a socket): ev is of
		// a later connection on the 4-tuple, whose first packet has not
		// arrived yet.
		d.queue(e, ev)
	}
	d.gauges()
}

// prevConn returns the connection e replaced on its 4-tuple while that one
// was waiting for its UUID, if e knows of one.
func (e *entry) prevConn() *entry {
	if e.x == nil {
		return nil
	}
	return e.x.prev
}

// knows reports whether uuid is the UUID of e's connection or of another
// connection on its 4-tuple that e knows of.
func (e *entry) knows(uuid string) bool {
	if e.saver != nil && e.saver.UUID() == uuid || e.named != nil && e.named.UUID == uuid {
		return true
	}
	if e.x == nil {
		return false
	}
	for _, o := range e.x.next {
		if o.UUID == uuid {
			return true
		}
	}
	for _, u := range e.x.recent {
		if u == uuid {
			return true
		}
	}
	return false
}

// queue keeps ev for a later connection on e's 4-tuple.
func (d *Demuxer) queue(e *entry, ev Open) {
	if e.x == nil {
		e.x = &reuse{}
	}
	if len(e.x.next) == maxQueued {
		d.cfg.Savers.CountNoPackets()
		copy(e.x.next, e.x.next[1:])
		e.x.next = e.x.next[:maxQueued-1]
	}
	e.x.next = append(e.x.next, ev)
}

// name gives the pending flow e its UUID: its saver starts with the packets
// held.
func (d *Demuxer) name(e *entry, ev Open) {
	d.startSaver(e, ev)
	d.npkts -= e.npending()
	e.release(e.saver.Push)
	e.pending = false
	d.npending--
}

// nameEarlier names, with an Open dated before the connection of e started,
// the earlier connection on the 4-tuple that it is of, if that is still
// waiting for its UUID; its saver publishes at once. It reports whether the
// Open was of an earlier connection that e knows of (named now, or already
// ended without its UUID); if not, the Open is handled as any other.
func (d *Demuxer) nameEarlier(e *entry, ev Open) bool {
	for r := e.prevConn(); r != nil; r = r.prevConn() {
		if r.conn.before(ev.Time) {
			continue // older than r too
		}
		if !r.pending {
			// r was named, or dropped at its deadline: ev is late.
			d.cfg.Savers.CountNoPackets()
			return true
		}
		d.name(r, ev)
		r.saver.Close()
		r.saver = nil // the entry stays linked; its saver is on its own now
		e.x.recent = addRecent(e.x.recent, ev.UUID)
		return true
	}
	return false
}

func (d *Demuxer) startSaver(e *entry, ev Open) {
	e.saver = d.cfg.Savers.New(ev.UUID, ev.Time, flowLog{ev.Key, d.cfg.LogKey})
	e.saver.MissedPending(uint64(e.missed))
	e.missed = 0 // the entry may serve a later connection on its 4-tuple
	e.saver.Start(&d.wg)
}

// flowLog formats a flow for a log line only when the line is logged.
type flowLog struct {
	k      flow.Key
	format func(flow.Key) string
}

func (f flowLog) LogValue() slog.Value { return slog.StringValue(f.format(f.k)) }

// GC ends flows without packets since the previous call: their savers
// publish. Run calls it FlowTimeout after the previous call ended, so a flow
// is ended after one to two FlowTimeouts of silence.
func (d *Demuxer) GC() {
	start := time.Now()
	// A flow collected while it still waits for its UUID is the
	// original's uuidchanclosed (the collection closed its saver's UUID
	// channel), not a UUID that did not come in time.
	d.waitEnded = d.uuidChanClosed
	defer func() { d.waitEnded = d.uuidTimedOut }()
	for k, e := range d.flows {
		if e.gen >= d.gen {
			continue
		}
		if e.saver != nil {
			d.cfg.Metrics.DemuxerSaversGCed.Inc()
		}
		if d.end(e) {
			delete(d.flows, k)
		}
	}
	d.gen++
	d.fifo.shrink()
	d.gauges()
	d.cfg.Metrics.DemuxerGCLatency.Observe(time.Since(start).Seconds())
}

// end ends the connection of e, a flow in the table (see finish), and
// reports whether e leaves the table: it stays if Opens wait in it for a
// later connection on its 4-tuple, and waits then for that one's first
// packet, as a flow named before its first packet does.
func (d *Demuxer) end(e *entry) bool {
	hadConn := e.conn.flags&connSeen != 0
	var uuid string
	if e.saver != nil {
		uuid = e.saver.UUID()
	}
	d.finish(e)
	if e.x == nil || len(e.x.next) == 0 {
		return true
	}
	if !hadConn {
		// Named several times and no packet came: none of them will.
		d.countQueued(e)
		return true
	}
	if uuid != "" {
		e.x.recent = addRecent(e.x.recent, uuid)
	}
	e.saver = nil
	e.named = &e.x.next[0]
	e.x.next = e.x.next[1:]
	e.conn = conn{}
	e.gen = d.gen
	return false
}

// finish ends the connection of e: its saver publishes, or its held packets
// are dropped, or its UUID is counted as one without packets.
func (d *Demuxer) finish(e *entry) {
	switch {
	case e.saver != nil:
		e.saver.Close()
	case e.named != nil:
		d.cfg.Savers.CountNoPackets()
	case e.pending:
		d.dropPending(e, d.droppedWait)
	}
}

// countQueued counts the Opens waiting in e for a later connection as UUIDs
// without packets, and forgets them.
func (d *Demuxer) countQueued(e *entry) {
	if e.x == nil {
		return
	}
	for range e.x.next {
		d.cfg.Savers.CountNoPackets()
	}
	e.x.next = nil
}

// expirePending drops the flows that have waited UUIDWait for their UUID.
func (d *Demuxer) expirePending(now int64) {
	for d.fifo.len() > 0 {
		r := d.fifo.front()
		if r.e.pending && r.deadline > now {
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
		live := d.fifo.front().e.pending
		d.popPending(d.droppedLimit)
		if live {
			return
		}
	}
}

// popPending removes the oldest FIFO ref, dropping its flow if still pending.
// A flow in the table leaves it, unless Opens for a later connection wait in
// it; an earlier connection set aside by a new one on its 4-tuple is only
// dropped.
func (d *Demuxer) popPending(reason prometheus.Counter) {
	r := d.fifo.front()
	d.fifo.pop()
	e := r.e
	if !e.pending {
		return
	}
	k := e.first.Key
	if d.flows[k] != e {
		d.dropPending(e, reason)
		return
	}
	if reason != d.droppedWait {
		// Evicted: the Opens waiting in it go too.
		d.dropPending(e, reason)
		d.countQueued(e)
		delete(d.flows, k)
		return
	}
	if d.end(e) {
		delete(d.flows, k)
	}
}

func (d *Demuxer) dropPending(e *entry, reason prometheus.Counter) {
	reason.Inc()
	if reason == d.droppedWait {
		// The original counted a flow that never got its UUID as a
		// saver error; dashboards watch it.
		d.waitEnded.Inc()
	}
	d.cfg.Metrics.DemuxerIgnored.Add(float64(e.npending()))
	d.npkts -= e.npending()
	e.release(nil)
	e.pending = false
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
	d.waiting.Set(float64(d.npending))
	d.hasPending.Store(d.npending > 0)
}

// Flush ends every flow now and waits for the savers to publish. Run calls
// it when packets is closed.
func (d *Demuxer) Flush() { d.shutdown() }

func (d *Demuxer) shutdown() {
	d.WakeSavers()
	for k, e := range d.flows {
		d.finish(e)
		d.countQueued(e)
		delete(d.flows, k)
	}
	// Earlier connections set aside by new ones on their 4-tuples.
	for d.fifo.len() > 0 {
		d.popPending(d.droppedWait)
	}
	d.fifo.reset()
	d.gauges()
	d.wg.Wait()
}
