// Package capture reads packets from the kernel with AF_PACKET sockets and
// their TPACKET_V3 rings, parses each packet once, copies only its header
// bytes and hands them to the demuxer in batches.
//
// Without -interface, one socket captures every interface of the host (the
// kernel's "any" binding), so that memory, idle CPU and start-up do not grow
// with the number of interfaces and new interfaces are captured from their
// first packet; the socket filter leaves out loopback and the ports of
// bridges and bonds, whose packets the bridge or bond itself also carries.
// With -interface, one socket per named interface.
//
// # Delay
//
// Each socket's goroutine sleeps in the runtime's network poller (openWaiter)
// until the kernel hands it a ring block or it is told to stop or change its
// filter; an idle capture costs no CPU. The kernel hands a block over when
// it is full or Timeout after its first packet, whichever comes first. The goroutine then reads every block
// that is ready, and hands each batch on when it is full or when the ring
// has nothing more to read right now. So a packet reaches the demuxer at most
// Timeout (100 ms by default) plus the time to read the ring after it was
// captured, at one packet a second as at line rate.
//
// # Ownership
//
// Only the goroutine that runs an Interface touches its socket and ring:
// filter changes and stops are handed to it through a mutex-guarded mailbox
// and a read deadline of now that wakes its wait in the poller (or an
// eventfd, when it waits in poll(2)), and it closes the socket itself when it
// ends.
package capture

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/metrics"
)

// Defaults of the capture settings.
const (
	// DefaultBufferSize is the kernel capture ring per socket. libpcap's
	// default is 2 MiB, about 7,000 packets of 300 bytes (snaplen 256 plus
	// the ring's per-packet overhead): 25 ms at 300,000 packets/s, less than
	// one scheduling hiccup of a busy two-core host, so the original lost
	// packets in bursts. Measured with the live benchmark (4 bulk streams,
	// about 280,000 packets/s on 2 cores, BENCHMARKS.md): 32 MiB still
	// dropped 41,000-110,000 packets a run, 64 MiB and 128 MiB none. The
	// kernel allocates the whole ring when the socket opens, and it counts
	// in the daemon's resident memory.
	DefaultBufferSize = 64 << 20
	// DefaultTimeout is the kernel's block timeout: the longest a packet
	// waits in a ring block that is not full before the block is handed to
	// the capture goroutine. It costs no CPU while no packet comes (the
	// kernel hands over no empty block), so it is short: it bounds the delay
	// at low packet rates and how long the drain at shutdown waits.
	DefaultTimeout = 100 * time.Millisecond
	// statsInterval is how often the kernel's drop counter is read while
	// packets come.
	statsInterval = time.Second
	// drainMargin is added to the block timeout when draining at a stop,
	// for the kernel's block timer to fire.
	drainMargin = 50 * time.Millisecond
)

// Config holds the settings of every capture.
type Config struct {
	// Snaplen is the most bytes captured per packet (-maxheadersize).
	Snaplen int
	// BufferSize is the kernel ring size in bytes.
	BufferSize int
	// Timeout is the kernel's block timeout; see DefaultTimeout.
	Timeout time.Duration
	Metrics *metrics.Metrics
	Log     *slog.Logger

	// drops is the kernel drop counter of every socket opened with this
	// Config, for KernelDropsSince.
	drops dropLog
}

func (cfg *Config) timeout() time.Duration {
	if cfg.Timeout <= 0 {
		return DefaultTimeout
	}
	return cfg.Timeout
}

// Filter describes the socket filter for logs and tests, in libpcap's
// words: "tcp and (host A or host B ...)", or "tcp" with no address.
func Filter(addrs []netip.Addr) string {
	if len(addrs) == 0 {
		return "tcp"
	}
	hosts := make([]string, 0, len(addrs))
	for _, a := range addrs {
		hosts = append(hosts, "host "+a.WithZone("").String())
	}
	slices.Sort(hosts)
	hosts = slices.Compact(hosts)
	return "tcp and (" + strings.Join(hosts, " or ") + ")"
}

