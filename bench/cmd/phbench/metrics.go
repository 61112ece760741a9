package main

import (
	"bufio"
	"bytes"
	"fmt"
	"github.com/m-lab/packet-headers/internal/netns"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

// scrape reads the daemon's /metrics inside the server namespace. The
// connection is dialled on a thread switched into the namespace (an
// http.Client would dial from another goroutine, in the orchestrator's own
// namespace, where 127.0.0.1:port is someone else or no one), then HTTP
// runs over it.
func scrape(ns *os.File, addr string) (samples, error) {
	var c net.Conn
	err := netns.Run(ns, func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial metrics %s: %w", addr, err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return nil, err
	}
	if _, err := io.WriteString(c, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n"); err != nil {
		return nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("metrics: %s", resp.Status)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	return parseSamples(body)
}

// samples maps each series of a Prometheus text exposition, as written
// (`name{label="v",...}`), to its value.
type samples map[string]float64

// parseSamples parses the text exposition format well enough for the
// daemon's own output: one sample per line, comments skipped, no
// timestamps. Label values in the daemon's metrics contain no spaces.
func parseSamples(body []byte) (samples, error) {
	s := samples{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			return nil, fmt.Errorf("metrics: malformed line %q", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics: %q: %w", line, err)
		}
		s[line[:i]] = v
	}
	return s, sc.Err()
}

// sum returns the sum of every series of the metric name, whatever its
// labels, and whether there was any.
func (s samples) sum(name string) float64 {
	var t float64
	for k, v := range s {
		if k == name || strings.HasPrefix(k, name+"{") {
			t += v
		}
	}
	return t
}

// get returns one series, e.g. `pcap_eventsocket_events_total{event="open"}`.
func (s samples) get(series string) float64 { return s[series] }

// pcap returns the non-zero pcap_ series, for the JSON report: they explain
// a failed target without a second run.
func (s samples) pcap() map[string]float64 {
	out := map[string]float64{}
	for k, v := range s {
		if strings.HasPrefix(k, "pcap_") && v != 0 && !strings.Contains(k, "_bucket") {
			out[k] = v
		}
	}
	return out
}
