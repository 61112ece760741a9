package saver

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/m-lab/packet-headers/metrics"
)

// TestOriginalStateWords: the states that the original daemon also had carry
// its words.
func TestOriginalStateWords(t *testing.T) {
	for s, want := range map[State]string{
		NotStarted:        "notstarted",
		WaitingForPackets: "readingcandidatepackets",
		Streaming:         "streaming",
		DirCreation:       "dircreation",
		Publishing:        "writefinal",
		Discarding:        "discardingpackets",
		Stopped:           "stopped",
		MkdirError:        "mkdirerror",
		FileOpenError:     "fileopenerror",
		NoPacketsError:    "nopacketserror",
	} {
		if got := s.String(); got != want {
			t.Errorf("state %d is %q, want the original's %q", s, got, want)
		}
	}
}

// TestErrorReasons: each failure counts once under this daemon's reason and,
// for a finished file that could not be written out or published, once more
// under the original's reason for that stage (writefinal when buffered,
// streaming with -stream).
func TestErrorReasons(t *testing.T) {
	reasons := []string{"nopackets", "mkdir", "fileopen", "write", "link", "exists", "writefinal", "streaming", "writepartial", "uuidchanclosed", "uuidtimedout"}
	for _, stream := range []bool{false, true} {
		final := "writefinal"
		if stream {
			final = "streaming"
		}
		for _, tt := range []struct {
			s    State
			want []string
		}{
			{NoPacketsError, []string{"nopackets"}},
			{MkdirError, []string{"mkdir"}},
			{FileOpenError, []string{"fileopen"}},
			{WriteError, []string{"write", final}},
			{LinkError, []string{"link", final}},
			{ExistsError, []string{"exists", final}},
		} {
			c := NewPool(Config{Metrics: metrics.New(prometheus.NewRegistry()), Stream: stream})
			c.errs[tt.s].Inc()
			for _, r := range reasons {
				want := 0.0
				for _, w := range tt.want {
					if r == w {
						want = 1
					}
				}
				if got := testutil.ToFloat64(c.Metrics.SaverErrors.WithLabelValues(r)); got != want {
					t.Errorf("stream=%v, %v: pcap_saver_errors_total{reason=%q} = %v, want %v", stream, tt.s, r, got, want)
				}
			}
		}
	}
}

// TestExistingFileCountsBothReasons: a real failure to publish (the file's
// name is taken) counts under exists and under the original's stage reason.
func TestExistingFileCountsBothReasons(t *testing.T) {
	for _, stream := range []bool{false, true} {
		dir := t.TempDir()
		p := DatePath(dir, testUUID, opened)
		if err := os.MkdirAll(filepath.Dir(p), 0o775); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("old"), 0o664); err != nil {
			t.Fatal(err)
		}
		cfg := newConfig(t, dir)
		cfg.Stream = stream
		runSaver(cfg, readPackets(t, "v4.pcap"))
		final, other := "writefinal", "streaming"
		if stream {
			final, other = other, final
		}
		for r, want := range map[string]float64{"exists": 1, final: 1, other: 0, "write": 0} {
			if got := testutil.ToFloat64(cfg.Metrics.SaverErrors.WithLabelValues(r)); got != want {
				t.Errorf("stream=%v: pcap_saver_errors_total{reason=%q} = %v, want %v", stream, r, got, want)
			}
		}
	}
}