// Interface captures on one packet socket: one interface, or every
// interface (the name "any").
type Interface struct {
	name    string
	ifindex int // 0 for every interface
	src     ringSource
	cfg     *Config
	log     *slog.Logger
	packets prometheus.Counter
	drops   prometheus.Gauge
	ifdrops prometheus.Gauge
	bad     map[error]prometheus.Counter

	// The mailbox: what other goroutines ask of the reading goroutine.
	mu        sync.Mutex
	wake      int      // eventfd; -1 once closed
	waiter    *os.File // the socket's duplicate in the runtime's poller, or nil
	newFilter []unix.SockFilter
	stopAt    time.Time

	// The reading goroutine's own state.
	cur        int    // next ring block
	totalDrops uint64 // kernel drops since open
	ifdrop0    uint64 // the interface's rx_dropped at open
	b          flow.Builder
	batch      *flow.Batch
	vlanBuf    []byte
}

// AnyInterface is the name of the capture on every interface.
const AnyInterface = "any"

// Open starts a capture on the interface name (AnyInterface: every
// interface) with the socket filter prog. The caller must Run it (which
// closes it) or Close it.
func Open(name string, prog []unix.SockFilter, cfg *Config) (*Interface, error) {
	ifindex := 0
	if name != AnyInterface {
		ifc, err := net.InterfaceByName(name)
		if err != nil {
			return nil, fmt.Errorf("open capture on %s: %w", name, err)
		}
		ifindex = ifc.Index
	}
	s, err := openPacketSocket(ifindex, cfg.BufferSize, cfg.timeout(), prog)
	if err != nil {
		return nil, fmt.Errorf("open capture on %s: %w", name, err)
	}
	c, err := newInterface(name, ifindex, s, cfg)
	if err != nil {
		if cerr := s.close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		return nil, err
	}
	return c, nil
}

func newInterface(name string, ifindex int, src ringSource, cfg *Config) (*Interface, error) {
	wake, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("open capture on %s: eventfd: %w", name, err)
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := cfg.Metrics
	c := &Interface{
		name:    name,
		ifindex: ifindex,
		src:     src,
		cfg:     cfg,
		wake:    wake,
		log:     log.With("interface", name),
		packets: m.PacketsCaptured.WithLabelValues(name),
		drops:   m.KernelDrops.WithLabelValues(name),
		ifdrops: m.InterfaceDrops.WithLabelValues(name),
		bad:     map[error]prometheus.Counter{},
	}
	c.ifdrop0, _ = c.interfaceDrops()
	for _, e := range []error{flow.ErrTruncated, flow.ErrNotIP, flow.ErrNotTCP, flow.ErrFragment, flow.ErrMalformed, flow.ErrLinkType, flow.ErrTooManyExt} {
		c.bad[e] = m.BadPackets.WithLabelValues(reason(e))
	}
	return c, nil
}

// reason names a parse error for the metric label.
func reason(err error) string {
	switch err {
	case flow.ErrTruncated:
		return "truncated"
	case flow.ErrNotIP:
		return "notip"
	case flow.ErrNotTCP:
		return "nottcp"
	case flow.ErrFragment:
		return "fragment"
	case flow.ErrMalformed:
		return "malformed"
	case flow.ErrLinkType:
		return "linktype"
	case flow.ErrTooManyExt:
		return "toomanyheaders"
	}
	return "other"
}

// Name returns the interface's name.
func (c *Interface) Name() string { return c.name }

// SetFilter hands a new socket filter to the reading goroutine, which
// attaches it between two reads. It may be called from any goroutine, also
// after the capture ended (it then does nothing).
func (c *Interface) SetFilter(prog []unix.SockFilter) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.newFilter = prog
	c.signal()
}

// Stop asks the reading goroutine to drain what the kernel captured until
// now, hand it on and end. It may be called from any goroutine, any number
// of times, also after the capture ended.
func (c *Interface) Stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopAt.IsZero() {
		c.stopAt = time.Now()
	}
	c.signal()
}

// signal wakes the reading goroutine; c.mu is held. A goroutine waiting in
// the runtime's poller is woken by a deadline of now, one in poll(2) by the
// eventfd.
func (c *Interface) signal() {
	if c.wake < 0 {
		return
	}
	if c.waiter != nil {
		c.waiter.SetReadDeadline(time.Now()) // fails only once closed
	}
	var one [8]byte
	one[0] = 1 // host order on little-endian; any non-zero value wakes
	if _, err := unix.Write(c.wake, one[:]); err != nil && !errors.Is(err, unix.EAGAIN) {
		c.log.Warn("wake capture", "err", err)
	}
}

// Close releases an Interface that was opened but never Run.
func (c *Interface) Close() error { return c.close() }

