package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/m-lab/packet-headers/internal/nsproc"
	"github.com/m-lab/packet-headers/internal/promscrape"
	"github.com/m-lab/packet-headers/internal/topo"
)

// The UUID prefix of the run, as tcp-info reads it from -uuid-prefix-file
// (<hostname>_<boot time> in production).
const uuidPrefix = "phbench_1700000000"

// Fixed ports are safe: every run has namespaces of its own.
const (
	serverPort  = "9000"
	daemonProm  = "127.0.0.1:9990"
	tcpinfoProm = "127.0.0.1:9992"
)

// run is one run in progress: its directory, namespaces and processes.
type runState struct {
	cfg  *Config
	bins bins
	tp   *topo.Topology
	dir  string
	// dataDir is the daemon's -datadir.
	dataDir string
	w       io.Writer

	tcpinfo, ref, floor, daemon, server, client *nsproc.Proc
	// metrics is the daemon's /metrics, in the server namespace.
	metrics promscrape.Target

	// Link counters before the load.
	linkBefore, peerBefore linkStats
}

func (s *runState) path(name string) string { return filepath.Join(s.dir, name) }

// runOnce sets up a fresh topology, runs the load once, stops everything
// and compares the daemon's files with the reference. Whatever it started
// is stopped and removed when it returns, on error or interrupt too.
func runOnce(ctx context.Context, cfg *Config, b bins, n int, w io.Writer) (res *Result, err error) {
	var cleanup stack
	defer func() {
		if cerr := cleanup.run(); cerr != nil {
			fmt.Fprintf(os.Stderr, "phbench: run %d cleanup: %v\n", n, cerr)
		}
	}()
	s := &runState{cfg: cfg, bins: b, w: w}
	if s.dir, err = os.MkdirTemp(cfg.WorkDir, "phbench-run-"); err != nil {
		return nil, err
	}
	if cfg.Keep {
		fmt.Fprintf(w, "run %d: keeping %s\n", n, s.dir)
	} else {
		cleanup.push("remove "+s.dir, func() error { return os.RemoveAll(s.dir) })
	}
	if s.tp, err = newTopology(fmt.Sprintf("%dr%d", os.Getpid(), n), bool(cfg.Offloads), &cleanup); err != nil {
		return nil, err
	}
	s.metrics = promscrape.Target{NS: s.tp.ServerNS, Addr: daemonProm}
	if err := s.start(ctx, &cleanup); err != nil {
		return nil, err
	}
	res = &Result{Run: n}
	if err := s.load(ctx, res); err != nil {
		return nil, err
	}
	if err := s.stop(ctx, res); err != nil {
		return nil, err
	}
	if res.Match, err = match(s.path("ref.pcap"), s.path("floor.pcap"), s.path("flows.json"), s.dataDir, uuidPrefix); err != nil {
		return nil, err
	}
	// The daemon has stopped and its files are counted: the file system's
	// own cost per file, on the same directory.
	if res.PublishFloor, err = measurePublishFloor(s.dataDir); err != nil {
		return nil, fmt.Errorf("publish floor: %w", err)
	}
	summaryf(w, "run %d: %d flows, %d named, %d files, %d complete; %d reference packets; daemon %.2fs CPU, VmHWM %d MB; floor %.2fs CPU; load average %.2f",
		n, res.Match.Flows, int(res.Named), res.Match.Files, res.Match.Complete, res.Match.RefAllPacket,
		res.DaemonCPU, res.PeakRSSKB/1024, res.FloorCPU, res.LoadEnd1)
	if f := res.PublishFloor; f != nil {
		summaryf(w, "run %d: publish floor, %d files of %d B: %.1f µs CPU per file without fsync, %.1f µs with (wall %.1f, %.1f µs)",
			n, f.Files, f.FileBytes, f.NoSyncCPU, f.SyncCPU, f.NoSyncWall, f.SyncWall)
	}
	return res, nil
}

