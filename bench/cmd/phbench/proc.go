package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/m-lab/packet-headers/internal/nsproc"
)

// startProc starts bin in the namespace ns (internal/nsproc); cleanup kills
// it by its PID if it still runs.
func startProc(cleanup *stack, ns, name, bin string, args ...string) (*nsproc.Proc, error) {
	return startProcEnv(cleanup, nil, ns, name, bin, args...)
}

// startProcEnv is startProc with env added to the benchmark's environment
// (a later entry wins).
func startProcEnv(cleanup *stack, env []string, ns, name, bin string, args ...string) (*nsproc.Proc, error) {
	p, err := nsproc.Start(ns, name, env, bin, args...)
	if err != nil {
		return nil, err
	}
	cleanup.push("stop "+name, func() error {
		p.Kill()
		return nil
	})
	return p, nil
}

// userHZ is the unit of the CPU times in /proc/<pid>/stat: USER_HZ, which
// Linux fixes at 100 for the user-space ABI whatever the kernel's HZ.
const userHZ = 100

// procCPU returns a live process's user+system CPU time (all threads).
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(b)
}

// parseStatCPU reads utime and stime (fields 14 and 15) of a /proc/<pid>/stat
// line. The command name (field 2) may contain spaces and parentheses, so
// fields are counted from the last ')'.
func parseStatCPU(b []byte) (time.Duration, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("malformed stat line")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state): utime is field 14, f[11].
	if len(f) < 13 {
		return 0, errors.New("short stat line")
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(ut+st) * time.Second / userHZ, nil
}

// procStatusKB returns a field of /proc/<pid>/status in kB (VmHWM, VmRSS).
func procStatusKB(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	return parseStatusKB(b, field)
}

func parseStatusKB(b []byte, field string) (int64, error) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), field+":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("%s: unexpected %q", field, rest)
		}
		return strconv.ParseInt(f[0], 10, 64)
	}
	return 0, fmt.Errorf("%s not in status", field)
}

// loadAvg returns the 1-minute load average: the machine is shared, and a
// number measured under load says so.
func loadAvg() (float64, error) {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0, errors.New("empty /proc/loadavg")
	}
	return strconv.ParseFloat(f[0], 64)
}

// tcpdumpCount reads a count of tcpdump's exit summary, e.g. "dropped by
// kernel" or "captured"; -1 when tcpdump did not print it.
func tcpdumpCount(out, what string) int64 {
	for _, l := range strings.Split(out, "\n") {
		if s, ok := strings.CutSuffix(strings.TrimSpace(l), " packets "+what); ok {
			if n, err := strconv.ParseInt(s, 10, 64); err == nil {
				return n
			}
		}
	}
	return -1
}
