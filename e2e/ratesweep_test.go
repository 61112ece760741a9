package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/internal/netns"
	"github.com/m-lab/packet-headers/internal/replay"
)

// The rate sweep (issue 9): the daemon must keep every flow whatever its
// packet rate, with -flowtimeout short against the flow's gaps. A capture
// that hands packets on only when a batch is full, or after a read timeout
// that a steady trickle never lets expire, holds a slow flow's packets for
// longer than the flow timeout: the flow is collected while its packets are
// still inside the daemon, and is lost or cut.
//
// Packets of every flow on an interface share the capture's batches, so a
// fast flow would hand a slow one's packets on: each slow flow therefore
// runs alone in its own topology, with its own daemon, and the topologies of
// one mode run at the same time to keep the test short.

// sweepFlowTimeout is the daemon's -flowtimeout in these tests.
const sweepFlowTimeout = 2 * time.Second

// sweepMsgLen is the size of each of a paced client's writes.
const sweepMsgLen = 100

// flowPlan is how a test client writes: msgs messages of sweepMsgLen bytes,
// message i at due(i) after the connection is up; then it half-closes and
// reads the echo server's response.
type flowPlan struct {
	name string
	v6   bool
	msgs int
	due  func(i int) time.Duration
	tick time.Duration // how often the client looks for due messages
}

// tickFor is the pacing ticker's period for messages gap apart.
func tickFor(gap time.Duration) time.Duration {
	return min(max(gap/4, time.Millisecond), 10*time.Millisecond)
}

func family(v6 bool) string {
	if v6 {
		return "v6"
	}
	return "v4"
}

// steadyFlow writes rate messages a second for d.
func steadyFlow(v6 bool, rate float64, d time.Duration) flowPlan {
	gap := time.Duration(float64(time.Second) / rate)
	return flowPlan{
		name: fmt.Sprintf("%g/s %s", rate, family(v6)),
		v6:   v6,
		msgs: int(rate * d.Seconds()),
		due:  func(i int) time.Duration { return time.Duration(i) * gap },
		tick: tickFor(gap),
	}
}

// pausedFlow writes rate messages a second for before, is silent for pause,
// and writes as before for after.
func pausedFlow(v6 bool, rate float64, before, pause, after time.Duration) flowPlan {
	gap := time.Duration(float64(time.Second) / rate)
	n1, n2 := int(rate*before.Seconds()), int(rate*after.Seconds())
	return flowPlan{
		name: fmt.Sprintf("%g/s with a %v pause %s", rate, pause, family(v6)),
		v6:   v6,
		msgs: n1 + n2,
		due: func(i int) time.Duration {
			if i < n1 {
				return time.Duration(i) * gap
			}
			return time.Duration(i)*gap + pause
		},
		tick: tickFor(gap),
	}
}

// burstyFlow writes bursts of burst messages back to back, quiet apart.
func burstyFlow(v6 bool, burst, bursts int, quiet time.Duration) flowPlan {
	return flowPlan{
		name: fmt.Sprintf("%d bursts of %d %s", bursts, burst, family(v6)),
		v6:   v6,
		msgs: burst * bursts,
		due:  func(i int) time.Duration { return time.Duration(i/burst) * quiet },
		tick: 10 * time.Millisecond,
	}
}

// flowRun is one paced client flow of an env.
type flowRun struct {
	e    *env
	plan flowPlan
	// stop, when closed, ends the flow before its last message.
	stop chan struct{}
	// marked is closed once mark messages are written (if mark > 0).
	mark   int
	marked chan struct{}
	sent   atomic.Int64

	// Set by run.
	client string // the client's address:port
	key    flow.Key
	err    error
	took   time.Duration
	// Set by the test after run.
	uuid string
}

func newFlowRun(e *env, p flowPlan) *flowRun {
	return &flowRun{e: e, plan: p, stop: make(chan struct{}), marked: make(chan struct{})}
}

func (r *flowRun) label() string {
	return fmt.Sprintf("%s (%s, %s)", r.plan.name, r.client, r.uuid)
}

// run connects, writes the plan's messages, half-closes and reads the
// response. It runs in its own goroutine: errors are kept in r.err.
func (r *flowRun) run() {
	addr := r.e.server.ln4.Addr().String()
	if r.plan.v6 {
		addr = r.e.server.ln6.Addr().String()
	}
	var c net.Conn
	err := netns.Run(r.e.tp.clientNS, func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	})
	if err != nil {
		r.err = fmt.Errorf("dial %s: %w", addr, err)
		return
	}
	defer c.Close()
	r.client = c.LocalAddr().String()
	r.key = flow.KeyFromAddrPorts(c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort())
	last := time.Duration(0)
	if r.plan.msgs > 0 {
		last = r.plan.due(r.plan.msgs - 1)
	}
	c.SetDeadline(time.Now().Add(last + 30*time.Second))
	msg := bytes.Repeat([]byte("P"), sweepMsgLen)
	start := time.Now()
	// The ticker paces the writes (traffic generation): at each tick,
	// every message that is due is written.
	tk := time.NewTicker(r.plan.tick)
	defer tk.Stop()
	i := 0
