// Package kernelsource names TCP flows without tcp-info: it learns about the
// host's TCP sockets from the kernel and gives each the UUID tcp-info would
// give it.
//
// Beside tcp-info, packet-headers takes each flow's UUID from tcp-info's
// eventsocket (package tcpeventsocket). Run standalone, there is no
// eventsocket, and without UUIDs no file is written. This package is the
// built-in replacement: like tcp-info's collector it dumps the TCP sockets
// of the network namespace over netlink sock_diag (IPv6, then IPv4) every
// 10 ms, asks for the same states, drops the same sockets (loopback,
// link-local, multicast and unspecified addresses), and names each socket
// <prefix>_<cookie as %016X>, the format of github.com/m-lab/uuid, with the
// prefix read from the same -uuid-prefix-file the same way (and refused if
// it would make unsafe file names: CheckPrefix). A file written
// in standalone mode therefore carries the name a file written beside
// tcp-info would carry. Unlike tcp-info, the daemon's Source polls only while
// a captured flow waits for its UUID (Config.Pending).
//
// It goes one step beyond tcp-info. A flow that ends within one poll is never
// seen by a dump, and tcp-info never names it. The Source also subscribes to
// the kernel's TCP socket-destroy notifications (multicast groups of
// NETLINK_SOCK_DIAG) and names each socket that ends without having been
// seen; the demuxer holds an unnamed flow's packets for a few seconds, so
// such short flows are saved too. The kernel lets any process subscribe
// (sock_diag creates its netlink socket with NL_CFG_F_NONROOT_RECV), but a
// security policy or a seccomp filter may refuse it: then the Source logs a
// warning once and polls only, as tcp-info does.
//
// It is a package of its own, beside tcpeventsocket, because it is a second
// source of the same flow.Named events with nothing else in common with
// the eventsocket client: it speaks netlink to the kernel, not JSON to a
// peer.
package kernelsource

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/m-lab/uuid/prefix"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/saver"

	"github.com/m-lab/packet-headers/flow"
)

// DefaultInterval is tcp-info's polling interval (collector.Run).
//
// A poll is not free, and nearly all of its cost is the kernel's: each of
// the two dumps walks the whole established-socket hash table (about 0.2 ms
// for 262,144 buckets on a 2-core AMD EPYC VM), and each TCP socket of the
// namespace costs about 1 µs more. At 10,000 sockets a 10 ms interval keeps
// a CPU busy. A longer Interval trades that for later UUIDs; the demuxer
// holds the packets of unnamed flows meanwhile, up to its limits.
const DefaultInterval = 10 * time.Millisecond

const (
	// forgetAfter is how long a socket that has left the dumps is still
	// remembered. A socket leaves the dumps when it enters TIME_WAIT or
	// CLOSE, but the kernel notifies its destruction only when its last
	// reference goes: at once for a socket its application has closed,
	// later for one the application still holds (a reset connection not
	// yet closed). A notification for a forgotten socket would name it a
	// second time. The memory costs a map entry per socket closed in the
	// last 10 to 20 seconds.
	forgetAfter = 10 * time.Second
	// failLogInterval bounds how often failed dumps and lost
	// notifications are logged: a kernel that refuses dumps refuses
	// a hundred a second.
	failLogInterval = time.Minute
	// idleDrain is how often the destroy notifications are read between
	// polls (see Run).
	idleDrain = time.Second
	// destroyBufSize is the read buffer of destroy notifications. The
	// kernel sends one notification (under 400 bytes with its tcp_info)
	// per datagram.
	destroyBufSize = 16 << 10
)

