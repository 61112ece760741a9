package tcpeventsocket

import (
	"errors"
	"net/netip"
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
