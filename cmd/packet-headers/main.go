// Command packet-headers records the packet headers of every TCP flow of the
// host into one pcap file per flow, named by the flow's UUID.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/capture"
	"github.com/m-lab/packet-headers/demuxer"
	"github.com/m-lab/packet-headers/flow"
	"github.com/m-lab/packet-headers/kernelsource"
	phmetrics "github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/saver"
	"github.com/m-lab/packet-headers/tcpeventsocket"
)

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.LookupEnv, os.Stdout, os.Stderr))
}

// run is the daemon. It returns the process exit code: 0 after a clean
// shutdown, 1 on a runtime failure, 2 on bad flags or settings. env looks up
// environment variables (os.LookupEnv).
func run(ctx context.Context, args []string, env func(string) (string, bool), stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "inspect" {
		return runInspect(args[1:], stdout, stderr)
	}
	cfg, err := parseConfig(args, io.Discard, env)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(stdout, "Usage of packet-headers (packet-headers inspect -help: read the files' capture records):")
		fs := newFlagSet(new(Config), stdout)
		fs.PrintDefaults()
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "packet-headers: %v\n", oneLine(err))
		return 2
	}
	if cfg.Version {
		fmt.Fprintln(stdout, versionLine())
		return 0
	}
	level, _ := parseLevel(cfg.LogLevel)
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	d, err := newDaemon(ctx, cfg, log, prometheus.NewRegistry())
	if err != nil {
		fmt.Fprintf(stderr, "packet-headers: %v\n", oneLine(err))
		return 2
	}
	d.notifySocket, _ = env("NOTIFY_SOCKET")
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := d.run(ctx); err != nil {
		log.Error("exiting", "err", err)
		return 1
	}
	return 0
}

// oneLine joins the lines of a (possibly joined) error.
func oneLine(err error) string {
	var s []byte
	for i, r := range err.Error() {
		if r == '\n' {
			if i > 0 {
				s = append(s, "; "...)
			}
			continue
		}
		s = append(s, string(r)...)
	}
	return string(s)
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("-log.level=%s: want debug, info, warn or error", s)
	}
	return l, nil
}

// daemon is a configured, not yet running packet-headers.
type daemon struct {
	cfg      *Config
	log      *slog.Logger
	reg      *prometheus.Registry
	m        *phmetrics.Metrics
	anon     *anonymize.Anonymizer
	listener net.Listener
	dataDir  string
	captures *capture.Manager
	demux    *demuxer.Demuxer
	packets  chan *flow.Batch
	events   chan flow.Named
	source   uuidSource
	// notifySocket is systemd's NOTIFY_SOCKET, or empty.
	notifySocket string
}

// uuidSource tells the demuxer the UUIDs of flows until ctx is done.
type uuidSource interface {
	Run(ctx context.Context) error
}

// newDaemon checks everything that can be checked before starting (the
// interfaces exist and can be captured on, the data directory can be
// written, the metrics address is free) so that a bad setting is one clear
// error at start.
func newDaemon(ctx context.Context, cfg *Config, log *slog.Logger, reg *prometheus.Registry) (*daemon, error) {
	d := &daemon{cfg: cfg, log: log, reg: reg}
	if err := capture.CheckInterfaces(cfg.Interfaces); err != nil {
		return nil, err
	}
	// A relative -datadir is relative to the working directory at start,
	// once (the original applied it twice, writing to data/data/...).
	dir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("-datadir=%s: %w", cfg.DataDir, err)
	}
	if err := saver.CheckDir(dir); err != nil {
		return nil, fmt.Errorf("-datadir=%s: cannot write files there: %w", cfg.DataDir, err)
	}
	d.dataDir = dir

	if cfg.MaxHeap > 0 {
		// As the original: the heap limit is the runtime's memory limit
		// (exported as go_gc_gomemlimit_bytes).
		debug.SetMemoryLimit(int64(min(uint64(cfg.MaxHeap), math.MaxInt64)))
	}
	d.m = phmetrics.New(reg)
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if err := registerCommit(reg, commit()); err != nil {
		return nil, err
	}

	local, err := capture.LocalAddrs()
	if err != nil {
		return nil, err
	}
	d.anon = anonymize.New(cfg.AnonymizeIP, local)
	var anon saver.Anonymizer
	if cfg.AnonymizeIP != anonymize.None {
		anon = d.anon
	}
	d.packets = make(chan *flow.Batch, 256)
	d.events = make(chan flow.Named, 1024)
	capCfg := &capture.Config{
		Snaplen:    cfg.MaxHeaderSize,
		BufferSize: int(cfg.CaptureBuffer),
		Timeout:    capture.DefaultTimeout,
		Metrics:    d.m,
		Log:        log,
	}
	d.demux = demuxer.New(demuxer.Config{
		FlowTimeout: cfg.FlowTimeout,
		UUIDWait:    cfg.UUIDWait,
		MaxFlows:    cfg.MaxFlows,
		MaxPending:  cfg.MaxPending,
		MaxHeap:     uint64(cfg.MaxHeap),
		Savers:      saver.NewPool(*saverConfig(cfg, dir, anon, capCfg, d.m, log)),
		Metrics:     d.m,
		Log:         log,
		LogKey:      d.logKey,
	})
	d.source, err = d.newUUIDSource()
	if err != nil {
		return nil, err
	}
	d.listener, err = net.Listen("tcp", cfg.PromListen)
	if err != nil {
		return nil, fmt.Errorf("-prometheusx.listen-address=%s: %w", cfg.PromListen, err)
	}
	d.captures = capture.NewManager(capCfg, cfg.Interfaces, d.packets, d.anon.SetLocal)
	if err := d.captures.Start(); err != nil {
		d.listener.Close()
		d.captures.Close()
		if len(cfg.Interfaces) > 0 {
			return nil, fmt.Errorf("-interface: %w", err)
		}
		return nil, fmt.Errorf("capture: %w", err)
	}
	// Said once everything is set up, so that a daemon that cannot start
	// says only why.
	if src, ok := d.source.(*kernelsource.Source); ok {
		log.Info("standalone: UUIDs from the kernel", "prefix", src.Prefix(), "destroy_notifications", src.NotifiesDestroy())
	}
	return d, nil
}

