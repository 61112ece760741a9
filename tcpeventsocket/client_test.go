package tcpeventsocket

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/m-lab/tcp-info/eventsocket"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/metrics"
)

// waitLimit bounds every wait of these tests. It is a deadline for a
// condition, never a delay: passing tests wait only as long as the client
// needs.
const waitLimit = 10 * time.Second

// chanHandler hands events to the test through a channel. The buffer is large
// enough for every test, so Event never blocks the client.
type chanHandler chan Event

func (h chanHandler) Event(ev Event) { h <- ev }

// recLog is a slog.Handler that records messages, so tests can wait for the
// client to reach a state and count how often it logged.
type recLog struct {
	mu   sync.Mutex
	msgs []string
	c    chan string
}

func newRecLog() *recLog { return &recLog{c: make(chan string, 1000)} }

func (r *recLog) Enabled(context.Context, slog.Level) bool { return true }
func (r *recLog) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *recLog) WithGroup(string) slog.Handler            { return r }
func (r *recLog) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	r.msgs = append(r.msgs, rec.Message)
	r.mu.Unlock()
	select {
	case r.c <- rec.Message:
	default:
	}
	return nil
}

// count returns how many messages starting with prefix were logged.
func (r *recLog) count(prefix string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range r.msgs {
		if strings.HasPrefix(m, prefix) {
			n++
		}
	}
	return n
}

// waitFor waits until a message starting with prefix is logged.
func (r *recLog) waitFor(t *testing.T, prefix string) {
	t.Helper()
	deadline := time.After(waitLimit)
	for {
		select {
		case m := <-r.c:
			if strings.HasPrefix(m, prefix) {
				return
			}
		case <-deadline:
			t.Fatalf("no log message %q within %v", prefix, waitLimit)
		}
	}
}

// checkGoroutines fails the test if, once it is cleaned up, more goroutines
// are left than at its start. Goroutines end asynchronously after Run
// returns (the context.AfterFunc that closes the connection), so it waits for
// the count to come down, up to waitLimit.
func checkGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(waitLimit)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				t.Errorf("%d goroutines left, %d before the test:\n%s",
					runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
				return
			}
			<-tick.C
		}
	})
}

// testClient is a Client running in its own goroutine.
type testClient struct {
	*Client
	events chanHandler
	log    *recLog
	m      *metrics.Metrics
	cancel context.CancelFunc
	done   chan error
}

// startClient runs a Client of path. Cleanup stops it and checks that Run
// returned nil promptly. Tests call checkGoroutines themselves, first, so
// that the check runs after every other cleanup.
func startClient(t *testing.T, path string) *testClient {
	t.Helper()
	tc := &testClient{
		events: make(chanHandler, 100),
		log:    newRecLog(),
		m:      metrics.New(prometheus.NewRegistry()),
		done:   make(chan error, 1),
	}
	tc.Client = New(path, tc.events, tc.m, slog.New(tc.log))
	ctx, cancel := context.WithCancel(context.Background())
	tc.cancel = cancel
	go func() { tc.done <- tc.Run(ctx) }()
	t.Cleanup(func() { tc.stop(t) })
	return tc
}

// stop cancels the client and waits for Run to return nil. It may be called
// more than once.
func (tc *testClient) stop(t *testing.T) {
	t.Helper()
	tc.cancel()
	select {
	case err, ok := <-tc.done:
		if !ok {
			return
		}
		close(tc.done)
		if err != nil {
			t.Errorf("Run() = %v, want nil", err)
		}
	case <-time.After(waitLimit):
		t.Fatalf("Run did not return within %v of cancel", waitLimit)
	}
	if tc.isConnected() {
		t.Errorf("Connected() = true after Run returned")
	}
	if got := toFloat64(t, tc.m.EventsocketUp); got != 0 {
		t.Errorf("EventsocketUp = %v after Run returned, want 0", got)
	}
}

// next returns the next event the handler received.
func (tc *testClient) next(t *testing.T) Event {
	t.Helper()
	select {
	case ev := <-tc.events:
		return ev
	case <-time.After(waitLimit):
		t.Fatalf("no event within %v", waitLimit)
		return Event{}
	}
}

