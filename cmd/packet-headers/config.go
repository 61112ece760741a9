package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/m-lab/go/flagx"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/capture"
	"github.com/m-lab/packet-headers/demuxer"
	"github.com/m-lab/packet-headers/kernelsource"
	"github.com/m-lab/packet-headers/saver"
)

// Config is every setting of the daemon, filled from flags and environment
// variables.
type Config struct {
	AnonymizeIP     anonymize.Method
	CaptureDuration time.Duration
	DataDir         string
	FlowTimeout     time.Duration
	Interfaces      flagx.StringArray
	MaxHeaderSize   int
	MaxIdleRAM      ByteSize
	MaxHeap         ByteSize
	MaxFlows        int
	MaxPending      int
	GzipLevel       int
	PromListen      string
	SigtermWait     time.Duration
	Stream          bool
	Fsync           bool
	EventSocket     string
	UUIDWait        time.Duration
	CaptureBuffer   ByteSize
	UUIDPrefixFile  string
	PollInterval    time.Duration
	LogLevel        string
	Version         bool
}

// newFlagSet defines every flag on a new FlagSet bound to c. The names,
// defaults and meanings of the original daemon's flags are kept.
func newFlagSet(c *Config, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("packet-headers", flag.ContinueOnError)
	fs.SetOutput(out)
	*c = Config{
		AnonymizeIP:     anonymize.None,
		CaptureDuration: 30 * time.Second,
		DataDir:         ".",
		FlowTimeout:     30 * time.Second,
		MaxHeaderSize:   256,
		MaxIdleRAM:      3 * GB,
		MaxHeap:         8 * GB,
		PromListen:      ":9990",
		SigtermWait:     time.Second,
		UUIDWait:        5 * time.Second,
		CaptureBuffer:   capture.DefaultBufferSize,
		PollInterval:    10 * time.Millisecond,
		LogLevel:        "info",
		GzipLevel:       saver.DefaultLevel,
		Fsync:           true,
	}
	fs.Var(&c.AnonymizeIP, "anonymize.ip", `Valid values are "none" and "netblock". netblock keeps remote IPv4 addresses to their /24 and IPv6 to their /48 in every file and log, with checksums kept consistent. (default none)`)
	fs.DurationVar(&c.CaptureDuration, "captureduration", c.CaptureDuration, "Only save the first captureduration of each flow, to prevent long-lived flows from spamming the hard drive.")
	fs.StringVar(&c.DataDir, "datadir", c.DataDir, "The directory to which data is written, as <datadir>/YYYY/MM/DD/<UUID>.pcap.gz. A relative path is relative to the working directory.")
	fs.DurationVar(&c.FlowTimeout, "flowtimeout", c.FlowTimeout, "Once there have been no packets for a flow for at least flowtimeout, the flow can be assumed to be closed.")
	fs.Var(&c.Interfaces, "interface", "The interface on which to capture traffic. May be repeated, or comma-separated. If unset, will capture on all available interfaces that are up (except loopback), including ones that appear later.")
	fs.IntVar(&c.MaxHeaderSize, "maxheadersize", c.MaxHeaderSize, "The maximum size of packet headers allowed. A lower value allows the pcap process to be less wasteful but risks more esoteric IPv6 headers (which can theoretically be up to the full size of the packet but in practice seem to be under 128) getting truncated.")
	fs.Var(&c.MaxIdleRAM, "maxidleram", "How much idle RAM we should tolerate before we try and forcibly return it to the OS.")
	fs.Var(&c.MaxHeap, "maxheap", "The Go runtime's memory limit (debug.SetMemoryLimit), as the original's; besides, while the Go heap exceeds it, new flows are not saved until it shrinks again. 0 means no limit.")
	fs.IntVar(&c.MaxFlows, "maxflows", 0, "The maximum number of concurrent flows tracked. When reached, new flows are ignored (and counted). 0 means no limit.")
	fs.IntVar(&c.MaxPending, "maxpending", demuxer.DefaultMaxPending, "The maximum number of flows waiting for their UUID. Beyond it the oldest is dropped (and counted), so a SYN flood cannot exhaust memory or crowd out real flows.")
	fs.IntVar(&c.GzipLevel, "gziplevel", c.GzipLevel, "The gzip compression level of the files, 1 (fastest) to 9 (smallest). Level 5 makes files about 10% smaller than 1 for about twice the CPU.")
	fs.StringVar(&c.PromListen, "prometheusx.listen-address", c.PromListen, "The address on which Prometheus metrics are served at /metrics.")
	fs.DurationVar(&c.SigtermWait, "sigtermwait", c.SigtermWait, "How long should the daemon hang around before exiting after receiving a SIGTERM.")
	fs.BoolVar(&c.Stream, "stream", false, "Stream results to disk instead of buffering them in RAM.")
	fs.BoolVar(&c.Fsync, "fsync", c.Fsync, "Sync each file to disk before giving it its name, and its directory after, so that a power loss never leaves an empty or partial file under a final name and every file published survives. false saves an fsync of the file and one of its directory per file.")
	fs.StringVar(&c.EventSocket, "tcpinfo.eventsocket", "", "The filename of the unix-domain socket on which events are served. If unset, UUIDs come from the kernel directly (standalone mode).")
	fs.DurationVar(&c.UUIDWait, "uuidwaitduration", c.UUIDWait, "Wait up to uuidwaitduration for each flow before either assigning a UUID or discarding all future packets. This prevents buffering unsaveable packets.")
	fs.Var(&c.CaptureBuffer, "capture.buffersize", "The kernel capture ring per interface. A larger ring rides out longer bursts without dropping packets.")
	fs.StringVar(&c.UUIDPrefixFile, "uuid-prefix-file", "", "The file holding the UUID prefix for sockets created in this network namespace (standalone mode; as tcp-info's flag of the same name).")
	fs.DurationVar(&c.PollInterval, "uuidsource.pollinterval", c.PollInterval, "How often the built-in UUID source polls the kernel for new sockets while a captured flow waits for its UUID (standalone mode).")
	fs.StringVar(&c.LogLevel, "log.level", c.LogLevel, "The least important log level printed: debug, info, warn or error.")
	fs.BoolVar(&c.Version, "version", false, "Print the version and the commit it was built from, and exit.")
	return fs
}