func (d *daemon) newUUIDSource() (uuidSource, error) {
	if d.cfg.EventSocket != "" {
		c := tcpeventsocket.New(d.cfg.EventSocket, tcpeventsocket.Opens(d.events), d.m, d.log)
		c.SkipClose = true // flows end by going idle or by -captureduration
		return c, nil
	}
	src, err := kernelsource.New(kernelsource.Config{
		PrefixFile: d.cfg.UUIDPrefixFile,
		Interval:   d.cfg.PollInterval,
		Metrics:    d.m,
		Log:        d.log,
		// Dump the sockets only while a captured flow waits for its
		// UUID.
		Pending: d.demux,
	}, d.events)
	if err != nil {
		return nil, fmt.Errorf("-uuid-prefix-file=%s: %w", d.cfg.UUIDPrefixFile, err)
	}
	return src, nil
}

// logKey formats a flow for logs, anonymized like the files.
func (d *daemon) logKey(k flow.Key) string {
	a, b := k.Endpoints()
	a = netip.AddrPortFrom(d.anon.Addr(a.Addr()), a.Port())
	b = netip.AddrPortFrom(d.anon.Addr(b.Addr()), b.Port())
	return a.String() + "<->" + b.String()
}

// run runs the daemon until ctx is done (a signal), then shuts down: it
// waits -sigtermwait while still capturing, stops capturing, and publishes
// every flow that has a UUID before returning.
func (d *daemon) run(ctx context.Context) error {
	srv := &http.Server{
		Handler:           d.mux(),
		ReadHeaderTimeout: 10 * time.Second,
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := srv.Serve(d.listener); !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("metrics server", "err", err)
		}
	})
	d.log.Info("started", "datadir", d.dataDir, "interfaces", d.captures.Active(),
		"eventsocket", d.cfg.EventSocket, "anonymize", d.cfg.AnonymizeIP.String(), "metrics", d.listener.Addr().String(),
		"version", version, "commit", commit())
	if err := sdNotify(d.notifySocket, "READY=1"); err != nil {
		d.log.Warn("tell systemd the daemon is ready", "err", err)
	}

	// Capture and the UUID source go on for -sigtermwait after the signal,
	// so that flows in their last moments still get named and saved.
	runCtx, stopRun := context.WithCancel(context.Background())
	defer stopRun()
	wg.Go(func() {
		<-ctx.Done()
		d.log.Info("signal received; stopping", "sigtermwait", d.cfg.SigtermWait)
		if err := sdNotify(d.notifySocket, "STOPPING=1"); err != nil {
			d.log.Warn("tell systemd the daemon is stopping", "err", err)
		}
		time.Sleep(d.cfg.SigtermWait)
		stopRun()
	})
	srcCtx, stopSource := context.WithCancel(context.Background())
	defer stopSource()
	sourceDone := make(chan struct{})
	go func() {
		defer close(sourceDone)
		if err := d.source.Run(srcCtx); err != nil {
			d.log.Error("UUID source", "err", err)
		}
	}()
	wg.Go(func() { d.releaseIdleRAM(runCtx, idleRAMCheckInterval) })
	demuxDone := make(chan struct{})
	go func() {
		d.demux.Run(d.packets, d.events)
		close(demuxDone)
	}()

	// The shutdown, in order. 1: the captures stop and hand on everything
	// the kernel captured before the stop (Run returns once they have).
	d.captures.Run(runCtx)
	// 2: the UUID source stops, after delivering the UUIDs it has
	// already received, while the demuxer still reads them.
	stopSource()
	<-sourceDone
	// 3: the demuxer applies the UUIDs still waiting, ends every flow and
	// waits for its saver to publish.
	close(d.packets)
	<-demuxDone
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := srv.Shutdown(shutdownCtx)
	wg.Wait()
	d.log.Info("stopped")
	return err
}

func promHandler(g prometheus.Gatherer) http.Handler {
	return promhttp.HandlerFor(g, promhttp.HandlerOpts{})
}

func (d *daemon) mux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promHandler(d.reg))
	handlePprof(mux)
	return mux
}

// idleRAMCheckInterval is how often releaseIdleRAM looks at the idle heap.
const idleRAMCheckInterval = 10 * time.Second

// releaseIdleRAM returns idle heap memory to the OS when there is more than
// -maxidleram of it, as the original did: after a burst of flows the Go
// runtime keeps freed memory for reuse, which looks like a leak to the
// machine's other tenants.
func (d *daemon) releaseIdleRAM(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	sample := []metrics.Sample{{Name: "/memory/classes/heap/free:bytes"}}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			metrics.Read(sample)
			if free := sample[0].Value.Uint64(); free > uint64(d.cfg.MaxIdleRAM) {
				d.log.Info("returning idle memory to the OS", "idle", free)
				debug.FreeOSMemory()
			}
		}
	}
}