// expectUUIDs checks the UUIDs of the next len(want) events.
func (tc *testClient) expectUUIDs(t *testing.T, want ...string) {
	t.Helper()
	var got []string
	for range want {
		got = append(got, tc.next(t).UUID)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("event UUIDs mismatch (-want +got):\n%s", diff)
	}
}

func (tc *testClient) badCount(t *testing.T, reason string) float64 {
	return toFloat64(t, tc.m.BadEventsFromTCPInfo.WithLabelValues(reason))
}

// toFloat64 reads a counter or gauge. It stands in for
// prometheus/testutil.ToFloat64, whose dependency (kylelemons/godebug) is not
// in go.sum.
func toFloat64(t *testing.T, m prometheus.Metric) float64 {
	t.Helper()
	var pb dto.Metric
	if err := m.Write(&pb); err != nil {
		t.Fatalf("read metric: %v", err)
	}
	switch {
	case pb.Counter != nil:
		return pb.Counter.GetValue()
	case pb.Gauge != nil:
		return pb.Gauge.GetValue()
	}
	t.Fatalf("metric %v is neither a counter nor a gauge", m.Desc())
	return 0
}

// listen listens on a unix socket at path. Accept is bounded by waitLimit so
// that a client that never connects fails the test instead of hanging it.
func listen(t *testing.T, path string) *net.UnixListener {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	if err := ln.SetDeadline(time.Now().Add(waitLimit)); err != nil {
		t.Fatal(err)
	}
	return ln
}