pace:
	for i < r.plan.msgs {
		for i < r.plan.msgs && time.Since(start) >= r.plan.due(i) {
			if _, err := c.Write(msg); err != nil {
				r.err = fmt.Errorf("write %d: %w", i, err)
				return
			}
			i++
			r.sent.Store(int64(i))
			if i == r.mark {
				close(r.marked)
			}
		}
		if i == r.plan.msgs {
			break
		}
		select {
		case <-tk.C:
		case <-r.stop:
			break pace
		}
	}
	c.(*net.TCPConn).CloseWrite()
	n, err := io.Copy(io.Discard, c)
	if err != nil || int(n) != r.e.server.respLen {
		r.err = fmt.Errorf("after %d messages: read %d bytes, %v; want %d", i, n, err, r.e.server.respLen)
	}
	r.took = time.Since(start)
}

// findFiles waits until each UUID has its file, or until the deadline, and
// returns the paths found.
func (e *env) findFiles(uuids []string, d time.Duration) map[string]string {
	found := map[string]string{}
	deadline := time.Now().Add(d)
	for {
		for _, u := range uuids {
			if _, ok := found[u]; ok {
				continue
			}
			if m, _ := filepath.Glob(filepath.Join(e.dataDir, "*", "*", "*", u+".pcap.gz")); len(m) == 1 {
				found[u] = m[0]
			}
		}
		if len(found) == len(uuids) || time.Now().After(deadline) {
			return found
		}
		time.Sleep(50 * time.Millisecond) // polling the file system, with a deadline
	}
}

// sweepGroup is one topology of the sweep and the flows run on it.
type sweepGroup struct {
	name  string
	plans []flowPlan
	e     *env
	runs  []*flowRun
}

// sweepGroups are the sweep's topologies. A slow flow is alone on its link
// (beside another, it would see the capture's batches fill twice as fast);
// the fast flows, the bursts and the many slow flows share one each.
func sweepGroups() []*sweepGroup {
	var groups []*sweepGroup
	alone := func(f func(v6 bool) flowPlan) {
		for _, v6 := range []bool{false, true} {
			p := f(v6)
			groups = append(groups, &sweepGroup{name: p.name, plans: []flowPlan{p}})
		}
	}
	both := func(f func(v6 bool) flowPlan) []flowPlan { return []flowPlan{f(false), f(true)} }
	// Gaps of a second: shorter than -flowtimeout, longer than any read
	// timeout.
	alone(func(v6 bool) flowPlan { return steadyFlow(v6, 1, 7*time.Second) })
	alone(func(v6 bool) flowPlan { return steadyFlow(v6, 5, 5*time.Second) })
	alone(func(v6 bool) flowPlan { return steadyFlow(v6, 20, 4*time.Second) })
	// Issue 9's standalone case: a capture that hands on full batches of
	// 128 packets only gave this flow's first batch after 6 s and the rest
	// at its end, more than two flow timeouts later: the file was cut.
	alone(func(v6 bool) flowPlan { return steadyFlow(v6, 10, 10*time.Second) })
	alone(func(v6 bool) flowPlan {
		return pausedFlow(v6, 10, 2*time.Second, 1500*time.Millisecond, 2*time.Second)
	})
	groups = append(groups,
		&sweepGroup{name: "100/s and 1000/s", plans: append(
			both(func(v6 bool) flowPlan { return steadyFlow(v6, 100, 3*time.Second) }),
			both(func(v6 bool) flowPlan { return steadyFlow(v6, 1000, 3*time.Second) })...)},
		&sweepGroup{name: "bursts", plans: both(func(v6 bool) flowPlan { return burstyFlow(v6, 50, 4, 700*time.Millisecond) })})
	var many []flowPlan
	for i := range 20 {
		p := steadyFlow(i%2 == 1, 5, 4*time.Second)
		p.name = fmt.Sprintf("many #%d %s", i, p.name)
		many = append(many, p)
	}
	return append(groups, &sweepGroup{name: "20 flows at 5/s", plans: many})
}

// TestRateSweep: beside tcp-info, flows from 1 to 1000 messages a second,
// with pauses, bursts and many at once, each have their file with every
// packet of the reference.
func TestRateSweep(t *testing.T) { rateSweep(t) }