// start starts tcp-info, both tcpdumps, the daemon and the load's server,
// each once the previous is ready.
func (s *runState) start(ctx context.Context, cleanup *stack) error {
	cfg, tp := s.cfg, s.tp
	if err := os.WriteFile(s.path("prefix"), []byte(uuidPrefix), 0o644); err != nil {
		return err
	}
	var err error
	if s.cfg.DataDir == "" {
		s.dataDir = s.path("data")
		if err := os.Mkdir(s.dataDir, 0o755); err != nil {
			return err
		}
	} else {
		if s.dataDir, err = os.MkdirTemp(s.cfg.DataDir, "phbench-data-"); err != nil {
			return err
		}
		if s.cfg.Keep {
			fmt.Fprintf(s.w, "  keeping the daemon's files in %s\n", s.dataDir)
		} else {
			cleanup.push("remove "+s.dataDir, func() error { return os.RemoveAll(s.dataDir) })
		}
	}
	sock := s.path("tcpinfo.sock")
	if cfg.Source == TCPInfo {
		// tcp-info archives every connection through a zstd process of
		// its own: 10,000 concurrent flows would be 10,000 processes
		// (about 2.5 MB each, and a third of this host's pid_max). The
		// benchmark measures the daemon, so tcp-info runs with no zstd on
		// its PATH: it logs one error per connection, writes empty
		// archives, and its eventsocket is unaffected.
		for _, d := range []string{"tcpinfo", "nozstd"} {
			if err := os.Mkdir(s.path(d), 0o755); err != nil {
				return err
			}
		}
		s.tcpinfo, err = startProcEnv(cleanup, []string{"PATH=" + s.path("nozstd")}, tp.Server, "tcp-info", s.bins.tcpinfo,
			"-tcpinfo.eventsocket="+sock,
			"-output="+s.path("tcpinfo"),
			"-prometheusx.listen-address="+tcpinfoProm,
			"-uuid-prefix-file="+s.path("prefix"))
		if err != nil {
			return err
		}
		if err := s.tcpinfo.WaitFile(ctx, sock, 15*time.Second); err != nil {
			return err
		}
	}
	// The reference: every packet of the load as the client sees it.
	// --immediate-mode: without it tcpdump loses its last ring block on
	// SIGTERM. No -U: a write(2) per packet costs so much CPU that the
	// reference itself dropped 5-25% of a bulk run's packets; tcpdump
	// flushes its file when it exits on SIGTERM, and run checks that the
	// file holds every packet tcpdump says it captured. A 128 MiB ring
	// absorbs the moments tcpdump does not get a CPU.
	s.ref, err = startProc(cleanup, tp.Client, "reference tcpdump", "tcpdump",
		"-i", tp.ClientIf, "-n", "--immediate-mode", "-B", "131072", "-s", "256", "-w", s.path("ref.pcap"), "tcp")
	if err != nil {
		return err
	}
	// The floor: what tcpdump costs to write the same packets on the
	// daemon's interface, in its cheapest configuration.
	s.floor, err = startProc(cleanup, tp.Server, "floor tcpdump", "tcpdump",
		"-i", tp.ServerIf, "-s", "128", "-B", "4096", "-w", s.path("floor.pcap"), "tcp")
	if err != nil {
		return err
	}
	for _, p := range []*nsproc.Proc{s.ref, s.floor} {
		if err := p.WaitOutput(ctx, "listening on", 15*time.Second); err != nil {
			return err
		}
	}
	if err := addIdleInterfaces(tp.Server, cfg.IdleInterfaces); err != nil {
		return err
	}
	var args []string
	if !cfg.AllInterfaces {
		args = append(args, "-interface="+tp.ServerIf)
	}
	args = append(args,
		"-datadir="+s.dataDir,
		"-flowtimeout="+cfg.FlowTimeout.String(),
		// Longer than any run, so that no flow is cut short.
		"-captureduration=1h",
		"-prometheusx.listen-address="+daemonProm,
	)
	if cfg.Source == TCPInfo {
		args = append(args, "-tcpinfo.eventsocket="+sock)
	} else {
		args = append(args, "-uuid-prefix-file="+s.path("prefix"))
	}
	args = append(args, cfg.DaemonFlags...)
	if s.daemon, err = startProc(cleanup, tp.Server, "packet-headers", s.bins.daemon, args...); err != nil {
		return err
	}
	if err := s.daemon.WaitOutput(ctx, "msg=started", 15*time.Second); err != nil {
		return err
	}
	if cfg.Source == TCPInfo {
		if err := s.daemon.WaitOutput(ctx, "connected to eventsocket", 15*time.Second); err != nil {
			return err
		}
	}
	req, resp := cfg.Req, cfg.Resp
	s.server, err = startProc(cleanup, tp.Server, "phload serve", s.bins.load, "serve",
		"-listen="+net.JoinHostPort(topo.ServerV4, serverPort)+","+net.JoinHostPort(topo.ServerV6, serverPort),
		"-req="+strconv.Itoa(req), "-resp="+strconv.Itoa(resp),
		"-maxconns="+strconv.Itoa(cfg.Count+cfg.Streams),
		"-flows="+s.path("flows.json"))
	if err != nil {
		return err
	}
	if err := s.server.WaitOutput(ctx, "ready", 15*time.Second); err != nil {
		return err
	}
	// The metrics endpoint answers before the load starts: a scrape
	// failing later would otherwise lose the run.
	if _, err := s.metrics.Scrape(); err != nil {
		return err
	}
	// Let start-up allocations and the first GC settle before the
	// baseline.
	return sleep(ctx, time.Second)
}

