package tcpeventsocket

import (
	"context"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// The eventsocket is read in batches, by polling.
//
// tcp-info writes each event as it finds it, one write per event. Read the
// usual way, with the socket in the runtime's network poller, every write
// woke the daemon (the poller's thread, then the reading goroutine, then the
// demuxer). Instead, the socket is kept out of the poller and read without
// blocking: whatever is there is read at once, and when nothing is, the
// reader sleeps, readGap at first and up to readIdleGap while the socket
// stays quiet. An event waits at most that long to be read (the demuxer holds
// a flow's packets for seconds meanwhile), and tcp-info, which blocks when
// the socket's buffer is full, waits at most that long for room. In the churn
// benchmark beside tcp-info this took the daemon's CPU per flow from 345,
// 347 and 384 µs to 298, 309 and 326 µs (interleaved runs).
const (
	readGap     = 10 * time.Millisecond
	readIdleGap = 50 * time.Millisecond
)

// pollingReader reads a socket without blocking, sleeping while it is empty.
type pollingReader struct {
	ctx  context.Context
	f    *os.File
	fd   int
	wait time.Duration // the next sleep
}

// newPollingReader takes conn's socket out of the runtime's network poller
// and returns a reader of it that stops when ctx is done. Close it when done;
// conn is closed already.
func newPollingReader(ctx context.Context, conn net.Conn) (io.ReadCloser, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return conn, nil // not a socket (a test's pipe): read it the usual way
	}
	// File duplicates the descriptor; closing conn then takes the socket
	// out of the poller, and the duplicate still reads it.
	f, err := uc.File()
	conn.Close()
	if err != nil {
		return nil, err
	}
	return &pollingReader{ctx: ctx, f: f, fd: int(f.Fd()), wait: readGap}, nil
}

func (r *pollingReader) Close() error { return r.f.Close() }

func (r *pollingReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		n, _, err := unix.Recvfrom(r.fd, p, unix.MSG_DONTWAIT)
		switch {
		case err == nil && n > 0:
			r.wait = readGap
			return n, nil
		case err == nil:
			return 0, io.EOF
		case err == unix.EINTR:
			continue
		case err != unix.EAGAIN:
			return 0, err
		}
		t := time.NewTimer(r.wait)
		select {
		case <-r.ctx.Done():
			t.Stop()
			return 0, r.ctx.Err()
		case <-t.C:
		}
		r.wait = min(2*r.wait, readIdleGap)
	}
}
