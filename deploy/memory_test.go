package deploy

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// outsideGoLimit is what the daemon's process may hold outside the Go memory
// limit besides the capture rings: the binary's mapped text and data, and
// what the kernel charges to its cgroup for its sockets. Measured, the
// binary maps under 20 MiB.
const outsideGoLimit = 64 << 20

// memoryBudget checks that a memory limit (a container's limits.memory, a
// unit's MemoryMax=) holds what the daemon run with args may use:
//
//	-maxheap                         the Go memory limit (debug.SetMemoryLimit): live
//	                                 heap, garbage, stacks and the idle heap not yet
//	                                 returned to the OS, which -maxidleram caps below it
//	+ sockets × -capture.buffersize  the capture rings, mapped from the kernel
//	+ outsideGoLimit                 the binary and the kernel's socket buffers
//	+ -maxheap / 4                   headroom: the Go limit is soft, flows admitted
//	                                 before the shedding grow until they end, and
//	                                 the page cache of written files is charged too
//
// It returns the sum term by term, and an error if the limit does not hold
// it or a flag makes the arithmetic meaningless.
func memoryBudget(t *testing.T, daemon *program, args []string, limit int64) (string, error) {
	t.Helper()
	size := func(name string) (int64, error) {
		v := daemon.value(t, args, name)
		n, err := parseByteSize(v)
		if err != nil {
			return 0, fmt.Errorf("-%s=%s: %w", name, v, err)
		}
		return n, nil
	}
	heap, err1 := size("maxheap")
	idle, err2 := size("maxidleram")
	ring, err3 := size("capture.buffersize")
	if err := errors.Join(err1, err2, err3); err != nil {
		return "", err
	}
	if heap == 0 {
		return "", fmt.Errorf("no -maxheap: the Go heap has no bound below the memory limit %d", limit)
	}
	// Without -interface one socket captures every interface; with it,
	// one socket per interface.
	sockets := int64(0)
	for _, a := range args {
		if v, ok := strings.CutPrefix(strings.TrimLeft(a, "-"), "interface="); ok {
			sockets += int64(len(strings.Split(v, ",")))
		}
	}
	sockets = max(sockets, 1)
	headroom := heap / 4
	sum := heap + sockets*ring + outsideGoLimit + headroom
	breakdown := fmt.Sprintf("-maxheap %d + %d capture ring(s) of %d + %d outside the Go limit + %d headroom (a quarter of -maxheap) = %d; limit %d",
		heap, sockets, ring, outsideGoLimit, headroom, sum, limit)
	if sum > limit {
		return breakdown, fmt.Errorf("the memory limit does not hold the daemon: %s", breakdown)
	}
	// The idle heap is a part of the Go memory limit: a -maxidleram as
	// large would never be reached, and the flag would do nothing.
	if idle >= heap {
		return breakdown, fmt.Errorf("-maxidleram %d is not below -maxheap %d: idle heap is counted in the Go memory limit, so it would never return memory", idle, heap)
	}
	return breakdown, nil
}

// checkMemoryBudget reports memoryBudget's error, or logs its sum.
func checkMemoryBudget(t *testing.T, where string, daemon *program, args []string, limit int64) {
	t.Helper()
	breakdown, err := memoryBudget(t, daemon, args, limit)
	if err != nil {
		t.Errorf("%s: %v", where, err)
		return
	}
	t.Logf("%s: %s", where, breakdown)
}

// parseByteSize parses a size as the daemon's flags take it: a number with
// an optional unit K, M, G (powers of 1000, as the original's flags) or Ki,
// Mi, Gi, and an optional B.
func parseByteSize(s string) (int64, error) {
	m := regexp.MustCompile(`^(\d+)(K|M|G|Ki|Mi|Gi)?B?$`).FindStringSubmatch(s)
	if m == nil {
		return 0, fmt.Errorf("%q is not a size", s)
	}
	n, err := strconv.ParseInt(m[1], 10, 64)
	if err != nil {
		return 0, err
	}
	return n * map[string]int64{"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}[m[2]], nil
}

// parseSystemdBytes parses a size as systemd's MemoryMax= takes it: bytes,
// or K, M, G, T, which are powers of 1024.
func parseSystemdBytes(s string) (int64, error) {
	m := regexp.MustCompile(`^(\d+)([KMGT])?$`).FindStringSubmatch(s)
	if m == nil {
		return 0, fmt.Errorf("%q is not a size in bytes (infinity and percentages are not a bound)", s)
	}
	n, err := strconv.ParseInt(m[1], 10, 64)
	if err != nil {
		return 0, err
	}
	return n << map[string]int{"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m[2]], nil
}

func TestParseSizes(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want int64
	}{
		{"0", 0}, {"2GB", 2e9}, {"1500MB", 1.5e9}, {"64MiB", 64 << 20}, {"3G", 3e9}, {"10KiB", 10 << 10}, {"7B", 7},
	} {
		if got, err := parseByteSize(tt.in); err != nil || got != tt.want {
			t.Errorf("parseByteSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
	}
	for _, bad := range []string{"", "2 GB", "1.5G", "2TB", "-1"} {
		if got, err := parseByteSize(bad); err == nil {
			t.Errorf("parseByteSize(%q) = %d, want an error", bad, got)
		}
	}
	for _, tt := range []struct {
		in   string
		want int64
	}{
		{"3G", 3 << 30}, {"512M", 512 << 20}, {"4096", 4096},
	} {
		if got, err := parseSystemdBytes(tt.in); err != nil || got != tt.want {
			t.Errorf("parseSystemdBytes(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
	}
	for _, bad := range []string{"infinity", "50%", "3GB"} {
		if got, err := parseSystemdBytes(bad); err == nil {
			t.Errorf("parseSystemdBytes(%q) = %d, want an error", bad, got)
		}
	}
}

// TestMemoryBudget checks memoryBudget itself: the production flags
// fit 3Gi, and fail where the old DaemonSet's did (2GB of heap and 1500MB
// of idle heap, counted apart, in 3Gi) or where a term is missing.
func TestMemoryBudget(t *testing.T) {
	daemon := newProgram(t, "packet-headers", daemonBinary(t), false)
	for _, tt := range []struct {
		name  string
		args  []string
		limit int64
		ok    bool
	}{
		{"production", []string{"-maxheap=2GB", "-maxidleram=500MB"}, 3 << 30, true},
		{"the heap alone fills the limit", []string{"-maxheap=3GB", "-maxidleram=500MB"}, 3 << 30, false},
		{"no room for the headroom", []string{"-maxheap=2GB", "-maxidleram=500MB"}, 2<<30 + 128<<20, false},
		{"a ring per interface", []string{"-maxheap=2GB", "-maxidleram=500MB", "-interface=a,b", "-interface=c", "-capture.buffersize=256MiB"}, 3 << 30, false},
		{"idle heap as large as the heap", []string{"-maxheap=2GB", "-maxidleram=2GB"}, 3 << 30, false},
		{"no -maxheap", []string{"-maxheap=0", "-maxidleram=500MB"}, 3 << 30, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			breakdown, err := memoryBudget(t, daemon, tt.args, tt.limit)
			if (err == nil) != tt.ok {
				t.Errorf("memoryBudget(%q, limit %d) = %v, want an error: %v", tt.args, tt.limit, err, !tt.ok)
			}
			t.Log(breakdown)
		})
	}
}
