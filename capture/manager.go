package capture

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/flow"
)

// DefaultRescan is how often the Manager looks for changed interfaces and
// addresses.
const DefaultRescan = 2 * time.Second

// Manager runs the captures: one socket on every interface, or one per
// named interface. It keeps the socket filters in step with the host's
// addresses and its interfaces (bridge and bond ports come and go), reopens
// a named interface that went away when it comes back, and stops them all.
type Manager struct {
	cfg     *Config
	names   []string
	out     chan<- *flow.Batch
	onAddrs func([]netip.Addr)
	// Rescan is how often interfaces and addresses are checked.
	Rescan time.Duration

	mu       sync.Mutex
	active   map[string]*Interface
	failed   map[string]bool // interfaces whose last open failed, to log once
	covered  []string        // interfaces the captures cover
	allAddrs []netip.Addr    // every address of the host
	addrs    []netip.Addr    // those in the filter (filterAddrs)
	exclude  []int
	prog     []unix.SockFilter
	scanned  bool
	stopping bool
	wg       sync.WaitGroup
}

// NewManager creates a manager that captures on names (every interface
// when names is empty) into out. onAddrs, if not nil, is called with the
// host's addresses at start and whenever they change.
func NewManager(cfg *Config, names []string, out chan<- *flow.Batch, onAddrs func([]netip.Addr)) *Manager {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Manager{
		cfg:     cfg,
		names:   names,
		out:     out,
		onAddrs: onAddrs,
		Rescan:  DefaultRescan,
		active:  map[string]*Interface{},
		failed:  map[string]bool{},
	}
}

// LocalAddrs returns the addresses of all the host's interfaces.
func LocalAddrs() ([]netip.Addr, error) {
	ifAddrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("list interface addresses: %w", err)
	}
	var addrs []netip.Addr
	for _, a := range ifAddrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			addrs = append(addrs, p.Addr().Unmap())
		}
	}
	slices.SortFunc(addrs, func(a, b netip.Addr) int { return a.Compare(b) })
	return slices.Compact(addrs), nil
}

// CheckInterfaces returns an error naming the first of names that is not an
// interface of this host.
func CheckInterfaces(names []string) error {
	for _, n := range names {
		if _, err := net.InterfaceByName(n); err != nil {
			return fmt.Errorf("-interface=%s: no such interface", n)
		}
	}
	return nil
}

// link is what the manager needs to know of a network interface.
type link struct {
	index  int
	name   string
	up     bool
	lo     bool
	master int // the bridge or bond this interface is a port of, or 0
}

// links lists the host's interfaces with one netlink dump.
func links() ([]link, error) {
	rib, err := syscall.NetlinkRIB(syscall.RTM_GETLINK, syscall.AF_UNSPEC)
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	msgs, err := syscall.ParseNetlinkMessage(rib)
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	var ls []link
	for i := range msgs {
		m := &msgs[i]
		if m.Header.Type != syscall.RTM_NEWLINK || len(m.Data) < syscall.SizeofIfInfomsg {
			continue
		}
		ifi := (*syscall.IfInfomsg)(unsafe.Pointer(&m.Data[0]))
		attrs, err := syscall.ParseNetlinkRouteAttr(m)
		if err != nil {
			return nil, fmt.Errorf("list interfaces: %w", err)
		}
		l := link{
			index: int(ifi.Index),
			up:    ifi.Flags&syscall.IFF_UP != 0,
			lo:    ifi.Flags&syscall.IFF_LOOPBACK != 0,
		}
		for _, a := range attrs {
			switch a.Attr.Type {
			case syscall.IFLA_IFNAME:
				l.name = string(trimNUL(a.Value))
			case unix.IFLA_MASTER:
				if len(a.Value) >= 4 {
					l.master = int(ne32(a.Value, 0))
				}
			}
		}
		ls = append(ls, l)
	}
	return ls, nil
}

// filterAddrs returns the addresses whose TCP the socket filter keeps:
// every address of the host but loopback and link-local ones, which
// tcp-info never names (nor the standalone source), so that their packets
// could never be saved. On a host with a hundred veths that leaves out a
// hundred IPv6 link-local addresses, nine instructions each per direction,
// and the filter's recompilation whenever one appears.
func filterAddrs(addrs []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range addrs {
		if !a.IsLoopback() && !a.IsLinkLocalUnicast() {
			out = append(out, a)
		}
	}
	return out
}

func trimNUL(b []byte) []byte {
	if i := slices.Index(b, 0); i >= 0 {
		return b[:i]
	}
	return b
}

// Start opens the captures. Failing to open the capture on every
// interface, or any named interface, is an error; so is a lack of
// permission. The captures run until Close.
func (m *Manager) Start() error {
	return m.scan(true)
}

