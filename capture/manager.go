package capture

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/m-lab/packet-headers/flow"
)

// DefaultRescan is how often the Manager looks for new interfaces and
// changed addresses.
const DefaultRescan = 2 * time.Second

// Manager runs one capture per interface: the named ones, or every interface
// that is up (except loopback: tcp-info never names loopback flows, so their
// packets could never be saved). It picks up interfaces that appear, lets a
// capture whose interface disappears end alone, and keeps each capture's
// filter in step with the host's addresses.
type Manager struct {
	cfg     *Config
	names   []string
	out     chan<- *flow.Batch
	onAddrs func([]netip.Addr)
	// Rescan is how often interfaces and addresses are checked.
	Rescan time.Duration

	// base is the parent context of every capture; Run cancels it.
	base   context.Context
	cancel context.CancelFunc

	mu     sync.Mutex
	active map[string]*running
	failed map[string]bool // interfaces whose last open failed, to log once
	addrs  []netip.Addr
	filter string
	wg     sync.WaitGroup
}

type running struct {
	c      *Interface
	cancel context.CancelFunc
}

// NewManager creates a manager that captures on names (all interfaces that
// are up when names is empty) into out. onAddrs, if not nil, is called with
// the host's addresses at start and whenever they change.
func NewManager(cfg *Config, names []string, out chan<- *flow.Batch, onAddrs func([]netip.Addr)) *Manager {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	base, cancel := context.WithCancel(context.Background())
	return &Manager{
		base:    base,
		cancel:  cancel,
		cfg:     cfg,
		names:   names,
		out:     out,
		onAddrs: onAddrs,
		Rescan:  DefaultRescan,
		active:  map[string]*running{},
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

// targets lists the interfaces to capture on now.
func (m *Manager) targets() ([]string, error) {
	if len(m.names) > 0 {
		return m.names, nil
	}
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	var names []string
	for _, i := range ifs {
		if i.Flags&net.FlagUp != 0 && i.Flags&net.FlagLoopback == 0 {
			names = append(names, i.Name)
		}
	}
	return names, nil
}

// Start opens the first captures. With named interfaces, failing to open
// any of them is an error; otherwise failures are logged and retried. The
// captures run until Run's context is done.
func (m *Manager) Start() error {
	return m.scan(len(m.names) > 0)
}

// Run keeps the captures going until ctx is done, then stops them all and
// returns once every capture goroutine has ended (and sent what it read).
func (m *Manager) Run(ctx context.Context) {
	t := time.NewTicker(m.Rescan)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			m.cancel()
			m.wg.Wait()
			return
		case <-t.C:
			if err := m.scan(false); err != nil {
				m.cfg.Log.Warn("rescan interfaces", "err", err)
			}
		}
	}
}

// Active returns the names of the interfaces being captured.
func (m *Manager) Active() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var names []string
	for n := range m.active {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

func (m *Manager) scan(strict bool) error {
	addrs, err := LocalAddrs()
	if err != nil {
		return err
	}
	names, err := m.targets()
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if !slices.Equal(addrs, m.addrs) || m.filter == "" {
		m.addrs = addrs
		m.filter = Filter(addrs)
		if m.onAddrs != nil {
			m.onAddrs(addrs)
		}
		for _, r := range m.active {
			if err := r.c.SetFilter(m.filter); err != nil {
				m.cfg.Log.Warn("update filter", "err", err)
			}
		}
	}
	for _, name := range names {
		if _, ok := m.active[name]; ok || m.base.Err() != nil {
			continue
		}
		c, err := Open(name, m.filter, m.cfg)
		if err != nil {
			if strict {
				return err
			}
			if !m.failed[name] {
				m.cfg.Log.Warn("cannot capture; will retry", "interface", name, "err", err)
				m.failed[name] = true
			}
			continue
		}
		delete(m.failed, name)
		cctx, cancel := context.WithCancel(m.base)
		r := &running{c: c, cancel: cancel}
		m.active[name] = r
		m.cfg.Log.Info("capturing", "interface", name, "filter", m.filter)
		m.wg.Go(func() {
			err := c.Run(cctx, m.out)
			cancel()
			m.mu.Lock()
			if m.active[name] == r {
				delete(m.active, name)
			}
			m.mu.Unlock()
			if err != nil {
				m.cfg.Log.Warn("capture ended", "interface", name, "err", err)
			}
		})
	}
	return nil
}
