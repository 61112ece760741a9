package deploy

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

const (
	unitPath     = "deploy/systemd/packet-headers.service"
	tmpfilesPath = "deploy/systemd/packet-headers.conf"
)

// systemdExecStart returns the arguments of each ExecStart= line of a unit,
// with continuation lines joined.
func systemdExecStart(unit string) [][]string {
	var cmds [][]string
	joined := strings.ReplaceAll(unit, "\\\n", " ")
	for line := range strings.Lines(joined) {
		v, ok := strings.CutPrefix(strings.TrimSpace(line), "ExecStart=")
		if !ok {
			continue
		}
		v = strings.TrimLeft(v, "-@:+!|")
		cmds = append(cmds, strings.Fields(v))
	}
	return cmds
}

// unitValues returns the values of a key in a unit, in order.
func unitValues(unit, key string) []string {
	var vs []string
	for line := range strings.Lines(unit) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), key+"="); ok {
			vs = append(vs, v)
		}
	}
	return vs
}

// unitWords returns the words of every value of a key in a unit.
func unitWords(unit, key string) []string {
	var ws []string
	for _, v := range unitValues(unit, key) {
		ws = append(ws, strings.Fields(v)...)
	}
	return ws
}

// TestSystemdUnit checks the unit's settings against what the daemon needs
// and does, and has systemd-analyze verify it.
func TestSystemdUnit(t *testing.T) {
	unit := readFile(t, unitPath)
	cmds := systemdExecStart(unit)
	if len(cmds) != 1 {
		t.Fatalf("%s: want one ExecStart=, got %q", unitPath, cmds)
	}
	args := cmds[0][1:]
	daemon := newProgram(t, "packet-headers", daemonBinary(t), false)
	errorf := func(t *testing.T, format string, args ...any) {
		t.Helper()
		t.Errorf(unitPath+": "+format, args...)
	}
	one := func(t *testing.T, key string) string {
		t.Helper()
		vs := unitValues(unit, key)
		if len(vs) != 1 {
			errorf(t, "want one %s=, got %q", key, vs)
			return ""
		}
		return vs[0]
	}

	// Ready when the daemon says so (sd_notify READY=1), from its main
	// process only.
	if typ, access := one(t, "Type"), one(t, "NotifyAccess"); typ != "notify" || access != "main" {
		errorf(t, "Type=%s NotifyAccess=%s, want Type=notify NotifyAccess=main: the daemon says READY=1 once capture and the UUID source are up", typ, access)
	}

	// CAP_NET_RAW and nothing else, in both sets: a capability in the
	// ambient set only is dropped by the bounding set, and one in the
	// bounding set only is a privilege nobody uses.
	for _, key := range []string{"AmbientCapabilities", "CapabilityBoundingSet"} {
		if got := unitWords(unit, key); !slices.Equal(got, []string{"CAP_NET_RAW"}) {
			errorf(t, "%s=%s, want CAP_NET_RAW only (the AF_PACKET socket; the UUID source needs no capability)", key, strings.Join(got, " "))
		}
	}

	dir, ok := flagValue(args, "datadir")
	if !ok || !slices.Contains(unitWords(unit, "ReadWritePaths"), dir) {
		errorf(t, "-datadir=%s is not in ReadWritePaths= (ProtectSystem=strict makes everything else read-only)", dir)
	}
	if user := unitValues(unit, "User"); len(user) == 1 {
		sysusers := readFile(t, "deploy/systemd/packet-headers.sysusers")
		if !regexp.MustCompile(`(?m)^u ` + regexp.QuoteMeta(user[0]) + ` `).MatchString(sysusers) {
			errorf(t, "User=%s is not created by packet-headers.sysusers", user[0])
		}
	}
	if stop := one(t, "TimeoutStopSec"); stop != "" {
		if d, err := time.ParseDuration(stop); err != nil {
			errorf(t, "TimeoutStopSec=%s: %v", stop, err)
		} else if d < daemon.duration(t, args, "sigtermwait")+10*time.Second {
			errorf(t, "TimeoutStopSec=%s leaves less than 10s after -sigtermwait to publish", stop)
		}
	}

	t.Run("memory", func(t *testing.T) {
		v := one(t, "MemoryMax")
		limit, err := parseSystemdBytes(v)
		if err != nil {
			t.Fatalf("%s: MemoryMax=%s: %v", unitPath, v, err)
		}
		checkMemoryBudget(t, unitPath, daemon, args, limit)
	})

	// A bad flag exits 2, and 2 stops the restarts: it would fail the
	// same way every RestartSec= forever.
	t.Run("no restart on a bad flag", func(t *testing.T) {
		if !slices.Contains(unitWords(unit, "RestartPreventExitStatus"), "2") {
			errorf(t, "RestartPreventExitStatus= does not have 2, the daemon's exit code for a bad flag")
		}
		for _, bad := range [][]string{
			{"-anonymize.ip=bogus"},
			{"-no-such-flag"},
			{"-maxheap=lots"},
		} {
			cmd := exec.Command(daemonBinary(t), append(slices.Clone(args), bad...)...)
			cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 2 {
				t.Errorf("packet-headers %s: %v, want exit code 2\n%s", strings.Join(bad, " "), err, out)
			}
		}
	})

	t.Run("tmpfiles", func(t *testing.T) {
		if !strings.Contains(unit, filepath.Base(tmpfilesPath)) {
			errorf(t, "does not say how to install %s", filepath.Base(tmpfilesPath))
		}
		if path := tmpfilesLine(t).path; path != dir {
			t.Errorf("%s cleans %s, but the unit's -datadir is %s", tmpfilesPath, path, dir)
		}
	})

	t.Run("systemd-analyze verify", func(t *testing.T) {
		analyze, err := exec.LookPath("systemd-analyze")
		if err != nil {
			t.Skip("systemd-analyze not installed (Debian: systemd); not verifying the unit")
		}
		if msgs := analyzeVerify(t, analyze, unit, cmds[0][0]); len(msgs) > 0 {
			t.Errorf("systemd-analyze verify %s:\n%s", unitPath, strings.Join(msgs, "\n"))
		}
		// And it does catch a misspelled key, which systemd would
		// ignore with a warning in the journal.
		mutant := strings.Replace(unit, "\nRestartPreventExitStatus=", "\nRestartPreventExitStatsu=", 1)
		if mutant == unit {
			t.Fatal("no RestartPreventExitStatus= to misspell")
		}
		if msgs := analyzeVerify(t, analyze, mutant, cmds[0][0]); !slices.ContainsFunc(msgs, func(m string) bool { return strings.Contains(m, "RestartPreventExitStatsu") }) {
			t.Errorf("systemd-analyze verify did not complain about RestartPreventExitStatsu=: %q", msgs)
		}
	})
}

