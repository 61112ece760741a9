// Package tcpeventsocket is a client of tcp-info's eventsocket: the unix
// stream socket on which tcp-info announces, one JSON object per line, each
// TCP socket it sees open (with the socket's endpoints and UUID) and close.
// The demuxer needs the Open events to learn the UUID, and so the file name,
// of each flow it captures.
//
// Unlike the original client (tcp-info's eventsocket.MustRun), this one never
// exits the process: a missing socket, a tcp-info restart or a bad line is
// counted, logged at a bounded rate and survived. Lines are decoded into this
// package's own copy of the wire types rather than tcp-info's, because
// importing github.com/m-lab/tcp-info/eventsocket registers the
// -tcpinfo.eventsocket flag on flag.CommandLine as a side effect, which would
// collide with the daemon's own flag of that name.
package tcpeventsocket

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/saver"
)

// Kind is the kind of an event. Its values are tcp-info's wire values
// (eventsocket.TCPEvent).
type Kind int

const (
	// Open is sent once tcp-info sees a socket ESTABLISHED, and again for
	// every live socket when tcp-info restarts.
	Open Kind = 0
	// Close is sent when tcp-info sees a socket go away.
	Close Kind = 1
)

// String returns "open" or "close", the label values of the
// EventsReceived{event} metric.
func (k Kind) String() string {
	switch k {
	case Open:
		return "open"
	case Close:
		return "close"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// Event is one valid line of the eventsocket.
type Event struct {
	Kind Kind
	// Time is the timestamp tcp-info stamped on the event, in UTC because the
	// output file's date directory is the Open event's UTC date.
	Time time.Time
	// UUID names the flow's output file; ParseLine guarantees it is a safe
	// file name (see ReasonBadUUID).
	UUID string
	// Key is the direction-independent key of the flow; Local is tcp-info's
	// Src (this host's side) and Remote its Dst. IPv4 addresses are 4 bytes.
	// All three are zero for a Close event without an ID, which is how
	// tcp-info sends every Close.
	Key    flow.Key
	Local  netip.AddrPort
	Remote netip.AddrPort
}

// Reasons a line is rejected. They are the label values of the
// BadEventsFromTCPInfo{reason} metric, so they must stay stable.
const (
	ReasonJSON         = "json"         // not a JSON object of the expected shape
	ReasonUnknownEvent = "unknownevent" // Event is neither Open nor Close
	ReasonNilID        = "nilid"        // an Open without ID
	ReasonBadIP        = "badip"        // SrcIP or DstIP missing, malformed, unspecified or zoned
	ReasonBadPort      = "badport"      // SPort or DPort 0 or out of range
	ReasonBadUUID      = "baduuid"      // UUID unusable as a file name
	ReasonNoTimestamp  = "notimestamp"  // Timestamp missing or zero
	// ReasonOversize is used by the Client, not ParseLine: a line longer than
	// MaxLineLen is skipped without being read into memory whole.
	ReasonOversize = "oversize"
)

// Reasons lists every reason a line can be rejected with, so that callers can
// create the metric's series up front.
var Reasons = []string{
	ReasonJSON, ReasonUnknownEvent, ReasonNilID, ReasonBadIP, ReasonBadPort,
	ReasonBadUUID, ReasonNoTimestamp, ReasonOversize,
}

// BadEventError is the error of a line that cannot be used. Reason is one of
// the Reason constants; Err says what exactly was wrong.
type BadEventError struct {
	Reason string
	Err    error
}

func (e *BadEventError) Error() string {
	return fmt.Sprintf("bad event (%s): %v", e.Reason, e.Err)
}

func (e *BadEventError) Unwrap() error { return e.Err }

func bad(reason string, format string, args ...any) *BadEventError {
	return &BadEventError{Reason: reason, Err: fmt.Errorf(format, args...)}
}

// wireEvent mirrors tcp-info's eventsocket.FlowEvent.
type wireEvent struct {
	Event     int
	Timestamp time.Time
	UUID      string
	ID        *wireSockID
}

// wireSockID mirrors tcp-info's inetdiag.SockID. Src is the local side. The
// ports are uint16 so that encoding/json itself rejects out-of-range values.
type wireSockID struct {
	SPort     uint16
	DPort     uint16
	SrcIP     string
	DstIP     string
	Interface uint32
	Cookie    int64
}

// maxUUIDLen is the longest UUID accepted (see saver.MaxUUIDLen).
const maxUUIDLen = saver.MaxUUIDLen

// ParseLine decodes one eventsocket line (with or without its trailing
// newline) into an Event. Every error is a *BadEventError. It does not retain
// line, and it is safe for concurrent use.
//
// A Close that carries an ID has it checked like an Open's, since a malformed
// ID means the line is corrupt; tcp-info sends Close without ID.
func ParseLine(line []byte) (Event, error) {
	w, ok := fastDecode(line)
	if !ok {
		w = wireEvent{}
		if err := json.Unmarshal(line, &w); err != nil {
			return Event{}, classifyJSONError(err)
		}
	}
	kind := Kind(w.Event)
	if kind != Open && kind != Close {
		return Event{}, bad(ReasonUnknownEvent, "event %d", w.Event)
	}
	if w.Timestamp.IsZero() {
		return Event{}, bad(ReasonNoTimestamp, "zero or missing timestamp")
	}
	if err := checkUUID(w.UUID); err != nil {
		return Event{}, err
	}
	ev := Event{Kind: kind, Time: w.Timestamp.UTC(), UUID: w.UUID}
	if w.ID == nil {
		if kind == Open {
			return Event{}, bad(ReasonNilID, "open event without ID")
		}
		return ev, nil
	}
	src, err := parseIP("SrcIP", w.ID.SrcIP)
	if err != nil {
		return Event{}, err
	}
	dst, err := parseIP("DstIP", w.ID.DstIP)
	if err != nil {
		return Event{}, err
	}
	if w.ID.SPort == 0 || w.ID.DPort == 0 {
		return Event{}, bad(ReasonBadPort, "port 0 (SPort %d, DPort %d)", w.ID.SPort, w.ID.DPort)
	}
	ev.Local = netip.AddrPortFrom(src, w.ID.SPort)
	ev.Remote = netip.AddrPortFrom(dst, w.ID.DPort)
	ev.Key = flow.KeyFromAddrPorts(ev.Local, ev.Remote)
	return ev, nil
}

// classifyJSONError turns a decoding error into a BadEventError. A number that
// does not fit its field is valid JSON with a bad value, so it gets the
// reason of that field: a port of 70000 is a bad port, not bad JSON.
func classifyJSONError(err error) *BadEventError {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) && strings.HasPrefix(te.Value, "number") {
		switch te.Field {
		case "ID.SPort", "ID.DPort":
			return &BadEventError{Reason: ReasonBadPort, Err: err}
		case "Event":
			return &BadEventError{Reason: ReasonUnknownEvent, Err: err}
		}
	}
	return &BadEventError{Reason: ReasonJSON, Err: err}
}

// parseIP parses an address as tcp-info formats it (net.IP.String()). IPv4
// and IPv4-mapped IPv6 come back as 4-byte addresses. tcp-info only reports
// established sockets, so an unspecified address means a corrupt line; a zone
// is refused because tcp-info never writes one and it would make Local and
// Remote differ from the addresses the capture sees.
func parseIP(field, s string) (netip.Addr, error) {
	// The messages never quote the address: they are logged, and with
	// -anonymize.ip=netblock no remote address may reach the logs.
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, bad(ReasonBadIP, "%s: not an IP address (%d bytes)", field, len(s))
	}
	a = a.Unmap()
	if a.Zone() != "" || a.IsUnspecified() {
		return netip.Addr{}, bad(ReasonBadIP, "%s: unspecified or zoned address", field)
	}
	return a, nil
}

// checkUUID makes sure a UUID is safe to use as a file name, by the rule
// the standalone source applies too (saver.CheckUUID).
func checkUUID(u string) error {
	if err := saver.CheckUUID(u); err != nil {
		return &BadEventError{Reason: ReasonBadUUID, Err: err}
	}
	return nil
}
