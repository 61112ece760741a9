package demuxer

// pendingRef is a pending flow in the order flows became pending. It is 16
// bytes: the flow's key is in its entry (entry.first.Key).
type pendingRef struct {
	e        *entry
	deadline int64 // ns since the demuxer's epoch (Demuxer.clock)
}

// refQueue is a FIFO of pendingRefs in a ring buffer: pushing and popping
// move no memory, and the buffer shrinks again after a flood.
type refQueue struct {
	buf  []pendingRef
	head int // index of the oldest ref
	n    int
}

const minQueue = 1024

func (q *refQueue) len() int { return q.n }

func (q *refQueue) push(r pendingRef) {
	if q.n == len(q.buf) {
		q.resize(max(minQueue, 2*len(q.buf)))
	}
	q.buf[(q.head+q.n)%len(q.buf)] = r
	q.n++
}

// front returns the oldest ref; the queue must not be empty.
func (q *refQueue) front() pendingRef { return q.buf[q.head] }

// pop removes the oldest ref; the queue must not be empty.
func (q *refQueue) pop() {
	q.buf[q.head] = pendingRef{} // do not pin the entry
	q.head = (q.head + 1) % len(q.buf)
	q.n--
}

// shrink halves the buffer while it is at most a quarter full, so that a
// flood's queue does not stay allocated after the flood.
func (q *refQueue) shrink() {
	c := len(q.buf)
	for c > minQueue && q.n <= c/4 {
		c /= 2
	}
	if c < len(q.buf) {
		q.resize(c)
	}
}

func (q *refQueue) resize(c int) {
	buf := make([]pendingRef, c)
	if q.n > 0 {
		if q.head+q.n <= len(q.buf) {
			copy(buf, q.buf[q.head:q.head+q.n])
		} else {
			k := copy(buf, q.buf[q.head:])
			copy(buf[k:], q.buf[:q.n-k])
		}
	}
	q.buf, q.head = buf, 0
}

func (q *refQueue) reset() { *q = refQueue{} }