// Config holds a Source's settings.
type Config struct {
	// PrefixFile holds the UUID prefix, as tcp-info's -uuid-prefix-file
	// does. Its bytes are the prefix, unmodified: m-lab/uuid reads the
	// flag with flagx.FileBytes, which does not trim, so a trailing
	// newline would be part of every UUID, of tcp-info's and of ours.
	// New refuses such a prefix, and any other that would make UUIDs
	// unsafe as file names (CheckPrefix).
	// Empty means m-lab/uuid's default, prefix.UnsafeString(), which is
	// also tcp-info's when it runs without the flag.
	PrefixFile string
	// Interval is the time between dumps; 0 means DefaultInterval.
	Interval time.Duration
	// Metrics receives UUIDSourceSockets (every new socket seen, named or
	// not: loopback ones count), UUIDSourceIssued (Opens sent) and
	// UUIDSourcePoll (the duration of a poll, both dumps); nil means
	// metrics on a private registry.
	Metrics *metrics.Metrics
	// Log is the logger; nil discards.
	Log *slog.Logger
	// Pending, if not nil, tells whether any flow is waiting for its UUID
	// (the demuxer implements it). After each poll the Source asks it,
	// and while nothing waits it stops polling until PendingWake
	// receives: every flow the daemon captures is pending until it is
	// named, so a host with thousands of established but quiet sockets is
	// not dumped a hundred times a second for nothing. Destroy
	// notifications are read all the time. Nil means polling every
	// Interval, as tcp-info does.
	Pending Pending
}

// Pending is the signal "a captured flow waits for its UUID", which the
// demuxer gives.
type Pending interface {
	// HasPending reports whether a flow waits for its UUID.
	HasPending() bool
	// PendingWake receives when a flow starts waiting.
	PendingWake() <-chan struct{}
}

// Source learns about TCP sockets from the kernel and sends one flow.Named
// for each socket tcp-info would name. Create it with New, then call Run
// once: Run releases the netlink sockets New opened. Prefix is safe for
// concurrent use; the rest belongs to Run's goroutine.
type Source struct {
	cfg     Config
	prefix  string
	out     chan<- flow.Named
	dumper  *dumper
	destroy int // the destroy notifications' socket; -1: polling only
	// destroyBuf is the read buffer of destroy notifications.
	destroyBuf []byte
	ran        atomic.Bool

	sockets prometheus.Counter
	issued  prometheus.Counter
	pollDur prometheus.Histogram

	// The cookies known, in two generations, owned by Run's goroutine.
	// Each socket in a dump is looked up in cur; only a cookie in neither
	// map is new and costs more than the lookup. After a successful dump,
	// once forgetAfter has passed since the last swap, cur becomes old and
	// an empty map becomes cur; the next dump moves the live cookies back,
	// so the cookies of sockets gone for forgetAfter to 2×forgetAfter are
	// dropped with old.
	cur, old map[uint64]struct{}
	swapped  time.Time
	opens    []flow.Named // Opens found by the current poll
	failLog  rateLog
	lostLog  rateLog // lost or bad destroy notifications
}

// New creates a Source that sends its Opens to out. It reads the prefix file
// and opens its netlink sockets in the network namespace of the calling
// thread. It subscribes to socket-destroy notifications if it can; if not,
// it logs a warning once and the Source polls only.
func New(cfg Config, out chan<- flow.Named) (*Source, error) {
	if out == nil {
		return nil, errors.New("kernelsource: nil output channel")
	}
	if cfg.Interval < 0 {
		return nil, fmt.Errorf("kernelsource: negative interval %v", cfg.Interval)
	}
	if cfg.Interval == 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.Pending != nil && cfg.Pending.PendingWake() == nil {
		// Polling would pause and never resume.
		return nil, errors.New("kernelsource: Config.Pending without a wake channel")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.New(prometheus.NewRegistry())
	}
	p, err := ReadPrefix(cfg.PrefixFile)
	if err != nil {
		return nil, err
	}
	d, err := openDumper()
	if err != nil {
		return nil, err
	}
	s := &Source{
		cfg:     cfg,
		prefix:  p,
		out:     out,
		dumper:  d,
		sockets: cfg.Metrics.UUIDSourceSockets,
		issued:  cfg.Metrics.UUIDSourceIssued,
		pollDur: cfg.Metrics.UUIDSourcePoll,
		cur:     make(map[uint64]struct{}),
		old:     make(map[uint64]struct{}),
	}
	if s.destroy, err = openDestroy(); err == nil {
		s.destroyBuf = make([]byte, destroyBufSize)
	} else {
		// EPERM, typically: refused by a security policy.
		cfg.Log.Warn("cannot subscribe to TCP socket-destroy notifications; polling only: flows shorter than the poll interval get no UUID",
			"interval", cfg.Interval, "err", err)
	}
	return s, nil
}