func accept(t *testing.T, ln *net.UnixListener) net.Conn {
	t.Helper()
	c, err := ln.Accept()
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func send(t *testing.T, c net.Conn, lines ...string) {
	t.Helper()
	for _, l := range lines {
		if _, err := c.Write([]byte(l)); err != nil {
			t.Fatalf("write: %v", err)
		}
	}
}

// open is a valid Open line for uuid, newline included.
func open(uuid string) string {
	return openLine(uuid, id(443, 51234, "192.0.2.10", "198.51.100.7")) + "\n"
}

func sockPath(t *testing.T) string {
	return filepath.Join(t.TempDir(), "events.sock")
}

func TestClientSocketAppears(t *testing.T) {
	checkGoroutines(t)
	path := sockPath(t)
	tc := startClient(t, path)

	tc.log.waitFor(t, "cannot connect")
	if tc.isConnected() {
		t.Errorf("Connected() = true with no socket")
	}
	ln := listen(t, path)
	c := accept(t, ln)
	send(t, c, open("a"))
	tc.expectUUIDs(t, "a")

	if !tc.isConnected() {
		t.Errorf("Connected() = false after an event")
	}
	if got := toFloat64(t, tc.m.EventsocketUp); got != 1 {
		t.Errorf("EventsocketUp = %v, want 1", got)
	}
	if got := toFloat64(t, tc.m.EventsocketConnects); got != 1 {
		t.Errorf("EventsocketConnects = %v, want 1", got)
	}
	if got := toFloat64(t, tc.m.EventsReceived.WithLabelValues("open")); got != 1 {
		t.Errorf("EventsReceived{open} = %v, want 1", got)
	}
	// However many dials failed before the socket appeared, the failure was
	// logged once.
	if got := tc.log.count("cannot connect"); got != 1 {
		t.Errorf("logged %d dial failures, want 1", got)
	}
}

// TestClientReconnects simulates a tcp-info restart: the connection ends, a
// new server comes up at the same path and resends Open with the same UUIDs.
func TestClientReconnects(t *testing.T) {
	checkGoroutines(t)
	path := sockPath(t)
	ln := listen(t, path)
	tc := startClient(t, path)

	c1 := accept(t, ln)
	send(t, c1, open("a"), open("b"))
	tc.expectUUIDs(t, "a", "b")
	c1.Close()
	ln.Close()
	tc.log.waitFor(t, "eventsocket connection ended")

	ln2 := listen(t, path) // the path was unlinked by ln.Close
	c2 := accept(t, ln2)
	send(t, c2, open("a"), open("b"), open("c"))
	tc.expectUUIDs(t, "a", "b", "c")

	if got := toFloat64(t, tc.m.EventsocketConnects); got != 2 {
		t.Errorf("EventsocketConnects = %v, want 2", got)
	}
	if got := toFloat64(t, tc.m.EventsReceived.WithLabelValues("open")); got != 5 {
		t.Errorf("EventsReceived{open} = %v, want 5", got)
	}
}

// TestClientBadLines checks that bad lines are counted by reason and skipped,
// that the good lines around them are delivered in order, and that bad lines
// are not logged one by one.
func TestClientBadLines(t *testing.T) {
	checkGoroutines(t)
	path := sockPath(t)
	ln := listen(t, path)
	tc := startClient(t, path)
	c := accept(t, ln)

	// pad makes a valid line exactly n bytes long, newline included.
	pad := func(uuid string, n int) string {
		l := strings.TrimSuffix(open(uuid), "\n")
		return l + strings.Repeat(" ", n-len(l)-1) + "\n"
	}
	send(t, c,
		open("good1"),
		"not json\n",
		open("good2"),
		`{"Event":7,"Timestamp":`+ts+`,"UUID":"x"}`+"\n",
		open("../etc/passwd"),
		openLine("p", id(70000, 1, "192.0.2.1", "192.0.2.2"))+"\n",
		open("good3"),
		strings.Repeat("x", 1<<20), // no newline: a megabyte-long line
		"\n",
		open("good4"),
		pad("atlimit", MaxLineLen),             // fits the buffer exactly
		pad("overlimit", MaxLineLen+1),         // one byte too long
		strings.Repeat("{", 3*MaxLineLen)+"\n", // several buffers of garbage
		open("good5")[:20], open("good5")[20:], // split across writes
		open("good6"),
	)
	tc.expectUUIDs(t, "good1", "good2", "good3", "good4", "atlimit", "good5", "good6")

	want := map[string]float64{
		ReasonJSON: 1, ReasonUnknownEvent: 1, ReasonBadUUID: 1, ReasonBadPort: 1, ReasonOversize: 3,
		ReasonNilID: 0, ReasonBadIP: 0, ReasonNoTimestamp: 0,
	}
	got := map[string]float64{}
	for r := range want {
		got[r] = tc.badCount(t, r)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("bad events by reason mismatch (-want +got):\n%s", diff)
	}
	// The lines were handled in order, so by now every bad line has been
	// seen; all came within badLineLogInterval, and one was logged.
	if got := tc.log.count("skipping bad"); got != 1 {
		t.Errorf("logged %d bad lines, want 1", got)
	}
	if got := toFloat64(t, tc.m.EventsocketConnects); got != 1 {
		t.Errorf("EventsocketConnects = %v, want 1 (bad lines must not drop the connection)", got)
	}
}

// TestClientLastLineWithoutNewline checks that an event whose line is cut off
// by the end of the connection is still delivered if complete.
func TestClientLastLineWithoutNewline(t *testing.T) {
	checkGoroutines(t)
	path := sockPath(t)
	ln := listen(t, path)
	tc := startClient(t, path)
	c := accept(t, ln)
	send(t, c, open("a"), strings.TrimSuffix(open("b"), "\n"))
	c.Close()
	tc.expectUUIDs(t, "a", "b")
	tc.log.waitFor(t, "eventsocket connection ended")
	if got := tc.badCount(t, ReasonJSON); got != 0 {
		t.Errorf("bad json = %v, want 0", got)
	}
}

// TestClientStops checks that cancelling the context makes Run return nil
// promptly wherever the client is: blocked in a read, or waiting to redial.
// startClient's cleanup does the checking; checkGoroutines looks for leaks.
func TestClientStops(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, path string, tc func() *testClient)
	}{
		{
			name: "blocked in read",
			setup: func(t *testing.T, path string, start func() *testClient) {
				ln := listen(t, path)
				tc := start()
				c := accept(t, ln)
				send(t, c, open("a"))
				tc.expectUUIDs(t, "a") // now it is reading again
				tc.stop(t)
			},
		},
		{
			name: "waiting to redial",
			setup: func(t *testing.T, path string, start func() *testClient) {
				tc := start()
				tc.log.waitFor(t, "cannot connect")
				tc.stop(t)
			},
		},
		{
			name: "connected, server silent",
			setup: func(t *testing.T, path string, start func() *testClient) {
				ln := listen(t, path)
				tc := start()
				accept(t, ln)
				tc.log.waitFor(t, "connected")
				tc.stop(t)
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkGoroutines(t)
			path := sockPath(t)
			tt.setup(t, path, func() *testClient { return startClient(t, path) })
		})
	}
}

