// Package capture reads packets from network interfaces with libpcap, one
// goroutine per interface, parses each packet once, copies only its header
// bytes and hands them to the demuxer in batches.
package capture

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/pcap"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/metrics"
)

// Defaults of the capture settings.
const (
	// DefaultBufferSize is the kernel capture ring per interface. libpcap's
	// default is 2 MiB, about 7,000 packets of 300 bytes (snaplen 256 plus
	// the ring's per-packet overhead): 25 ms at 300,000 packets/s, less than
	// one scheduling hiccup of a busy two-core host, so the original lost
	// packets in bursts. Measured with the live benchmark (4 bulk streams,
	// about 280,000 packets/s on 2 cores, BENCHMARKS.md): 32 MiB still
	// dropped 41,000-110,000 packets a run, 64 MiB and 128 MiB none. The
	// kernel backs only the pages the ring has used.
	DefaultBufferSize = 64 << 20
	// DefaultTimeout is how long libpcap waits to fill a ring block before
	// handing over what it has: the longest a packet waits at a low packet
	// rate, and how long a capture takes to notice that it should stop. Each
	// wait is a blocking cgo call, and each one wakes the Go runtime's
	// monitor thread for a while: an idle daemon spent 31 ms of CPU a
	// second at 50 ms, 3 ms at 500 ms (BENCHMARKS.md). 250 ms keeps the
	// delay well under -flowtimeout and -uuidwaitduration.
	DefaultTimeout = 250 * time.Millisecond
	// statsInterval is how often the kernel's drop counters are read.
	statsInterval = time.Second
)

// Config holds the settings of every interface's capture.
type Config struct {
	// Snaplen is the most bytes captured per packet (-maxheadersize).
	Snaplen int
	// BufferSize is the kernel ring size in bytes.
	BufferSize int
	// Timeout is libpcap's read timeout.
	Timeout time.Duration
	Metrics *metrics.Metrics
	Log     *slog.Logger
}

// Filter returns the BPF filter that captures the TCP packets to and from the
// host's own addresses: "tcp and (host A or host B ...)", as the original.
// With no address, it captures all TCP.
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

// source is the part of a libpcap handle a capture uses; *pcap.Handle
// implements it, and tests give a fake.
type source interface {
	ZeroCopyReadPacketData() ([]byte, gopacket.CaptureInfo, error)
	Stats() (*pcap.Stats, error)
	SetBPFFilter(string) error
	Close()
}

// Interface captures on one network interface.
type Interface struct {
	name    string
	link    flow.LinkType
	h       source
	cfg     *Config
	filter  string
	log     *slog.Logger
	packets prometheus.Counter
	drops   prometheus.Gauge
	ifdrops prometheus.Gauge
	bad     map[error]prometheus.Counter
}

// Open starts a capture on the interface name with the given BPF filter.
// The caller must Run it (which closes it) or Close it.
func Open(name, filter string, cfg *Config) (*Interface, error) {
	ih, err := pcap.NewInactiveHandle(name)
	if err != nil {
		return nil, fmt.Errorf("open capture on %s: %w", name, err)
	}
	defer ih.CleanUp()
	for _, step := range []struct {
		what string
		err  error
	}{
		{"snaplen", ih.SetSnapLen(cfg.Snaplen)},
		{"promiscuous mode", ih.SetPromisc(false)},
		{"timeout", ih.SetTimeout(cfg.Timeout)},
		{"buffer size", ih.SetBufferSize(cfg.BufferSize)},
	} {
		if step.err != nil {
			return nil, fmt.Errorf("open capture on %s: set %s: %w", name, step.what, step.err)
		}
	}
	h, err := ih.Activate()
	if err != nil {
		return nil, fmt.Errorf("open capture on %s: %w", name, err)
	}
	if err := h.SetBPFFilter(filter); err != nil {
		h.Close()
		return nil, fmt.Errorf("set filter %q on %s: %w", filter, name, err)
	}
	return newInterface(name, flow.LinkType(h.LinkType()), h, filter, cfg), nil
}

