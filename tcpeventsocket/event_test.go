package tcpeventsocket

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/m-lab/packet-headers/flow"
)

// eventCmp lets cmp compare the types with unexported fields that Event holds.
// == on netip values also tells a 4-byte IPv4 address from its mapped form.
var eventCmp = cmp.Options{
	cmp.Comparer(func(a, b flow.Key) bool { return a == b }),
	cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b }),
}

const ts = `"2024-11-18T12:00:00.123456789Z"`

var wantTime = time.Date(2024, 11, 18, 12, 0, 0, 123456789, time.UTC)

// openLine returns an Open line with the given UUID and ID fields.
func openLine(uuid, id string) string {
	u, err := json.Marshal(uuid)
	if err != nil {
		panic(err)
	}
	return fmt.Sprintf(`{"Event":0,"Timestamp":%s,"UUID":%s,"ID":%s}`, ts, u, id)
}

func id(sport, dport int, src, dst string) string {
	return fmt.Sprintf(`{"SPort":%d,"DPort":%d,"SrcIP":%q,"DstIP":%q,"Interface":0,"Cookie":34047}`, sport, dport, src, dst)
}

const goodUUID = "host_1548788619_00000000000084FF"

func TestParseLine(t *testing.T) {
	v4 := id(443, 51234, "192.0.2.10", "198.51.100.7")
	tests := []struct {
		name   string
		line   string
		want   Event
		reason string // "" for success
	}{
		{
			name: "open v4",
			line: openLine(goodUUID, v4) + "\n",
			want: Event{
				Kind: Open, Time: wantTime, UUID: goodUUID,
				Local:  netip.MustParseAddrPort("192.0.2.10:443"),
				Remote: netip.MustParseAddrPort("198.51.100.7:51234"),
				Key: flow.KeyFromAddrPorts(netip.MustParseAddrPort("192.0.2.10:443"),
					netip.MustParseAddrPort("198.51.100.7:51234")),
			},
		},
		{
			name: "open v6",
			line: openLine(goodUUID, id(443, 40000, "2001:db8::1", "2001:db8::2")),
			want: Event{
				Kind: Open, Time: wantTime, UUID: goodUUID,
				Local:  netip.MustParseAddrPort("[2001:db8::1]:443"),
				Remote: netip.MustParseAddrPort("[2001:db8::2]:40000"),
				Key: flow.KeyFromAddrPorts(netip.MustParseAddrPort("[2001:db8::1]:443"),
					netip.MustParseAddrPort("[2001:db8::2]:40000")),
			},
		},
		{
			name: "mapped v4 normalized to 4 bytes",
			line: openLine(goodUUID, id(443, 51234, "::ffff:192.0.2.1", "::ffff:198.51.100.7")),
			want: Event{
				Kind: Open, Time: wantTime, UUID: goodUUID,
				Local:  netip.MustParseAddrPort("192.0.2.1:443"),
				Remote: netip.MustParseAddrPort("198.51.100.7:51234"),
				Key: flow.KeyFromAddrPorts(netip.MustParseAddrPort("192.0.2.1:443"),
					netip.MustParseAddrPort("198.51.100.7:51234")),
			},
		},
		{
			name: "close without ID, as tcp-info sends it",
			line: `{"Event":1,"Timestamp":` + ts + `,"UUID":"` + goodUUID + `","ID":null}` + "\r\n",
			want: Event{Kind: Close, Time: wantTime, UUID: goodUUID},
		},
		{
			name: "close without ID field",
			line: `{"Event":1,"Timestamp":` + ts + `,"UUID":"` + goodUUID + `"}`,
			want: Event{Kind: Close, Time: wantTime, UUID: goodUUID},
		},
		{
			name: "timestamp with offset",
			line: `{"Event":1,"Timestamp":"2024-11-19T01:00:00.123456789+13:00","UUID":"a"}`,
			want: Event{Kind: Close, Time: wantTime, UUID: "a"},
		},
		{name: "uuid with all allowed bytes", line: `{"Event":1,"Timestamp":` + ts + `,"UUID":"aZ09._-"}`,
			want: Event{Kind: Close, Time: wantTime, UUID: "aZ09._-"}},

		{name: "not json", line: "hello\n", reason: ReasonJSON},
		{name: "empty line", line: "\n", reason: ReasonJSON},
		{name: "truncated", line: openLine(goodUUID, v4)[:40], reason: ReasonJSON},
		{name: "two objects", line: openLine(goodUUID, v4) + "{}", reason: ReasonJSON},
		{name: "array", line: "[]", reason: ReasonJSON},
		{name: "event as string", line: `{"Event":"0","Timestamp":` + ts + `,"UUID":"a"}`, reason: ReasonJSON},
		{name: "bad timestamp", line: `{"Event":1,"Timestamp":"yesterday","UUID":"a"}`, reason: ReasonJSON},
		{name: "ip as number", line: openLine(goodUUID, `{"SPort":1,"DPort":2,"SrcIP":1,"DstIP":"192.0.2.1"}`), reason: ReasonJSON},

		{name: "unknown event 7", line: `{"Event":7,"Timestamp":` + ts + `,"UUID":"a"}`, reason: ReasonUnknownEvent},
		{name: "negative event", line: `{"Event":-1,"Timestamp":` + ts + `,"UUID":"a"}`, reason: ReasonUnknownEvent},
		{name: "huge event", line: `{"Event":1e30,"Timestamp":` + ts + `,"UUID":"a"}`, reason: ReasonUnknownEvent},

		{name: "open without ID", line: `{"Event":0,"Timestamp":` + ts + `,"UUID":"a"}`, reason: ReasonNilID},
		{name: "open with null ID", line: `{"Event":0,"Timestamp":` + ts + `,"UUID":"a","ID":null}`, reason: ReasonNilID},

		{name: "bad src ip", line: openLine(goodUUID, id(443, 1, "192.0.2", "192.0.2.1")), reason: ReasonBadIP},
		{name: "bad dst ip", line: openLine(goodUUID, id(443, 1, "192.0.2.1", "host")), reason: ReasonBadIP},
		{name: "empty ip", line: openLine(goodUUID, id(443, 1, "", "192.0.2.1")), reason: ReasonBadIP},
		{name: "unspecified ip", line: openLine(goodUUID, id(443, 1, "0.0.0.0", "192.0.2.1")), reason: ReasonBadIP},
		{name: "unspecified v6", line: openLine(goodUUID, id(443, 1, "2001:db8::1", "::")), reason: ReasonBadIP},
		{name: "zoned ip", line: openLine(goodUUID, id(443, 1, "fe80::1%eth0", "fe80::2")), reason: ReasonBadIP},
		{name: "bad ip in close ID", line: `{"Event":1,"Timestamp":` + ts + `,"UUID":"a","ID":` + id(1, 1, "x", "y") + `}`, reason: ReasonBadIP},

		{name: "sport 0", line: openLine(goodUUID, id(0, 51234, "192.0.2.10", "198.51.100.7")), reason: ReasonBadPort},
		{name: "dport 0", line: openLine(goodUUID, id(443, 0, "192.0.2.10", "198.51.100.7")), reason: ReasonBadPort},
		{name: "port 70000", line: openLine(goodUUID, id(70000, 51234, "192.0.2.10", "198.51.100.7")), reason: ReasonBadPort},
		{name: "negative port", line: openLine(goodUUID, id(443, -1, "192.0.2.10", "198.51.100.7")), reason: ReasonBadPort},
		{name: "fractional port", line: openLine(goodUUID, `{"SPort":1.5,"DPort":2,"SrcIP":"192.0.2.1","DstIP":"192.0.2.2"}`), reason: ReasonBadPort},

		{name: "uuid ../x", line: openLine("../x", v4), reason: ReasonBadUUID},
		{name: "uuid a/b", line: openLine("a/b", v4), reason: ReasonBadUUID},
		{name: "uuid ..", line: openLine("..", v4), reason: ReasonBadUUID},
		{name: "uuid .", line: openLine(".", v4), reason: ReasonBadUUID},
		{name: "uuid .hidden", line: openLine(".hidden", v4), reason: ReasonBadUUID},
		{name: "uuid empty", line: openLine("", v4), reason: ReasonBadUUID},
		{name: "uuid missing", line: `{"Event":1,"Timestamp":` + ts + `}`, reason: ReasonBadUUID},
		{name: "uuid 300 bytes", line: openLine(strings.Repeat("a", 300), v4), reason: ReasonBadUUID},
		{name: "uuid too long for a file name", line: openLine(strings.Repeat("a", maxUUIDLen+1), v4), reason: ReasonBadUUID},
		{name: "uuid with space", line: openLine("a b", v4), reason: ReasonBadUUID},
		{name: "uuid with NUL", line: openLine("a\x00b", v4), reason: ReasonBadUUID},
		{name: "uuid with backslash", line: openLine(`a\b`, v4), reason: ReasonBadUUID},
		{name: "uuid with non-ASCII", line: openLine("caf\u00e9", v4), reason: ReasonBadUUID},

		{name: "no timestamp", line: `{"Event":0,"UUID":"a","ID":` + v4 + `}`, reason: ReasonNoTimestamp},
		{name: "zero timestamp", line: `{"Event":1,"Timestamp":"0001-01-01T00:00:00Z","UUID":"a"}`, reason: ReasonNoTimestamp},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseLine([]byte(tt.line))
			if tt.reason != "" {
				var be *BadEventError
				if !errors.As(err, &be) {
					t.Fatalf("ParseLine() = %+v, %v; want a *BadEventError with reason %q", got, err, tt.reason)
				}
				if diff := cmp.Diff(tt.reason, be.Reason); diff != "" {
					t.Errorf("reason mismatch (-want +got):\n%s\nerror: %v", diff, err)
				}
				if be.Err == nil {
					t.Errorf("BadEventError.Err is nil")
				}
				if diff := cmp.Diff(Event{}, got, eventCmp); diff != "" {
					t.Errorf("event of a bad line not zero (-want +got):\n%s", diff)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseLine() error = %v", err)
			}
			if diff := cmp.Diff(tt.want, got, eventCmp); diff != "" {
				t.Errorf("ParseLine() mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

// TestParseLineMappedIsFourBytes pins the normalization on its own, in case
// netip's == ever stopped telling the two forms apart.
func TestParseLineMappedIsFourBytes(t *testing.T) {
	ev, err := ParseLine([]byte(openLine(goodUUID, id(443, 1, "::ffff:192.0.2.1", "198.51.100.7"))))
	if err != nil {
		t.Fatal(err)
	}
	if !ev.Local.Addr().Is4() {
		t.Errorf("Local = %v, want a 4-byte address", ev.Local)
	}
}

// TestParseLineTimeIsUTC checks the location, which cmp's use of
// time.Time.Equal ignores: the saver takes the date directory from it.
func TestParseLineTimeIsUTC(t *testing.T) {
	ev, err := ParseLine([]byte(`{"Event":1,"Timestamp":"2024-11-19T01:00:00+13:00","UUID":"a"}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := ev.Time.Location(); got != time.UTC {
		t.Errorf("Time.Location() = %v, want UTC", got)
	}
	if got, want := ev.Time.Day(), 18; got != want {
		t.Errorf("Time.Day() = %d, want %d", got, want)
	}
}

// TestKeyDirectionIndependent checks that an Open's key is the key the
// capture computes from a packet in either direction, so that the demuxer can
// find the flow.
func TestKeyDirectionIndependent(t *testing.T) {
	tests := []struct {
		name           string
		src, dst       string
		sport, dport   uint16
		srcRaw, dstRaw []byte
	}{
		{name: "v4", src: "192.0.2.10", dst: "198.51.100.7", sport: 443, dport: 51234,
			srcRaw: []byte{192, 0, 2, 10}, dstRaw: []byte{198, 51, 100, 7}},
		{name: "v4 local is the larger address", src: "198.51.100.7", dst: "192.0.2.10", sport: 443, dport: 51234,
			srcRaw: []byte{198, 51, 100, 7}, dstRaw: []byte{192, 0, 2, 10}},
		{name: "v6", src: "2001:db8::1", dst: "2001:db8::2", sport: 443, dport: 40000,
			srcRaw: netip.MustParseAddr("2001:db8::1").AsSlice(), dstRaw: netip.MustParseAddr("2001:db8::2").AsSlice()},
		{name: "same address, ports decide", src: "192.0.2.1", dst: "192.0.2.1", sport: 50000, dport: 80,
			srcRaw: []byte{192, 0, 2, 1}, dstRaw: []byte{192, 0, 2, 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ev, err := ParseLine([]byte(openLine(goodUUID, id(int(tt.sport), int(tt.dport), tt.src, tt.dst))))
			if err != nil {
				t.Fatal(err)
			}
			// A packet from the remote side: its source is tcp-info's Dst.
			fromRemote := flow.MakeKey(tt.dstRaw, tt.dport, tt.srcRaw, tt.sport)
			fromLocal := flow.MakeKey(tt.srcRaw, tt.sport, tt.dstRaw, tt.dport)
			if ev.Key != fromRemote {
				t.Errorf("Key = %v, want the reverse-order key %v", ev.Key, fromRemote)
			}
			if ev.Key != fromLocal {
				t.Errorf("Key = %v, want the same-order key %v", ev.Key, fromLocal)
			}
		})
	}
}

func TestKindString(t *testing.T) {
	for _, tt := range []struct {
		k    Kind
		want string
	}{{Open, "open"}, {Close, "close"}, {Kind(7), "Kind(7)"}} {
		t.Run(tt.want, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, tt.k.String()); diff != "" {
				t.Errorf("String() mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestBadEventErrorUnwraps(t *testing.T) {
	_, err := ParseLine([]byte(`{"Event":0,"Timestamp":"yesterday","UUID":"a"}`))
	var pe *time.ParseError
	if !errors.As(err, &pe) {
		t.Errorf("error %v does not wrap the *time.ParseError", err)
	}
	if !strings.HasPrefix(err.Error(), "bad event (json): ") {
		t.Errorf("Error() = %q, want it to start with the reason", err.Error())
	}
}

// TestBadIPNotInError: bad-event errors are logged, and with netblock
// anonymization no remote address may reach the logs, so they never quote
// the address.
func TestBadIPNotInError(t *testing.T) {
	for _, ip := range []string{"198.51.100.77x", "198.51.100.77%eth0", "2001:db8:1:2:3:4:5:6%x", "0.0.0.0"} {
		line := `{"Event":0,"Timestamp":"2024-11-18T12:00:00Z","UUID":"h_1","ID":{"SPort":1,"DPort":2,"SrcIP":"192.0.2.1","DstIP":"` + ip + `","Cookie":1}}`
		_, err := ParseLine([]byte(line))
		if err == nil {
			t.Fatalf("%s accepted", ip)
		}
		if strings.Contains(err.Error(), ip) || (len(ip) > 12 && strings.Contains(err.Error(), ip[:12])) {
			t.Errorf("error %q quotes the address %q", err, ip)
		}
	}
}

// BenchmarkParseLine decodes an Open line as tcp-info writes it (the fast
// path) and one that needs encoding/json (an escaped character in the UUID).
func BenchmarkParseLine(b *testing.B) {
	for _, bc := range []struct{ name, line string }{
		{"tcpinfo", openLine(goodUUID, id(443, 51234, "192.0.2.10", "198.51.100.7"))},
		{"escaped", strings.Replace(openLine(goodUUID, id(443, 51234, "192.0.2.10", "198.51.100.7")), "host", `\u0068ost`, 1)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			line := []byte(bc.line)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := ParseLine(line); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
