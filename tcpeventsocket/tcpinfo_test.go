package tcpeventsocket

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/m-lab/tcp-info/eventsocket"
	"github.com/m-lab/tcp-info/inetdiag"

	"github.com/m-lab/packet-headers/flow"
)

// TestTCPInfoServer proves wire compatibility: tcp-info's own eventsocket
// server (v1.9.0, the version tcp-info runs) sends Open and Close events and
// the client decodes them to the endpoints, key and UUID that were sent.
func TestTCPInfoServer(t *testing.T) {
	checkGoroutines(t) // runs last: the server's goroutines must end too
	path := sockPath(t)
	srv := eventsocket.New(path)
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	srvCtx, srvCancel := context.WithCancel(context.Background())
	srvDone := make(chan error, 1)
	go func() { srvDone <- srv.Serve(srvCtx) }()
	// Registered before startClient so that it runs after the client has
	// stopped: the server panics if sent an event after Serve returned.
	t.Cleanup(func() {
		srvCancel()
		select {
		case <-srvDone:
		case <-time.After(waitLimit):
			t.Errorf("tcp-info server did not stop")
		}
	})
	tc := startClient(t, path)

	// The server only sends to clients it has accepted, and nothing tells
	// when that happened, so send probe Close events until one arrives.
	// Later probes still in flight are skipped by the reads below.
	tc.log.waitFor(t, "connected")
	deadline := time.Now().Add(waitLimit)
	for probed := false; !probed; {
		if time.Now().After(deadline) {
			t.Fatalf("tcp-info server never delivered a probe")
		}
		srv.FlowDeleted(time.Now(), "probe")
		select {
		case ev := <-tc.events:
			probed = ev.UUID == "probe"
		case <-time.After(20 * time.Millisecond):
		}
	}
	next := func() Event {
		for {
			if ev := tc.next(t); ev.UUID != "probe" {
				return ev
			}
		}
	}

	openTime := time.Date(2024, 11, 18, 12, 0, 0, 123456789, time.UTC)
	closeTime := openTime.Add(time.Minute)
	tests := []struct {
		name string
		send func()
		want Event
	}{
		{
			name: "open v4",
			send: func() {
				srv.FlowCreated(openTime, goodUUID, inetdiag.SockID{
					SPort: 443, DPort: 51234, SrcIP: "192.0.2.10", DstIP: "198.51.100.7", Cookie: 0x84FF,
				})
			},
			want: Event{
				Kind: Open, Time: openTime, UUID: goodUUID,
				Local:  netip.MustParseAddrPort("192.0.2.10:443"),
				Remote: netip.MustParseAddrPort("198.51.100.7:51234"),
				Key: flow.KeyFromAddrPorts(netip.MustParseAddrPort("198.51.100.7:51234"),
					netip.MustParseAddrPort("192.0.2.10:443")),
			},
		},
		{
			name: "open v6 with a negative cookie",
			send: func() {
				srv.FlowCreated(openTime, "host_1_FFFFFFFFFFFFFFFF", inetdiag.SockID{
					SPort: 8080, DPort: 40000, SrcIP: "2001:db8::1", DstIP: "2001:db8::2", Interface: 3, Cookie: -1,
				})
			},
			want: Event{
				Kind: Open, Time: openTime, UUID: "host_1_FFFFFFFFFFFFFFFF",
				Local:  netip.MustParseAddrPort("[2001:db8::1]:8080"),
				Remote: netip.MustParseAddrPort("[2001:db8::2]:40000"),
				Key: flow.KeyFromAddrPorts(netip.MustParseAddrPort("[2001:db8::1]:8080"),
					netip.MustParseAddrPort("[2001:db8::2]:40000")),
			},
		},
		{
			name: "close",
			send: func() { srv.FlowDeleted(closeTime, goodUUID) },
			want: Event{Kind: Close, Time: closeTime, UUID: goodUUID},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.send()
			if diff := cmp.Diff(tt.want, next(), eventCmp); diff != "" {
				t.Errorf("event mismatch (-want +got):\n%s", diff)
			}
		})
	}
	for r, want := range map[string]float64{"open": 2, "close": 1} {
		// Probes are Close events too; count only the real ones.
		got := toFloat64(t, tc.m.EventsReceived.WithLabelValues(r))
		if r == "close" {
			if got < want+1 {
				t.Errorf("EventsReceived{close} = %v, want at least %v (one probe)", got, want+1)
			}
			continue
		}
		if got != want {
			t.Errorf("EventsReceived{%s} = %v, want %v", r, got, want)
		}
	}
	for _, r := range Reasons {
		if got := tc.badCount(t, r); got != 0 {
			t.Errorf("bad events {%s} = %v, want 0", r, got)
		}
	}
}
