package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"text/tabwriter"
)

// Result is one run's measurements. Ratios are NaN when their denominator
// is zero; JSON carries them as null.
type Result struct {
	Run      int     `json:"run"`
	LoadAvg1 float64 `json:"loadavg_1m_start"`
	LoadEnd1 float64 `json:"loadavg_1m_end"`

	Load       json.RawMessage `json:"load"` // phload client's own result
	LoadErrors int             `json:"load_errors"`

	// The UUID source's view and the files.
	Opens float64      `json:"source_opens"` // Opens the source sent (eventsocket) or issued (standalone)
	Named float64      `json:"named"`        // pcap_demuxer_uuids_total
	Match *matchResult `json:"match"`

	DaemonExit    int     `json:"daemon_exit"`
	DaemonCPU     float64 `json:"daemon_cpu_s"`        // user+system, whole life (rusage)
	DaemonCPULive float64 `json:"daemon_cpu_s_before"` // from /proc just before SIGTERM
	DaemonCPU0    float64 `json:"daemon_cpu_s_start"`  // from /proc when the load started
	FloorCPU0     float64 `json:"floor_cpu_s_start"`
	PeakRSSKB     int64   `json:"daemon_vmhwm_kb"`  // VmHWM just before SIGTERM
	MaxRSSKB      int64   `json:"daemon_maxrss_kb"` // rusage, including shutdown

	CapturePackets float64            `json:"capture_packets"` // pcap_capture_packets_total
	KernelDrops    float64            `json:"kernel_drops"`
	IfaceDrops     float64            `json:"interface_drops"`
	Missed         float64            `json:"missed_packets"` // pcap_missed_packets_total, every label
	Metrics        map[string]float64 `json:"metrics"`        // non-zero pcap_ series before SIGTERM

	// LinkPackets is every packet that crossed the server's veth during
	// the load (both directions; a few are ARP or neighbour discovery),
	// from the kernel's counters: the denominator of per-packet figures,
	// right even when a capture drops.
	LinkPackets int64 `json:"link_packets"`
	LinkDrops   int64 `json:"link_drops"` // veth drops on either end

	TCPInfoCPU  float64 `json:"tcpinfo_cpu_s,omitempty"` // tcp-info's whole life, for comparison
	FloorCPU    float64 `json:"floor_cpu_s"`
	FloorDrops  int64   `json:"floor_drops"`  // server-side tcpdump's kernel drops
	RefDrops    int64   `json:"ref_drops"`    // reference tcpdump's kernel drops
	RefCaptured int64   `json:"ref_captured"` // packets the reference tcpdump says it wrote

	// PublishFloor is what publishing one file of the run's median size
	// costs on the same data directory, measured after the daemon
	// stopped; nil when the daemon published no file.
	PublishFloor *publishFloor `json:"publish_floor"`

	// Concurrent mode.
	OpenFlows    int     `json:"open_flows,omitempty"`
	BaseRSSKB    int64   `json:"baseline_vmrss_kb,omitempty"`
	OpenRSSKB    int64   `json:"open_vmrss_kb,omitempty"`
	SaversActive float64 `json:"savers_active,omitempty"`

	// Derived is every row of the report for this run, as in the table.
	Derived map[string]jsonFloat `json:"derived"`
}

// metric is one row of the report: how to compute it from a run, so that
// the table, the medians and the targets all use the same definitions.
type metric struct {
	name string
	unit string
	f    func(r *Result) float64
	// only limits a row to some modes; nil means every mode.
	only []Mode
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return math.NaN()
	}
	return a / b
}

// linkPackets is the denominator of the per-packet figures: every packet
// that crossed the link, by the kernel's count.
func linkPackets(r *Result) float64 { return float64(r.LinkPackets) }

// refValid reports whether the reference holds every packet of the load:
// tcpdump dropped none and its file has all it captured. A run whose
// reference is incomplete says nothing about the daemon's completeness, so
// those rows are left out ("-") for it rather than blamed on the daemon.
func refValid(r *Result) bool {
	return r.RefDrops == 0 && r.RefCaptured == int64(r.Match.RefAllPacket)
}

// ifRef returns f's value when the run's reference is valid, else NaN.
func ifRef(f func(r *Result) float64) func(r *Result) float64 {
	return func(r *Result) float64 {
		if !refValid(r) {
			return math.NaN()
		}
		return f(r)
	}
}

