package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// clientConfig holds the client's flags. Which fields a mode reads is said
// in each field's flag usage.
type clientConfig struct {
	Addr     string
	Rate     int
	Count    int
	Hold     time.Duration
	Req      int
	Resp     int
	Streams  int
	Duration time.Duration
	Pace     int64
	Timeout  time.Duration
}

// Bounds that keep every loop finite whatever the flags say.
const (
	maxCount    = 100_000
	maxRate     = 20_000
	maxStreams  = 256
	maxDuration = 10 * time.Minute
)

func (c *clientConfig) validate(mode string) error {
	switch {
	case c.Addr == "":
		return errors.New("-addr is required")
	case c.Req < 0 || c.Resp < 0:
		return errors.New("-req and -resp must not be negative")
	case c.Timeout <= 0:
		return errors.New("-timeout must be positive")
	case c.Hold < 0 || c.Hold > maxDuration:
		return fmt.Errorf("-hold must be within 0..%v", maxDuration)
	}
	switch mode {
	case "churn", "concurrent":
		if c.Rate <= 0 || c.Rate > maxRate || c.Count <= 0 || c.Count > maxCount {
			return fmt.Errorf("-rate must be within 1..%d and -count within 1..%d", maxRate, maxCount)
		}
	case "bulk":
		if c.Streams <= 0 || c.Streams > maxStreams || c.Duration <= 0 || c.Duration > maxDuration || c.Pace < 0 {
			return fmt.Errorf("-streams must be within 1..%d, -duration within 0..%v, -pace not negative", maxStreams, maxDuration)
		}
	}
	return nil
}

// result is what the client reports on its last line.
type result struct {
	Attempted int            `json:"attempted"`
	OK        int            `json:"ok"`
	Errors    map[string]int `json:"errors,omitempty"`
	Bytes     int64          `json:"bytes,omitempty"`
	Elapsed   float64        `json:"elapsed_s"`
	// Late counts churn connections started more than 10 ms after their
	// schedule: the client could not keep the rate.
	Late int `json:"late,omitempty"`
}

// tally collects outcomes from many goroutines.
type tally struct {
	mu  sync.Mutex
	res result
}

func (t *tally) ok(bytes int64) {
	t.mu.Lock()
	t.res.OK++
	t.res.Bytes += bytes
	t.mu.Unlock()
}

func (t *tally) fail(stage string) {
	t.mu.Lock()
	if t.res.Errors == nil {
		t.res.Errors = map[string]int{}
	}
	t.res.Errors[stage]++
	t.mu.Unlock()
}

func runClient(ctx context.Context, mode string, args []string, stdin io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet(mode, flag.ContinueOnError)
	var c clientConfig
	fs.StringVar(&c.Addr, "addr", "", "server address:port")
	fs.IntVar(&c.Rate, "rate", 200, "churn, concurrent: connections opened per second")
	fs.IntVar(&c.Count, "count", 2000, "churn, concurrent: connections in all")
	fs.DurationVar(&c.Hold, "hold", 100*time.Millisecond, "churn: each connection's life from connect; concurrent: the longest all stay open waiting for a line on stdin")
	fs.IntVar(&c.Req, "req", 500, "churn, concurrent: request bytes")
	fs.IntVar(&c.Resp, "resp", 8000, "churn, concurrent: response bytes expected")
	fs.IntVar(&c.Streams, "streams", 4, "bulk: parallel streams")
	fs.DurationVar(&c.Duration, "duration", 10*time.Second, "bulk: how long each stream sends")
	fs.Int64Var(&c.Pace, "pace", 0, "bulk: bytes per second per stream (SO_MAX_PACING_RATE); 0 sends as fast as possible")
	fs.DurationVar(&c.Timeout, "timeout", 10*time.Second, "longest wait for one connect, read or write")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := c.validate(mode); err != nil {
		return err
	}
	var t tally
	start := time.Now()
	var err error
	switch mode {
	case "churn":
		err = churn(ctx, &c, &t)
	case "bulk":
		err = bulk(ctx, &c, &t)
	case "concurrent":
		err = concurrent(ctx, &c, &t, stdin, stdout)
	}
	t.mu.Lock()
	t.res.Elapsed = time.Since(start).Seconds()
	b, merr := json.Marshal(t.res)
	t.mu.Unlock()
	if merr != nil {
		return errors.Join(err, merr)
	}
	fmt.Fprintf(stdout, "result %s\n", b)
	return err
}

// schedule calls fn(i) for i in [0, count) at rate per second from now, each
// in its own goroutine, and waits for all of them. It stops early when ctx
// is done. Starts are scheduled on absolute times so that a slow moment is
// caught up rather than stretching the run.
func schedule(ctx context.Context, rate, count int, t *tally, fn func(i int)) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	t0 := time.Now()
	for i := range count {
		at := t0.Add(time.Duration(int64(i) * int64(time.Second) / int64(rate)))
		if err := sleepUntil(ctx, at); err != nil {
			return err
		}
		t.mu.Lock()
		t.res.Attempted++
		if time.Since(at) > 10*time.Millisecond {
			t.res.Late++
		}
		t.mu.Unlock()
		wg.Go(func() { fn(i) })
	}
	return nil
}

// churn opens -count connections at -rate per second; each sends -req
// bytes, reads -resp bytes, stays open until -hold after its connect, and
// closes.
func churn(ctx context.Context, c *clientConfig, t *tally) error {
	// Bounded in time as well as count: the schedule, one hold, and the
	// timeouts of the last connection.
	limit := time.Duration(c.Count)*time.Second/time.Duration(c.Rate) + c.Hold + 3*c.Timeout
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	req := payload(c.Req)
	return schedule(ctx, c.Rate, c.Count, t, func(int) {
		start := time.Now()
		conn, stage := exchange(ctx, c, req)
		if conn == nil {
			t.fail(stage)
			return
		}
		defer conn.Close()
		if err := sleepUntil(ctx, start.Add(c.Hold)); err != nil {
			t.fail("hold")
			return
		}
		t.ok(int64(c.Req + c.Resp))
	})
}