// load runs the client and, in concurrent mode, measures the daemon with
// every flow open.
func (s *runState) load(ctx context.Context, res *Result) error {
	cfg := s.cfg
	addr := net.JoinHostPort(topo.ServerV4, serverPort)
	if cfg.IPv6 {
		addr = net.JoinHostPort(topo.ServerV6, serverPort)
	}
	var err error
	if res.LoadAvg1, err = loadAvg(); err != nil {
		return err
	}
	if s.linkBefore, err = readLinkStats(s.tp.Server, s.tp.ServerIf); err != nil {
		return err
	}
	if s.peerBefore, err = readLinkStats(s.tp.Client, s.tp.ClientIf); err != nil {
		return err
	}
	cpu, err := procCPU(s.daemon.Pid())
	if err != nil {
		return err
	}
	res.DaemonCPU0 = cpu.Seconds()
	if cpu, err = procCPU(s.floor.Pid()); err != nil {
		return err
	}
	res.FloorCPU0 = cpu.Seconds()
	args := []string{cfg.Mode.String(), "-addr=" + addr}
	// How long the client may take before it is declared stuck.
	var limit time.Duration
	switch cfg.Mode {
	case Churn:
		args = append(args, "-rate="+strconv.Itoa(cfg.Rate), "-count="+strconv.Itoa(cfg.Count),
			"-hold="+cfg.Hold.String(), "-req="+strconv.Itoa(cfg.Req), "-resp="+strconv.Itoa(cfg.Resp))
		limit = time.Duration(cfg.Count)*time.Second/time.Duration(cfg.Rate) + cfg.Hold + time.Minute
	case Bulk:
		args = append(args, "-streams="+strconv.Itoa(cfg.Streams), "-duration="+cfg.Duration.String(),
			"-pace="+strconv.FormatInt(cfg.Pace, 10))
		limit = cfg.Duration + time.Minute
	case Concurrent:
		if res.BaseRSSKB, err = procStatusKB(s.daemon.Pid(), "VmRSS"); err != nil {
			return err
		}
		// The client's own bound on holding; phbench normally tells it
		// to close much earlier.
		args = append(args, "-rate="+strconv.Itoa(cfg.Rate), "-count="+strconv.Itoa(cfg.Count),
			"-hold="+(cfg.Hold+5*time.Minute).String(), "-req="+strconv.Itoa(cfg.Req), "-resp="+strconv.Itoa(cfg.Resp))
		limit = 2*time.Duration(cfg.Count)*time.Second/time.Duration(cfg.Rate) + cfg.Hold + 7*time.Minute
	}
	var cleanup stack
	defer func() {
		if err := cleanup.run(); err != nil {
			fmt.Fprintf(os.Stderr, "phbench: %v\n", err)
		}
	}()
	if s.client, err = startProc(&cleanup, s.tp.Client, "phload "+cfg.Mode.String(), s.bins.load, args...); err != nil {
		return err
	}
	if cfg.Mode == Concurrent {
		if err := s.measureOpen(ctx, res); err != nil {
			return err
		}
	}
	if err := s.client.Wait(ctx, limit); err != nil {
		return fmt.Errorf("%w:\n%s", err, s.client.Out.String())
	}
	if err := s.client.Err(); err != nil {
		return fmt.Errorf("%s: %w:\n%s", s.client.Name, err, s.client.Out.String())
	}
	line, ok := s.client.Out.LastLine("result ")
	if !ok {
		return fmt.Errorf("phload printed no result:\n%s", s.client.Out.String())
	}
	res.Load = json.RawMessage(line)
	var lr struct {
		Errors map[string]int `json:"errors"`
	}
	if err := json.Unmarshal(res.Load, &lr); err != nil {
		return fmt.Errorf("phload result %q: %w", line, err)
	}
	for _, n := range lr.Errors {
		res.LoadErrors += n
	}
	return nil
}

