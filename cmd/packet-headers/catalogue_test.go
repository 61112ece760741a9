package main

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	dto "github.com/prometheus/client_model/go"

	"github.com/m-lab/packet-headers/demuxer"
	"github.com/m-lab/packet-headers/flow"
	phmetrics "github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/saver"
	"github.com/m-lab/packet-headers/tcpeventsocket"
)

// family is a metric's type and label names.
type family struct {
	typ    string
	labels string // comma-separated, in order
}

// catalogue is every metric the daemon registers besides the Go runtime's
// and the process's (go_*, process_*). Those marked original are the original
// daemon's (m-lab/packet-headers metrics/metrics.go and prometheusx's
// git_short_commit), with its names, types and labels; dashboards and
// alerts select them.
var catalogue = map[string]family{
	// The original's.
	"pcap_missed_packets_total":                   {"counter", "saverstate"},
	"pcap_missed_uuids_total":                     {"counter", "saverstate"},
	"pcap_saver_starts_total":                     {"counter", ""},
	"pcap_saver_stops_total":                      {"counter", ""},
	"pcap_saver_errors_total":                     {"counter", "reason"},
	"pcap_saver_states":                           {"gauge", "state"},
	"pcap_saver_skipped_total":                    {"counter", ""},
	"pcap_demuxer_bad_packets_total":              {"counter", ""},
	"pcap_demuxer_gc_latency_seconds":             {"histogram", ""},
	"pcap_demuxer_uuids_total":                    {"counter", ""},
	"pcap_demuxer_savers_garbage_collected_total": {"counter", ""},
	"pcap_demuxer_savers_active":                  {"gauge", ""},
	"pcap_demuxer_ignored_total":                  {"counter", ""},
	"pcap_tcpinfohandler_bad_events_total":        {"counter", "reason"},
	"pcap_muxer_interfaces_with_captures":         {"gauge", ""},
	"git_short_commit":                            {"gauge", "commit"},
	// This daemon's.
	"pcap_capture_packets_total":            {"counter", "interface"},
	"pcap_capture_kernel_drops":             {"gauge", "interface"},
	"pcap_capture_interface_drops":          {"gauge", "interface"},
	"pcap_capture_bad_packets_total":        {"counter", "reason"},
	"pcap_saver_files_published_total":      {"counter", ""},
	"pcap_saver_bytes_written_total":        {"counter", ""},
	"pcap_saver_packets_total":              {"counter", ""},
	"pcap_saver_file_kernel_drops":          {"histogram", ""},
	"pcap_saver_files_incomplete_total":     {"counter", "reason"},
	"pcap_demuxer_pending_flows":            {"gauge", ""},
	"pcap_demuxer_pending_dropped_total":    {"counter", "reason"},
	"pcap_demuxer_flows_shed_total":         {"counter", "limit"},
	"pcap_eventsocket_connected":            {"gauge", ""},
	"pcap_eventsocket_connects_total":       {"counter", ""},
	"pcap_eventsocket_events_total":         {"counter", "event"},
	"pcap_uuidsource_sockets_seen_total":    {"counter", ""},
	"pcap_uuidsource_uuids_issued_total":    {"counter", ""},
	"pcap_uuidsource_poll_duration_seconds": {"histogram", ""},
}

// The original's saver states (saver/tcp.go: its status words, and an error
// cause followed by "error").
var originalSaverStates = []string{
	"notstarted", "readingcandidatepackets", "uuidwait", "uuidfound", "dircreation",
	"writepartial", "streaming", "writefinal", "discardingpackets",
	"nopacketserror", "uuidtimedouterror", "uuidchanclosederror", "mkdirerror",
	"fileopenerror", "writepartialerror", "streamingerror", "writefinalerror",
}