func (c *Interface) close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	if c.wake >= 0 {
		errs = append(errs, unix.Close(c.wake))
		c.wake = -1
	}
	if c.src != nil {
		errs = append(errs, c.src.close())
		c.src = nil
	}
	return errors.Join(errs...)
}

// mailbox takes what other goroutines asked for.
func (c *Interface) mailbox() (filter []unix.SockFilter, stopAt time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	filter, c.newFilter = c.newFilter, nil
	return filter, c.stopAt
}

// Run reads packets until ctx is done or Stop is called, or the interface
// goes away, sending them to out in batches. It closes the socket before
// returning. It returns nil when it was stopped, else the error that ended
// it.
//
// When stopped, Run first drains what the kernel captured before then: a
// packet becomes readable when its ring block is handed over, at the latest
// one block timeout after it arrived, so Run reads on for that long (plus a
// margin) before it closes. Sending to out blocks: the receiver must read
// until every capture has returned.
func (c *Interface) Run(ctx context.Context, out chan<- *flow.Batch) (err error) {
	defer func() {
		if cerr := c.close(); cerr != nil {
			c.log.Warn("close capture", "err", cerr)
		}
	}()
	unhook := context.AfterFunc(ctx, c.Stop)
	defer unhook()
	c.batch = flow.GetBatch()
	defer func() {
		c.send(out)
		flow.PutBatch(c.batch)
		c.batch = nil
		c.readStats()
	}()

	var drainUntil time.Time
	trafficSinceStats := false
	nextStats := time.Now().Add(statsInterval)
	pfd := []unix.PollFd{{Fd: int32(c.src.fd()), Events: unix.POLLIN}, {Fd: int32(c.wake), Events: unix.POLLIN}}
	waiter, rc := c.openWaiter()
	defer c.closeWaiter()
	// pollOnce: wait in poll(2) next time, not in the runtime's poller,
	// which has reported an error on the socket (see wait).
	pollOnce := false
	var deadline time.Time // the waiter's deadline for the next wait
	for {
		if waiter != nil && !pollOnce {
			// Set before the mailbox is read: a message that comes
			// after it sets the deadline to now (signal).
			deadline = wakeAt(trafficSinceStats, nextStats, drainUntil)
			if err := waiter.SetReadDeadline(deadline); err != nil {
				return fmt.Errorf("capture on %s: set deadline: %w", c.name, err)
			}
		}
		filter, stopAt := c.mailbox()
		if filter != nil {
			if err := c.src.setFilter(filter); err != nil {
				c.log.Warn("update filter", "err", err)
			}
		}
		if !stopAt.IsZero() && drainUntil.IsZero() {
			drainUntil = stopAt.Add(c.cfg.timeout() + drainMargin)
			if waiter != nil && !pollOnce {
				continue // the deadline must include the drain
			}
		}
		if c.readRing(out) > 0 {
			trafficSinceStats = true
		}
		c.send(out)
		now := time.Now()
		if trafficSinceStats && !now.Before(nextStats) {
			c.readStats()
			trafficSinceStats = false
			nextStats = now.Add(statsInterval)
		}
		if !drainUntil.IsZero() && !now.Before(drainUntil) {
			// Everything captured before the stop has been handed over.
			c.readRing(out)
			return nil
		}
		if waiter != nil && !pollOnce {
			if trafficSinceStats && (deadline.IsZero() || nextStats.Before(deadline)) {
				continue // the deadline must include the next stats read
			}
			woke := false
			err := rc.Read(func(uintptr) bool {
				if blockReady(c.src.block(c.cur)) {
					return true
				}
				// Woken without a block: the socket may have an
				// error (an interface going away), which the
				// poller reports as an event like any other.
				done := woke
				woke = true
				return done
			})
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				continue
			case err == nil && blockReady(c.src.block(c.cur)):
				continue
			case err != nil:
				// The poller reports nothing but an error on the
				// socket, and will until its next event: wait in
				// poll(2) once.
				pollOnce = true
			}
			// poll(2) says what the socket has.
			pfd[0].Revents = 0
			if _, err := unix.Poll(pfd[:1], 0); err != nil && !errors.Is(err, unix.EINTR) {
				return fmt.Errorf("capture on %s: poll: %w", c.name, err)
			}
			if err := c.polledError(pfd[0], out); err != nil {
				return err
			}
			continue
		}
		pollOnce = false
		wait := -1 // sleep until a packet or a message
		if trafficSinceStats {
			wait = msUntil(now, nextStats)
		}
		if !drainUntil.IsZero() {
			if w := msUntil(now, drainUntil); wait < 0 || w < wait {
				wait = w
			}
		}
		pfd[0].Revents, pfd[1].Revents = 0, 0
		if _, err := unix.Poll(pfd, wait); err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("capture on %s: poll: %w", c.name, err)
		}
		if pfd[1].Revents&unix.POLLIN != 0 {
			var buf [8]byte
			if _, err := unix.Read(c.wake, buf[:]); err != nil && !errors.Is(err, unix.EAGAIN) {
				return fmt.Errorf("capture on %s: read eventfd: %w", c.name, err)
			}
		}
		if err := c.polledError(pfd[0], out); err != nil {
			return err
		}
	}
}