// measureOpen waits until the client has opened every connection and the
// daemon has named them, holds, reads the daemon's memory, and tells the
// client to close.
func (s *runState) measureOpen(ctx context.Context, res *Result) error {
	cfg := s.cfg
	if err := s.client.WaitOutput(ctx, "open ", 2*time.Duration(cfg.Count)*time.Second/time.Duration(cfg.Rate)+time.Minute); err != nil {
		return err
	}
	line, _ := s.client.Out.LastLine("open ")
	open, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		return fmt.Errorf("phload: %q: %w", line, err)
	}
	res.OpenFlows = open
	// tcp-info polls every 10 ms, but 10,000 sockets take it a while.
	m, named, err := s.metrics.Wait(ctx, 250*time.Millisecond, time.Minute, func(m promscrape.Samples) bool {
		return m.Sum("pcap_demuxer_uuids_total") >= float64(open)
	})
	if err != nil {
		return err
	}
	if !named {
		summaryf(s.w, "only %v of %d open flows named after a minute; measuring anyway", m.Sum("pcap_demuxer_uuids_total"), open)
	}
	if err := sleep(ctx, cfg.Hold); err != nil {
		return err
	}
	if res.OpenRSSKB, err = procStatusKB(s.daemon.Pid(), "VmRSS"); err != nil {
		return err
	}
	if m, err = s.metrics.Scrape(); err != nil {
		return err
	}
	res.SaversActive = m.Sum("pcap_demuxer_savers_active")
	if _, err := io.WriteString(s.client.Stdin, "close\n"); err != nil {
		return fmt.Errorf("tell phload to close: %w", err)
	}
	return nil
}

