package kernelsource

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/demuxer"
)

// TestPollsOnlyWhileNeeded: with Config.Needed, the Source dumps once at
// start and then only while Needed is true, resuming when Wake receives; a
// socket opened while it is paused is named by the first poll after the
// wake.
func TestPollsOnlyWhileNeeded(t *testing.T) {
	ns := newNetns(t)
	var needed atomic.Bool
	wake := make(chan struct{}, 1)
	h := newHarness(t, ns, Config{Needed: needed.Load, Wake: wake}, nil)
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

// TestNeededWithoutWakeRefused: polling that could pause could never resume.
func TestNeededWithoutWakeRefused(t *testing.T) {
	if _, err := New(Config{Needed: func() bool { return false }}, make(chan demuxer.Open)); err == nil {
		t.Error("New accepted Needed without Wake")
	}
}
