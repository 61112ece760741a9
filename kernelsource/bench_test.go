package kernelsource

import (
	"context"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/flow"
)

// benchSocketsEnv sets the number of sockets of BenchmarkPoll; the issue's
// figure is 10,000: KERNELSOURCE_BENCH_SOCKETS=10000 go test -bench=Poll.
const benchSocketsEnv = "KERNELSOURCE_BENCH_SOCKETS"

// BenchmarkPoll measures one poll (a dump of each family) with N idle
// established sockets that are all known already: the Source's steady-state
// cost, paid every Interval. The sockets are N/2 connections between
// 198.18.0.1 and 198.18.0.2 in a namespace of the benchmark's own. Besides
// wall time per poll it reports the process's CPU time (user and system,
// from getrusage) per poll; most of it is the kernel's.
func BenchmarkPoll(b *testing.B) {
	n := 1000
	if v := os.Getenv(benchSocketsEnv); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 2 {
			b.Fatalf("%s=%q: want a number of sockets, at least 2", benchSocketsEnv, v)
		}
	}
	ns := newNetns(b)
	l := ns.listen(b, addrB+":0")
	accepted := make(chan net.Conn, n/2)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	conns := make([]net.Conn, 0, n)
	b.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	err := ns.do(func() error {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(addrA)}, Timeout: 5 * time.Second}
		for range n / 2 {
			c, err := d.Dial("tcp", l.Addr().String())
			if err != nil {
				return err
			}
			conns = append(conns, c)
		}
		return nil
	})
	if err != nil {
		b.Fatalf("after %d connections: %v", len(conns), err)
	}
	for range n / 2 {
		conns = append(conns, <-accepted)
	}

	out := make(chan flow.Named, n+16)
	var s *Source
	if err := ns.do(func() (err error) {
		s, err = New(Config{PrefixFile: os.DevNull}, out)
		return err
	}); err != nil {
		b.Fatal(err)
	}
	// Run is not used: its loop would compete with the measured polls.
	b.Cleanup(func() {
		s.dumper.close()
		s.closeDestroy()
	})
	ctx := context.Background()
	s.poll(ctx) // learns every socket
	if got := len(out); got != n/2*2 {
		b.Fatalf("the first poll named %d sockets, want %d", got, n/2*2)
	}

	var before, after unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &before); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		s.poll(ctx)
	}
	if err := unix.Getrusage(unix.RUSAGE_SELF, &after); err != nil {
		b.Fatal(err)
	}
	if len(out) != n/2*2 {
		b.Fatalf("%d Opens after the first poll, want none", len(out)-n/2*2)
	}
	user := time.Duration(after.Utime.Nano() - before.Utime.Nano())
	sys := time.Duration(after.Stime.Nano() - before.Stime.Nano())
	polls := float64(b.N)
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/polls, "ns/poll")
	b.ReportMetric(float64((user+sys).Nanoseconds())/polls, "cpu-ns/poll")
	b.ReportMetric(float64(sys.Nanoseconds())/polls, "sys-ns/poll")
	b.ReportMetric(float64(n/2*2), "sockets")
}
