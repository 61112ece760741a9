package kernelsource

import (
	"testing"
	"time"
)

// TestPollWait: polls start every Interval while a dump is quick; a dump
// slower than Interval is followed by as long a pause, so polling costs at
// most half a CPU.
func TestPollWait(t *testing.T) {
	s := &Source{cfg: Config{Interval: 10 * time.Millisecond}}
	for _, tt := range []struct{ took, want time.Duration }{
		{0, 10 * time.Millisecond},
		{time.Millisecond, 9 * time.Millisecond},
		{5 * time.Millisecond, 5 * time.Millisecond},
		{12 * time.Millisecond, 12 * time.Millisecond},
	} {
		if got := s.pollWait(tt.took); got != tt.want {
			t.Errorf("pollWait(%v) = %v, want %v", tt.took, got, tt.want)
		}
	}
}
