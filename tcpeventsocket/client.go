package tcpeventsocket

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/metrics"
)

// MaxLineLen is the longest line, newline included, that the Client reads.
// tcp-info's lines are about 250 bytes; anything near this size is garbage,
// and bounding it bounds the Client's memory to one buffer of this size.
const MaxLineLen = 64 << 10

const (
	// minBackoff and maxBackoff bound the wait between connection attempts.
	// tcp-info usually restarts within seconds, and a unix dial costs
	// nothing, so the cap is short: each second without tcp-info is a second
	// of flows whose UUIDs are never learned.
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second
	// healthyConn is how long a connection must last for the backoff to be
	// reset even if it delivered no event (a quiet host). It equals
	// maxBackoff so that a server that accepts and at once hangs up is not
	// redialled, and logged about, faster than once per maxBackoff.
	healthyConn = maxBackoff
	// badLineLogInterval bounds how often bad lines are logged: a tcp-info
	// gone wrong could send thousands per second, and the metric already
	// counts each one.
	badLineLogInterval = 10 * time.Second
)

// Handler receives the valid events of a Client.
type Handler interface {
	// Event is called from the Client's goroutine, one event at a time, in
	// the order tcp-info sent them. It must return quickly: while it runs
	// nothing is read from the socket, and tcp-info writes to its clients
	// while holding a lock, so a slow handler ends up stalling tcp-info.
	Event(ev Event)
}

// Opens is the Handler that sends the name of each flow tcp-info opens to
// the channel (the demuxer's), blocking while it is full; other events are
// dropped. The demuxer reads the channel until the Client has returned.
type Opens chan<- flow.Named

// Event implements Handler.
func (o Opens) Event(ev Event) {
	if ev.Kind == Open {
		o <- flow.Named{Key: ev.Key, UUID: ev.UUID, Time: ev.Time}
	}
}

// Client reads events from tcp-info's eventsocket and passes them to a
// Handler, reconnecting whenever the socket is missing or the connection
// ends. Create it with New; Run it once.
type Client struct {
	// SkipClose, set before Run, counts Close events without decoding
	// them or passing them on, for handlers that have no use for them:
	// tcp-info sends one per flow, and decoding it is about as costly as
	// decoding the Open. tcp-info writes the Event field first, so a Close
	// is recognised by its first bytes.
	SkipClose bool

	path      string
	h         Handler
	m         *metrics.Metrics
	log       *slog.Logger
	connected atomic.Bool
	// received[kind] is EventsReceived{event=kind}, looked up once.
	received [2]prometheus.Counter

	// Rate limiting of bad-line logs; used only by Run's goroutine.
	lastBadLog time.Time
	badSince   int // bad lines not logged since lastBadLog
}

// New returns a Client of the eventsocket at path that gives events to h and
// counts them in m. Nothing happens until Run is called.
func New(path string, h Handler, m *metrics.Metrics, log *slog.Logger) *Client {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// Create the series up front so that dashboards see zeros, not gaps.
	for _, r := range Reasons {
		m.BadEventsFromTCPInfo.WithLabelValues(r)
	}
	c := &Client{path: path, h: h, m: m, log: log.With("eventsocket", path)}
	c.received[Open] = m.EventsReceived.WithLabelValues(Open.String())
	c.received[Close] = m.EventsReceived.WithLabelValues(Close.String())
	return c
}

// isConnected reports whether the Client is connected to the eventsocket now.
// It is safe for concurrent use.
func (c *Client) isConnected() bool { return c.connected.Load() }

// state is what the Client last logged about its connection, so that it logs
// once per change rather than once per attempt.
type state int

const (
	stateStart state = iota
	stateConnected
	stateDisconnected // a connection ended
	stateUnreachable  // dialing fails
)

