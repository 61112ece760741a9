package main

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"runtime/debug"
	"strconv"

	"github.com/m-lab/go/prometheusx"
	"github.com/prometheus/client_golang/prometheus"
)

// version is the release, set at build time with
// -ldflags "-X main.version=v1.2.3".
var version = "dev"

// commit returns the short commit the binary was built from: M-Lab's
// builds set prometheusx.GitShortCommit with -ldflags, as for the
// original; otherwise Go's build information, if it has it.
func commit() string {
	if c := prometheusx.GitShortCommit; c != "" && c != "No commit specified" {
		return c
	}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	rev, dirty := "", false
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev == "" {
		return "unknown"
	}
	rev = rev[:min(len(rev), 7)]
	if dirty {
		rev += "-dirty"
	}
	return rev
}

// versionLine is what -version prints.
func versionLine() string {
	return fmt.Sprintf("packet-headers %s (commit %s)", version, commit())
}

// registerCommit exports git_short_commit{commit} as m-lab/go's prometheusx
// does: the commit read as a hexadecimal number, 0 if it is not one.
func registerCommit(reg prometheus.Registerer, c string) error {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "git_short_commit",
		Help: "The git commit interpreted as a number.",
	}, []string{"commit"})
	if err := reg.Register(g); err != nil {
		return err
	}
	n, err := strconv.ParseInt(c, 16, 64)
	if err != nil {
		n = 0
	}
	g.WithLabelValues(c).Set(float64(n))
	return nil
}

// handlePprof serves Go's profiles under /debug/pprof/, as prometheusx's
// metrics server does.
func handlePprof(mux *http.ServeMux) {
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
}

// sdNotify sends state ("READY=1", "STOPPING=1") to systemd's notification
// socket at addr (the NOTIFY_SOCKET variable; a leading @ is an abstract
// socket). With no socket (not run by systemd with Type=notify), it does
// nothing.
func sdNotify(addr, state string) error {
	if addr == "" {
		return nil
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("notify systemd: %w", err)
	}
	_, werr := c.Write([]byte(state))
	return errors.Join(werr, c.Close())
}
