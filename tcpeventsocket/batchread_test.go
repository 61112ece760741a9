package tcpeventsocket

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// unixPair returns a connected pair: a *net.UnixConn and the peer's raw
// descriptor.
func unixPair(t *testing.T) (*net.UnixConn, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "pair")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); unix.Close(fds[1]) })
	return c.(*net.UnixConn), fds[1]
}

// TestPollingReader: the reader takes the socket out of conn, reads what the
// peer writes, also after a quiet spell, stops when ctx is done and sees the
// peer's close as EOF.
func TestPollingReader(t *testing.T) {
	conn, peer := unixPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	r, err := newPollingReader(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := conn.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("conn still open after newPollingReader: write gave %v", err)
	}
	buf := make([]byte, 64)
	for _, msg := range []string{"first\n", "second, after the reader slept\n"} {
		done := make(chan string, 1)
		go func() {
			n, err := r.Read(buf)
			if err != nil {
				done <- "error: " + err.Error()
				return
			}
			done <- string(buf[:n])
		}()
		if _, err := unix.Write(peer, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		if got := <-done; got != msg {
			t.Errorf("read %q, want %q", got, msg)
		}
	}
	// Nothing to read: the context ends the wait.
	errc := make(chan error, 1)
	go func() {
		_, err := r.Read(buf)
		errc <- err
	}()
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("read after cancel: %v, want context.Canceled", err)
	}
	// A reader that has had nothing for a while blocks in poll(2); the
	// context still ends the wait.
	conn3, _ := unixPair(t)
	ctx3, cancel3 := context.WithCancel(context.Background())
	r3, err := newPollingReader(ctx3, conn3)
	if err != nil {
		t.Fatal(err)
	}
	defer r3.Close()
	go func() {
		_, err := r3.Read(buf)
		errc <- err
	}()
	cancel3()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("read of a quiet socket after cancel: %v, want context.Canceled", err)
	}
	// The peer closes: EOF.
	conn2, peer2 := unixPair(t)
	if err := unix.Shutdown(peer2, unix.SHUT_WR); err != nil {
		t.Fatal(err)
	}
	r2, err := newPollingReader(context.Background(), conn2)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	if _, err := r2.Read(buf); err != io.EOF {
		t.Errorf("read from a closed peer: %v, want EOF", err)
	}
}