// stop reads the daemon's counters and resources once the load has passed,
// then stops every process in an order that loses nothing: the daemon
// first (SIGTERM publishes every flow with a UUID), then the captures,
// then the server (which writes the flows it accepted), then tcp-info.
func (s *runState) stop(ctx context.Context, res *Result) error {
	if err := sleep(ctx, s.cfg.Settle); err != nil {
		return err
	}
	link, err := readLinkStats(s.tp.Server, s.tp.ServerIf)
	if err != nil {
		return err
	}
	peer, err := readLinkStats(s.tp.Client, s.tp.ClientIf)
	if err != nil {
		return err
	}
	res.LinkPackets = int64(link.RX.Packets + link.TX.Packets - s.linkBefore.RX.Packets - s.linkBefore.TX.Packets)
	// A veth counts a packet its peer could not queue as the sender's TX
	// drop; the receiver's RX drops are counted too for completeness.
	res.LinkDrops = int64(link.RX.Dropped + link.TX.Dropped + peer.RX.Dropped + peer.TX.Dropped -
		s.linkBefore.RX.Dropped - s.linkBefore.TX.Dropped - s.peerBefore.RX.Dropped - s.peerBefore.TX.Dropped)
	pid := s.daemon.Pid()
	cpu, err := procCPU(pid)
	if err != nil {
		return err
	}
	res.DaemonCPULive = cpu.Seconds()
	if res.PeakRSSKB, err = procStatusKB(pid, "VmHWM"); err != nil {
		return err
	}
	m, err := s.metrics.Scrape()
	if err != nil {
		return err
	}
	res.Named = m.Sum("pcap_demuxer_uuids_total")
	if s.cfg.Source == TCPInfo {
		res.Opens = m[`pcap_eventsocket_events_total{event="open"}`]
	} else {
		res.Opens = m.Sum("pcap_uuidsource_uuids_issued_total")
	}
	res.CapturePackets = m.Sum("pcap_capture_packets_total")
	res.KernelDrops = m.Sum("pcap_capture_kernel_drops")
	res.IfaceDrops = m.Sum("pcap_capture_interface_drops")
	res.Missed = m.Sum("pcap_missed_packets_total")
	res.Metrics = m.NonZero("pcap_")
	if res.LoadEnd1, err = loadAvg(); err != nil {
		return err
	}

	if err := s.daemon.Stop(syscall.SIGTERM, 2*time.Minute); err != nil {
		return err
	}
	res.DaemonExit = s.daemon.Cmd.ProcessState.ExitCode()
	if res.DaemonExit != 0 {
		return fmt.Errorf("daemon exited %d after SIGTERM:\n%s", res.DaemonExit, s.daemon.Out.String())
	}
	c, maxRSS, _ := s.daemon.Rusage()
	res.DaemonCPU, res.MaxRSSKB = c.Seconds(), maxRSS

	for _, p := range []*nsproc.Proc{s.floor, s.ref} {
		if err := p.Stop(syscall.SIGTERM, 30*time.Second); err != nil {
			return err
		}
	}
	c, _, _ = s.floor.Rusage()
	res.FloorCPU = c.Seconds()
	res.FloorDrops = tcpdumpCount(s.floor.Out.String(), "dropped by kernel")
	res.RefDrops = tcpdumpCount(s.ref.Out.String(), "dropped by kernel")
	res.RefCaptured = tcpdumpCount(s.ref.Out.String(), "captured")

	if err := s.server.Stop(syscall.SIGTERM, 30*time.Second); err != nil {
		return err
	}
	if err := s.server.Err(); err != nil {
		return fmt.Errorf("phload serve: %w:\n%s", err, s.server.Out.String())
	}
	if s.tcpinfo != nil {
		if err := s.tcpinfo.Stop(syscall.SIGTERM, 30*time.Second); err != nil {
			return err
		}
		c, _, _ = s.tcpinfo.Rusage()
		res.TCPInfoCPU = c.Seconds()
	}
	if s.cfg.Keep {
		for _, p := range []*nsproc.Proc{s.daemon, s.tcpinfo, s.ref, s.floor, s.server, s.client} {
			if p == nil {
				continue
			}
			name := strings.ReplaceAll(p.Name, " ", "-") + ".log"
			if err := os.WriteFile(s.path(name), []byte(p.Out.String()), 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}
