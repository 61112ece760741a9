package flow

import "time"

// Named says that the flow Key is named UUID, as of Time (tcp-info's Open
// event timestamp, or when the kernel source saw the socket; it also dates
// the flow's file). It is the one value both UUID sources, tcp-info's
// eventsocket client and the kernel source, hand the demuxer, on one
// channel.
type Named struct {
	Key  Key
	UUID string
	Time time.Time
}