// TestRateSweepStandalone is TestRateSweep with the built-in UUID source.
func TestRateSweepStandalone(t *testing.T) { rateSweep(t, standaloneArg) }

func rateSweep(t *testing.T, extra ...string) {
	args := append([]string{fmt.Sprintf("-flowtimeout=%v", sweepFlowTimeout)}, extra...)
	groups := sweepGroups()
	setup := time.Now()
	for _, g := range groups {
		g.e = newEnv(t, args...)
		for _, p := range g.plans {
			g.runs = append(g.runs, newFlowRun(g.e, p))
		}
	}
	t.Logf("%d topologies set up in %v", len(groups), time.Since(setup))
	// Every flow of every group at once.
	start := time.Now()
	var wg sync.WaitGroup
	for _, g := range groups {
		for _, r := range g.runs {
			wg.Go(r.run)
		}
	}
	wg.Wait()
	t.Logf("traffic took %v", time.Since(start))
	for _, g := range groups {
		for _, r := range g.runs {
			if r.err != nil {
				t.Fatalf("%s: flow %s: %v", g.name, r.plan.name, r.err)
			}
			r.uuid = g.e.server.uuidOf(t, r.client)
		}
	}

	// A flow ends one to two flow timeouts after its last packet.
	filesStart := time.Now()
	found := make([]map[string]string, len(groups))
	for i, g := range groups {
		var uuids []string
		for _, r := range g.runs {
			uuids = append(uuids, r.uuid)
		}
		found[i] = g.e.findFiles(uuids, 2*sweepFlowTimeout+10*time.Second-time.Since(filesStart))
	}
	t.Logf("files waited for %v", time.Since(filesStart))
	metrics := make([]string, len(groups))
	for i, g := range groups {
		metrics[i] = g.e.pcapMetrics()
	}

	for i, g := range groups {
		ref := g.e.stopReference()
		failed := false
		for _, r := range g.runs {
			path, ok := found[i][r.uuid]
			up, down := byDirection(t, ref[r.key], serverAddrOf(conn{key: r.key}))
			if !ok {
				t.Errorf("%s: flow %s: no file; the reference has %d+%d packets, %d messages sent in %v",
					g.name, r.label(), len(up), len(down), r.sent.Load(), r.took.Round(time.Millisecond))
				failed = true
				continue
			}
			got, _, _ := replay.ReadFile(path)
			t.Logf("%s: flow %s: %d messages in %v, reference %d packets, file %d", g.name, r.label(),
				r.sent.Load(), r.took.Round(time.Millisecond), len(ref[r.key]), len(got))
			t.Run(r.plan.name, func(t *testing.T) {
				compareFlow(t, path, ref[r.key], serverAddrOf(conn{key: r.key}), false)
				if t.Failed() {
					failed = true
				}
			})
		}
		if n := len(g.e.files()); n != len(g.runs) {
			t.Errorf("%s: %d files for %d flows: %v", g.name, n, len(g.runs), g.e.files())
			failed = true
		}
		if failed {
			t.Logf("%s: daemon metrics:\n%s", g.name, metrics[i])
		}
	}
}

// refBefore counts a flow's reference packets, by direction, captured
// before t.
func refBefore(t *testing.T, pkts []replay.Packet, server string, before time.Time) (up, down int) {
	u, d := byDirection(t, pkts, server)
	for _, p := range u {
		if p.Time < before.UnixNano() {
			up++
		}
	}
	for _, p := range d {
		if p.Time < before.UnixNano() {
			down++
		}
	}
	return up, down
}

// sigtermRun is one repetition of TestRateSIGTERMSlowFlow in one mode.
type sigtermRun struct {
	r       *flowRun
	sent    time.Time // when SIGTERM was sent
	metrics string    // the daemon's, just before
	path    string
}

