package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is a process the benchmark started in a namespace. It is controlled
// by its PID only (never by name: other engineers run the same programs on
// this machine).
type proc struct {
	name  string
	cmd   *exec.Cmd
	out   *logBuffer // stdout and stderr together
	stdin io.WriteCloser
	done  chan struct{} // closed when the process has exited and been reaped
	err   error         // Wait's error, valid once done is closed
}

// startProc runs bin in the network namespace ns. `ip netns exec` execs the
// program after joining the namespace, so the PID is the program's own and
// its /proc entries and rusage are the program's. The process is killed if
// the benchmark dies (Pdeathsig: the Go runtime only ends a thread when a
// goroutine exits locked to it, which inNS avoids), and by cleanup
// otherwise.
func startProc(cleanup *stack, ns, name, bin string, args ...string) (*proc, error) {
	return startProcEnv(cleanup, nil, ns, name, bin, args...)
}

// startProcEnv is startProc with env added to the benchmark's environment
// (a later entry wins).
func startProcEnv(cleanup *stack, env []string, ns, name, bin string, args ...string) (*proc, error) {
	p := &proc{name: name, out: newLogBuffer(), done: make(chan struct{})}
	p.cmd = exec.Command("ip", append([]string{"netns", "exec", ns, bin}, args...)...)
	if env != nil {
		p.cmd.Env = append(os.Environ(), env...)
	}
	p.cmd.Stdout = p.out
	p.cmd.Stderr = p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := p.cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	p.stdin = stdin
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	cleanup.push("stop "+name, func() error {
		p.kill()
		return nil
	})
	return p, nil
}

// exited reports whether the process has exited.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// waitOutput waits until the process's output contains s, failing early if
// the process exits or ctx is done.
func (p *proc) waitOutput(ctx context.Context, s string, d time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	if p.out.waitFor(s, ctx.Done(), p.done) {
		return nil
	}
	if p.exited() {
		return fmt.Errorf("%s exited (%v) before printing %q:\n%s", p.name, p.err, s, p.out.String())
	}
	return fmt.Errorf("%s did not print %q within %v (%w):\n%s", p.name, s, d, context.Cause(ctx), p.out.String())
}

// stop sends sig by PID and waits up to d for the exit, then kills.
func (p *proc) stop(sig syscall.Signal, d time.Duration) error {
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal %s: %w", p.name, err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(d):
		p.kill()
		return fmt.Errorf("%s did not exit within %v of %v; killed", p.name, d, sig)
	}
}

// wait waits up to d for the process to exit on its own, and fails unless
// it exited 0.
func (p *proc) wait(ctx context.Context, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-p.done:
		if p.err != nil {
			return fmt.Errorf("%s: %w:\n%s", p.name, p.err, p.out.String())
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return fmt.Errorf("%s still running after %v:\n%s", p.name, d, p.out.String())
	}
}

func (p *proc) kill() {
	if !p.exited() {
		p.cmd.Process.Kill()
		<-p.done
	}
}

// rusage returns the CPU time and peak RSS of the exited process.
func (p *proc) rusage() (cpu time.Duration, maxRSSKB int64, ok bool) {
	if p.cmd.ProcessState == nil {
		return 0, 0, false
	}
	ru, ok := p.cmd.ProcessState.SysUsage().(*syscall.Rusage)
	if !ok {
		return 0, 0, false
	}
	cpu = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	return cpu, ru.Maxrss, true
}

// lastLine returns the last output line starting with prefix, without it.
func (p *proc) lastLine(prefix string) (string, bool) {
	var last string
	found := false
	sc := bufio.NewScanner(strings.NewReader(p.out.String()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if s, ok := strings.CutPrefix(sc.Text(), prefix); ok {
			last, found = s, true
		}
	}
	return last, found
}

// logBuffer collects a process's output and lets the benchmark wait for a
// string in it. It is safe for concurrent use.
type logBuffer struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{} // closed and replaced on every write
}

func newLogBuffer() *logBuffer { return &logBuffer{changed: make(chan struct{})} }

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	close(l.changed)
	l.changed = make(chan struct{})
	return len(p), nil
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// waitFor waits until the output contains s, giving up when timeout or stop
// is closed.
func (l *logBuffer) waitFor(s string, timeout <-chan struct{}, stop <-chan struct{}) bool {
	for {
		l.mu.Lock()
		found := bytes.Contains(l.buf.Bytes(), []byte(s))
		changed := l.changed
		l.mu.Unlock()
		if found {
			return true
		}
		select {
		case <-changed:
		case <-stop:
			// The last output may have raced with the exit.
			return strings.Contains(l.String(), s)
		case <-timeout:
			return false
		}
	}
}

// userHZ is the unit of the CPU times in /proc/<pid>/stat: USER_HZ, which
// Linux fixes at 100 for the user-space ABI whatever the kernel's HZ.
const userHZ = 100

// procCPU returns a live process's user+system CPU time (all threads).
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(b)
}

// parseStatCPU reads utime and stime (fields 14 and 15) of a /proc/<pid>/stat
// line. The command name (field 2) may contain spaces and parentheses, so
// fields are counted from the last ')'.
func parseStatCPU(b []byte) (time.Duration, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("malformed stat line")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state): utime is field 14, f[11].
	if len(f) < 13 {
		return 0, errors.New("short stat line")
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(ut+st) * time.Second / userHZ, nil
}

// procStatusKB returns a field of /proc/<pid>/status in kB (VmHWM, VmRSS).
func procStatusKB(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	return parseStatusKB(b, field)
}

func parseStatusKB(b []byte, field string) (int64, error) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), field+":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("%s: unexpected %q", field, rest)
		}
		return strconv.ParseInt(f[0], 10, 64)
	}
	return 0, fmt.Errorf("%s not in status", field)
}

// loadAvg returns the 1-minute load average: the machine is shared, and a
// number measured under load says so.
func loadAvg() (float64, error) {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0, errors.New("empty /proc/loadavg")
	}
	return strconv.ParseFloat(f[0], 64)
}

// tcpdumpCount reads a count of tcpdump's exit summary, e.g. "dropped by
// kernel" or "captured"; -1 when tcpdump did not print it.
func tcpdumpCount(out, what string) int64 {
	for _, l := range strings.Split(out, "\n") {
		if s, ok := strings.CutSuffix(strings.TrimSpace(l), " packets "+what); ok {
			if n, err := strconv.ParseInt(s, 10, 64); err == nil {
				return n
			}
		}
	}
	return -1
}