// ReadPrefix reads the UUID prefix from the file at path (m-lab/uuid's
// default if path is empty) and checks it with CheckPrefix.
func ReadPrefix(path string) (string, error) {
	p, err := readPrefix(path)
	if err != nil {
		return "", err
	}
	if err := CheckPrefix(p); err != nil {
		if path == "" {
			return "", fmt.Errorf("%w (m-lab/uuid's default prefix, from the host name)", err)
		}
		return "", err
	}
	return p, nil
}

// CheckPrefix makes sure that the UUIDs made with prefix p are safe as file
// names, by the rule the eventsocket's UUIDs follow (saver.CheckUUID): only
// letters, digits, '.', '_' and '-', no leading dot, and short enough. The
// error says what is wrong with p.
//
// m-lab/uuid takes a prefix file's bytes as they are, so a prefix that
// breaks the rule makes tcp-info send UUIDs the eventsocket client refuses
// too; and standalone, a prefix such as "../../x" would put files outside
// the data directory, and the newline that `echo host > file` leaves would
// end up in every file name. Trimming it silently would name files
// differently from tcp-info given the same file, so a bad prefix is refused
// instead, before anything starts.
func CheckPrefix(p string) error {
	err := saver.CheckUUID(UUID(p, 0))
	if err == nil {
		return nil
	}
	bad := -1 // the first byte not allowed
	for i := 0; i < len(p) && bad < 0; i++ {
		if !saver.UUIDByte(p[i]) {
			bad = i
		}
	}
	maxLen := saver.MaxUUIDLen - len(UUID("", 0))
	switch {
	case strings.HasSuffix(p, "\n") && bad == len(p)-1:
		return fmt.Errorf("uuid prefix %q ends with a newline, which would be part of every file name; write the file without it (printf '%%s' PREFIX > FILE, not echo)", p)
	case bad >= 0:
		return fmt.Errorf("uuid prefix %q has byte %#02x at offset %d; file names allow only letters, digits, '.', '_' and '-'", p, p[bad], bad)
	case p[0] == '.':
		return fmt.Errorf("uuid prefix %q starts with a dot, which would hide every file from the uploader", p)
	case len(p) > maxLen:
		return fmt.Errorf("uuid prefix is %d bytes long; at most %d fit in a file name with the socket cookie", len(p), maxLen)
	}
	return fmt.Errorf("uuid prefix %q: %w", p, err)
}

// readPrefix reads the prefix as m-lab/uuid does.
func readPrefix(path string) (string, error) {
	if path == "" {
		return prefix.UnsafeString(), nil
	}
	b, err := os.ReadFile(path) // what flagx.FileBytes.Set does
	if err != nil {
		return "", fmt.Errorf("read uuid prefix file: %w", err)
	}
	return string(b), nil
}

// Prefix returns the UUID prefix.
func (s *Source) Prefix() string { return s.prefix }

// NotifiesDestroy reports whether the Source receives socket-destroy
// notifications, and so names flows shorter than a poll.
func (s *Source) NotifiesDestroy() bool { return s.destroy >= 0 }

// UUID returns the UUID of the socket with the given cookie:
// prefix + "_" + the cookie as 16 upper-case hexadecimal digits, the format
// of m-lab/uuid's FromCookie (fmt.Sprintf("%s_%016X", prefix, cookie)).
func UUID(prefix string, cookie uint64) string {
	const digits = "0123456789ABCDEF"
	var hex [16]byte
	for i := len(hex) - 1; i >= 0; i-- {
		hex[i] = digits[cookie&0xF]
		cookie >>= 4
	}
	var b strings.Builder
	b.Grow(len(prefix) + 1 + len(hex))
	b.WriteString(prefix)
	b.WriteByte('_')
	b.Write(hex[:])
	return b.String()
}

