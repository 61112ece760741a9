package main

import (
	"math"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestParseStatCPU(t *testing.T) {
	// A command name with a space and a parenthesis, as the kernel allows.
	line := []byte("1234 (we ird) prog) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 8 0 100 0 0")
	got, err := parseStatCPU(line)
	if err != nil {
		t.Fatal(err)
	}
	if want := 3250 * time.Millisecond; got != want {
		t.Errorf("parseStatCPU = %v, want %v", got, want)
	}
	if _, err := parseStatCPU([]byte("1234 (x) S 1")); err == nil {
		t.Error("short line: no error")
	}
}

func TestParseStatusKB(t *testing.T) {
	status := []byte("Name:\tpacket-headers\nVmHWM:\t   51580 kB\nVmRSS:\t   40000 kB\n")
	for _, tc := range []struct {
		field string
		want  int64
	}{{"VmHWM", 51580}, {"VmRSS", 40000}} {
		got, err := parseStatusKB(status, tc.field)
		if err != nil || got != tc.want {
			t.Errorf("%s = %d, %v; want %d", tc.field, got, err, tc.want)
		}
	}
	if _, err := parseStatusKB(status, "VmSwap"); err == nil {
		t.Error("missing field: no error")
	}
}

func TestTCPDumpCount(t *testing.T) {
	out := "tcpdump: listening on vs1, link-type EN10MB\n1992 packets captured\n1992 packets received by filter\n7 packets dropped by kernel\n"
	if got := tcpdumpCount(out, "dropped by kernel"); got != 7 {
		t.Errorf("dropped = %d, want 7", got)
	}
	if got := tcpdumpCount(out, "captured"); got != 1992 {
		t.Errorf("captured = %d, want 1992", got)
	}
	if got := tcpdumpCount("killed", "captured"); got != -1 {
		t.Errorf("no summary = %d, want -1", got)
	}
}

func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want float64
	}{
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{math.NaN(), 5, 1}, 3},
	} {
		if got := median(tc.in); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
	if got := median([]float64{math.NaN()}); !math.IsNaN(got) {
		t.Errorf("median of nothing = %v, want NaN", got)
	}
}

func TestDiff(t *testing.T) {
	r := func(n uint64) record { return record{len: 66, hash: n} }
	// Same packets in another order, one repeated packet missing once, one
	// extra.
	got := []record{r(2), r(1), r(3), r(9)}
	want := []record{r(1), r(2), r(3), r(3)}
	missing, extra := diff(got, want)
	if d := cmp.Diff([]record{r(3)}, missing, cmp.AllowUnexported(record{})); d != "" {
		t.Errorf("missing (-want +got):\n%s", d)
	}
	if d := cmp.Diff([]record{r(9)}, extra, cmp.AllowUnexported(record{})); d != "" {
		t.Errorf("extra (-want +got):\n%s", d)
	}
	if m, e := diff(want, want); len(m)+len(e) != 0 {
		t.Errorf("diff of equal lists: %v %v", m, e)
	}
}

func TestParseConfig(t *testing.T) {
	for _, tc := range []struct {
		name    string
		args    []string
		wantErr bool
		check   func(c *Config) bool
	}{
		{"churn defaults", nil, false, func(c *Config) bool {
			return c.Mode == Churn && c.Rate == 200 && c.Count == 2000 && c.FlowTimeout == time.Second && !bool(c.Offloads)
		}},
		{"concurrent defaults", []string{"-mode=concurrent"}, false, func(c *Config) bool {
			return c.Rate == 1000 && c.Count == 10000 && c.Req == 16 && c.FlowTimeout == 10*time.Minute
		}},
		{"concurrent keeps given flags", []string{"-mode=concurrent", "-count=500", "-rate=50"}, false, func(c *Config) bool {
			return c.Count == 500 && c.Rate == 50
		}},
		{"bulk is a sink", []string{"-mode=bulk", "-req=9"}, false, func(c *Config) bool { return c.Req == 0 && c.Resp == 0 }},
		{"offloads on", []string{"-offloads=on"}, false, func(c *Config) bool { return bool(c.Offloads) }},
		{"standalone", []string{"-source=standalone"}, false, func(c *Config) bool { return c.Source == Standalone }},
		{"bad mode", []string{"-mode=storm"}, true, nil},
		{"bad offloads", []string{"-offloads=maybe"}, true, nil},
		{"too many flows", []string{"-count=100000"}, true, nil},
		{"no runs", []string{"-runs=0"}, true, nil},
		{"stray argument", []string{"churn"}, true, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := parseConfig(tc.args, testWriter{t})
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if err == nil && !tc.check(c) {
				t.Errorf("config %+v", c)
			}
		})
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}
