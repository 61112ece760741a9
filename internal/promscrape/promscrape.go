// Package promscrape reads a Prometheus /metrics page, possibly from inside
// a network namespace: what the end-to-end tests and the live benchmark
// read of the daemon they run in the namespaces they create.
package promscrape

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/m-lab/packet-headers/internal/netns"
)

// Target is a /metrics endpoint.
type Target struct {
	// NS is the network namespace the endpoint listens in (an open
	// /var/run/netns/NAME file); nil is the caller's own.
	NS *os.File
	// Addr is host:port, e.g. 127.0.0.1:9990.
	Addr string
}

// Body reads the page. The connection is dialled on a thread switched into
// t.NS (an http.Client would dial from another goroutine, in the caller's
// namespace, where 127.0.0.1:port is someone else or no one), then HTTP
// runs over it.
func (t Target) Body() ([]byte, error) {
	var c net.Conn
	dial := func() error {
		var err error
		c, err = net.DialTimeout("tcp", t.Addr, 5*time.Second)
		return err
	}
	var err error
	if t.NS != nil {
		err = netns.Run(t.NS, dial)
	} else {
		err = dial()
	}
	if err != nil {
		return nil, fmt.Errorf("dial metrics %s: %w", t.Addr, err)
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
		return nil, fmt.Errorf("metrics %s: %s", t.Addr, resp.Status)
	}
	return io.ReadAll(resp.Body)
}

// Scrape reads and parses the page.
func (t Target) Scrape() (Samples, error) {
	body, err := t.Body()
	if err != nil {
		return nil, err
	}
	return Parse(body)
}

// Wait scrapes every interval until done returns true for the samples, d
// passes or ctx ends, and returns the last samples and whether done was
// met. It scrapes at least once; a failed scrape ends it with the error.
func (t Target) Wait(ctx context.Context, every, d time.Duration, done func(Samples) bool) (Samples, bool, error) {
	deadline := time.Now().Add(d)
	for {
		s, err := t.Scrape()
		if err != nil {
			return nil, false, err
		}
		if done(s) {
			return s, true, nil
		}
		if time.Now().After(deadline) {
			return s, false, nil
		}
		// Polling a real process's metrics, with a deadline.
		timer := time.NewTimer(every)
		select {
		case <-ctx.Done():
			timer.Stop()
			return s, false, ctx.Err()
		case <-timer.C:
		}
	}
}

// Samples maps each series of a page, as written (`name{label="v",...}`,
// labels in the order the exporter wrote them), to its value.
type Samples map[string]float64

// Parse reads the text exposition format: one sample a line, comments and
// blank lines skipped, a timestamp after the value ignored. Label values may
// hold spaces, braces and escaped quotes.
func Parse(body []byte) (Samples, error) {
	s := Samples{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		end := seriesEnd(line)
		if end < 0 {
			return nil, fmt.Errorf("metrics: malformed line %q", line)
		}
		f := strings.Fields(line[end:])
		if len(f) == 0 || len(f) > 2 {
			return nil, fmt.Errorf("metrics: malformed line %q", line)
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics: %q: %w", line, err)
		}
		s[line[:end]] = v
	}
	return s, sc.Err()
}

// seriesEnd returns the length of the series at the start of line: the name
// and, if there is one, the label set up to its closing brace; -1 if the
// label set does not close.
func seriesEnd(line string) int {
	i := strings.IndexAny(line, "{ \t")
	if i < 0 || line[i] != '{' {
		return i
	}
	quoted := false
	for j := i + 1; j < len(line); j++ {
		switch c := line[j]; {
		case quoted && c == '\\':
			j++ // an escaped character, \" included
		case c == '"':
			quoted = !quoted
		case !quoted && c == '}':
			return j + 1
		}
	}
	return -1
}

// Sum returns the sum of every series of the metric name, whatever its
// labels (0 if there is none).
func (s Samples) Sum(name string) float64 {
	var t float64
	for k, v := range s {
		if k == name || strings.HasPrefix(k, name+"{") {
			t += v
		}
	}
	return t
}

// NonZero returns the series whose names start with prefix and whose value
// is not 0, histogram buckets left out: what explains a failure without a
// second run.
func (s Samples) NonZero(prefix string) map[string]float64 {
	out := map[string]float64{}
	for k, v := range s {
		if strings.HasPrefix(k, prefix) && v != 0 && !strings.Contains(k, "_bucket") {
			out[k] = v
		}
	}
	return out
}
