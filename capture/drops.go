package capture

import "sync"

// dropLogSize is how many increases of the drop counter dropLog keeps. It
// keeps at most one a second (see add), so it reaches back at least 17
// minutes: far longer than a flow's life in the daemon (-captureduration
// plus up to two -flowtimeout).
const dropLogSize = 1024

// dropLog is the kernel drop counter of every capture socket together, with
// when each increase was read from the kernel, so that a saver can bound the
// drops its flow may have suffered since the flow's first packet
// (KernelDropsSince).
type dropLog struct {
	mu    sync.Mutex
	total uint64
	steps [dropLogSize]dropStep // ring of increases, oldest at n-len
	n     int                   // increases recorded; the newest is steps[(n-1)%dropLogSize]
}

// dropStep is the counter's total after the drops read at time at (Unix ns).
type dropStep struct {
	at    int64
	total uint64
}

// add records d more drops, read from the kernel at time at (Unix ns). An
// increase read within a second of the previous one is merged into it, at
// the later time: that keeps the log small and only makes KernelDropsSince
// larger (never smaller) for a time in between.
func (l *dropLog) add(d uint64, at int64) {
	if d == 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total += d
	if l.n > 0 {
		last := &l.steps[(l.n-1)%dropLogSize]
		if at-last.at < 1e9 && at >= last.at {
			*last = dropStep{at, l.total}
			return
		}
	}
	l.steps[l.n%dropLogSize] = dropStep{at, l.total}
	l.n++
}

// since returns how many drops were read after time t (Unix ns): the total
// now less the total as of the last increase read at or before t. The
// kernel's counter is read every second while packets come (and when a
// capture stops), so drops that happened before t but were read after it are
// included (the bound is larger, never smaller), and drops not yet read are
// not. If t is older than every increase kept, every drop counted since the
// start is returned: a bound still.
func (l *dropLog) since(t int64) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	oldest := max(0, l.n-dropLogSize)
	for i := l.n - 1; i >= oldest; i-- {
		if s := l.steps[i%dropLogSize]; s.at <= t {
			return l.total - s.total
		}
	}
	return l.total
}

// KernelDropsSince returns how many packets the kernel dropped on the
// capture sockets of this Config (one for every interface, or one per
// -interface, all together) since time t (Unix ns), as far as the daemon has
// read the kernel's counters: an upper bound of what a flow whose first
// packet was captured at t may have lost, except for drops in the last
// second or so, which are read with the next statistics (see dropLog.since).
// It is safe for concurrent use.
func (cfg *Config) KernelDropsSince(t int64) uint64 { return cfg.drops.since(t) }
