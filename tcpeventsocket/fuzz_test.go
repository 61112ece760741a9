package tcpeventsocket

import (
	"encoding/json"
	"errors"
	"net/netip"
	"reflect"
	"regexp"
	"slices"
	"testing"

	"github.com/m-lab/packet-headers/flow"
)

// safeUUID is the file-name rule of checkUUID, written independently as a
// regexp so that the fuzzer checks one against the other.
var safeUUID = regexp.MustCompile(`^[A-Za-z0-9_-][A-Za-z0-9._-]{0,246}$`)

// FuzzParseLine feeds arbitrary lines to ParseLine, which faces whatever is
// on the other end of the eventsocket. Seeds are in testdata/fuzz.
func FuzzParseLine(f *testing.F) {
	f.Add([]byte(openLine(goodUUID, id(443, 51234, "192.0.2.10", "198.51.100.7"))))
	f.Add([]byte(`{"Event":1,"Timestamp":` + ts + `,"UUID":"` + goodUUID + `","ID":null}`))
	f.Fuzz(func(t *testing.T, line []byte) {
		ev, err := ParseLine(line)
		if err != nil {
			var be *BadEventError
			if !errors.As(err, &be) {
				t.Fatalf("error %v (%T) is not a *BadEventError", err, err)
			}
			if be.Reason == ReasonOversize || !slices.Contains(Reasons, be.Reason) {
				t.Fatalf("unexpected reason %q", be.Reason)
			}
			return
		}
		if !safeUUID.MatchString(ev.UUID) {
			t.Fatalf("accepted unsafe UUID %q", ev.UUID)
		}
		if ev.Time.IsZero() {
			t.Fatalf("accepted zero time")
		}
		if ev.Kind != Open && ev.Kind != Close {
			t.Fatalf("accepted kind %v", ev.Kind)
		}
		if ev.Kind == Open && ev.Key.IsZero() {
			t.Fatalf("open with zero key: %+v", ev)
		}
		if ev.Key.IsZero() {
			if ev.Local.IsValid() || ev.Remote.IsValid() {
				t.Fatalf("zero key with endpoints %v %v", ev.Local, ev.Remote)
			}
			return
		}
		for _, ap := range []netip.AddrPort{ev.Local, ev.Remote} {
			a := ap.Addr()
			if ap.Port() == 0 || a.IsUnspecified() || a.Zone() != "" || a.Is4In6() || !(a.Is4() || a.Is6()) {
				t.Fatalf("accepted unusable endpoint %v in %+v", ap, ev)
			}
		}
		if want := flow.KeyFromAddrPorts(ev.Remote, ev.Local); ev.Key != want {
			t.Fatalf("Key %v, want %v", ev.Key, want)
		}
	})
}

// FuzzFastDecode checks the fast decoder against encoding/json: whenever
// fastDecode accepts a line, encoding/json accepts it too and decodes the same
// value. (When fastDecode declines, ParseLine uses encoding/json itself.)
func FuzzFastDecode(f *testing.F) {
	for _, l := range fastDecodeSeeds {
		f.Add([]byte(l))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		got, ok := fastDecode(line)
		if !ok {
			return
		}
		var want wireEvent
		if err := json.Unmarshal(line, &want); err != nil {
			t.Fatalf("fastDecode accepted %q, encoding/json: %v", line, err)
		}
		if !reflect.DeepEqual(got, want) || !got.Timestamp.Equal(want.Timestamp) {
			t.Fatalf("%q: fastDecode %+v (ID %+v), encoding/json %+v (ID %+v)", line, got, got.ID, want, want.ID)
		}
	})
}

// fastDecodeSeeds: what tcp-info writes, and near misses of each rule.
var fastDecodeSeeds = []string{
	openLine(goodUUID, id(443, 51234, "192.0.2.10", "198.51.100.7")),
	openLine(goodUUID, id(443, 51234, "2001:db8::1", "2001:db8::2")),
	`{"Event":1,"Timestamp":` + ts + `,"UUID":"` + goodUUID + `","ID":null}`,
	` { "Event" : 1 , "Timestamp" : ` + ts + ` , "UUID" : "x" } ` + "\n",
	`{"Event":0,"Timestamp":` + ts + `,"UUID":"x","ID":{"SPort":70000}}`,
	`{"Event":0,"Timestamp":` + ts + `,"UUID":"x","ID":{"sport":1}}`,
	`{"event":0}`,
	`{"Event":0,"Event":1}`,
	`{"Event":01}`,
	`{"Event":1.0}`,
	`{"Event":-1}`,
	`{"UUID":"a\u002fb"}`,
	`{"UUID":"é"}`,
	`{"Timestamp":"2024-11-18T12:00:00Z"}`,
	`{"Timestamp":"yesterday"}`,
	`{"ID":{}}`,
	`{"ID":{"Cookie":-9223372036854775808,"Interface":4294967295}}`,
	`{"ID":{"Cookie":9223372036854775808}}`,
	`{}`,
	`{} x`,
	`{"Event":0,}`,
}