// Run rescans every Rescan until ctx is done, then closes the manager.
func (m *Manager) Run(ctx context.Context) {
	t := time.NewTicker(m.Rescan)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			m.Close()
			return
		case <-t.C:
			if err := m.scan(false); err != nil {
				m.cfg.Log.Warn("rescan interfaces", "err", err)
			}
		}
	}
}

// Close stops every capture and returns once each has drained what the
// kernel captured before the stop into out and ended.
func (m *Manager) Close() {
	m.mu.Lock()
	m.stopping = true
	for _, c := range m.active {
		c.Stop()
	}
	m.mu.Unlock()
	m.wg.Wait()
}

// Active returns the names of the interfaces being captured.
func (m *Manager) Active() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.covered)
}

func (m *Manager) scan(start bool) error {
	addrs, err := LocalAddrs()
	if err != nil {
		return err
	}
	ls, err := links()
	if err != nil {
		return err
	}
	var exclude []int
	var covered []string
	if len(m.names) == 0 {
		for _, l := range ls {
			switch {
			case l.lo || l.master != 0:
				// Loopback flows are never named; a port's packets are
				// also seen on its bridge or bond.
				exclude = append(exclude, l.index)
			case l.up:
				covered = append(covered, l.name)
			}
		}
		slices.Sort(covered)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.stopping {
		return nil
	}
	if !m.scanned || !slices.Equal(addrs, m.allAddrs) {
		if m.onAddrs != nil {
			m.onAddrs(addrs)
		}
		m.allAddrs = addrs
	}
	if faddrs := filterAddrs(addrs); !m.scanned || !slices.Equal(faddrs, m.addrs) || !slices.Equal(exclude, m.exclude) {
		m.scanned = true
		m.addrs, m.exclude = faddrs, exclude
		prog, all := filterProgram(faddrs, exclude, m.cfg.Snaplen)
		if !all {
			m.cfg.Log.Warn("too many addresses for the socket filter; capturing all TCP", "addresses", len(faddrs))
		}
		m.prog = prog
		for _, c := range m.active {
			c.SetFilter(prog)
		}
	}
	if len(m.names) == 0 {
		// The capture on every interface ends only when stopped or
		// when its socket fails; then it is reopened here. It is opened
		// before the interfaces are logged, so that a daemon that cannot
		// capture says only why.
		if _, ok := m.active[AnyInterface]; !ok {
			if err := m.open(AnyInterface); err != nil {
				if start {
					return err
				}
				m.logFailure(AnyInterface, err)
			}
		}
		for _, n := range covered {
			if !slices.Contains(m.covered, n) {
				m.cfg.Log.Info("capturing", "interface", n, "socket", AnyInterface)
			}
		}
		for _, n := range m.covered {
			if !slices.Contains(covered, n) {
				m.cfg.Log.Info("interface gone", "interface", n)
			}
		}
		m.covered = covered
		m.cfg.Metrics.InterfacesCaptured.Set(float64(len(covered)))
		return nil
	}
	present := map[string]bool{}
	for _, l := range ls {
		present[l.name] = true
	}
	for _, name := range m.names {
		if _, ok := m.active[name]; ok {
			continue
		}
		if !present[name] && !start {
			continue // gone; reopened when it is back
		}
		if err := m.open(name); err != nil {
			if start {
				return err
			}
			m.logFailure(name, err)
		}
	}
	m.covered = m.covered[:0]
	for n := range m.active {
		m.covered = append(m.covered, n)
	}
	slices.Sort(m.covered)
	m.cfg.Metrics.InterfacesCaptured.Set(float64(len(m.active)))
	return nil
}

func (m *Manager) logFailure(name string, err error) {
	if !m.failed[name] {
		m.cfg.Log.Warn("cannot capture; will retry", "interface", name, "err", err)
		m.failed[name] = true
	}
}

// open starts the capture named name; m.mu is held.
func (m *Manager) open(name string) error {
	c, err := Open(name, m.prog, m.cfg)
	if err != nil {
		return err
	}
	delete(m.failed, name)
	m.active[name] = c
	if name == AnyInterface {
		m.cfg.Log.Info("capture socket open on every interface", "filter", Filter(m.addrs), "excluded_interfaces", len(m.exclude))
	} else {
		m.cfg.Log.Info("capturing", "interface", name, "filter", Filter(m.addrs))
	}
	m.wg.Go(func() {
		err := c.Run(context.Background(), m.out)
		m.mu.Lock()
		if m.active[name] == c {
			delete(m.active, name)
		}
		m.mu.Unlock()
		if err != nil && !errors.Is(err, context.Canceled) {
			m.cfg.Log.Warn("capture ended", "interface", name, "err", err)
		}
	})
	return nil
}