// parseConfig fills a Config from the command line, then from environment
// variables (named like the flag, upper case, non-alphanumerics as _) for
// the flags the command line did not set.
func parseConfig(args []string, out io.Writer, env func(string) (string, bool)) (*Config, error) {
	c := new(Config)
	fs := newFlagSet(c, out)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if err := argsFromEnv(fs, env); err != nil {
		return nil, err
	}
	if c.Version {
		return c, nil
	}
	if err := c.Validate(); err != nil {
		return c, err
	}
	return c, c.checkPrefixFile()
}

// checkPrefixFile refuses, in standalone mode, a -uuid-prefix-file whose
// prefix would make unsafe file names (kernelsource.CheckPrefix: a slash, a
// trailing newline, a leading dot...), before anything starts. Beside
// tcp-info the file is not read: tcp-info names the flows.
func (c *Config) checkPrefixFile() error {
	if c.EventSocket != "" || c.UUIDPrefixFile == "" {
		return nil
	}
	if _, err := kernelsource.ReadPrefix(c.UUIDPrefixFile); err != nil {
		return fmt.Errorf("-uuid-prefix-file=%s: %w", c.UUIDPrefixFile, err)
	}
	return nil
}

// argsFromEnv sets each flag not given on the command line from its
// environment variable.
func argsFromEnv(fs *flag.FlagSet, lookupEnv func(string) (string, bool)) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		env := flagx.MakeShellVariableName(f.Name)
		v, ok := lookupEnv(env)
		if !ok || set[f.Name] {
			return
		}
		if err := f.Value.Set(v); err != nil {
			errs = append(errs, fmt.Errorf("environment %s=%q (for -%s): %w", env, v, f.Name, err))
		}
	})
	return errors.Join(errs...)
}