func newInterface(name string, link flow.LinkType, h source, filter string, cfg *Config) *Interface {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := cfg.Metrics
	c := &Interface{
		name:    name,
		link:    link,
		h:       h,
		cfg:     cfg,
		filter:  filter,
		log:     log.With("interface", name),
		packets: m.PacketsCaptured.WithLabelValues(name),
		drops:   m.KernelDrops.WithLabelValues(name),
		ifdrops: m.InterfaceDrops.WithLabelValues(name),
		bad:     map[error]prometheus.Counter{},
	}
	for _, e := range []error{flow.ErrTruncated, flow.ErrNotIP, flow.ErrNotTCP, flow.ErrFragment, flow.ErrMalformed, flow.ErrLinkType, flow.ErrTooManyExt} {
		c.bad[e] = m.BadPackets.WithLabelValues(reason(e))
	}
	return c
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

// SetFilter replaces the BPF filter, for when the host's addresses change.
func (c *Interface) SetFilter(filter string) error {
	if filter == c.filter {
		return nil
	}
	if err := c.h.SetBPFFilter(filter); err != nil {
		return fmt.Errorf("set filter %q on %s: %w", filter, c.name, err)
	}
	c.filter = filter
	return nil
}

// Close closes the capture. It is safe to call while Run reads: the read
// returns and Run ends.
func (c *Interface) Close() { c.h.Close() }

// Run reads packets until ctx is done or the interface fails (it went away),
// sending them to out in batches. It closes the handle before returning. It
// returns nil when ctx ended it, else the read error.
//
// When ctx is done, Run first drains what the kernel captured before then:
// with libpcap's ring (TPACKET_V3), packets become readable only when their
// block is handed over, at the latest one read timeout after they arrived,
// so closing at once would lose the last packets of every flow in flight.
// It reads on until a packet captured after the stop, or a read timeout a
// full timeout after it; the handle is closed regardless after two
// timeouts and a second. Sending to out blocks: the receiver must read until
// every capture has returned.
//
// Each packet's header bytes are copied once, out of libpcap's ring, into
// memory the packet then owns; nothing else is allocated per packet.
func (c *Interface) Run(ctx context.Context, out chan<- *flow.Batch) error {
	defer c.h.Close()
	// The hard stop: once ctx is done, close the handle if draining has
	// not ended by itself in time.
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
		case <-done:
			return
		}
		t := time.NewTimer(2*c.cfg.Timeout + time.Second)
		defer t.Stop()
		select {
		case <-t.C:
			c.h.Close()
		case <-done:
		}
	}()

	var b flow.Builder
	batch := flow.GetBatch()
	nextStats := time.Now().Add(statsInterval)
	send := func() {
		if len(batch.Packets) == 0 {
			return
		}
		c.packets.Add(float64(len(batch.Packets)))
		out <- batch
		batch = flow.GetBatch()
	}
	defer func() { flow.PutBatch(batch) }()
	c.cfg.Metrics.InterfacesCaptured.Inc()
	defer c.cfg.Metrics.InterfacesCaptured.Dec()
	var stopAt time.Time // when ctx was seen done
	for {
		data, ci, err := c.h.ZeroCopyReadPacketData()
		if stopAt.IsZero() && ctx.Err() != nil {
			stopAt = time.Now()
		}
		switch {
		case err == nil:
			if !stopAt.IsZero() && ci.Timestamp.After(stopAt) {
				// Everything captured before the stop has been read.
				send()
				return nil
			}
			// Built in place in the batch's next slot.
			n := len(batch.Packets)
			if n < cap(batch.Packets) {
				batch.Packets = batch.Packets[:n+1]
			} else {
				batch.Packets = append(batch.Packets, flow.Packet{})
			}
			if _, perr := b.BuildInto(&batch.Packets[n], data, c.link, ci.Timestamp.UnixNano(), ci.Length); perr != nil {
				batch.Packets = batch.Packets[:n]
				c.badPacket(perr)
				continue
			}
			if n+1 < flow.BatchSize {
				continue
			}
		case errors.Is(err, pcap.NextErrorTimeoutExpired):
			// Nothing for a while: hand over what we have.
			if !stopAt.IsZero() && time.Since(stopAt) >= c.cfg.Timeout {
				send()
				return nil
			}
		case ctx.Err() != nil || errors.Is(err, io.EOF):
			send()
			return nil
		default:
			send()
			return fmt.Errorf("read from %s: %w", c.name, err)
		}
		send()
		if now := time.Now(); now.After(nextStats) {
			nextStats = now.Add(statsInterval)
			c.readStats()
		}
	}
}

func (c *Interface) badPacket(err error) {
	c.cfg.Metrics.DemuxerBadPacket.Inc()
	if ctr, ok := c.bad[err]; ok {
		ctr.Inc()
	}
}

// readStats exports the kernel's drop counters.
func (c *Interface) readStats() {
	st, err := c.h.Stats()
	if err != nil {
		c.log.Warn("read capture statistics", "err", err)
		return
	}
	c.drops.Set(float64(st.PacketsDropped))
	c.ifdrops.Set(float64(st.PacketsIfDropped))
}
