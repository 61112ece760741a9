package saver

// State is where a saver is in its life. The String values are the label
// values of pcap_saver_states and pcap_missed_packets_total{saverstate}, the
// same words as the original daemon's so that dashboards keep working.
type State int32

// The states of a saver, in the order it goes through them.
const (
	NotStarted State = iota
	// WaitingForPackets: the UUID is known but no packet has arrived yet.
	WaitingForPackets
	// Streaming: packets are being saved.
	Streaming
	// DirCreation and Publishing: the file is being written and linked.
	DirCreation
	Publishing
	// Discarding: the file is published (or failed); later packets of the
	// flow are dropped on purpose.
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
	Publishing:        "writepartial",
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
// states.
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

// IsError reports whether s is one of the error states.
func (s State) IsError() bool { return s >= MkdirError && s < numStates }