// TestRateSIGTERMSlowFlow: a flow of 5 messages a second is in flight,
// named and older than two flow timeouts, when the daemon gets SIGTERM. Its
// file must be published, and hold every packet the reference saw before
// the signal (and nothing else than the reference's). Three times, beside
// tcp-info and standalone at once.
func TestRateSIGTERMSlowFlow(t *testing.T) {
	const sigtermWait = time.Second
	args := []string{fmt.Sprintf("-flowtimeout=%v", sweepFlowTimeout), fmt.Sprintf("-sigtermwait=%v", sigtermWait)}
	modes := []struct {
		name string
		args []string
		e    *env
		reps []sigtermRun
	}{
		{name: "beside tcp-info", args: args},
		{name: "standalone", args: append(args, standaloneArg)},
	}
	for i := range modes {
		modes[i].e = newEnv(t, modes[i].args...)
	}
	const reps = 3
	// The signal comes after 4.4 s of the flow: two flow timeouts and
	// more, so that the daemon's GC has run twice during the flow.
	const mark = 22
	for rep := range reps {
		if rep > 0 {
			for _, m := range modes {
				m.e.startDaemon(append([]string{"-interface=" + m.e.tp.serverIf}, m.args...)...)
				line := "connected to eventsocket"
				if m.e.standalone {
					line = "standalone"
				}
				if !m.e.daemon.log.waitFor(line, 1, 10*time.Second) {
					t.Fatalf("%s: daemon did not start:\n%s", m.name, m.e.daemon.log.String())
				}
			}
		}
		var wg sync.WaitGroup
		runs := make([]*flowRun, len(modes))
		named := make([]float64, len(modes))
		for i, m := range modes {
			named[i] = m.e.metric(m.e.namedMetric())
			runs[i] = newFlowRun(m.e, steadyFlow(i%2 == 1, 5, 20*time.Second))
			runs[i].mark = mark
			wg.Go(runs[i].run)
		}
		stopFlows := func() {
			for _, r := range runs {
				close(r.stop)
			}
			wg.Wait()
		}
		for i, m := range modes {
			select {
			case <-runs[i].marked:
			case <-time.After(30 * time.Second):
				stopFlows()
				t.Fatalf("%s, repetition %d: %d messages sent, not %d: %v", m.name, rep+1, runs[i].sent.Load(), mark, runs[i].err)
			}
			// Named in a few tens of milliseconds, if its packets reached
			// the demuxer: 4.4 s is plenty.
			if m.e.metric(m.e.namedMetric()) < named[i]+1 {
				t.Errorf("%s, repetition %d: the flow was not named %d messages into it", m.name, rep+1, mark)
			}
			modes[i].reps = append(modes[i].reps, sigtermRun{r: runs[i], sent: time.Now(), metrics: m.e.pcapMetrics()})
			m.e.daemon.signal(syscall.SIGTERM)
		}
		for _, m := range modes {
			code, ok := m.e.daemon.wait(sigtermWait + 15*time.Second)
			if !ok || code != 0 {
				t.Errorf("%s, repetition %d: daemon after SIGTERM: exited=%v code=%d", m.name, rep+1, ok, code)
			}
		}
		// The flows go on after the daemon is gone, then end.
		stopFlows()
		for i := range modes {
			m := &modes[i]
			sr := &m.reps[rep]
			if sr.r.err != nil {
				t.Fatalf("%s, repetition %d: %v", m.name, rep+1, sr.r.err)
			}
			sr.r.uuid = m.e.server.uuidOf(t, sr.r.client)
			// The daemon has exited: the file is there or never will be.
			if f := m.e.findFiles([]string{sr.r.uuid}, 0); f[sr.r.uuid] != "" {
				sr.path = f[sr.r.uuid]
			}
		}
	}

	for _, m := range modes {
		ref := m.e.stopReference()
		for rep, sr := range m.reps {
			server := serverAddrOf(conn{key: sr.r.key})
			wantUp, wantDown := refBefore(t, ref[sr.r.key], server, sr.sent)
			if sr.path == "" {
				t.Errorf("%s, repetition %d: flow %s: no file after SIGTERM; the reference saw %d+%d packets before the signal; metrics before it:\n%s",
					m.name, rep+1, sr.r.label(), wantUp, wantDown, sr.metrics)
				continue
			}
			got, _, err := replay.ReadFile(sr.path)
			if err != nil {
				t.Errorf("%s, repetition %d: %v", m.name, rep+1, err)
				continue
			}
			gotUp, gotDown := byDirection(t, got, server)
			t.Logf("%s, repetition %d: flow %s: %d+%d packets in the file, %d+%d in the reference before SIGTERM, %d in all",
				m.name, rep+1, sr.r.label(), len(gotUp), len(gotDown), wantUp, wantDown, len(ref[sr.r.key]))
			if len(gotUp) < wantUp || len(gotDown) < wantDown {
				t.Errorf("%s, repetition %d: flow %s: the file holds %d+%d packets, the reference saw %d+%d before SIGTERM; metrics before it:\n%s",
					m.name, rep+1, sr.r.label(), len(gotUp), len(gotDown), wantUp, wantDown, sr.metrics)
			}
			compareFlow(t, sr.path, ref[sr.r.key], server, true)
		}
		if t.Failed() {
			t.Logf("%s: last daemon's output:\n%s", m.name, lastLines(m.e.daemon.log.String(), 40))
		}
	}
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(l[max(0, len(l)-n):], "\n")
}