// namedLoad is the number of load flows the UUID source named. Only the
// source's total is known, which also counts a socket that is not the
// load's (none in these namespaces: tcp-info ignores loopback), so it is
// capped at the load's flows.
func namedLoad(r *Result) float64 { return math.Min(r.Named, float64(r.Match.Flows)) }

var metrics = []metric{
	{name: "load flows", f: func(r *Result) float64 { return float64(r.Match.Flows) }},
	{name: "load errors", f: func(r *Result) float64 { return float64(r.LoadErrors) }},
	{name: "flows named by source", f: func(r *Result) float64 { return r.Named }},
	{name: "files published", f: func(r *Result) float64 { return float64(r.Match.Files) }},
	{name: "link packets", f: linkPackets},
	{name: "link drops", f: func(r *Result) float64 { return float64(r.LinkDrops) }},
	{name: "reference packets", f: func(r *Result) float64 { return float64(r.Match.RefAllPacket) }},
	{name: "reference tcpdump drops", f: func(r *Result) float64 { return float64(r.RefDrops) }},
	{name: "reference valid", f: func(r *Result) float64 {
		if refValid(r) {
			return 1
		}
		return 0
	}},
	{name: "complete flows", f: ifRef(func(r *Result) float64 { return float64(r.Match.Complete) })},
	{name: "complete / named", unit: "%", f: ifRef(func(r *Result) float64 { return 100 * ratio(float64(r.Match.Complete), namedLoad(r)) })},
	{name: "complete, in reference order", f: ifRef(func(r *Result) float64 { return float64(r.Match.RefOrder) })},
	{name: "packets in files / reference", unit: "%", f: ifRef(func(r *Result) float64 {
		return 100 * ratio(float64(r.Match.FilePackets), float64(r.Match.RefPackets))
	})},
	{name: "packets missing from files", f: ifRef(func(r *Result) float64 { return float64(r.Match.Missing) })},
	{name: "  of which the floor tcpdump saw", f: ifRef(func(r *Result) float64 { return float64(r.Match.MissingInFloor) })},
	{name: "packets extra in files", f: ifRef(func(r *Result) float64 { return float64(r.Match.Extra) })},
	{name: "packets captured / link", unit: "%", f: func(r *Result) float64 { return 100 * ratio(r.CapturePackets, linkPackets(r)) }},
	{name: "kernel drops", f: func(r *Result) float64 { return r.KernelDrops }},
	{name: "interface drops", f: func(r *Result) float64 { return r.IfaceDrops }},
	{name: "missed packets", f: func(r *Result) float64 { return r.Missed }},
	{name: "records with payload", f: func(r *Result) float64 { return float64(r.Match.Payload) }},
	{name: "daemon CPU", unit: "s", f: func(r *Result) float64 { return r.DaemonCPU }},
	{name: "daemon CPU / packet", unit: "µs", f: func(r *Result) float64 { return 1e6 * ratio(r.DaemonCPU, linkPackets(r)) }},
	// The part of the daemon's CPU spent while the load ran, without
	// start-up and shutdown (publishing every flow still open): /proc's
	// 10 ms ticks, so only meaningful for runs of seconds.
	{name: "daemon CPU during load", unit: "s", f: func(r *Result) float64 { return r.DaemonCPULive - r.DaemonCPU0 }},
	{name: "daemon CPU / packet, during load", unit: "µs", f: func(r *Result) float64 {
		return 1e6 * ratio(r.DaemonCPULive-r.DaemonCPU0, linkPackets(r))
	}},
	{name: "daemon CPU / flow", unit: "µs", f: daemonCPUPerFlow},
	// The file system's own cost of a flow's file (see floor.go), and the
	// daemon's CPU per flow as a multiple of it.
	{name: "publish floor file size", unit: "B", f: floorValue(func(f *publishFloor) float64 { return float64(f.FileBytes) })},
	{name: "publish floor CPU / file, no fsync", unit: "µs", f: floorValue(func(f *publishFloor) float64 { return f.NoSyncCPU })},
	{name: "publish floor CPU / file, fsync", unit: "µs", f: floorValue(func(f *publishFloor) float64 { return f.SyncCPU })},
	{name: "daemon CPU / flow / publish floor, no fsync", unit: "x", f: overFloor(func(f *publishFloor) float64 { return f.NoSyncCPU })},
	{name: "daemon CPU / flow / publish floor, fsync", unit: "x", f: overFloor(func(f *publishFloor) float64 { return f.SyncCPU })},
	{name: "daemon peak RSS (VmHWM)", unit: "MB", f: func(r *Result) float64 { return float64(r.PeakRSSKB) / 1024 }},
	{name: "daemon max RSS incl. shutdown", unit: "MB", f: func(r *Result) float64 { return float64(r.MaxRSSKB) / 1024 }},
	{name: "tcp-info CPU (for comparison)", unit: "s", f: func(r *Result) float64 { return r.TCPInfoCPU }},
	{name: "floor tcpdump CPU", unit: "s", f: func(r *Result) float64 { return r.FloorCPU }},
	{name: "floor tcpdump CPU / packet", unit: "µs", f: func(r *Result) float64 { return 1e6 * ratio(r.FloorCPU, linkPackets(r)) }},
	{name: "daemon / floor CPU", unit: "x", f: func(r *Result) float64 { return ratio(r.DaemonCPU, r.FloorCPU) }},
	{name: "floor tcpdump drops", f: func(r *Result) float64 { return float64(r.FloorDrops) }},
	{name: "open flows", only: []Mode{Concurrent}, f: func(r *Result) float64 { return float64(r.OpenFlows) }},
	{name: "savers active when measured", only: []Mode{Concurrent}, f: func(r *Result) float64 { return r.SaversActive }},
	{name: "RSS baseline", unit: "MB", only: []Mode{Concurrent}, f: func(r *Result) float64 { return float64(r.BaseRSSKB) / 1024 }},
	{name: "RSS with flows open", unit: "MB", only: []Mode{Concurrent}, f: func(r *Result) float64 { return float64(r.OpenRSSKB) / 1024 }},
	{name: "RSS / open flow", unit: "KB", only: []Mode{Concurrent}, f: rssPerFlowKB},
	{name: "load average 1m (start)", f: func(r *Result) float64 { return r.LoadAvg1 }},
	{name: "load average 1m (end)", f: func(r *Result) float64 { return r.LoadEnd1 }},
}

