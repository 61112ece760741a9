package main

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestVersionFlag(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(t.Context(), []string{"-version"}, noEnv, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	if got := stdout.String(); !strings.HasPrefix(got, "packet-headers ") || !strings.Contains(got, "(commit ") {
		t.Errorf("-version printed %q", got)
	}
}

func TestRegisterCommit(t *testing.T) {
	for _, tt := range []struct {
		commit string
		want   string
	}{
		{"abc1234", `git_short_commit{commit="abc1234"} 1.80097588e+08`},
		{"unknown", `git_short_commit{commit="unknown"} 0`},
	} {
		reg := prometheus.NewRegistry()
		if err := registerCommit(reg, tt.commit); err != nil {
			t.Fatal(err)
		}
		if got := gather(t, reg); !strings.Contains(got, tt.want) {
			t.Errorf("commit %s: metrics lack %q:\n%s", tt.commit, tt.want, got)
		}
	}
}

func gather(t *testing.T, g prometheus.Gatherer) string {
	t.Helper()
	h := httptest.NewRecorder()
	promHandler(g).ServeHTTP(h, httptest.NewRequest("GET", "/metrics", nil))
	return h.Body.String()
}

// TestMetricsEndpoint: the metrics server has the original's extras (pprof,
// git_short_commit) and -maxheap is the runtime's memory limit.
func TestMetricsEndpoint(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to capture")
	}
	old := debug.SetMemoryLimit(-1)
	defer debug.SetMemoryLimit(old)
	cfg, err := parseConfig([]string{"-datadir=" + t.TempDir(), "-interface=lo", "-prometheusx.listen-address=127.0.0.1:0", "-maxheap=1GB", "-tcpinfo.eventsocket=" + filepath.Join(t.TempDir(), "none.sock")}, io.Discard, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	d, err := newDaemon(t.Context(), cfg, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		d.listener.Close()
		d.captures.Close()
	}()
	srv := httptest.NewServer(d.mux())
	defer srv.Close()
	get := func(path string) string {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d %v", path, resp.StatusCode, err)
		}
		return string(b)
	}
	m := get("/metrics")
	for _, want := range []string{"go_gc_gomemlimit_bytes 1e+09", "git_short_commit{commit=", "pcap_saver_starts_total"} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if p := get("/debug/pprof/"); !strings.Contains(p, "goroutine") {
		t.Error("/debug/pprof/ lists no profile")
	}
}

func TestSDNotify(t *testing.T) {
	if err := sdNotify("", "READY=1"); err != nil {
		t.Errorf("no socket: %v", err)
	}
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := sdNotify(path, "READY=1"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != "READY=1" {
		t.Errorf("read %q, %v", buf[:n], err)
	}
	if err := sdNotify(filepath.Join(t.TempDir(), "absent"), "READY=1"); err == nil {
		t.Error("no error for a missing socket")
	}
}