// originalLabels is every label value the original emitted, by metric and
// label: the savers' states (and, for packets and UUIDs it could not hand
// to a saver, stopped, and the demuxer's skipped and draining), the savers'
// error causes, and tcpinfohandler's bad events.
var originalLabels = map[[2]string][]string{
	{"pcap_saver_states", "state"}:                     originalSaverStates,
	{"pcap_missed_packets_total", "saverstate"}:        append(slices.Clone(originalSaverStates), "stopped", "skipped", "draining"),
	{"pcap_missed_uuids_total", "saverstate"}:          append(slices.Clone(originalSaverStates), "stopped", "skipped", "draining"),
	{"pcap_saver_errors_total", "reason"}:              {"nopackets", "uuidtimedout", "uuidchanclosed", "mkdir", "fileopen", "writepartial", "streaming", "writefinal"},
	{"pcap_tcpinfohandler_bad_events_total", "reason"}: {"nilid", "badip"},
}

// TestMetricCatalogue pins the metrics the daemon exports: every name, type
// and label of the catalogue and nothing else under pcap_; every label value
// the original emitted, as a series from the start; and every metric and
// label value the deploy/ dashboard and alerts select.
func TestMetricCatalogue(t *testing.T) {
	t.Run("components", func(t *testing.T) {
		// The daemon's metrics and series as newDaemon makes them,
		// without capturing (which needs CAP_NET_RAW): no pcap_capture_
		// series then.
		reg := prometheus.NewRegistry()
		m := phmetrics.New(reg)
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		if err := registerCommit(reg, commit()); err != nil {
			t.Fatal(err)
		}
		demuxer.New(demuxer.Config{
			FlowTimeout: time.Minute,
			UUIDWait:    time.Second,
			Savers:      saver.NewPool(saver.Config{Dir: t.TempDir(), CaptureDuration: time.Minute, Metrics: m}),
			Metrics:     m,
		})
		tcpeventsocket.New(filepath.Join(t.TempDir(), "none.sock"), tcpeventsocket.Opens(make(chan flow.Named)), m, nil)
		checkCatalogue(t, reg, m, true)
	})
	t.Run("daemon", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("needs root to capture")
		}
		for _, mode := range []string{"eventsocket", "standalone"} {
			args := []string{"-datadir=" + t.TempDir(), "-interface=lo", "-prometheusx.listen-address=127.0.0.1:0"}
			if mode == "eventsocket" {
				args = append(args, "-tcpinfo.eventsocket="+filepath.Join(t.TempDir(), "none.sock"))
			}
			cfg, err := parseConfig(args, io.Discard, noEnv)
			if err != nil {
				t.Fatal(err)
			}
			d, err := newDaemon(t.Context(), cfg, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
			if err != nil {
				t.Fatal(err)
			}
			t.Run(mode, func(t *testing.T) { checkCatalogue(t, d.reg, d.m, mode == "eventsocket") })
			d.listener.Close()
			d.captures.Close()
		}
	})
}