func daemonCPUPerFlow(r *Result) float64 { return 1e6 * ratio(r.DaemonCPU, float64(r.Match.Flows)) }

// floorValue returns a value of the run's publish floor; NaN without one.
func floorValue(f func(*publishFloor) float64) func(r *Result) float64 {
	return func(r *Result) float64 {
		if r.PublishFloor == nil {
			return math.NaN()
		}
		return f(r.PublishFloor)
	}
}

// overFloor returns the daemon's CPU per flow over a publish floor's CPU
// per file.
func overFloor(f func(*publishFloor) float64) func(r *Result) float64 {
	return func(r *Result) float64 {
		if r.PublishFloor == nil {
			return math.NaN()
		}
		return ratio(daemonCPUPerFlow(r), f(r.PublishFloor))
	}
}

func rssPerFlowKB(r *Result) float64 {
	return ratio(float64(r.OpenRSSKB-r.BaseRSSKB), float64(r.OpenFlows))
}

func (m metric) applies(mode Mode) bool { return m.only == nil || slices.Contains(m.only, mode) }

// median of the values that are numbers.
func median(xs []float64) float64 {
	var v []float64
	for _, x := range xs {
		if !math.IsNaN(x) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return math.NaN()
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// target is one of the goals for a mode, checked on the medians.
type target struct {
	Name  string    `json:"name"`
	Value jsonFloat `json:"value"`
	Limit float64   `json:"limit"`
	Max   bool      `json:"at_most"` // the value must be at most the limit (else at least)
	Met   bool      `json:"met"`
}

// targets are the goals. They are only meaningful for the load the
// issue states (churn 200/s x 2,000 held 100 ms, bulk 4 streams unpaced with
// offloads off, 10,000 concurrent flows); they are checked whatever the load.
func targets(mode Mode, med map[string]jsonFloat) []target {
	var ts []target
	add := func(name, metric string, limit float64, atMost bool) {
		v := float64(med[metric])
		met := !math.IsNaN(v) && (atMost && v <= limit || !atMost && v >= limit)
		ts = append(ts, target{Name: name, Value: jsonFloat(v), Limit: limit, Max: atMost, Met: met})
	}
	switch mode {
	case Churn:
		add("named flows complete (%)", "complete / named", 100, false)
		add("daemon CPU per packet (µs)", "daemon CPU / packet", 5, true)
		add("peak RSS (MB)", "daemon peak RSS (VmHWM)", 100, true)
	case Bulk:
		add("packets in files / reference (%)", "packets in files / reference", 99.9, false)
		add("packets captured / link (%)", "packets captured / link", 99.9, false)
		add("flows complete (%)", "complete / named", 100, false)
		add("daemon / tcpdump CPU per packet (x)", "daemon / floor CPU", 3, true)
	case Concurrent:
		add("RSS per open flow (KB)", "RSS / open flow", 20, true)
	}
	return ts
}

// Report is the JSON output.
type Report struct {
	Config  *Config              `json:"config"`
	Runs    []*Result            `json:"runs"`
	Medians map[string]jsonFloat `json:"medians"`
	Targets []target             `json:"targets"`
}

func newReport(cfg *Config, runs []*Result) *Report {
	rep := &Report{Config: cfg, Runs: runs, Medians: map[string]jsonFloat{}}
	for _, m := range metrics {
		if !m.applies(cfg.Mode) {
			continue
		}
		var xs []float64
		for _, r := range runs {
			v := m.f(r)
			if r.Derived == nil {
				r.Derived = map[string]jsonFloat{}
			}
			r.Derived[m.name] = jsonFloat(v)
			xs = append(xs, v)
		}
		rep.Medians[m.name] = jsonFloat(median(xs))
	}
	rep.Targets = targets(cfg.Mode, rep.Medians)
	return rep
}

// printTable writes one column per run and the medians, then the targets
// and the reasons flows were incomplete.
func (rep *Report) printTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "metric\tunit\t")
	for _, r := range rep.Runs {
		fmt.Fprintf(tw, "run %d\t", r.Run)
	}
	fmt.Fprint(tw, "median\t\n")
	for _, m := range metrics {
		if !m.applies(rep.Config.Mode) {
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t", m.name, m.unit)
		for _, r := range rep.Runs {
			fmt.Fprintf(tw, "%s\t", format(m.f(r)))
		}
		fmt.Fprintf(tw, "%s\t\n", format(float64(rep.Medians[m.name])))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, r := range rep.Runs {
		if !refValid(r) {
			why := fmt.Sprintf("dropped %d packets", r.RefDrops)
			if r.RefDrops < 0 || r.RefCaptured < 0 {
				// tcpdump's closing statistics were not in its output.
				why = "printed no drop count"
			}
			fmt.Fprintf(w, "run %d: the reference tcpdump %s (file %d of %d captured): completeness not measured in this run\n",
				r.Run, why, r.Match.RefAllPacket, r.RefCaptured)
			continue
		}
		if len(r.Match.Reasons) > 0 {
			fmt.Fprintf(w, "run %d incomplete flows by reason: %v\n", r.Run, r.Match.Reasons)
			for _, e := range r.Match.Examples {
				fmt.Fprintf(w, "  %s\n", e)
			}
		}
	}
	fmt.Fprintln(w, "targets (on the medians):")
	for _, t := range rep.Targets {
		verdict, op := "MISSED", ">="
		if t.Met {
			verdict = "met"
		}
		if t.Max {
			op = "<="
		}
		fmt.Fprintf(w, "  %-40s %10s  want %s %g  %s\n", t.Name, format(float64(t.Value)), op, t.Limit, verdict)
	}
	return nil
}

func format(v float64) string {
	switch {
	case math.IsNaN(v):
		return "-"
	case v == math.Trunc(v) && math.Abs(v) < 1e12:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 100:
		return fmt.Sprintf("%.1f", v)
	case math.Abs(v) >= 1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

// writeJSON writes the report.
func (rep *Report) writeJSON(path string) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// jsonFloat is a float64 that is written as null when it is NaN (a ratio
// with nothing to divide by), which JSON cannot represent.
type jsonFloat float64

func (f jsonFloat) MarshalJSON() ([]byte, error) {
	if math.IsNaN(float64(f)) || math.IsInf(float64(f), 0) {
		return []byte("null"), nil
	}
	return json.Marshal(float64(f))
}