// analyzeVerify runs systemd-analyze verify on a unit and returns what it
// says about it. verify insists that the executable exists: exe is
// replaced by the build.
func analyzeVerify(t *testing.T, analyze, unit, exe string) []string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "packet-headers.service")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(unit, exe, daemonBinary(t))), 0o644); err != nil {
		t.Fatal(err)
	}
	out, _ := exec.Command(analyze, "verify", path).CombinedOutput()
	// Only what it says about this unit: in a container it may also
	// complain about the machine.
	var msgs []string
	for line := range strings.Lines(string(out)) {
		if strings.Contains(line, "packet-headers.service") {
			msgs = append(msgs, strings.TrimSpace(line))
		}
	}
	return msgs
}

// tmpfilesEntry is a line of a tmpfiles.d file.
type tmpfilesEntry struct {
	typ, path, mode, user, group, age string
}

// tmpfilesLine returns the one line of deploy/systemd/packet-headers.conf.
func tmpfilesLine(t *testing.T) tmpfilesEntry {
	t.Helper()
	var lines [][]string
	for line := range strings.Lines(readFile(t, tmpfilesPath)) {
		if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
			lines = append(lines, strings.Fields(l))
		}
	}
	if len(lines) != 1 || len(lines[0]) != 6 {
		t.Fatalf("%s: want one line of six fields (type path mode user group age), got %q", tmpfilesPath, lines)
	}
	f := lines[0]
	return tmpfilesEntry{f[0], f[1], f[2], f[3], f[4], f[5]}
}

// TestTmpfiles checks the tmpfiles.d file that ages out the data directory:
// what it cleans, after how long, and that systemd-tmpfiles takes it and
// cleans the date directories without removing the data directory.
func TestTmpfiles(t *testing.T) {
	e := tmpfilesLine(t)
	// e: clean an existing directory; d would also create it (the unit
	// does that with the right owner). Neither removes the directory.
	if e.typ != "e" && e.typ != "d" {
		t.Errorf("%s: type %q, want e (clean the directory) or d", tmpfilesPath, e.typ)
	}
	m := regexp.MustCompile(`^(?:[abcmABCM]+:)?(\d+)(d|w)$`).FindStringSubmatch(e.age)
	if m == nil {
		t.Fatalf("%s: age %q, want days or weeks (e.g. 7d): files must outlive an uploader's short outage", tmpfilesPath, e.age)
	}
	if m[1] == "0" {
		t.Errorf("%s: age 0 deletes every file at each run, before any uploader takes it", tmpfilesPath)
	}

	tmpfiles, err := exec.LookPath("systemd-tmpfiles")
	if err != nil {
		t.Skip("systemd-tmpfiles not installed (Debian: systemd); not running the file")
	}
	conf := readFile(t, tmpfilesPath)
	// clean runs systemd-tmpfiles --clean with conf on a root of its own
	// holding one fresh file, and reports whether the file is still there.
	clean := func(conf string) (kept bool) {
		t.Helper()
		dir := t.TempDir()
		confPath := filepath.Join(dir, "packet-headers.conf")
		if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
		data := filepath.Join(dir, "root", e.path)
		file := filepath.Join(data, "2024/11/18/host_1548788619_00000000000084FF.pcap.gz")
		if err := os.MkdirAll(filepath.Dir(file), 0o775); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(file, []byte("pcap"), 0o664); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(tmpfiles, "--clean", "--root="+filepath.Join(dir, "root"), confPath).CombinedOutput()
		if err != nil || len(out) > 0 {
			t.Errorf("systemd-tmpfiles --clean %s: %v\n%s", tmpfilesPath, err, out)
		}
		if _, err := os.Stat(data); err != nil {
			t.Errorf("systemd-tmpfiles --clean removed the data directory itself: %v", err)
		}
		_, err = os.Stat(file)
		return err == nil
	}
	if !clean(conf) {
		t.Errorf("%s: systemd-tmpfiles --clean removed a file written just now", tmpfilesPath)
	}
	// With age 0 the same line cleans everything under the directory:
	// the line applies to the data directory and what the daemon writes
	// there.
	zero := strings.Join([]string{e.typ, e.path, e.mode, e.user, e.group, "0"}, " ") + "\n"
	if clean(zero) {
		t.Errorf("%s with age 0: systemd-tmpfiles --clean left the file: the line does not clean what the daemon writes", tmpfilesPath)
	}
}
