package tcpeventsocket

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The eventsocket is read in batches.
//
// tcp-info writes each event as it finds it, one write per event. Read the
// usual way, with the socket in the runtime's network poller, every write
// woke the daemon (the poller's thread, then the reading goroutine, then the
// demuxer). Instead, the socket is kept out of the poller. While events come,
// it is read without blocking every readGap: whatever is there is read at
// once. After quietAfter without an event, the reader blocks in poll(2)
// until the socket has data (or the context ends), so that a quiet
// eventsocket costs nothing. An event waits at most readGap to be read (the
// demuxer holds a flow's packets for seconds meanwhile), and tcp-info, which
// blocks when the socket's buffer is full, waits at most that long for room
// (the buffer, wmem_default, 208 KB by default, holds a few hundred events,
// each written as its own message).
//
// Each wake-up costs far more than the events it reads: besides the
// goroutines and threads it wakes, the runtime's monitor thread, asleep
// while the daemon is idle, polls every 20 µs for a while after each. In the
// churn benchmark beside tcp-info (200 connections a second), reading by
// polling took the daemon's CPU per flow from 345, 347 and 384 µs to 298,
// 309 and 326 µs (interleaved runs, reads every 10 ms), and reading every
// 50 ms rather than every 10 from 139 and 143 µs to 108 and 108 (tmpfs;
// BENCHMARKS.md); blocking when quiet keeps an idle daemon's CPU where it was
// with the network poller.
const (
	readGap    = 50 * time.Millisecond
	quietAfter = time.Second
)

// pollingReader reads a socket as described above.
type pollingReader struct {
	ctx      context.Context
	fd       int // the socket's duplicate, outside the runtime's poller
	cancelFD int // an eventfd written when ctx is done, to end a poll(2)
	stop     func() bool
	fired    chan struct{} // closed when the AfterFunc has written
	timer    *time.Timer
	lastData time.Time
}

// newPollingReader takes conn's socket out of the runtime's network poller
// and returns a reader of it that stops when ctx is done. Close it when done;
// conn is closed already.
func newPollingReader(ctx context.Context, conn net.Conn) (io.ReadCloser, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return conn, nil // not a socket (a test's pipe): read it the usual way
	}
	// Duplicate the descriptor with fcntl, not with uc.File, whose
	// os.File would register the duplicate with the poller again; closing
	// conn then takes the socket out of the poller, and the duplicate
	// still reads it.
	rc, err := uc.SyscallConn()
	if err != nil {
		conn.Close()
		return nil, err
	}
	fd := -1
	cerr := rc.Control(func(s uintptr) { fd, err = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) })
	conn.Close()
	if cerr != nil {
		return nil, cerr
	}
	if err != nil {
		return nil, os.NewSyscallError("fcntl", err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("eventfd", err)
	}
	r := &pollingReader{ctx: ctx, fd: fd, cancelFD: efd, fired: make(chan struct{})}
	r.stop = context.AfterFunc(ctx, func() {
		defer close(r.fired)
		var one [8]byte
		binary.NativeEndian.PutUint64(one[:], 1)
		unix.Write(efd, one[:]) // cannot fail but for a full counter
	})
	return r, nil
}

func (r *pollingReader) Close() error {
	if !r.stop() {
		// The write to the eventfd has started: let it end before the
		// descriptor is closed (and its number perhaps reused).
		<-r.fired
	}
	if r.timer != nil {
		r.timer.Stop()
	}
	unix.Close(r.cancelFD)
	return unix.Close(r.fd)
}

func (r *pollingReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		if err := r.ctx.Err(); err != nil {
			return r.drain(p, err)
		}
		// A raw system call: recv with MSG_DONTWAIT never blocks, and
		// unlike syscall.Syscall a raw call does not wake the runtime's
		// monitor thread, which would then spin for a while, every time
		// the reader finds the socket empty.
		r1, _, errno := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(r.fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), unix.MSG_DONTWAIT, 0, 0)
		switch n := int(r1); {
		case errno == 0 && n > 0:
			r.lastData = time.Now()
			return n, nil
		case errno == 0:
			return 0, io.EOF
		case errno == unix.EINTR:
			continue
		case errno != unix.EAGAIN:
			return 0, os.NewSyscallError("recvfrom", errno)
		}
		if time.Since(r.lastData) >= quietAfter {
			if err := r.block(); err != nil {
				return 0, err
			}
			continue
		}
		if r.timer == nil {
			r.timer = time.NewTimer(readGap)
		} else {
			r.timer.Reset(readGap)
		}
		select {
		case <-r.ctx.Done():
		case <-r.timer.C:
		}
	}
}

// drain returns what the socket holds once ctx is done: tcp-info wrote those
// events before the stop, and the daemon names their flows before it
// publishes the last files. With nothing left, it returns err.
func (r *pollingReader) drain(p []byte, err error) (int, error) {
	for {
		r1, _, errno := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(r.fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), unix.MSG_DONTWAIT, 0, 0)
		switch n := int(r1); {
		case errno == unix.EINTR:
			continue
		case errno == 0 && n > 0:
			return n, nil
		case errno == 0:
			return 0, io.EOF
		}
		return 0, err
	}
}

// block waits in poll(2) until the socket is readable or ctx is done. The
// goroutine's thread blocks in the system call, outside the runtime's
// poller; the runtime hands its processor to other goroutines meanwhile.
func (r *pollingReader) block() error {
	fds := []unix.PollFd{{Fd: int32(r.fd), Events: unix.POLLIN}, {Fd: int32(r.cancelFD), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(fds, -1)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return os.NewSyscallError("poll", err)
		}
		return nil
	}
}
