package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"
)

// Mode is the kind of load.
type Mode int

const (
	// Churn opens short request/response connections at a fixed rate.
	Churn Mode = iota
	// Bulk runs a few long streams as fast as TCP goes (or paced).
	Bulk
	// Concurrent holds many idle connections open at once.
	Concurrent
)

var modeNames = []string{"churn", "bulk", "concurrent"}

func (m Mode) String() string {
	if int(m) < len(modeNames) {
		return modeNames[m]
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

func (m Mode) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

func (m *Mode) UnmarshalText(b []byte) error {
	for i, n := range modeNames {
		if string(b) == n {
			*m = Mode(i)
			return nil
		}
	}
	return fmt.Errorf("want %s", strings.Join(modeNames, ", "))
}

// Source is where the daemon gets UUIDs from.
type Source int

const (
	// TCPInfo runs tcp-info beside the daemon, as in production.
	TCPInfo Source = iota
	// Standalone leaves -tcpinfo.eventsocket unset: the daemon's built-in
	// kernel source names flows.
	Standalone
)

var sourceNames = []string{"tcpinfo", "standalone"}

func (s Source) String() string {
	if int(s) < len(sourceNames) {
		return sourceNames[s]
	}
	return fmt.Sprintf("Source(%d)", int(s))
}

func (s Source) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

func (s *Source) UnmarshalText(b []byte) error {
	for i, n := range sourceNames {
		if string(b) == n {
			*s = Source(i)
			return nil
		}
	}
	return fmt.Errorf("want %s", strings.Join(sourceNames, ", "))
}

// onOff is a bool flag spelled on or off, as ethtool spells offloads.
type onOff bool

func (o onOff) MarshalText() ([]byte, error) {
	if o {
		return []byte("on"), nil
	}
	return []byte("off"), nil
}

func (o *onOff) UnmarshalText(b []byte) error {
	switch string(b) {
	case "on":
		*o = true
	case "off":
		*o = false
	default:
		return errors.New("want on or off")
	}
	return nil
}

// Config is the benchmark's settings: flags, with defaults that depend on
// the mode filled in.
type Config struct {
	Mode     Mode          `json:"mode"`
	Rate     int           `json:"rate"`
	Count    int           `json:"count"`
	Hold     time.Duration `json:"hold_ns"`
	Req      int           `json:"req"`
	Resp     int           `json:"resp"`
	Streams  int           `json:"streams"`
	Duration time.Duration `json:"duration_ns"`
	Pace     int64         `json:"pace"`
	IPv6     bool          `json:"ipv6"`
	Offloads onOff         `json:"offloads"`
	Source   Source        `json:"source"`
	Runs     int           `json:"runs"`

	Daemon  string `json:"daemon"`
	TCPInfo string `json:"tcpinfo"`
	Load    string `json:"load"`
	Out     string `json:"-"`
	Keep    bool   `json:"-"`
	WorkDir string `json:"-"`
	DataDir string `json:"datadir,omitempty"`

	FlowTimeout time.Duration `json:"flowtimeout_ns"`
	Settle      time.Duration `json:"settle_ns"`
	DaemonFlags []string      `json:"daemon_flags,omitempty"`
	// AllInterfaces runs the daemon without -interface: one socket for
	// every interface of the server namespace.
	AllInterfaces bool `json:"all_interfaces,omitempty"`
	// IdleInterfaces is the number of idle veth pairs added to the
	// server namespace (a host with many interfaces).
	IdleInterfaces int `json:"idle_interfaces,omitempty"`
}

// Bounds that keep every run finite. Connection counts stay under the
// client's ephemeral port range (32768-60999 by default: 28,232 ports),
// since every flow needs its own 4-tuple to be told apart in the reference.
const (
	maxRuns     = 20
	maxCount    = 28_000
	maxRate     = 20_000
	maxStreams  = 256
	maxDuration = 10 * time.Minute
)

func newFlagSet(c *Config, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("phbench", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.TextVar(&c.Mode, "mode", Churn, "churn, bulk or concurrent")
	fs.IntVar(&c.Rate, "rate", 200, "churn, concurrent: connections opened per second (concurrent default 1000)")
	fs.IntVar(&c.Count, "count", 2000, "churn, concurrent: connections in all (concurrent default 10000)")
	fs.DurationVar(&c.Hold, "hold", 100*time.Millisecond, "churn: each connection's life from its connect; concurrent: how long all stay open once named, before memory is read (default 3s)")
	fs.IntVar(&c.Req, "req", 500, "churn, concurrent: request bytes (concurrent default 16)")
	fs.IntVar(&c.Resp, "resp", 8000, "churn, concurrent: response bytes (concurrent default 16)")
	fs.IntVar(&c.Streams, "streams", 4, "bulk: parallel streams")
	fs.DurationVar(&c.Duration, "duration", 10*time.Second, "bulk: how long the streams send")
	fs.Int64Var(&c.Pace, "pace", 0, "bulk: bytes per second per stream; 0 is unpaced")
	fs.BoolVar(&c.IPv6, "ipv6", false, "connect over IPv6 (2001:db8::/64) instead of IPv4 (198.18.0.0/24)")
	fs.TextVar(&c.Offloads, "offloads", onOff(false), "segmentation offloads on the veth pair (tso, gso, gro): on or off")
	fs.TextVar(&c.Source, "source", TCPInfo, "UUID source: tcpinfo (tcp-info's eventsocket) or standalone (the daemon's own)")
	fs.IntVar(&c.Runs, "runs", 3, "runs; the report gives each and the medians")
	fs.StringVar(&c.Daemon, "daemon", "", "packet-headers binary (default: build ./cmd/packet-headers)")
	fs.StringVar(&c.TCPInfo, "tcpinfo", "", "tcp-info binary (default: build github.com/m-lab/tcp-info, the module's tool)")
	fs.StringVar(&c.Load, "load", "", "phload binary (default: build ./bench/cmd/phload)")
	fs.StringVar(&c.Out, "out", "results.json", "JSON report file; empty for none")
	fs.BoolVar(&c.Keep, "keep", false, "keep each run's directory (captures, the daemon's files, logs)")
	fs.StringVar(&c.WorkDir, "workdir", "", "where run directories (captures, logs) are made (default: $TMPDIR)")
	fs.StringVar(&c.DataDir, "datadir", "", "where the daemon's data directory is made (default: in the run directory). The file system matters: on ext4 without a journal, creating each file's inode dominates the daemon's CPU under churn")
	fs.DurationVar(&c.FlowTimeout, "flowtimeout", 0, "the daemon's -flowtimeout (default: 1s; concurrent 10m, so that idle flows stay open)")
	fs.BoolVar(&c.AllInterfaces, "allinterfaces", false, "run the daemon without -interface (one capture socket for every interface of the server namespace)")
	fs.IntVar(&c.IdleInterfaces, "idleinterfaces", 0, "idle veth pairs added to the server namespace, up to 500 (a host with many interfaces; use with -allinterfaces)")
	fs.DurationVar(&c.Settle, "settle", 2*time.Second, "wait after the load before reading the daemon's counters, so that the last packets are through")
	fs.Func("daemonflag", "extra flag for the daemon, e.g. -daemonflag=-stream (repeatable)", func(s string) error {
		c.DaemonFlags = append(c.DaemonFlags, s)
		return nil
	})
	return fs
}

// parseConfig parses the flags and fills in the mode's defaults for the
// flags not given.
func parseConfig(args []string, out io.Writer) (*Config, error) {
	c := &Config{}
	fs := newFlagSet(c, out)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	def := func(name string, fn func()) {
		if !set[name] {
			fn()
		}
	}
	switch c.Mode {
	case Concurrent:
		def("rate", func() { c.Rate = 1000 })
		def("count", func() { c.Count = 10000 })
		def("hold", func() { c.Hold = 3 * time.Second })
		def("req", func() { c.Req = 16 })
		def("resp", func() { c.Resp = 16 })
		// The flows are idle while memory is measured: the daemon must
		// not end them.
		def("flowtimeout", func() { c.FlowTimeout = 10 * time.Minute })
	default:
		def("flowtimeout", func() { c.FlowTimeout = time.Second })
	}
	if c.Mode == Bulk {
		// The bulk server is a sink.
		c.Req, c.Resp = 0, 0
	}
	return c, c.Validate()
}

// Validate checks the settings without side effects.
func (c *Config) Validate() error {
	switch {
	case c.Runs < 1 || c.Runs > maxRuns:
		return fmt.Errorf("-runs must be within 1..%d", maxRuns)
	case c.Rate < 1 || c.Rate > maxRate:
		return fmt.Errorf("-rate must be within 1..%d", maxRate)
	case c.Count < 1 || c.Count > maxCount:
		return fmt.Errorf("-count must be within 1..%d (ephemeral ports)", maxCount)
	case c.Hold < 0 || c.Hold > maxDuration:
		return fmt.Errorf("-hold must be within 0..%v", maxDuration)
	case c.Req < 0 || c.Resp < 0:
		return errors.New("-req and -resp must not be negative")
	case c.Streams < 1 || c.Streams > maxStreams:
		return fmt.Errorf("-streams must be within 1..%d", maxStreams)
	case c.Duration <= 0 || c.Duration > maxDuration:
		return fmt.Errorf("-duration must be within 0..%v", maxDuration)
	case c.Pace < 0:
		return errors.New("-pace must not be negative")
	case c.FlowTimeout <= 0:
		return errors.New("-flowtimeout must be positive")
	case c.Settle < 0 || c.Settle > time.Minute:
		return errors.New("-settle must be within 0..1m")
	case c.IdleInterfaces < 0 || c.IdleInterfaces > 500:
		return errors.New("-idleinterfaces must be within 0..500")
	}
	return nil
}

// Summary describes the load in one line.
func (c *Config) Summary() string {
	ip := "IPv4"
	if c.IPv6 {
		ip = "IPv6"
	}
	off, _ := c.Offloads.MarshalText()
	var load string
	switch c.Mode {
	case Churn:
		load = fmt.Sprintf("%d conn/s x %d, req %d B, resp %d B, held %v", c.Rate, c.Count, c.Req, c.Resp, c.Hold)
	case Bulk:
		pace := "unpaced"
		if c.Pace > 0 {
			pace = fmt.Sprintf("paced at %d B/s each", c.Pace)
		}
		load = fmt.Sprintf("%d streams for %v, %s", c.Streams, c.Duration, pace)
	case Concurrent:
		load = fmt.Sprintf("%d open flows (opened at %d/s, req %d B, resp %d B)", c.Count, c.Rate, c.Req, c.Resp)
	}
	ifs := "-interface"
	if c.AllInterfaces {
		ifs = "every interface"
	}
	if c.IdleInterfaces > 0 {
		ifs += fmt.Sprintf(", %d idle veth pairs", c.IdleInterfaces)
	}
	return fmt.Sprintf("%s: %s; %s, offloads %s, source %s, daemon on %s, -flowtimeout=%v %s; %d runs",
		c.Mode, load, ip, off, c.Source, ifs, c.FlowTimeout, strings.Join(c.DaemonFlags, " "), c.Runs)
}
