package promscrape

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestParse(t *testing.T) {
	body := []byte(`# HELP pcap_missed_packets_total x
# TYPE pcap_missed_packets_total counter
pcap_missed_packets_total{saverstate="pending"} 3
pcap_missed_packets_total{saverstate="streaming"} 4

pcap_eventsocket_events_total{event="open"} 2000
pcap_demuxer_uuids_total 2000
pcap_saver_errors_total{reason="write"} 0
pcap_demuxer_gc_latency_seconds_bucket{le="0.005"} 9
go_gc_duration_seconds{quantile="0.5"} 1.5e-05
go_info{version="go 1.26 {x} \"q\""} 1
with_timestamp 7 1700000000000
`)
	s, err := Parse(body)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Sum("pcap_missed_packets_total"); got != 7 {
		t.Errorf("Sum = %v, want 7", got)
	}
	if got := s.Sum("pcap_demuxer_uuids_total"); got != 2000 {
		t.Errorf("Sum without labels = %v, want 2000", got)
	}
	if got := s[`pcap_eventsocket_events_total{event="open"}`]; got != 2000 {
		t.Errorf("one series = %v, want 2000", got)
	}
	// A prefix of another metric's name is not that metric.
	if got := s.Sum("pcap_demuxer_uuids"); got != 0 {
		t.Errorf("Sum of a prefix = %v, want 0", got)
	}
	if got := s[`go_info{version="go 1.26 {x} \"q\""}`]; got != 1 {
		t.Errorf("label value with spaces, braces and quotes = %v, want 1", got)
	}
	if got := s["with_timestamp"]; got != 7 {
		t.Errorf("sample with a timestamp = %v, want 7", got)
	}
	want := map[string]float64{
		`pcap_missed_packets_total{saverstate="pending"}`:   3,
		`pcap_missed_packets_total{saverstate="streaming"}`: 4,
		`pcap_eventsocket_events_total{event="open"}`:       2000,
		`pcap_demuxer_uuids_total`:                          2000,
	}
	if d := cmp.Diff(want, s.NonZero("pcap_")); d != "" {
		t.Errorf("NonZero (-want +got):\n%s", d)
	}
	for _, bad := range []string{"lonely", `open{a="b" 1`, "x 1 2 3", "x one"} {
		if _, err := Parse([]byte(bad + "\n")); err == nil {
			t.Errorf("Parse(%q): no error", bad)
		}
	}
}

// TestTargetWait scrapes a server in this namespace (NS nil) until a counter
// reaches a value.
func TestTargetWait(t *testing.T) {
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintf(w, "# TYPE scrapes_total counter\nscrapes_total %d\n", n.Add(1))
	}))
	defer srv.Close()
	tg := Target{Addr: strings.TrimPrefix(srv.URL, "http://")}
	s, ok, err := tg.Wait(context.Background(), time.Millisecond, 10*time.Second, func(s Samples) bool { return s["scrapes_total"] >= 3 })
	if err != nil || !ok || s["scrapes_total"] != 3 {
		t.Errorf("Wait = %v, %v, %v; want scrapes_total 3, true, nil", s, ok, err)
	}
	// Not met within the time: the last samples, false.
	s, ok, err = tg.Wait(context.Background(), time.Millisecond, 0, func(Samples) bool { return false })
	if err != nil || ok || s["scrapes_total"] != 4 {
		t.Errorf("Wait past its time = %v, %v, %v; want scrapes_total 4, false, nil", s, ok, err)
	}
	// Nobody listening: an error.
	srv.Close()
	if _, _, err := tg.Wait(context.Background(), time.Millisecond, time.Second, func(Samples) bool { return true }); err == nil {
		t.Error("Wait on a closed server: no error")
	}
}
