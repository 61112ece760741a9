package nsproc

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

func TestOutputWaitFor(t *testing.T) {
	o := NewOutput()
	go func() {
		for i := range 3 {
			fmt.Fprintf(o, "line %d ready\n", i)
		}
	}()
	if !o.WaitForWithin("ready", 3, 10*time.Second) {
		t.Fatalf("WaitFor 3 times: false; output %q", o.String())
	}
	if o.WaitForWithin("ready", 4, 10*time.Millisecond) {
		t.Error("WaitFor 4 times: true after 3 lines")
	}
	stop := make(chan struct{})
	close(stop)
	if o.WaitFor("never", 1, nil, stop) {
		t.Error("WaitFor after stop: true")
	}
	if got, ok := o.LastLine("line "); !ok || got != "2 ready" {
		t.Errorf("LastLine = %q, %v; want \"2 ready\", true", got, ok)
	}
	if _, ok := o.LastLine("none"); ok {
		t.Error("LastLine of a missing prefix: found")
	}
}

// TestStartStop runs a program in a namespace of its own and stops it by
// its PID.
func TestStartStop(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2's ip")
	}
	ns := fmt.Sprintf("phnsproc%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	p, err := Start(ns, "sh", []string{"PHNSPROC=here"}, "sh", "-c", `echo "env $PHNSPROC"; exec sleep 60`)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	if err := p.WaitOutput(context.Background(), "env here", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if p.Exited() {
		t.Fatal("exited early")
	}
	if err := p.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if !p.Exited() || p.Err() == nil {
		t.Errorf("after Stop: exited %v, err %v; want exited by a signal", p.Exited(), p.Err())
	}
	if _, _, ok := p.Rusage(); !ok {
		t.Error("no rusage after exit")
	}
	if err := p.WaitOutput(context.Background(), "never", time.Second); err == nil {
		t.Error("WaitOutput on an exited process: no error")
	}
}
