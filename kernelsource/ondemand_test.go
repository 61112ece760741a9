package kernelsource

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/flow"
)

// fakePending is the demuxer's side of Config.Pending.
type fakePending struct {
	needed atomic.Bool
	wake   chan struct{}
}

func (f *fakePending) HasPending() bool             { return f.needed.Load() }
func (f *fakePending) PendingWake() <-chan struct{} { return f.wake }

// TestPollsOnlyWhileNeeded: with Config.Pending, the Source dumps once at
// start and then only while a flow is pending, resuming when PendingWake
// receives; a
// socket opened while it is paused is named by the first poll after the
// wake.
func TestPollsOnlyWhileNeeded(t *testing.T) {
	ns := newNetns(t)
	p := &fakePending{wake: make(chan struct{}, 1)}
	needed, wake := &p.needed, p.wake
	h := newHarness(t, ns, Config{Pending: p}, nil)
	h.waitPolls(t, 1) // the dump at start
	// Paused: at a 10 ms interval, 300 ms would hold about 30 dumps.
	before := h.polls(t)
	l := ns.listen(t, addrA+":0")
	c := connect(t, ns, l, addrB, addrA)
	h.take(300 * time.Millisecond)
	if n := h.polls(t) - before; n != 0 {
		t.Errorf("%d dumps while nothing needed a UUID", n)
	}
	if len(h.seen) != 0 {
		t.Errorf("Opens while paused: %v", h.seen)
	}
	// A flow waits: polling resumes and names the socket.
	needed.Store(true)
	wake <- struct{}{}
	h.waitPolls(t, 3)
	h.waitOpen(t, UUID(h.s.Prefix(), c.srvCook))
	h.waitOpen(t, UUID(h.s.Prefix(), c.clientCook))
	// Nothing waits any more: polling stops after at most the dump in
	// progress.
	needed.Store(false)
	h.waitPolls(t, 1)
	before = h.polls(t)
	h.take(300 * time.Millisecond)
	if n := h.polls(t) - before; n > 1 {
		t.Errorf("%d dumps after nothing needed a UUID any more", n)
	}
}

// TestPendingWithoutWakeRefused: polling that could pause could never
// resume.
func TestPendingWithoutWakeRefused(t *testing.T) {
	if _, err := New(Config{Pending: &fakePending{}}, make(chan flow.Named)); err == nil {
		t.Error("New accepted a Pending without a wake channel")
	}
}