// Validate checks the settings for values the daemon cannot run with. It
// does not touch the system.
func (c *Config) Validate() error {
	var errs []error
	positive := func(name string, d time.Duration) {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("-%s=%v: must be positive", name, d))
		}
	}
	positive("captureduration", c.CaptureDuration)
	positive("flowtimeout", c.FlowTimeout)
	positive("uuidwaitduration", c.UUIDWait)
	positive("uuidsource.pollinterval", c.PollInterval)
	if c.SigtermWait < 0 {
		errs = append(errs, fmt.Errorf("-sigtermwait=%v: must not be negative", c.SigtermWait))
	}
	if c.CaptureDuration > 0 && c.UUIDWait > 0 && c.CaptureDuration <= c.UUIDWait {
		errs = append(errs, fmt.Errorf("-captureduration=%v must be longer than -uuidwaitduration=%v", c.CaptureDuration, c.UUIDWait))
	}
	// A TCP packet's headers: 14 Ethernet + 20 IPv4 + 20 TCP at the least.
	if c.MaxHeaderSize < 54 || c.MaxHeaderSize > 65535 {
		errs = append(errs, fmt.Errorf("-maxheadersize=%d: must be between 54 and 65535", c.MaxHeaderSize))
	}
	if c.GzipLevel < 1 || c.GzipLevel > 9 {
		errs = append(errs, fmt.Errorf("-gziplevel=%d: must be between 1 and 9", c.GzipLevel))
	}
	if c.MaxPending <= 0 {
		errs = append(errs, fmt.Errorf("-maxpending=%d: must be positive", c.MaxPending))
	}
	if c.MaxFlows < 0 {
		errs = append(errs, fmt.Errorf("-maxflows=%d: must not be negative", c.MaxFlows))
	}
	if c.CaptureBuffer < 64<<10 {
		errs = append(errs, fmt.Errorf("-capture.buffersize=%v: must be at least 64KiB", c.CaptureBuffer))
	}
	if c.DataDir == "" {
		errs = append(errs, errors.New("-datadir: must not be empty"))
	}
	for _, i := range c.Interfaces {
		if i == "" {
			errs = append(errs, errors.New("-interface: empty interface name"))
		}
	}
	if _, err := parseLevel(c.LogLevel); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// ByteSize is a flag value for a size in bytes: a number with an optional
// unit, K, M, G (powers of 1000, as the original's flags) or KiB, MiB, GiB,
// with an optional B ("3GB", "1500MB", "64MiB", "0").
type ByteSize int64

// Units of ByteSize.
const (
	KB  ByteSize = 1000
	MB           = 1000 * KB
	GB           = 1000 * MB
	KiB ByteSize = 1 << 10
	MiB          = 1 << 20
	GiB          = 1 << 30
)

func (b ByteSize) String() string {
	for _, u := range []struct {
		n    ByteSize
		name string
	}{{GiB, "GiB"}, {GB, "GB"}, {MiB, "MiB"}, {MB, "MB"}, {KiB, "KiB"}, {KB, "KB"}} {
		if b != 0 && b%u.n == 0 {
			return strconv.FormatInt(int64(b/u.n), 10) + u.name
		}
	}
	return strconv.FormatInt(int64(b), 10) + "B"
}

// Set parses a size.
func (b *ByteSize) Set(s string) error {
	num := strings.TrimRight(s, "KMGiB")
	unit := strings.TrimSuffix(s[len(num):], "B")
	mult := map[string]ByteSize{"": 1, "K": KB, "M": MB, "G": GB, "Ki": KiB, "Mi": MiB, "Gi": GiB}[unit]
	n, err := strconv.ParseUint(num, 10, 63)
	if err != nil || mult == 0 || (unit == "" && s != num && !strings.HasSuffix(s, "B")) {
		return fmt.Errorf("invalid size %q (want a number with an optional unit: K, M, G, KiB, MiB, GiB)", s)
	}
	if n > uint64(math.MaxInt64/int64(mult)) {
		return fmt.Errorf("size %q is too large", s)
	}
	*b = ByteSize(n) * mult
	return nil
}