// polledError handles an error that poll(2) reports on the socket (see
// socketError); if it ends the capture, what the ring still holds is handed
// on first.
func (c *Interface) polledError(p unix.PollFd, out chan<- *flow.Batch) error {
	if p.Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) == 0 {
		return nil
	}
	err := c.socketError()
	if err != nil {
		c.readRing(out)
	}
	return err
}

// wakeAt is when the reading goroutine must wake up even if no block comes:
// for the next kernel drop counter read while traffic flows, and at the end
// of a stop's drain. Zero: only a block or a message wakes it.
func wakeAt(trafficSinceStats bool, nextStats, drainUntil time.Time) time.Time {
	var t time.Time
	if trafficSinceStats {
		t = nextStats
	}
	if !drainUntil.IsZero() && (t.IsZero() || drainUntil.Before(t)) {
		t = drainUntil
	}
	return t
}

// openWaiter puts a duplicate of the socket into the runtime's network
// poller, so that the reading goroutine waits for ring blocks there, with
// the daemon's other goroutines, rather than in its own blocking poll(2).
// A thread blocked in a system call for more than 10 ms is taken over by the
// runtime's monitor thread, which then polls every 20 µs for a while: with
// the capture asleep in poll(2) between blocks, that happened at every
// block timeout. It returns nils, and the capture waits in poll(2), if the
// socket cannot be polled that way.
func (c *Interface) openWaiter() (*os.File, syscall.RawConn) {
	fd, err := unix.FcntlInt(uintptr(c.src.fd()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		c.log.Debug("capture waits in poll(2)", "err", err)
		return nil, nil
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		c.log.Debug("capture waits in poll(2)", "err", err)
		return nil, nil
	}
	f := os.NewFile(uintptr(fd), c.name)
	rc, err := f.SyscallConn()
	if err == nil {
		// Not in the poller (os.NewFile could not add it): no deadlines.
		err = f.SetReadDeadline(time.Time{})
	}
	if err != nil {
		f.Close()
		c.log.Debug("capture waits in poll(2)", "err", err)
		return nil, nil
	}
	c.mu.Lock()
	c.waiter = f
	c.mu.Unlock()
	return f, rc
}

// closeWaiter takes the socket's duplicate out of the poller and closes it
// (the socket stays open).
func (c *Interface) closeWaiter() {
	c.mu.Lock()
	f := c.waiter
	c.waiter = nil
	c.mu.Unlock()
	if f != nil {
		f.Close()
	}
}

// msUntil is the poll timeout, in whole milliseconds rounded up, from now
// until t.
func msUntil(now, t time.Time) int {
	d := t.Sub(now)
	if d <= 0 {
		return 0
	}
	return int((d + time.Millisecond - 1) / time.Millisecond)
}

// socketError handles an error the socket reports: an interface that went
// down stays captured (the kernel resumes when it comes up again); one that
// went away ends the capture.
func (c *Interface) socketError() error {
	serr := c.src.sockErr()
	if serr == nil {
		return nil
	}
	if c.ifindex == 0 {
		c.log.Warn("capture socket error", "err", serr)
		return nil
	}
	if _, err := net.InterfaceByIndex(c.ifindex); err != nil {
		return fmt.Errorf("capture on %s: interface went away: %w", c.name, serr)
	}
	c.log.Info("interface went down; capture resumes when it comes up", "err", serr)
	return nil
}

// readRing parses every packet of every block the kernel has handed over,
// sending full batches to out, at most one pass over the ring, so that under
// a load that refills the ring as fast as it is read the loop still gets to
// its mailbox (a stop, a filter). It returns the number of packets read.
func (c *Interface) readRing(out chan<- *flow.Batch) int {
	read := 0
	nblocks := c.src.blocks()
	for range nblocks {
		blk := c.src.block(c.cur)
		if !blockReady(blk) {
			return read
		}
		n := int(ne32(blk, blkNumPkts))
		off := int(ne32(blk, blkFirst))
		for range n {
			h := blk[off:]
			c.packet(h)
			if len(c.batch.Packets) == flow.BatchSize {
				c.send(out)
			}
			off += int(ne32(h, pktNext))
		}
		read += n
		c.src.release(c.cur)
		c.cur++
		if c.cur == nblocks {
			c.cur = 0
		}
	}
	return read
}

// packet builds the packet whose tpacket3_hdr starts h into the batch's
// next slot.
func (c *Interface) packet(h []byte) {
	snap := int(ne32(h, pktSnaplen))
	origLen := int(ne32(h, pktLen))
	status := ne32(h, pktStatus)
	mac := int(ne16(h, pktMac))
	l3 := int(ne16(h, pktNet))
	ts := int64(ne32(h, pktSec))*1e9 + int64(ne32(h, pktNsec))
	data := h[mac : mac+snap]
	link := flow.LinkEthernet
	switch ne16(h, sllHatype) {
	case unix.ARPHRD_ETHER, unix.ARPHRD_LOOPBACK:
		if status&unix.TP_STATUS_VLAN_VALID != 0 {
			// The kernel took the 802.1Q tag out of the frame; put it
			// back where it was, as libpcap does.
			tpid := uint16(0x8100)
			if status&unix.TP_STATUS_VLAN_TPID_VALID != 0 {
				tpid = ne16(h, pktTPID)
			}
			data = c.withVLAN(data, tpid, uint16(ne32(h, pktVLANTCI)))
			origLen += 4
		}
	default:
		// No Ethernet header: start at the network header, and the
		// saver's file gets a synthetic Ethernet header.
		skip := min(max(l3-mac, 0), len(data))
		data = data[skip:]
		origLen -= skip
		link = flow.LinkRaw
	}
	n := len(c.batch.Packets)
	c.batch.Packets = append(c.batch.Packets, flow.Packet{})
	if _, err := c.b.BuildInto(&c.batch.Packets[n], data, link, ts, origLen); err != nil {
		c.batch.Packets = c.batch.Packets[:n]
		c.badPacket(err)
	}
}

// withVLAN returns data with an 802.1Q tag inserted after the MAC addresses.
func (c *Interface) withVLAN(data []byte, tpid, tci uint16) []byte {
	if len(data) < 12 {
		return data
	}
	if cap(c.vlanBuf) < len(data)+4 {
		c.vlanBuf = make([]byte, len(data)+4+64)
	}
	buf := c.vlanBuf[:len(data)+4]
	copy(buf, data[:12])
	buf[12], buf[13] = byte(tpid>>8), byte(tpid)
	buf[14], buf[15] = byte(tci>>8), byte(tci)
	copy(buf[16:], data[12:])
	return buf
}

// send hands the batch on, if it holds packets.
func (c *Interface) send(out chan<- *flow.Batch) {
	if len(c.batch.Packets) == 0 {
		return
	}
	c.packets.Add(float64(len(c.batch.Packets)))
	out <- c.batch
	c.batch = flow.GetBatch()
}

func (c *Interface) badPacket(err error) {
	c.cfg.Metrics.DemuxerBadPacket.Inc()
	if ctr, ok := c.bad[err]; ok {
		ctr.Inc()
	}
}

// readStats exports the kernel's drop counter and the interface's.
func (c *Interface) readStats() {
	d, err := c.src.stats()
	if err != nil {
		c.log.Warn("read capture statistics", "err", err)
		return
	}
	c.totalDrops += d
	c.drops.Set(float64(c.totalDrops))
	c.cfg.drops.add(d, time.Now().UnixNano())
	if n, ok := c.interfaceDrops(); ok && n >= c.ifdrop0 {
		c.ifdrops.Set(float64(n - c.ifdrop0))
	}
}

// interfaceDrops reads the interface's receive drop counter, as libpcap's
// ps_ifdrop does; there is none for the capture on every interface.
func (c *Interface) interfaceDrops() (uint64, bool) {
	if c.ifindex == 0 {
		return 0, false
	}
	b, err := os.ReadFile("/sys/class/net/" + c.name + "/statistics/rx_dropped")
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return n, err == nil
}