// checkCatalogue checks the metrics of reg, m's and the daemon's others; with
// eventsocket, the daemon reads tcp-info's eventsocket (the original's only
// UUID source, whose bad events it counts).
func checkCatalogue(t *testing.T, reg *prometheus.Registry, m *phmetrics.Metrics, eventsocket bool) {
	t.Helper()
	// The series that exist from the start.
	start := gatherFamilies(t, reg)
	for key, values := range originalLabels {
		if key[0] == "pcap_tcpinfohandler_bad_events_total" && !eventsocket {
			continue // no eventsocket, no bad events
		}
		have := labelValues(start[key[0]], key[1])
		for _, v := range values {
			if !have[v] {
				t.Errorf("%s{%s=%q}, a series of the original, is missing at start", key[0], key[1], v)
			}
		}
	}

	// Every metric of m registered, with its type and labels: a series in
	// each family (in the test's registry only) makes it show.
	mv := reflect.ValueOf(m).Elem()
	for i := range mv.NumField() {
		switch c := mv.Field(i).Interface().(type) {
		case *prometheus.CounterVec:
			touch(t, mv.Type().Field(i).Name, c.GetMetricWithLabelValues)
		case *prometheus.GaugeVec:
			touch(t, mv.Type().Field(i).Name, c.GetMetricWithLabelValues)
		case *prometheus.HistogramVec:
			t.Errorf("%s: a histogram with labels; touch it here", mv.Type().Field(i).Name)
		}
	}
	all := gatherFamilies(t, reg)
	for name, want := range catalogue {
		mf, ok := all[name]
		if !ok {
			t.Errorf("%s is not registered", name)
			continue
		}
		got := family{strings.ToLower(mf.GetType().String()), labelNames(mf)}
		if got != want {
			t.Errorf("%s is a %s with labels {%s}, want a %s with {%s}", name, got.typ, got.labels, want.typ, want.labels)
		}
	}
	for name := range all {
		if _, ok := catalogue[name]; !ok && !strings.HasPrefix(name, "go_") && !strings.HasPrefix(name, "process_") {
			t.Errorf("%s is registered but not in the catalogue (add it there and to the README)", name)
		}
	}

	// What deploy/ selects.
	for _, f := range []string{"../../deploy/grafana/packet-headers.json", "../../deploy/prometheus/alerts.yml"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		names, matchers := selected(string(b))
		if len(names) == 0 {
			t.Fatalf("%s selects no metric: the parse is wrong", f)
		}
		for _, n := range names {
			if _, ok := all[n]; !ok {
				t.Errorf("%s selects %s, which is not registered", f, n)
			}
		}
		for _, mt := range matchers {
			if !labelValues(start[mt[0]], mt[1])[mt[2]] {
				t.Errorf("%s selects %s{%s=%q}, a series that is missing at start", f, mt[0], mt[1], mt[2])
			}
		}
	}
}

// touch creates a series with empty label values in a vector, of whichever
// number of labels it has.
func touch[T any](t *testing.T, field string, get func(...string) (T, error)) {
	t.Helper()
	for n := range 8 {
		if _, err := get(make([]string, n)...); err == nil {
			return
		}
	}
	t.Errorf("%s: no label count fits", field)
}

func gatherFamilies(t *testing.T, reg *prometheus.Registry) map[string]*dto.MetricFamily {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

func labelNames(mf *dto.MetricFamily) string {
	if len(mf.GetMetric()) == 0 {
		return ""
	}
	var names []string
	for _, lp := range mf.GetMetric()[0].GetLabel() {
		names = append(names, lp.GetName())
	}
	return strings.Join(names, ",")
}

func labelValues(mf *dto.MetricFamily, label string) map[string]bool {
	out := map[string]bool{}
	for _, m := range mf.GetMetric() {
		for _, lp := range m.GetLabel() {
			if lp.GetName() == label {
				out[lp.GetValue()] = true
			}
		}
	}
	return out
}

var (
	metricRE  = regexp.MustCompile(`\b((?:pcap|go|process|git)_[a-z0-9_]+)\b(\{[^}]*\})?`)
	matcherRE = regexp.MustCompile(`([a-z_]+)\s*!?=\s*\\?"([^"\\]*)\\?"`)
)

// selected returns the metric names a dashboard or rule file selects (a
// histogram's series by their family's name) and its literal label matchers
// (metric, label, value), leaving out the instance variable.
func selected(s string) (names []string, matchers [][3]string) {
	for _, m := range metricRE.FindAllStringSubmatch(s, -1) {
		n := m[1]
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			n = strings.TrimSuffix(n, suffix)
		}
		names = append(names, n)
		for _, mt := range matcherRE.FindAllStringSubmatch(m[2], -1) {
			if mt[1] != "instance" && !strings.Contains(mt[2], "$") {
				matchers = append(matchers, [3]string{n, mt[1], mt[2]})
			}
		}
	}
	return names, matchers
}