// Run dumps the sockets every Interval (with Config.Pending, only while it
// is true) and sends an Open for each new socket to be named, and one for
// each socket destroyed without having been seen, until ctx is done; then it
// returns nil. A failed dump is logged (at most
// once a minute) and tried again at the next tick. Sending to out may block;
// Run still stops promptly when ctx is done. Run never closes out. Run may be
// called only once.
func (s *Source) Run(ctx context.Context) error {
	if !s.ran.CompareAndSwap(false, true) {
		return errors.New("kernelsource: Run called twice")
	}
	defer s.dumper.close()
	defer s.closeDestroy()
	if ctx.Err() != nil {
		return nil
	}
	// The next poll starts Interval after the previous one started, or, if
	// the dump took longer than Interval (about 12 ms with 10,000 sockets,
	// BENCHMARKS.md), as long after it ended as it took: polling then costs
	// at most half a CPU instead of all of it, and flows too short for the
	// slower polls are still named by destroy notifications.
	//
	// Destroy notifications are read at each poll, before the dumps,
	// rather than as they come: a reader woken for each would cost two
	// goroutine wake-ups and a system call per closed socket, a tenth of
	// the daemon's CPU in the churn benchmark. The kernel queues them in
	// the socket's buffer meanwhile.
	//
	// With Config.Pending, polling pauses while no flow waits for a UUID
	// and resumes at once when one does. The notifications are also read
	// every idleDrain, whether polling or not, so that the buffer does not
	// overflow with notifications of sockets nobody waits for, and so
	// that a long Interval does not delay the naming of short flows.
	pollTimer := time.NewTimer(time.Hour)
	defer pollTimer.Stop()
	var pollC <-chan time.Time
	schedule := func(took time.Duration) {
		if s.cfg.Pending == nil || s.cfg.Pending.HasPending() {
			pollTimer.Reset(s.pollWait(took))
			pollC = pollTimer.C
		} else {
			pollTimer.Stop()
			pollC = nil
		}
	}
	schedule(s.poll(ctx))
	var wake <-chan struct{}
	if s.cfg.Pending != nil {
		wake = s.cfg.Pending.PendingWake()
	}
	drain := time.NewTicker(idleDrain)
	defer drain.Stop()
	for {
		select {
		case <-ctx.Done():
			s.finalPoll(ctx)
			return nil
		case <-pollC:
			schedule(s.poll(ctx))
		case <-wake:
			if pollC == nil {
				schedule(s.poll(ctx))
			}
		case <-drain.C:
			s.drainDestroyed(ctx)
		}
	}
}

// finalPollLimit bounds the last poll at the stop, should nobody read out.
const finalPollLimit = time.Second

// finalPoll names, at the stop, the flows that still wait for their UUID
// (destroy notifications included), so that a flow whose socket the kernel
// knows is saved even when it began within the last poll interval. The
// daemon's demuxer reads out until the source has returned.
func (s *Source) finalPoll(ctx context.Context) {
	if s.cfg.Pending == nil || !s.cfg.Pending.HasPending() {
		return
	}
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finalPollLimit)
	defer cancel()
	s.poll(fctx)
}

// pollWait is how long to wait after a poll that took d.
func (s *Source) pollWait(d time.Duration) time.Duration {
	return max(s.cfg.Interval-d, d)
}

// poll dumps the sockets of both families and sends the Opens of the new
// ones, and returns how long the dump took. Like tcp-info, it dumps IPv6
// first and dates each family's Opens with the time its dump completed.
func (s *Source) poll(ctx context.Context) time.Duration {
	s.drainDestroyed(ctx)
	start := time.Now()
	var err error
	for _, family := range [...]uint8{unix.AF_INET6, unix.AF_INET} {
		first := len(s.opens)
		if e := s.dumper.dump(family, s.consider); e != nil && err == nil {
			err = fmt.Errorf("family %d: %w", family, e)
		}
		t := time.Now().UTC()
		for i := first; i < len(s.opens); i++ {
			s.opens[i].Time = t
		}
	}
	now := time.Now()
	took := now.Sub(start)
	s.pollDur.Observe(took.Seconds())
	switch {
	case err != nil:
		// The cookies stay known: a failed dump says nothing of which
		// sockets are gone.
		if ok, n := s.failLog.allow(now); ok {
			s.cfg.Log.Warn("socket dump failed; retrying at the next tick", "err", err, "suppressed", n)
		}
	case now.Sub(s.swapped) >= forgetAfter:
		s.old, s.cur = s.cur, s.old
		clear(s.cur)
		s.swapped = now
	}
	// Sockets found by a dump that failed part way are named too.
	for _, o := range s.opens {
		if !s.send(ctx, o) {
			break
		}
	}
	clear(s.opens) // drop the UUID strings
	s.opens = s.opens[:0]
	return took
}

