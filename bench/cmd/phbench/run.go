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
	tp   *topology
	dir  string
	// dataDir is the daemon's -datadir.
	dataDir string
	w       io.Writer

	tcpinfo, ref, floor, daemon, server, client *proc

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
	summaryf(w, "run %d: %d flows, %d named, %d files, %d complete; %d reference packets; daemon %.2fs CPU, VmHWM %d MB; floor %.2fs CPU; load average %.2f",
		n, res.Match.Flows, int(res.Named), res.Match.Files, res.Match.Complete, res.Match.RefAllPacket,
		res.DaemonCPU, res.PeakRSSKB/1024, res.FloorCPU, res.LoadEnd1)
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
		s.tcpinfo, err = startProcEnv(cleanup, []string{"PATH=" + s.path("nozstd")}, tp.server, "tcp-info", s.bins.tcpinfo,
			"-tcpinfo.eventsocket="+sock,
			"-output="+s.path("tcpinfo"),
			"-prometheusx.listen-address="+tcpinfoProm,
			"-uuid-prefix-file="+s.path("prefix"))
		if err != nil {
			return err
		}
		if err := waitFile(ctx, sock, s.tcpinfo, 15*time.Second); err != nil {
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
	s.ref, err = startProc(cleanup, tp.client, "reference tcpdump", "tcpdump",
		"-i", tp.clientIf, "-n", "--immediate-mode", "-B", "131072", "-s", "256", "-w", s.path("ref.pcap"), "tcp")
	if err != nil {
		return err
	}
	// The floor: what tcpdump costs to write the same packets on the
	// daemon's interface, in its cheapest configuration.
	s.floor, err = startProc(cleanup, tp.server, "floor tcpdump", "tcpdump",
		"-i", tp.serverIf, "-s", "128", "-B", "4096", "-w", s.path("floor.pcap"), "tcp")
	if err != nil {
		return err
	}
	for _, p := range []*proc{s.ref, s.floor} {
		if err := p.waitOutput(ctx, "listening on", 15*time.Second); err != nil {
			return err
		}
	}
	args := []string{
		"-interface=" + tp.serverIf,
		"-datadir=" + s.dataDir,
		"-flowtimeout=" + cfg.FlowTimeout.String(),
		// Longer than any run, so that no flow is cut short.
		"-captureduration=1h",
		"-prometheusx.listen-address=" + daemonProm,
	}
	if cfg.Source == TCPInfo {
		args = append(args, "-tcpinfo.eventsocket="+sock)
	} else {
		args = append(args, "-uuid-prefix-file="+s.path("prefix"))
	}
	args = append(args, cfg.DaemonFlags...)
	if s.daemon, err = startProc(cleanup, tp.server, "packet-headers", s.bins.daemon, args...); err != nil {
		return err
	}
	if err := s.daemon.waitOutput(ctx, "msg=started", 15*time.Second); err != nil {
		return err
	}
	if cfg.Source == TCPInfo {
		if err := s.daemon.waitOutput(ctx, "connected to eventsocket", 15*time.Second); err != nil {
			return err
		}
	}
	req, resp := cfg.Req, cfg.Resp
	s.server, err = startProc(cleanup, tp.server, "phload serve", s.bins.load, "serve",
		"-listen="+net.JoinHostPort(serverV4, serverPort)+","+net.JoinHostPort(serverV6, serverPort),
		"-req="+strconv.Itoa(req), "-resp="+strconv.Itoa(resp),
		"-maxconns="+strconv.Itoa(cfg.Count+cfg.Streams),
		"-flows="+s.path("flows.json"))
	if err != nil {
		return err
	}
	if err := s.server.waitOutput(ctx, "ready", 15*time.Second); err != nil {
		return err
	}
	// The metrics endpoint answers before the load starts: a scrape
	// failing later would otherwise lose the run.
	if _, err := scrape(tp.serverNS, daemonProm); err != nil {
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
	addr := net.JoinHostPort(serverV4, serverPort)
	if cfg.IPv6 {
		addr = net.JoinHostPort(serverV6, serverPort)
	}
	var err error
	if res.LoadAvg1, err = loadAvg(); err != nil {
		return err
	}
	if s.linkBefore, err = readLinkStats(s.tp.server, s.tp.serverIf); err != nil {
		return err
	}
	if s.peerBefore, err = readLinkStats(s.tp.client, s.tp.clientIf); err != nil {
		return err
	}
	cpu, err := procCPU(s.daemon.cmd.Process.Pid)
	if err != nil {
		return err
	}
	res.DaemonCPU0 = cpu.Seconds()
	if cpu, err = procCPU(s.floor.cmd.Process.Pid); err != nil {
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
		if res.BaseRSSKB, err = procStatusKB(s.daemon.cmd.Process.Pid, "VmRSS"); err != nil {
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
	if s.client, err = startProc(&cleanup, s.tp.client, "phload "+cfg.Mode.String(), s.bins.load, args...); err != nil {
		return err
	}
	if cfg.Mode == Concurrent {
		if err := s.measureOpen(ctx, res); err != nil {
			return err
		}
	}
	if err := s.client.wait(ctx, limit); err != nil {
		return err
	}
	line, ok := s.client.lastLine("result ")
	if !ok {
		return fmt.Errorf("phload printed no result:\n%s", s.client.out.String())
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
	if err := s.client.waitOutput(ctx, "open ", 2*time.Duration(cfg.Count)*time.Second/time.Duration(cfg.Rate)+time.Minute); err != nil {
		return err
	}
	line, _ := s.client.lastLine("open ")
	open, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		return fmt.Errorf("phload: %q: %w", line, err)
	}
	res.OpenFlows = open
	// tcp-info polls every 10 ms, but 10,000 sockets take it a while.
	deadline := time.Now().Add(time.Minute)
	for {
		m, err := scrape(s.tp.serverNS, daemonProm)
		if err != nil {
			return err
		}
		if m.sum("pcap_demuxer_uuids_total") >= float64(open) {
			break
		}
		if time.Now().After(deadline) {
			summaryf(s.w, "only %v of %d open flows named after a minute; measuring anyway", m.sum("pcap_demuxer_uuids_total"), open)
			break
		}
		if err := sleep(ctx, 250*time.Millisecond); err != nil {
			return err
		}
	}
	if err := sleep(ctx, cfg.Hold); err != nil {
		return err
	}
	if res.OpenRSSKB, err = procStatusKB(s.daemon.cmd.Process.Pid, "VmRSS"); err != nil {
		return err
	}
	m, err := scrape(s.tp.serverNS, daemonProm)
	if err != nil {
		return err
	}
	res.SaversActive = m.sum("pcap_demuxer_savers_active")
	if _, err := io.WriteString(s.client.stdin, "close\n"); err != nil {
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
	link, err := readLinkStats(s.tp.server, s.tp.serverIf)
	if err != nil {
		return err
	}
	peer, err := readLinkStats(s.tp.client, s.tp.clientIf)
	if err != nil {
		return err
	}
	res.LinkPackets = int64(link.RX.Packets + link.TX.Packets - s.linkBefore.RX.Packets - s.linkBefore.TX.Packets)
	// A veth counts a packet its peer could not queue as the sender's TX
	// drop; the receiver's RX drops are counted too for completeness.
	res.LinkDrops = int64(link.RX.Dropped + link.TX.Dropped + peer.RX.Dropped + peer.TX.Dropped -
		s.linkBefore.RX.Dropped - s.linkBefore.TX.Dropped - s.peerBefore.RX.Dropped - s.peerBefore.TX.Dropped)
	pid := s.daemon.cmd.Process.Pid
	cpu, err := procCPU(pid)
	if err != nil {
		return err
	}
	res.DaemonCPULive = cpu.Seconds()
	if res.PeakRSSKB, err = procStatusKB(pid, "VmHWM"); err != nil {
		return err
	}
	m, err := scrape(s.tp.serverNS, daemonProm)
	if err != nil {
		return err
	}
	res.Named = m.sum("pcap_demuxer_uuids_total")
	if s.cfg.Source == TCPInfo {
		res.Opens = m.get(`pcap_eventsocket_events_total{event="open"}`)
	} else {
		res.Opens = m.sum("pcap_uuidsource_uuids_issued_total")
	}
	res.CapturePackets = m.sum("pcap_capture_packets_total")
	res.KernelDrops = m.sum("pcap_capture_kernel_drops")
	res.IfaceDrops = m.sum("pcap_capture_interface_drops")
	res.Missed = m.sum("pcap_missed_packets_total")
	res.Metrics = m.pcap()
	if res.LoadEnd1, err = loadAvg(); err != nil {
		return err
	}

	if err := s.daemon.stop(syscall.SIGTERM, 2*time.Minute); err != nil {
		return err
	}
	res.DaemonExit = s.daemon.cmd.ProcessState.ExitCode()
	if res.DaemonExit != 0 {
		return fmt.Errorf("daemon exited %d after SIGTERM:\n%s", res.DaemonExit, s.daemon.out.String())
	}
	c, maxRSS, _ := s.daemon.rusage()
	res.DaemonCPU, res.MaxRSSKB = c.Seconds(), maxRSS

	for _, p := range []*proc{s.floor, s.ref} {
		if err := p.stop(syscall.SIGTERM, 30*time.Second); err != nil {
			return err
		}
	}
	c, _, _ = s.floor.rusage()
	res.FloorCPU = c.Seconds()
	res.FloorDrops = tcpdumpCount(s.floor.out.String(), "dropped by kernel")
	res.RefDrops = tcpdumpCount(s.ref.out.String(), "dropped by kernel")
	res.RefCaptured = tcpdumpCount(s.ref.out.String(), "captured")

	if err := s.server.stop(syscall.SIGTERM, 30*time.Second); err != nil {
		return err
	}
	if s.server.err != nil {
		return fmt.Errorf("phload serve: %w:\n%s", s.server.err, s.server.out.String())
	}
	if s.tcpinfo != nil {
		if err := s.tcpinfo.stop(syscall.SIGTERM, 30*time.Second); err != nil {
			return err
		}
		c, _, _ = s.tcpinfo.rusage()
		res.TCPInfoCPU = c.Seconds()
	}
	if s.cfg.Keep {
		for _, p := range []*proc{s.daemon, s.tcpinfo, s.ref, s.floor, s.server, s.client} {
			if p == nil {
				continue
			}
			name := strings.ReplaceAll(p.name, " ", "-") + ".log"
			if err := os.WriteFile(s.path(name), []byte(p.out.String()), 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}
