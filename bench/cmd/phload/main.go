// Command phload is the load generator of the live benchmark
// (bench/cmd/phbench). phbench runs one phload as the server in the server's
// network namespace and one as the client in the client's, each with
// `ip netns exec`: as separate processes the load's CPU time is not mixed
// with the orchestrator's, and every socket belongs to its namespace for its
// whole life.
//
//	phload serve      -listen=198.18.0.1:9000,[2001:db8::1]:9000 -req=500 -resp=8000 -flows=FILE
//	phload churn      -addr=198.18.0.1:9000 -rate=200 -count=2000 -hold=100ms -req=500 -resp=8000
//	phload bulk       -addr=198.18.0.1:9000 -streams=4 -duration=10s -pace=0
//	phload concurrent -addr=198.18.0.1:9000 -count=10000 -rate=1000 -req=16 -resp=16 -hold=2m
//
// The protocol is the same in every mode: the client writes -req bytes, the
// server answers -resp bytes once it has them, then reads until the client
// closes and closes too (so the client's FIN comes first, as in most
// request/response traffic). With -req=0 -resp=0 the server is a sink (bulk).
//
// Every mode is bounded in count and in time. The client prints progress
// lines ("open N" in concurrent mode) and, last, one line "result {JSON}".
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func main() { os.Exit(run()) }

func run() int {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: phload serve|churn|bulk|concurrent [flags]")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	mode, args := os.Args[1], os.Args[2:]
	var err error
	switch mode {
	case "serve":
		err = runServe(ctx, args, os.Stdout)
	case "churn", "bulk", "concurrent":
		err = runClient(ctx, mode, args, os.Stdin, os.Stdout)
	default:
		err = fmt.Errorf("unknown mode %q: want serve, churn, bulk or concurrent", mode)
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "phload %s: %v\n", mode, err)
		return 1
	}
	return 0
}

// raiseNoFile makes sure the process may hold need descriptors: 10,000
// concurrent flows need 10,000 sockets on each side. Go already raises the
// soft limit to the hard one at start; this only reports clearly when the
// hard limit is too low.
func raiseNoFile(need int) error {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("getrlimit: %w", err)
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
			return fmt.Errorf("setrlimit: %w", err)
		}
	}
	if lim.Cur < uint64(need) {
		return fmt.Errorf("RLIMIT_NOFILE is %d, %d descriptors needed (raise it with ulimit -n)", lim.Cur, need)
	}
	return nil
}

// payload returns n bytes to send. The content does not matter: only
// headers are captured.
func payload(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte('a' + i%26)
	}
	return b
}

// connLifetime bounds any single connection's life on either side, so that
// a lost peer cannot keep a goroutine forever.
const connLifetime = 15 * time.Minute

var errStopped = errors.New("stopped")

// sleepUntil waits until t or until ctx is done.
func sleepUntil(ctx context.Context, t time.Time) error {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err()
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return errStopped
	case <-timer.C:
		return nil
	}
}