// TestClientManyReconnects has the server hang up at once, again and again,
// and checks that the client keeps coming back (and does not give up or
// exit) while logging each change of state, not each attempt.
func TestClientManyReconnects(t *testing.T) {
	checkGoroutines(t)
	path := sockPath(t)
	ln := listen(t, path)
	tc := startClient(t, path)
	const n = 4
	for i := range n {
		c := accept(t, ln)
		send(t, c, open(fmt.Sprintf("u%d", i)))
		tc.expectUUIDs(t, fmt.Sprintf("u%d", i))
		c.Close()
	}
	c := accept(t, ln)
	send(t, c, open("last"))
	tc.expectUUIDs(t, "last")
	if got := toFloat64(t, tc.m.EventsocketConnects); got != n+1 {
		t.Errorf("EventsocketConnects = %v, want %d", got, n+1)
	}
	if got := tc.log.count("connected to eventsocket"); got != n+1 {
		t.Errorf("logged %d connects, want %d", got, n+1)
	}
}

// TestClientSkipClose: with SkipClose, Close events (recognised by the first
// bytes tcp-info's encoding gives them) are counted but not decoded or
// passed on; Opens still are.
func TestClientSkipClose(t *testing.T) {
	checkGoroutines(t)
	path := sockPath(t)
	ln := listen(t, path)
	closeLine, err := json.Marshal(eventsocket.FlowEvent{Event: eventsocket.Close, Timestamp: time.Now(), UUID: "h_2"})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(closeLine, closePrefix) {
		t.Fatalf("tcp-info's Close encodes as %s, not starting with %s", closeLine, closePrefix)
	}
	tc := &testClient{events: make(chanHandler, 100), log: newRecLog(), m: metrics.New(prometheus.NewRegistry()), done: make(chan error, 1)}
	tc.Client = New(path, tc.events, tc.m, slog.New(tc.log))
	tc.SkipClose = true
	ctx, cancel := context.WithCancel(context.Background())
	tc.cancel = cancel
	go func() { tc.done <- tc.Run(ctx) }()
	t.Cleanup(func() { tc.stop(t) })
	c := accept(t, ln)
	defer c.Close()
	send(t, c, open("h_1"), string(closeLine)+"\n", open("h_3"))
	tc.expectUUIDs(t, "h_1", "h_3")
	if got := toFloat64(t, tc.m.EventsReceived.WithLabelValues("close")); got != 1 {
		t.Errorf("close events counted %v, want 1", got)
	}
}

// TestClientDeliversEventsWrittenBeforeStop: the events tcp-info wrote before
// the stop but the client had not read yet are delivered before Run returns,
// so that the daemon names their flows before it publishes the last files.
func TestClientDeliversEventsWrittenBeforeStop(t *testing.T) {
	checkGoroutines(t)
	path := sockPath(t)
	ln := listen(t, path)
	tc := startClient(t, path)
	c := accept(t, ln)
	send(t, c, open("first"))
	tc.expectUUIDs(t, "first") // reading; now it waits for more
	var want []string
	var lines string
	for i := range 50 {
		u := fmt.Sprintf("late%02d", i)
		want = append(want, u)
		lines += open(u)
	}
	// One write: in the socket's buffer before the stop begins.
	send(t, c, lines)
	tc.stop(t)
	tc.expectUUIDs(t, want...)
}

// TestOpensHandler: the daemon's handler sends each Open's flow name and
// drops the other events.
func TestOpensHandler(t *testing.T) {
	out := make(chan flow.Named, 2)
	h := Opens(out)
	k := flow.KeyFromAddrPorts(netip.MustParseAddrPort("198.18.0.1:443"), netip.MustParseAddrPort("198.18.0.2:5000"))
	at := time.Date(2024, 11, 18, 12, 0, 0, 0, time.UTC)
	h.Event(Event{Kind: Close, UUID: "gone", Key: k, Time: at})
	h.Event(Event{Kind: Open, UUID: "u1", Key: k, Time: at})
	if len(out) != 1 {
		t.Fatalf("%d names sent, want 1 (the Open)", len(out))
	}
	if got := <-out; got != (flow.Named{Key: k, UUID: "u1", Time: at}) {
		t.Errorf("sent %+v", got)
	}
}
