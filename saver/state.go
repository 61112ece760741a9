package saver

import "github.com/prometheus/client_golang/prometheus"

// State is where a saver is in its life. Its String is the label value of
// pcap_saver_states{state}, pcap_missed_packets_total{saverstate} and
// pcap_missed_uuids_total{saverstate}. Where the original daemon had the same
// stage it is the original's word, so that dashboards that select it keep
// working; the README's Metrics section maps every word of the original.
type State int32

// The states of a saver, in the order it goes through them.
const (
	NotStarted State = iota
	// WaitingForPackets: the saver has started, no packet is saved yet.
	WaitingForPackets
	// Streaming: packets are being saved.
	Streaming
	// DirCreation: the date directory is being created.
	DirCreation
	// Publishing: the finished file is being written out and linked
	// under its name.
	Publishing
	// Discarding: the file is published; later packets of the flow are
	// dropped on purpose.
	Discarding
	Stopped
	// Error states: the flow's file could not be written.
	MkdirError
	FileOpenError
	WriteError
	LinkError
	ExistsError
	NoPacketsError
	numStates
)

var stateNames = [numStates]string{
	NotStarted:        "notstarted",
	WaitingForPackets: "readingcandidatepackets",
	Streaming:         "streaming",
	DirCreation:       "dircreation",
	Publishing:        "writefinal",
	Discarding:        "discardingpackets",
	Stopped:           "stopped",
	MkdirError:        "mkdirerror",
	FileOpenError:     "fileopenerror",
	WriteError:        "writeerror",
	LinkError:         "linkerror",
	ExistsError:       "existserror",
	NoPacketsError:    "nopacketserror",
}

// errorReasons are the pcap_saver_errors_total{reason} values of the error
// states: what failed.
var errorReasons = map[State]string{
	MkdirError:     "mkdir",
	FileOpenError:  "fileopen",
	WriteError:     "write",
	LinkError:      "link",
	ExistsError:    "exists",
	NoPacketsError: "nopackets",
}

func (s State) String() string {
	if s < 0 || s >= numStates {
		return "unknown"
	}
	return stateNames[s]
}

// isError reports whether s is one of the error states.
func (s State) isError() bool { return s >= MkdirError && s < numStates }

// Label values of the original that no saver state here carries. Their
// series exist from the start (at zero where nothing is counted under them),
// so that a dashboard or alert that selects them finds them.
const (
	// UUIDWait is the original's state of a flow that has packets and
	// waits for its UUID. Here such a flow waits in the demuxer, without a
	// saver: the demuxer counts its waiting flows under this word in
	// pcap_saver_states, and the packets it drops from them beyond its
	// hold limits in pcap_missed_packets_total.
	UUIDWait = "uuidwait"
	// Skipped labels, in pcap_missed_uuids_total, the UUIDs of new flows
	// refused by load shedding (-maxflows, -maxheap), as in the original.
	Skipped = "skipped"
	// UUIDTimedOut is the pcap_saver_errors_total reason of a flow whose
	// UUID did not come within -uuidwaitduration (the demuxer's count).
	UUIDTimedOut = "uuidtimedout"
	// UUIDChanClosed is the original's reason for a flow collected idle
	// (its UUID channel closed) while it still waited for its UUID: the
	// demuxer counts the waiting flows that its garbage collection ends.
	UUIDChanClosed = "uuidchanclosed"
)

// originalStates are the original's pcap_saver_states words that are no
// State here. uuidfound and writepartial were steps that no saver takes here
// (a saver starts when its flow's UUID is known, with its file), and the
// original's error states below were left at once for discardingpackets.
var originalStates = []string{
	UUIDWait, "uuidfound", "writepartial",
	"uuidtimedouterror", "uuidchanclosederror", "writepartialerror", "streamingerror", "writefinalerror",
}

// originalMissedStates are the further words of the original's
// pcap_missed_packets_total{saverstate} and pcap_missed_uuids_total
// {saverstate}: the load-shed flows (skipped) and the saver that drained
// them (draining).
var originalMissedStates = []string{Skipped, "draining"}

// originalReasons are the original's pcap_saver_errors_total reasons that are
// the reason of no error state here (see finalReason; writepartial, a failure
// to copy the packets buffered before the UUID into the file of -stream,
// cannot happen: a saver starts with its UUID).
var originalReasons = []string{UUIDTimedOut, UUIDChanClosed, "writepartial", "streaming", "writefinal"}

// finalReason is the original's reason for a failure to write out or
// publish a flow's finished file: writefinal when the file is buffered until
// it is complete (the default), streaming with -stream, where the original
// reported any failure of the stream when it closed the file.
func finalReason(stream bool) string {
	if stream {
		return "streaming"
	}
	return "writefinal"
}

// initLabels resolves the savers' labelled series (see Init) and creates the
// series of every label value of the original.
func (c *Pool) initLabels() {
	m := c.Metrics
	for s := State(0); s < numStates; s++ {
		c.missed[s] = m.MissedPackets.WithLabelValues(s.String())
		c.gauges[s] = m.SaverCount.WithLabelValues(s.String())
		m.MissedUUIDs.WithLabelValues(s.String())
		r, ok := errorReasons[s]
		if !ok {
			continue
		}
		c.errs[s] = m.SaverErrors.WithLabelValues(r)
		switch s {
		case WriteError, LinkError, ExistsError:
			// Counted under both: this daemon's reason (what
			// failed) and the original's (at which stage).
			c.errs[s] = both{c.errs[s], m.SaverErrors.WithLabelValues(finalReason(c.Stream))}
		}
	}
	for _, v := range originalStates {
		m.SaverCount.WithLabelValues(v)
		m.MissedPackets.WithLabelValues(v)
		m.MissedUUIDs.WithLabelValues(v)
	}
	for _, v := range originalMissedStates {
		m.MissedPackets.WithLabelValues(v)
		m.MissedUUIDs.WithLabelValues(v)
	}
	for _, r := range originalReasons {
		m.SaverErrors.WithLabelValues(r)
	}
}

// both is a counter that counts in two series.
type both struct {
	prometheus.Counter
	also prometheus.Counter
}

func (b both) Inc() {
	b.Counter.Inc()
	b.also.Inc()
}

func (b both) Add(v float64) {
	b.Counter.Add(v)
	b.also.Add(v)
}