// consider takes one socket of a dump. Only a new cookie costs more than a
// map lookup.
func (s *Source) consider(m sockMsg) {
	if _, ok := s.cur[m.cookie]; ok {
		return
	}
	s.cur[m.cookie] = struct{}{}
	if _, ok := s.old[m.cookie]; ok {
		return
	}
	s.sockets.Inc()
	if excluded(&m) {
		return
	}
	s.opens = append(s.opens, flow.Named{Key: m.key(), UUID: UUID(s.prefix, m.cookie)})
}

// destroyedSock is a socket-destroy notification.
type destroyedSock struct {
	m  sockMsg
	at time.Time
}

// destroyed names a destroyed socket if no dump has seen it. A destroyed
// socket is out of the kernel's tables before its notification is sent, so
// no later dump can see it again: it needs no entry in the known cookies.
func (s *Source) destroyed(ctx context.Context, d destroyedSock) {
	if _, ok := s.cur[d.m.cookie]; ok {
		return
	}
	if _, ok := s.old[d.m.cookie]; ok {
		return
	}
	s.sockets.Inc()
	if excluded(&d.m) {
		return
	}
	s.send(ctx, flow.Named{Key: d.m.key(), UUID: UUID(s.prefix, d.m.cookie), Time: d.at})
}

// send sends o to the demuxer, or gives up when ctx is done.
func (s *Source) send(ctx context.Context, o flow.Named) bool {
	select {
	case s.out <- o:
		s.issued.Inc()
		return true
	case <-ctx.Done():
		return false
	}
}

// drainDestroyed reads the destroy notifications queued in the socket and
// names the destroyed sockets no dump has seen. A notification is dated when
// it is read, at most a poll (or idleDrain) after the socket went.
func (s *Source) drainDestroyed(ctx context.Context) {
	for s.destroy >= 0 && ctx.Err() == nil {
		n, _, err := unix.Recvfrom(s.destroy, s.destroyBuf, 0)
		switch {
		case err == unix.EAGAIN:
			return
		case err == unix.EINTR:
			continue
		case err == unix.ENOBUFS:
			// The socket's buffer overflowed and the kernel dropped
			// notifications: short flows among them go unnamed.
			if ok, n := s.lostLog.allow(time.Now()); ok {
				s.cfg.Log.Warn("TCP socket-destroy notifications lost: receive buffer full", "suppressed", n)
			}
			continue
		case err != nil:
			s.cfg.Log.Warn("reading TCP socket-destroy notifications failed; polling only from now on", "err", err)
			s.closeDestroy()
			return
		}
		at := time.Now().UTC()
		err = forEachMessage(s.destroyBuf[:n], func(typ, _ uint16, _ uint32, p []byte) error {
			if typ != unix.SOCK_DIAG_BY_FAMILY {
				return nil
			}
			m, err := parseInetDiagMsg(p)
			if err != nil {
				return err
			}
			s.destroyed(ctx, destroyedSock{m: m, at: at})
			return nil
		})
		if err != nil {
			if ok, n := s.lostLog.allow(time.Now()); ok {
				s.cfg.Log.Warn("bad TCP socket-destroy notification", "err", err, "suppressed", n)
			}
		}
	}
}

// closeDestroy closes the destroy notifications' socket, if open.
func (s *Source) closeDestroy() {
	if s.destroy >= 0 {
		unix.Close(s.destroy)
		s.destroy = -1
	}
}

// rateLog limits a log message to one per failLogInterval.
type rateLog struct {
	next       time.Time
	suppressed int
}

// allow reports whether to log now and, if so, how many messages were
// suppressed since the last one.
func (r *rateLog) allow(now time.Time) (bool, int) {
	if now.Before(r.next) {
		r.suppressed++
		return false, 0
	}
	n := r.suppressed
	r.suppressed = 0
	r.next = now.Add(failLogInterval)
	return true, n
}
