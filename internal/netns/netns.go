// Package netns runs code inside a Linux network namespace and reads socket
// cookies: what the end-to-end tests and the live benchmark need to drive
// traffic and scrape metrics inside the namespaces they create.
package netns

import (
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// Run runs fn on an OS thread switched into the network namespace ns (an
// open /var/run/netns/NAME file). Sockets created in fn belong to ns for
// their whole life, whichever thread uses them later. Code in fn must not
// start goroutines that create sockets (net/http's client dials from
// another goroutine, in the wrong namespace).
func Run(ns *os.File, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: it dies with this goroutine
			// rather than run other goroutines in the wrong namespace.
			errc <- errors.Join(ferr, fmt.Errorf("setns back: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Cookie returns the kernel's socket cookie of a connection: tcp-info names
// the socket <prefix>_<%016X cookie>.
func Cookie(c net.Conn) (uint64, error) {
	sc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var cookie uint64
	var gerr error
	err = sc.Control(func(fd uintptr) {
		cookie, gerr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
	})
	return cookie, errors.Join(err, gerr)
}
