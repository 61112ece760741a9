// Command phbench is the live benchmark of packet-headers. For each run it
// builds two network namespaces joined by a veth pair, runs tcp-info (or
// nothing, in standalone mode) and the daemon on the server side, a
// reference tcpdump on the client side and a "floor" tcpdump beside the
// daemon, drives a load with phload (bench/cmd/phload), and then reports
// how many flows the daemon saved completely, how many packets it kept, and
// what that cost in CPU and memory, next to what tcpdump costs for the same
// packets. See bench/README.md.
//
// It needs root (namespaces, captures) and sends traffic only inside the
// namespaces it creates, between 198.18.0.1/2 and 2001:db8::1/2.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"
)

func main() { os.Exit(run()) }

func run() int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cfg, err := parseConfig(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "phbench: %v\n", err)
		return 2
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "phbench: needs root to create network namespaces and capture")
		return 2
	}
	nofile, err := raiseNoFile()
	if err != nil {
		fmt.Fprintf(os.Stderr, "phbench: %v\n", err)
		return 1
	}
	// tcp-info needs two descriptors per open connection; past its limit
	// it stops polling and names flows late or never, which would be
	// blamed on the daemon.
	if need := 2*uint64(cfg.Count) + 1000; cfg.Mode == Concurrent && cfg.Source == TCPInfo && need > nofile {
		fmt.Fprintf(os.Stderr, "phbench: tcp-info would need about %d descriptors for %d concurrent flows, the limit is %d: "+
			"use -count=%d or less, -source=standalone, or run with CAP_SYS_RESOURCE\n", need, cfg.Count, nofile, (nofile-1000)/2)
		return 2
	}
	if err := bench(ctx, cfg, os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "phbench: %v\n", err)
		return 1
	}
	return 0
}

// bench runs cfg.Runs runs and reports them.
func bench(ctx context.Context, cfg *Config, w io.Writer) error {
	var cleanup stack
	defer func() {
		if err := cleanup.run(); err != nil {
			fmt.Fprintf(os.Stderr, "phbench: cleanup: %v\n", err)
		}
	}()
	bins, err := binaries(ctx, cfg, &cleanup)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "phbench %s\n", cfg.Summary())
	var runs []*Result
	for i := 1; i <= cfg.Runs; i++ {
		r, err := runOnce(ctx, cfg, bins, i, w)
		if err != nil {
			return fmt.Errorf("run %d: %w", i, err)
		}
		runs = append(runs, r)
	}
	rep := newReport(cfg, runs)
	if err := rep.printTable(w); err != nil {
		return err
	}
	if cfg.Out != "" {
		if err := rep.writeJSON(cfg.Out); err != nil {
			return err
		}
		fmt.Fprintf(w, "results: %s\n", cfg.Out)
	}
	return nil
}

// stack is a list of cleanup steps run last-in first-out. It is not safe for
// concurrent use.
type stack struct {
	steps []cleanupStep
}

type cleanupStep struct {
	what string
	fn   func() error
}

func (s *stack) push(what string, fn func() error) {
	s.steps = append(s.steps, cleanupStep{what, fn})
}

// run runs every step, newest first, and returns their errors joined.
func (s *stack) run() error {
	var errs []error
	for i := len(s.steps) - 1; i >= 0; i-- {
		if err := s.steps[i].fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.steps[i].what, err))
		}
	}
	s.steps = nil
	return errors.Join(errs...)
}

// bins are the programs a run starts.
type bins struct {
	daemon, tcpinfo, load string
}

// binaries builds what was not given on the command line into a temporary
// directory. Building from the module (rather than taking whatever
// packet-headers is on the PATH) measures the code in this tree.
func binaries(ctx context.Context, cfg *Config, cleanup *stack) (bins, error) {
	b := bins{daemon: cfg.Daemon, tcpinfo: cfg.TCPInfo, load: cfg.Load}
	if b.daemon != "" && b.tcpinfo != "" && b.load != "" {
		return b, nil
	}
	dir, err := os.MkdirTemp("", "phbench-bin-")
	if err != nil {
		return b, err
	}
	cleanup.push("remove "+dir, func() error { return os.RemoveAll(dir) })
	for _, t := range []struct {
		path *string
		pkg  string
	}{
		{&b.daemon, "github.com/m-lab/packet-headers/cmd/packet-headers"},
		// A `tool` of go.mod: the version the e2e tests use.
		{&b.tcpinfo, "github.com/m-lab/tcp-info"},
		{&b.load, "github.com/m-lab/packet-headers/bench/cmd/phload"},
	} {
		if *t.path != "" {
			continue
		}
		out := filepath.Join(dir, filepath.Base(t.pkg))
		if o, err := exec.CommandContext(ctx, "go", "build", "-o", out, t.pkg).CombinedOutput(); err != nil {
			return b, fmt.Errorf("go build %s: %w\n%s", t.pkg, err, o)
		}
		*t.path = out
	}
	return b, nil
}

// noFile is the descriptor limit the benchmark tries to give its
// processes. tcp-info holds two descriptors per connection (its archive
// file and a pipe), so 10,000 concurrent flows need more than the common
// 20,000; root with CAP_SYS_RESOURCE may raise the hard limit up to
// fs.nr_open (1,048,576 by default).
const noFile = 1 << 18

// raiseNoFile raises RLIMIT_NOFILE for the processes the benchmark starts,
// as far as it is allowed, and returns the limit they get. syscall.Setrlimit
// (not x/sys/unix's) tells os/exec that the limit was set on purpose, so
// children inherit it rather than the limit at start.
func raiseNoFile() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("getrlimit: %w", err)
	}
	if lim.Cur >= noFile {
		return lim.Cur, nil
	}
	want := syscall.Rlimit{Cur: noFile, Max: max(lim.Max, noFile)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err == nil {
		return want.Cur, nil
	}
	// Not allowed beyond the hard limit (no CAP_SYS_RESOURCE): take that.
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("setrlimit: %w", err)
	}
	return lim.Cur, nil
}

// sleep waits d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// summaryf prints one line of progress.
func summaryf(w io.Writer, format string, args ...any) {
	fmt.Fprintf(w, "  "+format+"\n", args...)
}
