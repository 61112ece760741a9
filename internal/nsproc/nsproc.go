// Package nsproc starts programs inside network namespaces, collects their
// output, and stops them by their PID only: never by name, since other
// people run the same programs (tcpdump, tcp-info, the daemon) on the same
// machine. The end-to-end tests and the live benchmark start every process
// they need with it.
package nsproc

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Proc is a process started in a namespace.
type Proc struct {
	Name  string
	Cmd   *exec.Cmd
	Out   *Output // stdout and stderr together
	Stdin io.WriteCloser
	done  chan struct{} // closed once the process has exited and been reaped
	err   error         // Wait's error, valid once done is closed
}

// Start runs bin in the network namespace ns, with env added to this
// process's environment (a later entry wins). `ip netns exec` execs the
// program after joining the namespace, so the PID is the program's own, and
// so are its /proc entries and rusage. The process is killed if this one
// dies (Pdeathsig); otherwise the caller stops it with Kill or Stop.
func Start(ns, name string, env []string, bin string, args ...string) (*Proc, error) {
	p := &Proc{Name: name, Out: NewOutput(), done: make(chan struct{})}
	p.Cmd = exec.Command("ip", append([]string{"netns", "exec", ns, bin}, args...)...)
	if env != nil {
		p.Cmd.Env = append(os.Environ(), env...)
	}
	p.Cmd.Stdout = p.Out
	p.Cmd.Stderr = p.Out
	// Pdeathsig fires when the thread that started the process ends; the
	// Go runtime ends a thread only when a goroutine exits locked to it,
	// which netns.Run avoids.
	p.Cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := p.Cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	p.Stdin = stdin
	if err := p.Cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		p.err = p.Cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Pid is the process's ID.
func (p *Proc) Pid() int { return p.Cmd.Process.Pid }

// Done is closed once the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err is how the process ended (exec.Cmd.Wait's error); valid once Done is
// closed.
func (p *Proc) Err() error { return p.err }

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Signal sends sig by PID; a process that has exited is no error.
func (p *Proc) Signal(sig syscall.Signal) error {
	if err := p.Cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal %s: %w", p.Name, err)
	}
	return nil
}

// Kill kills the process by PID, if it still runs, and waits for it.
func (p *Proc) Kill() {
	if !p.Exited() {
		p.Cmd.Process.Kill()
		<-p.done
	}
}

// Wait waits up to d for the process to exit on its own, whatever its
// status.
func (p *Proc) Wait(ctx context.Context, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return fmt.Errorf("%s still running after %v", p.Name, d)
	}
}

// Stop sends sig and waits up to d for the exit, then kills.
func (p *Proc) Stop(sig syscall.Signal, d time.Duration) error {
	if err := p.Signal(sig); err != nil {
		return err
	}
	if err := p.Wait(context.Background(), d); err != nil {
		p.Kill()
		return fmt.Errorf("%s did not exit within %v of %v; killed", p.Name, d, sig)
	}
	return nil
}

// WaitOutput waits until the output holds s, failing early if the process
// exits or ctx ends.
func (p *Proc) WaitOutput(ctx context.Context, s string, d time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	if p.Out.WaitFor(s, 1, ctx.Done(), p.done) {
		return nil
	}
	if p.Exited() {
		return fmt.Errorf("%s exited (%v) before printing %q:\n%s", p.Name, p.err, s, p.Out.String())
	}
	return fmt.Errorf("%s did not print %q within %v (%w):\n%s", p.Name, s, d, context.Cause(ctx), p.Out.String())
}

// WaitFile waits until path exists, failing early if the process exits or
// ctx ends.
func (p *Proc) WaitFile(ctx context.Context, path string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if p.Exited() {
			return fmt.Errorf("%s exited (%v) before creating %s:\n%s", p.Name, p.err, path, p.Out.String())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not create %s within %v:\n%s", p.Name, path, d, p.Out.String())
		}
		// Polling a real process's effect on the file system, with a
		// deadline.
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Rusage returns the CPU time (user and system) and peak RSS of the exited
// process.
func (p *Proc) Rusage() (cpu time.Duration, maxRSSKB int64, ok bool) {
	if p.Cmd.ProcessState == nil {
		return 0, 0, false
	}
	ru, ok := p.Cmd.ProcessState.SysUsage().(*syscall.Rusage)
	if !ok {
		return 0, 0, false
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), ru.Maxrss, true
}

// Output collects a process's output and lets the caller wait for a string
// in it. It is safe for concurrent use.
type Output struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{} // closed and replaced on every write
}

// NewOutput returns an empty Output.
func NewOutput() *Output { return &Output{changed: make(chan struct{})} }

func (o *Output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.buf.Write(p)
	close(o.changed)
	o.changed = make(chan struct{})
	return len(p), nil
}

func (o *Output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// WaitFor waits until the output holds s at least n times, giving up when
// timeout or stop is closed (either may be nil: never).
func (o *Output) WaitFor(s string, n int, timeout, stop <-chan struct{}) bool {
	for {
		o.mu.Lock()
		found := bytes.Count(o.buf.Bytes(), []byte(s)) >= n
		changed := o.changed
		o.mu.Unlock()
		if found {
			return true
		}
		select {
		case <-changed:
		case <-stop:
			// The last output may have raced with the exit.
			return strings.Count(o.String(), s) >= n
		case <-timeout:
			return false
		}
	}
}

// WaitForWithin is WaitFor with a timeout of d.
func (o *Output) WaitForWithin(s string, n int, d time.Duration) bool {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return o.WaitFor(s, n, ctx.Done(), nil)
}

// LastLine returns the last line starting with prefix, without it.
func (o *Output) LastLine(prefix string) (string, bool) {
	var last string
	found := false
	sc := bufio.NewScanner(strings.NewReader(o.String()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if s, ok := strings.CutPrefix(sc.Text(), prefix); ok {
			last, found = s, true
		}
	}
	return last, found
}
