package tcpeventsocket

import (
	"strconv"
)

// fastDecode decodes a line in the exact shape tcp-info writes (json.Marshal
// of its FlowEvent: keys in any order with their exact names, no escapes in
// strings, an ID object or null) without reflection. It returns ok == false
// for anything else (other key spellings, escapes, duplicate keys, numbers
// out of range, nulls, trailing data, invalid JSON), and the caller then
// decodes the line with encoding/json, whose result and errors are the
// reference: FuzzFastDecode checks that whenever fastDecode succeeds,
// encoding/json accepts the line and decodes the same value.
//
// Decoding tcp-info's two events per flow with encoding/json was a tenth of
// the daemon's CPU in the churn benchmark.
func fastDecode(line []byte) (w wireEvent, ok bool) {
	d := fastDecoder{b: line}
	var seen uint8
	const (
		seenEvent = 1 << iota
		seenTimestamp
		seenUUID
		seenID
	)
	ok = d.object(func(key []byte) bool {
		switch string(key) {
		case "Event":
			if seen&seenEvent != 0 {
				return false
			}
			seen |= seenEvent
			n, ok := d.int(0, 1<<31-1)
			w.Event = int(n)
			return ok
		case "Timestamp":
			if seen&seenTimestamp != 0 {
				return false
			}
			seen |= seenTimestamp
			d.space()
			start := d.i
			if _, ok := d.str(); !ok {
				return false
			}
			// time.Time's own JSON decoding, as encoding/json would call it.
			return w.Timestamp.UnmarshalJSON(d.b[start:d.i]) == nil
		case "UUID":
			if seen&seenUUID != 0 {
				return false
			}
			seen |= seenUUID
			s, ok := d.str()
			w.UUID = string(s)
			return ok
		case "ID":
			if seen&seenID != 0 {
				return false
			}
			seen |= seenID
			if d.literal("null") {
				return true
			}
			w.ID = &wireSockID{}
			return d.sockID(w.ID)
		}
		return false
	})
	d.space()
	return w, ok && d.i == len(d.b)
}

// sockID decodes an ID object.
func (d *fastDecoder) sockID(id *wireSockID) bool {
	var seen uint8
	once := func(bit uint8) bool {
		if seen&bit != 0 {
			return false
		}
		seen |= bit
		return true
	}
	return d.object(func(key []byte) bool {
		var ok bool
		var n int64
		switch string(key) {
		case "SPort":
			if !once(1) {
				return false
			}
			n, ok = d.int(0, 1<<16-1)
			id.SPort = uint16(n)
		case "DPort":
			if !once(2) {
				return false
			}
			n, ok = d.int(0, 1<<16-1)
			id.DPort = uint16(n)
		case "SrcIP":
			if !once(4) {
				return false
			}
			var s []byte
			s, ok = d.str()
			id.SrcIP = string(s)
		case "DstIP":
			if !once(8) {
				return false
			}
			var s []byte
			s, ok = d.str()
			id.DstIP = string(s)
		case "Interface":
			if !once(16) {
				return false
			}
			n, ok = d.int(0, 1<<32-1)
			id.Interface = uint32(n)
		case "Cookie":
			if !once(32) {
				return false
			}
			n, ok = d.int(-1<<63, 1<<63-1)
			id.Cookie = n
		}
		return ok
	})
}

// fastDecoder is a cursor over a line.
type fastDecoder struct {
	b []byte
	i int
}

func (d *fastDecoder) space() {
	for d.i < len(d.b) {
		switch d.b[d.i] {
		case ' ', '\t', '\r', '\n':
			d.i++
		default:
			return
		}
	}
}

// consume skips white space and then c, reporting whether c was there.
func (d *fastDecoder) consume(c byte) bool {
	d.space()
	if d.i < len(d.b) && d.b[d.i] == c {
		d.i++
		return true
	}
	return false
}

func (d *fastDecoder) literal(s string) bool {
	d.space()
	if len(d.b)-d.i >= len(s) && string(d.b[d.i:d.i+len(s)]) == s {
		d.i += len(s)
		return true
	}
	return false
}

// object decodes {"key": value, ...}, calling member for each key with the
// cursor before the value; member decodes the value.
func (d *fastDecoder) object(member func(key []byte) bool) bool {
	if !d.consume('{') {
		return false
	}
	if d.consume('}') {
		return true
	}
	for {
		key, ok := d.str()
		if !ok || !d.consume(':') || !member(key) {
			return false
		}
		if d.consume('}') {
			return true
		}
		if !d.consume(',') {
			return false
		}
	}
}

// str decodes a string without escapes or control characters and returns
// its bytes (a sub-slice of the line).
func (d *fastDecoder) str() ([]byte, bool) {
	if !d.consume('"') {
		return nil, false
	}
	start := d.i
	for ; d.i < len(d.b); d.i++ {
		switch c := d.b[d.i]; {
		case c == '"':
			s := d.b[start:d.i]
			d.i++
			return s, true
		case c == '\\' || c < 0x20 || c >= 0x80:
			// Escapes, and non-ASCII bytes (encoding/json replaces
			// invalid UTF-8): left to encoding/json.
			return nil, false
		}
	}
	return nil, false
}

// int decodes an integer in [lo, hi] written as JSON writes integers (no
// leading zeros, no fraction, no exponent).
func (d *fastDecoder) int(lo, hi int64) (int64, bool) {
	d.space()
	start := d.i
	if d.i < len(d.b) && d.b[d.i] == '-' {
		d.i++
	}
	digits := d.i
	for d.i < len(d.b) && d.b[d.i] >= '0' && d.b[d.i] <= '9' {
		d.i++
	}
	switch {
	case d.i == digits:
		return 0, false
	case d.b[digits] == '0' && d.i-digits > 1:
		return 0, false // leading zero: invalid JSON
	case d.i < len(d.b) && (d.b[d.i] == '.' || d.b[d.i] == 'e' || d.b[d.i] == 'E'):
		return 0, false
	}
	n, err := strconv.ParseInt(string(d.b[start:d.i]), 10, 64)
	if err != nil || n < lo || n > hi {
		return 0, false
	}
	return n, true
}