// exchange connects, writes req and reads -resp bytes. It returns the open
// connection, or nil and the stage that failed.
func exchange(ctx context.Context, c *clientConfig, req []byte) (net.Conn, string) {
	d := net.Dialer{Timeout: c.Timeout}
	conn, err := d.DialContext(ctx, "tcp", c.Addr)
	if err != nil {
		return nil, "connect"
	}
	if err := conn.SetDeadline(time.Now().Add(c.Timeout)); err != nil {
		conn.Close()
		return nil, "deadline"
	}
	if len(req) > 0 {
		if _, err := conn.Write(req); err != nil {
			conn.Close()
			return nil, "write"
		}
	}
	if c.Resp > 0 {
		if _, err := io.ReadFull(conn, make([]byte, c.Resp)); err != nil {
			conn.Close()
			return nil, "read"
		}
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		conn.Close()
		return nil, "deadline"
	}
	return conn, ""
}

// bulk runs -streams connections that send for -duration, as fast as TCP
// allows or paced by the kernel at -pace bytes per second each, then close
// their side and wait for the server's FIN, so that every flow ends with a
// complete handshake.
func bulk(ctx context.Context, c *clientConfig, t *tally) error {
	buf := payload(128 << 10)
	var wg sync.WaitGroup
	for range c.Streams {
		t.mu.Lock()
		t.res.Attempted++
		t.mu.Unlock()
		wg.Go(func() {
			n, stage := stream(ctx, c, buf)
			if stage != "" {
				t.fail(stage)
				return
			}
			t.ok(n)
		})
	}
	wg.Wait()
	return nil
}

func stream(ctx context.Context, c *clientConfig, buf []byte) (int64, string) {
	d := net.Dialer{Timeout: c.Timeout}
	conn, err := d.DialContext(ctx, "tcp", c.Addr)
	if err != nil {
		return 0, "connect"
	}
	defer conn.Close()
	if c.Pace > 0 {
		if err := setPacing(conn, c.Pace); err != nil {
			return 0, "pacing"
		}
	}
	// The write deadline is what ends the stream: a write blocked on a
	// full socket buffer returns at the deadline.
	end := time.Now().Add(c.Duration)
	if err := conn.SetWriteDeadline(end); err != nil {
		return 0, "deadline"
	}
	stop := context.AfterFunc(ctx, func() { conn.SetWriteDeadline(time.Now()) })
	defer stop()
	var sent int64
	for time.Now().Before(end) && ctx.Err() == nil {
		n, err := conn.Write(buf)
		sent += int64(n)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		if err != nil {
			return sent, "write"
		}
	}
	if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
		return sent, "close"
	}
	// The server closes once it has read everything: wait for its FIN.
	if err := conn.SetReadDeadline(time.Now().Add(c.Timeout)); err != nil {
		return sent, "deadline"
	}
	if _, err := io.Copy(io.Discard, conn); err != nil {
		return sent, "read"
	}
	return sent, ""
}

// setPacing asks the kernel to pace the socket at rate bytes per second.
// TCP paces internally when no fq qdisc is there (Linux 4.13 and later).
func setPacing(conn net.Conn, rate int64) error {
	sc, err := conn.(syscall.Conn).SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = sc.Control(func(fd uintptr) {
		serr = unix.SetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_MAX_PACING_RATE, uint64(rate))
	})
	return errors.Join(err, serr)
}

// concurrent opens -count connections at -rate per second, each exchanging
// -req and -resp bytes, and keeps them all open and idle. It prints
// "open N" once all are open, then waits for a line on stdin (phbench has
// measured the daemon's memory by then) or -hold, and closes them at
// -rate per second, so that the closing burst is as gentle as the opening.
func concurrent(ctx context.Context, c *clientConfig, t *tally, stdin io.Reader, stdout io.Writer) error {
	if err := raiseNoFile(c.Count + 64); err != nil {
		return err
	}
	req := payload(c.Req)
	conns := make([]net.Conn, c.Count)
	openCtx, cancel := context.WithTimeout(ctx, time.Duration(c.Count)*time.Second/time.Duration(c.Rate)+3*c.Timeout)
	err := schedule(openCtx, c.Rate, c.Count, t, func(i int) {
		conn, stage := exchange(openCtx, c, req)
		if conn == nil {
			t.fail(stage)
			return
		}
		conns[i] = conn
		t.ok(int64(c.Req + c.Resp))
	})
	cancel()
	t.mu.Lock()
	open := t.res.OK
	t.mu.Unlock()
	fmt.Fprintf(stdout, "open %d\n", open)

	if err == nil {
		line := make(chan struct{})
		go func() {
			// Any line or EOF on stdin means "close now".
			bufio.NewReader(stdin).ReadString('\n')
			close(line)
		}()
		hold := time.NewTimer(c.Hold)
		select {
		case <-line:
		case <-hold.C:
		case <-ctx.Done():
		}
		hold.Stop()
	}
	t0 := time.Now()
	k := 0
	for _, conn := range conns {
		if conn == nil {
			continue
		}
		// Not ctx: the connections are closed even when interrupted, at
		// once then.
		if ctx.Err() == nil {
			time.Sleep(time.Until(t0.Add(time.Duration(int64(k) * int64(time.Second) / int64(c.Rate)))))
		}
		conn.Close()
		k++
	}
	return err
}