// Run connects to the eventsocket and delivers events to the Handler until
// ctx is done, then returns nil. It never gives up on the socket: dial
// failures and lost connections are retried with exponential backoff (100 ms
// doubling to 5 s, reset after a connection that delivered an event or lasted
// 5 s). Run must not be called more than once at a time.
func (c *Client) Run(ctx context.Context) error {
	defer func() {
		c.connected.Store(false)
		c.m.EventsocketUp.Set(0)
	}()
	var d net.Dialer
	backoff := minBackoff
	last := stateStart
	for {
		conn, err := d.DialContext(ctx, "unix", c.path)
		if ctx.Err() != nil {
			if conn != nil {
				conn.Close()
			}
			return nil
		}
		if err != nil {
			if last != stateUnreachable {
				c.log.Warn("cannot connect to eventsocket, retrying", "err", err)
				last = stateUnreachable
			}
		} else {
			c.log.Info("connected to eventsocket")
			last = stateConnected
			healthy, err := c.serve(ctx, conn)
			if ctx.Err() != nil {
				return nil
			}
			c.log.Warn("eventsocket connection ended, reconnecting", "err", err)
			last = stateDisconnected
			if healthy {
				backoff = minBackoff
			}
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// serve reads events from conn until it fails or ctx is done, and closes it.
// It reports whether the connection was healthy (delivered an event or lasted
// healthyConn) and why it ended.
func (c *Client) serve(ctx context.Context, conn net.Conn) (healthy bool, err error) {
	start := time.Now()
	// Closing the connection is what unblocks the read when ctx is done.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer func() {
		stop()
		conn.Close()
		c.connected.Store(false)
		c.m.EventsocketUp.Set(0)
		healthy = healthy || time.Since(start) >= healthyConn
	}()
	c.connected.Store(true)
	c.m.EventsocketUp.Set(1)
	c.m.EventsocketConnects.Inc()

	src, err := newPollingReader(ctx, conn)
	if err != nil {
		return false, fmt.Errorf("eventsocket: %w", err)
	}
	defer src.Close()
	r := bufio.NewReaderSize(src, MaxLineLen)
	for {
		// Once ctx is done the reader returns what the socket still
		// holds, then the context's error: every event tcp-info wrote
		// before the stop is delivered.
		line, err := r.ReadSlice('\n')
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			c.badLine(&BadEventError{Reason: ReasonOversize, Err: fmt.Errorf("line longer than %d bytes", MaxLineLen)})
			if err := skipLine(r); err != nil {
				return healthy, endErr(err)
			}
			continue
		case err != nil && len(line) == 0:
			return healthy, endErr(err)
		case err != nil && ctx.Err() != nil:
			// A line cut short by the stop, not by tcp-info.
			return healthy, ctx.Err()
		}
		if c.SkipClose && bytes.HasPrefix(line, closePrefix) {
			c.received[Close].Inc()
			healthy = true
			if err != nil {
				return healthy, endErr(err)
			}
			continue
		}
		// A last line cut short by the end of the connection is parsed as
		// well: if it is incomplete it fails as bad JSON and is counted.
		ev, perr := ParseLine(line)
		if perr != nil {
			c.badLine(perr)
		} else {
			c.received[ev.Kind].Inc()
			c.h.Event(ev)
			healthy = true
		}
		if err != nil {
			return healthy, endErr(err)
		}
	}
}

// closePrefix starts every Close event tcp-info writes.
var closePrefix = []byte(`{"Event":1,`)

// skipLine discards input up to and including the next newline, one buffer
// at a time, so that an oversize line never sits in memory whole.
func skipLine(r *bufio.Reader) error {
	for {
		_, err := r.ReadSlice('\n')
		if !errors.Is(err, bufio.ErrBufferFull) {
			return err
		}
	}
}

// endErr describes why a connection ended, for the log.
func endErr(err error) error {
	if errors.Is(err, io.EOF) {
		return errors.New("closed by tcp-info")
	}
	return fmt.Errorf("read: %w", err)
}

// badLine counts a rejected line and logs it unless a bad line was logged less
// than badLineLogInterval ago; the next log says how many were not logged.
func (c *Client) badLine(err error) {
	reason := ReasonJSON
	var be *BadEventError
	if errors.As(err, &be) {
		reason = be.Reason
	}
	c.m.BadEventsFromTCPInfo.WithLabelValues(reason).Inc()
	now := time.Now()
	if !c.lastBadLog.IsZero() && now.Sub(c.lastBadLog) < badLineLogInterval {
		c.badSince++
		return
	}
	c.log.Warn("skipping bad eventsocket line", "reason", reason, "err", err, "unlogged_since_last", c.badSince)
	c.lastBadLog = now
	c.badSince = 0
}
