// Package deploy holds the deployment files of packet-headers (the
// Dockerfile's build steps, a systemd unit, a Kubernetes DaemonSet,
// Prometheus alerts and a Grafana dashboard) and the tests that keep them
// true to the daemon: its flags, its metrics, and the way its image is
// built. It has no Go code of its own.
package deploy

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/m-lab/go/flagx"
	"golang.org/x/sys/unix"
)

// The repository's root, from this package's directory (go test runs in it).
const root = ".."

var (
	buildOnce sync.Once
	buildDir  string
	buildOut  []byte
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// daemonBinary builds the daemon once per test run with the Dockerfile's own
// build step and returns its path. Its directory is readable by all, so
// that it can be run as nobody.
func daemonBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "packet-headers-deploy-")
		if buildErr != nil {
			return
		}
		if buildErr = os.Chmod(buildDir, 0o755); buildErr != nil {
			return
		}
		cmd := exec.Command(filepath.Join(root, "deploy/docker-build-steps.sh"), "build", filepath.Join(buildDir, "packet-headers"))
		buildOut, buildErr = cmd.CombinedOutput()
	})
	if buildErr != nil {
		t.Fatalf("deploy/docker-build-steps.sh build: %v\n%s", buildErr, buildOut)
	}
	return filepath.Join(buildDir, "packet-headers")
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, path))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// dockerfile is the Dockerfile as a list of stages, each a list of
// instructions with continuation lines joined.
type instruction struct{ op, args string }

func parseDockerfile(t *testing.T) [][]instruction {
	t.Helper()
	var stages [][]instruction
	var cur strings.Builder
	for line := range strings.Lines(readFile(t, "Dockerfile")) {
		line = strings.TrimSpace(line)
		if cur.Len() == 0 && (line == "" || strings.HasPrefix(line, "#")) {
			continue
		}
		if l, more := strings.CutSuffix(line, `\`); more {
			cur.WriteString(l + " ")
			continue
		}
		cur.WriteString(line)
		op, args, _ := strings.Cut(cur.String(), " ")
		cur.Reset()
		op = strings.ToUpper(op)
		if op == "FROM" {
			stages = append(stages, nil)
		}
		if len(stages) == 0 {
			t.Fatalf("Dockerfile: %s before FROM", op)
		}
		stages[len(stages)-1] = append(stages[len(stages)-1], instruction{op, strings.Join(strings.Fields(args), " ")})
	}
	if len(stages) < 2 {
		t.Fatalf("Dockerfile: %d stages, want a build stage and a final stage", len(stages))
	}
	return stages
}

func hasInstruction(stage []instruction, op, args string) bool {
	return slices.Contains(stage, instruction{op, args})
}

// TestDockerBuildSteps checks that the Dockerfile builds with
// deploy/docker-build-steps.sh and runs what this test runs: the build, the
// file capability, and the binary as nobody.
func TestDockerBuildSteps(t *testing.T) {
	stages := parseDockerfile(t)
	build, final := stages[0], stages[len(stages)-1]
	script := readFile(t, "deploy/docker-build-steps.sh")

	t.Run("Dockerfile uses the script", func(t *testing.T) {
		// The steps the Dockerfile runs must be the steps this test runs.
		for _, want := range []struct {
			stage []instruction
			name  string
			in    instruction
		}{
			{build, "build", instruction{"RUN", "./deploy/docker-build-steps.sh build /packet-headers"}},
			{final, "final", instruction{"COPY", "--from=build /packet-headers /packet-headers"}},
			{final, "final", instruction{"USER", "nobody"}},
			{final, "final", instruction{"ENTRYPOINT", `["/packet-headers"]`}},
		} {
			if !hasInstruction(want.stage, want.in.op, want.in.args) {
				t.Errorf("the %s stage of the Dockerfile has no %s %s", want.name, want.in.op, want.in.args)
			}
		}
		setcap := false
		for _, in := range final {
			if in.op == "RUN" && strings.HasPrefix(in.args, "./deploy/docker-build-steps.sh setcap /packet-headers") {
				setcap = true
			}
		}
		if !setcap {
			t.Error("the final stage of the Dockerfile does not RUN ./deploy/docker-build-steps.sh setcap /packet-headers")
		}
		// Every step the Dockerfile asks of the script exists in it.
		known := map[string]bool{}
		for _, m := range regexp.MustCompile(`(?m)^([a-z-]+)\)$`).FindAllStringSubmatch(script, -1) {
			known[m[1]] = true
		}
		step := regexp.MustCompile(`docker-build-steps\.sh ([a-z-]+)`)
		for _, stage := range stages {
			for _, in := range stage {
				for _, m := range step.FindAllStringSubmatch(in.args, -1) {
					if in.op == "RUN" && !known[m[1]] {
						t.Errorf("the Dockerfile runs docker-build-steps.sh %s, which the script does not have (it has %v)", m[1], known)
					}
				}
			}
		}
		// The Go of the build image is go.mod's.
		from := func(s []instruction) string { return strings.Fields(s[0].args)[0] }
		goVersion := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(readFile(t, "go.mod"))
		if goVersion == nil || !strings.HasPrefix(from(build), "golang:"+goVersion[1]+"-") {
			t.Errorf("build stage FROM %s, want golang:%s-… (go.mod's Go)", from(build), goVersion)
		}
	})

	bin := daemonBinary(t)

	// The image installs no library for the daemon: the binary must need
	// none (no dynamic loader, no shared library), whatever the build
	// image's and the final image's C libraries are.
	t.Run("static binary", func(t *testing.T) {
		f, err := elf.Open(bin)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				t.Errorf("%s has a dynamic loader (PT_INTERP): built with cgo? The final image has no library for it", bin)
			}
		}
		if libs, err := f.ImportedLibraries(); err != nil || len(libs) > 0 {
			t.Errorf("%s needs shared libraries %q (%v): the final image installs none", bin, libs, err)
		}
	})

	t.Run("setcap", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("the setcap step and running as nobody need root; run the tests as root (CI does)")
		}
		if _, err := exec.LookPath("setcap"); err != nil {
			t.Skip("setcap not installed (Debian: apt-get install libcap2-bin); the image installs it in its final stage")
		}
		capped := filepath.Join(filepath.Dir(bin), "packet-headers-capped")
		copyFile(t, bin, capped)
		if out, err := exec.Command(filepath.Join(root, "deploy/docker-build-steps.sh"), "setcap", capped).CombinedOutput(); err != nil {
			t.Fatalf("docker-build-steps.sh setcap: %v\n%s", err, out)
		}
		out, err := exec.Command("getcap", capped).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "cap_net_raw") {
			t.Fatalf("getcap %s = %q, %v; want cap_net_raw", capped, out, err)
		}

		asNobody, how := nobodyRunner()
		if asNobody == nil {
			t.Skip("neither setpriv nor runuser is installed (Debian: util-linux); cannot run the binary as nobody")
		}
		t.Logf("running as nobody with %s", how)

		t.Run("help as nobody", func(t *testing.T) {
			out, err := asNobody(context.Background(), capped, "-help").CombinedOutput()
			if err != nil || !strings.Contains(string(out), "-tcpinfo.eventsocket") {
				t.Fatalf("%s -help as nobody: %v\n%s", capped, err, out)
			}
		})

		// As in the image: nobody captures with the file capability and
		// no other privilege, and cannot without it.
		t.Run("capture as nobody", func(t *testing.T) {
			var st unix.Statfs_t
			if err := unix.Statfs(capped, &st); err == nil && st.Flags&unix.ST_NOSUID != 0 {
				t.Skipf("%s is on a nosuid file system, where file capabilities are ignored", filepath.Dir(capped))
			}
			data := t.TempDir()
			for _, d := range []string{filepath.Dir(data), data} {
				if err := os.Chmod(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.Chown(data, 65534, 65534); err != nil {
				t.Fatal(err)
			}
			args := []string{
				"-interface=lo", "-datadir=" + data,
				// Nothing listens there: the daemon keeps retrying,
				// which is all this test needs.
				"-tcpinfo.eventsocket=" + filepath.Join(data, "none.sock"),
				"-prometheusx.listen-address=127.0.0.1:0",
			}
			if err := runUntilStarted(t, asNobody, capped, args); err != nil {
				t.Errorf("with cap_net_raw+ep: %v", err)
			}
			if err := runUntilStarted(t, asNobody, bin, args); err == nil {
				t.Errorf("without the file capability the daemon captured as nobody too: the check above proves nothing")
			} else {
				t.Logf("without the file capability, as expected: %v", err)
			}
		})
	})
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

// nobodyRunner returns a way to run a command as nobody (uid and gid 65534,
// no supplementary groups), or nil.
func nobodyRunner() (func(ctx context.Context, name string, args ...string) *exec.Cmd, string) {
	if p, err := exec.LookPath("setpriv"); err == nil {
		return func(ctx context.Context, name string, args ...string) *exec.Cmd {
			return exec.CommandContext(ctx, p, append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", "--", name}, args...)...)
		}, "setpriv"
	}
	if p, err := exec.LookPath("runuser"); err == nil {
		return func(ctx context.Context, name string, args ...string) *exec.Cmd {
			return exec.CommandContext(ctx, p, append([]string{"-u", "nobody", "--", name}, args...)...)
		}, "runuser"
	}
	return nil, ""
}

// runUntilStarted runs the daemon until it logs that it has started, then
// stops it with SIGTERM and expects a clean exit. It returns an error if it
// exits before starting.
func runUntilStarted(t *testing.T, run func(context.Context, string, ...string) *exec.Cmd, bin string, args []string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := run(ctx, bin, args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	started := make(chan bool, 1)
	var log bytes.Buffer
	var logMu sync.Mutex
	go func() {
		s := bufio.NewScanner(stderr)
		found := false
		for s.Scan() {
			logMu.Lock()
			log.WriteString(s.Text() + "\n")
			logMu.Unlock()
			if !found && strings.Contains(s.Text(), "msg=started") {
				found = true
				started <- true
			}
		}
		if !found {
			started <- false
		}
	}()
	logText := func() string { logMu.Lock(); defer logMu.Unlock(); return log.String() }
	select {
	case ok := <-started:
		if !ok {
			err := cmd.Wait()
			return fmt.Errorf("exited before starting (%v):\n%s", err, logText())
		}
	case <-ctx.Done():
		cmd.Wait()
		return fmt.Errorf("did not start within a minute:\n%s", logText())
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("after SIGTERM: %v\n%s", err, logText())
	}
	return nil
}

// program is a binary's flags, from its -help output.
type program struct {
	name  string
	bin   string
	help  string
	flags map[string]bool // name → is a bool flag
	// checkValues: the binary parses arguments followed by -help without
	// touching the system, so a bad value is an error.
	checkValues bool
}

var helpFlag = regexp.MustCompile(`(?m)^  -(\S+)( \S+)?`)

func newProgram(t *testing.T, name, bin string, checkValues bool) *program {
	t.Helper()
	out, err := exec.Command(bin, "-help").CombinedOutput()
	if err != nil && !strings.Contains(string(out), "Usage") {
		t.Fatalf("%s -help: %v\n%s", bin, err, out)
	}
	p := &program{name: name, bin: bin, help: string(out), flags: map[string]bool{}, checkValues: checkValues}
	for _, m := range helpFlag.FindAllStringSubmatch(string(out), -1) {
		p.flags[m[1]] = m[2] == ""
	}
	if len(p.flags) < 5 {
		t.Fatalf("%s -help: found only flags %v in:\n%s", bin, p.flags, out)
	}
	return p
}

var argRE = regexp.MustCompile(`^--?([A-Za-z0-9][A-Za-z0-9._-]*)(=.*)?$`)

// checkArgs reports each argument that is not -flag=value (or -flag for a
// bool) of a flag of p, and, where p allows, values that do not parse.
func (p *program) checkArgs(t *testing.T, where string, args []string) {
	t.Helper()
	if len(args) == 0 {
		t.Errorf("%s: no arguments found for %s", where, p.name)
	}
	for _, a := range args {
		m := argRE.FindStringSubmatch(a)
		if m == nil {
			t.Errorf("%s: argument %q of %s: want -flag=value", where, a, p.name)
			continue
		}
		isBool, ok := p.flags[m[1]]
		switch {
		case !ok:
			t.Errorf("%s: %s has no flag -%s (renamed?)", where, p.name, m[1])
		case !isBool && m[2] == "":
			t.Errorf("%s: -%s of %s needs a value: write -%s=value", where, m[1], p.name, m[1])
		}
	}
	if p.checkValues && !t.Failed() {
		// Flags are parsed in order, so -help at the end comes after every
		// value has been parsed.
		if out, err := exec.Command(p.bin, append(slices.Clone(args), "-help")...).CombinedOutput(); err != nil {
			t.Errorf("%s: %s does not accept %q: %v\n%s", where, p.name, args, err, firstLine(out))
		}
	}
}

// value returns the value args give flag name, or the flag's default from
// -help ("" if it shows none).
func (p *program) value(t *testing.T, args []string, name string) string {
	t.Helper()
	if v, ok := flagValue(args, name); ok {
		return v
	}
	if _, ok := p.flags[name]; !ok {
		t.Fatalf("%s has no flag -%s", p.name, name)
	}
	// -help prints each flag as "  -name type" and its usage on the
	// following lines, each indented by four spaces and a tab, the last
	// ending with "(default X)" if the default is not the zero value.
	m := regexp.MustCompile(`(?m)^  -` + regexp.QuoteMeta(name) + `( \S+)?\n((?:    \t.*\n?)*)`).FindStringSubmatch(p.help)
	if m == nil {
		t.Fatalf("%s -help: no usage of -%s", p.name, name)
	}
	if d := regexp.MustCompile(`\(default ([^)]*)\)\s*$`).FindStringSubmatch(m[2]); d != nil {
		if s, err := strconv.Unquote(d[1]); err == nil {
			return s
		}
		return d[1]
	}
	return ""
}

// duration is the value of a duration flag.
func (p *program) duration(t *testing.T, args []string, name string) time.Duration {
	t.Helper()
	v := p.value(t, args, name)
	d, err := time.ParseDuration(v)
	if err != nil {
		t.Fatalf("-%s=%s: %v", name, v, err)
	}
	return d
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(string(b), "\n")
	return s
}

// tcpinfoBinary builds the tcp-info of go.mod, the eventsocket peer.
func tcpinfoBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "tcp-info")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/m-lab/tcp-info")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build github.com/m-lab/tcp-info: %v\n%s", err, out)
	}
	return bin
}

func goModVersion(t *testing.T, module string) string {
	t.Helper()
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Version}}", module)
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -m %s: %v", module, err)
	}
	return strings.TrimSpace(string(out))
}

// flagValue returns the value of -name=value in args, if present.
func flagValue(args []string, name string) (string, bool) {
	for _, a := range args {
		for _, p := range []string{"-" + name + "=", "--" + name + "="} {
			if v, ok := strings.CutPrefix(a, p); ok {
				return v, true
			}
		}
	}
	return "", false
}

// TestDeployFlagsExist checks every flag the deployment files pass to the
// daemon (and to tcp-info beside it) against the flags of the binaries
// themselves, so that renaming a flag breaks this test rather than a
// deployment.
func TestDeployFlagsExist(t *testing.T) {
	daemon := newProgram(t, "packet-headers", daemonBinary(t), true)
	// tcp-info's -uuid-prefix-file reads the file while flags are parsed,
	// so its values cannot be checked here.
	tcpinfo := newProgram(t, "tcp-info", tcpinfoBinary(t), false)

	t.Run("systemd", func(t *testing.T) {
		units, err := filepath.Glob(filepath.Join(root, "deploy/systemd/*.service"))
		if err != nil || len(units) == 0 {
			t.Fatalf("no deploy/systemd/*.service: %v", err)
		}
		for _, path := range units {
			unit := readFile(t, strings.TrimPrefix(path, root+"/"))
			cmds := systemdExecStart(unit)
			if len(cmds) != 1 || filepath.Base(cmds[0][0]) != "packet-headers" {
				t.Errorf("%s: want one ExecStart= of packet-headers, got %q", path, cmds)
				continue
			}
			daemon.checkArgs(t, path, cmds[0][1:])
		}
	})

	t.Run("k8s", func(t *testing.T) {
		ds := loadDaemonSet(t, daemonSetPath)
		programs := map[string]*program{"packet-headers": daemon, "tcp-info": tcpinfo}
		seen := map[string]bool{}
		for _, c := range ds.Spec.Template.Spec.Containers {
			p, ok := programs[c.Name]
			if !ok {
				t.Errorf("%s: container %q: no flag list to check its args against", daemonSetPath, c.Name)
				continue
			}
			seen[c.Name] = true
			if c.Command != nil {
				t.Errorf("%s: container %q sets command: the image's entrypoint is the daemon", daemonSetPath, c.Name)
			}
			p.checkArgs(t, daemonSetPath+" container "+c.Name, c.Args)
			// The environment is read as flags too.
			for _, e := range c.Env {
				if !slices.ContainsFunc(slices.Collect(maps.Keys(p.flags)), func(f string) bool { return flagx.MakeShellVariableName(f) == e.Name }) {
					t.Errorf("%s: container %s: env %s is the variable of no flag of %s", daemonSetPath, c.Name, e.Name, p.name)
				}
			}
		}
		for name := range programs {
			if !seen[name] {
				t.Errorf("%s: no container %q", daemonSetPath, name)
			}
		}
		// The tcp-info image is the one the end-to-end tests run against.
		if c := container(&ds.Spec.Template.Spec, "tcp-info"); c != nil {
			if want := "measurementlab/tcp-info:" + goModVersion(t, "github.com/m-lab/tcp-info"); c.Image != want {
				t.Errorf("%s: tcp-info image %q, want %q (go.mod's tcp-info, which the end-to-end tests use)", daemonSetPath, c.Image, want)
			}
		}
	})

	t.Run("Dockerfile", func(t *testing.T) {
		stages := parseDockerfile(t)
		final := stages[len(stages)-1]
		var entry []string
		envs := 0
		for _, in := range final {
			switch in.op {
			case "ENTRYPOINT", "CMD":
				var argv []string
				if err := json.Unmarshal([]byte(in.args), &argv); err != nil {
					t.Errorf("Dockerfile: %s %s: want the JSON (exec) form: %v", in.op, in.args, err)
				}
				if in.op == "ENTRYPOINT" && len(argv) > 0 {
					argv = argv[1:]
				}
				entry = append(entry, argv...)
			case "ENV":
				// The final stage's environment is the daemon's: each
				// variable must be the one of a flag.
				name, _, _ := strings.Cut(in.args, "=")
				envs++
				if !slices.ContainsFunc(slices.Collect(maps.Keys(daemon.flags)), func(f string) bool { return flagx.MakeShellVariableName(f) == name }) {
					t.Errorf("Dockerfile: ENV %s is the variable of no flag of packet-headers", name)
				}
			}
		}
		if len(entry) > 0 {
			daemon.checkArgs(t, "Dockerfile", entry)
		} else if envs == 0 {
			t.Log("Dockerfile: passes no flag")
		}
	})
}

// metricNames reads the name of every metric defined in metrics/metrics.go:
// the Name (with Namespace and Subsystem) of each prometheus.*Opts literal.
func metricNames(t *testing.T) map[string]string {
	t.Helper()
	const path = "metrics/metrics.go"
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, filepath.Join(root, path), nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]string{} // name → kind (Counter, Gauge, Histogram, Summary)
	ast.Inspect(f, func(n ast.Node) bool {
		lit, ok := n.(*ast.CompositeLit)
		if !ok {
			return true
		}
		sel, ok := lit.Type.(*ast.SelectorExpr)
		if !ok || !strings.HasSuffix(sel.Sel.Name, "Opts") {
			return true
		}
		kind := strings.TrimSuffix(sel.Sel.Name, "Opts")
		parts := map[string]string{}
		for _, e := range lit.Elts {
			kv, ok := e.(*ast.KeyValueExpr)
			if !ok {
				continue
			}
			key, _ := kv.Key.(*ast.Ident)
			if key == nil || (key.Name != "Name" && key.Name != "Namespace" && key.Name != "Subsystem") {
				continue
			}
			bl, ok := kv.Value.(*ast.BasicLit)
			var s string
			if ok {
				s, err = strconv.Unquote(bl.Value)
			}
			if !ok || err != nil {
				t.Fatalf("%s: %s is not a string literal; this test cannot read it", fset.Position(kv.Pos()), key.Name)
			}
			parts[key.Name] = s
		}
		var full []string
		for _, k := range []string{"Namespace", "Subsystem", "Name"} {
			if parts[k] != "" {
				full = append(full, parts[k])
			}
		}
		names[strings.Join(full, "_")] = kind
		return true
	})
	if len(names) < 10 {
		t.Fatalf("%s: found only %d metrics: %v", path, len(names), names)
	}
	return names
}

var (
	promqlStrings  = regexp.MustCompile(`"(\\.|[^"\\])*"|'(\\.|[^'\\])*'|` + "`[^`]*`")
	promqlBrackets = regexp.MustCompile(`\[[^\]]*\]|\{[^}]*\}`)
	promqlGrouping = regexp.MustCompile(`\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promqlToken    = regexp.MustCompile(`[0-9][0-9A-Za-z_.]*|\$[A-Za-z0-9_]+|[A-Za-z_:][A-Za-z0-9_:]*`)
	promqlKeywords = map[string]bool{
		"and": true, "or": true, "unless": true, "bool": true, "offset": true,
		"by": true, "without": true, "on": true, "ignoring": true,
		"group_left": true, "group_right": true, "inf": true, "nan": true, "atan2": true,
	}
)

// promqlMetrics returns the metric names a PromQL expression selects: the
// identifiers left once strings, label matchers, ranges and groupings are
// removed, that are neither keywords, numbers, variables nor function calls.
func promqlMetrics(expr string) []string {
	e := promqlStrings.ReplaceAllString(expr, `""`)
	e = promqlBrackets.ReplaceAllString(e, " ")
	e = promqlGrouping.ReplaceAllString(e, " ")
	var names []string
	for _, loc := range promqlToken.FindAllStringIndex(e, -1) {
		tok := e[loc[0]:loc[1]]
		if tok[0] == '$' || tok[0] >= '0' && tok[0] <= '9' || promqlKeywords[strings.ToLower(tok)] {
			continue
		}
		if rest := strings.TrimLeft(e[loc[1]:], " \t\n"); strings.HasPrefix(rest, "(") {
			continue // a function or an aggregation
		}
		names = append(names, tok)
	}
	return names
}

func TestPromqlMetrics(t *testing.T) {
	tests := []struct {
		expr string
		want []string
	}{
		{`pcap_a == 0`, []string{"pcap_a"}},
		{`sum by (instance, reason) (rate(pcap_b_total{reason!="x y"}[10m])) > 0`, []string{"pcap_b_total"}},
		{"increase(pcap_c[30m]) > 0\nand\nincrease(pcap_d[30m]) == 0", []string{"pcap_c", "pcap_d"}},
		{`clamp_min(delta(pcap_e{instance=~"$instance"}[$__rate_interval]), 0) / 1e3`, []string{"pcap_e"}},
		{`sum(rate(x_bucket[5m])) without (le) or on(instance) vector(1)`, []string{"x_bucket"}},
	}
	for _, tt := range tests {
		if got := promqlMetrics(tt.expr); !slices.Equal(got, tt.want) {
			t.Errorf("promqlMetrics(%q) = %q, want %q", tt.expr, got, tt.want)
		}
	}
}

// checkMetric reports a metric name that the daemon does not export.
func checkMetric(known map[string]string, name string) error {
	if _, ok := known[name]; ok {
		return nil
	}
	// The Go and process collectors' metrics are registered by main.
	if strings.HasPrefix(name, "go_") || strings.HasPrefix(name, "process_") {
		return nil
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suffix); ok {
			if kind := known[base]; kind == "Histogram" || kind == "Summary" && suffix != "_bucket" {
				return nil
			}
		}
	}
	return errors.New("not a metric of metrics/metrics.go")
}

// TestAlertRules checks the alert rules with promtool, runs their unit
// tests, and checks that every metric they use exists.
func TestAlertRules(t *testing.T) {
	t.Run("metrics exist", func(t *testing.T) {
		known := metricNames(t)
		var rules ruleFile
		if err := decodeStrict([]byte(readFile(t, "deploy/prometheus/alerts.yml")), &rules); err != nil {
			t.Fatalf("alerts.yml: %v", err)
		}
		n := 0
		for _, g := range rules.Groups {
			for _, r := range g.Rules {
				n++
				names := promqlMetrics(r.Expr)
				if len(names) == 0 {
					t.Errorf("alerts.yml %s: no metric found in %q", r.Alert, r.Expr)
				}
				for _, m := range names {
					if err := checkMetric(known, m); err != nil {
						t.Errorf("alerts.yml %s: %s: %v", r.Alert, m, err)
					}
				}
				if r.Alert != "" && (r.Labels["severity"] == "" || r.Annotations["summary"] == "" || r.Annotations["description"] == "") {
					t.Errorf("alerts.yml %s: want a severity label, a summary and a description", r.Alert)
				}
			}
		}
		if n < 6 {
			t.Errorf("alerts.yml: %d rules, want at least 6", n)
		}
	})

	t.Run("promtool", func(t *testing.T) {
		promtool, err := exec.LookPath("promtool")
		if err != nil {
			t.Skip("promtool not installed (Debian: apt-get install prometheus, as scripts/install-deps.sh does); not checking the rules with it")
		}
		for _, args := range [][]string{
			{"check", "rules", "alerts.yml"},
			{"test", "rules", "alerts_test.yml"},
		} {
			cmd := exec.Command(promtool, args...)
			cmd.Dir = filepath.Join(root, "deploy/prometheus")
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
	})
}

// TestDashboard checks that the Grafana dashboard parses, has panels with
// queries on the Prometheus data source variable, and uses only metrics
// the daemon exports.
func TestDashboard(t *testing.T) {
	const path = "deploy/grafana/packet-headers.json"
	var dash struct {
		Title         string
		UID           string
		SchemaVersion int
		Templating    struct {
			List []struct{ Name, Type, Query any }
		}
		Panels []struct {
			ID         int
			Type       string
			Title      string
			Datasource *struct{ Type, UID string }
			GridPos    *struct{ X, Y, W, H int }
			Targets    []struct{ Expr, RefID string }
		}
	}
	if err := json.Unmarshal([]byte(readFile(t, path)), &dash); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if dash.Title == "" || dash.UID == "" || dash.SchemaVersion < 36 {
		t.Errorf("%s: title %q uid %q schemaVersion %d: want a title, a uid and schemaVersion >= 36", path, dash.Title, dash.UID, dash.SchemaVersion)
	}
	dsVar := ""
	for _, v := range dash.Templating.List {
		if v.Type == "datasource" && v.Query == "prometheus" {
			dsVar = fmt.Sprint(v.Name)
		}
	}
	if dsVar == "" {
		t.Fatalf("%s: no Prometheus data source variable", path)
	}
	known := metricNames(t)
	ids := map[int]bool{}
	queries := 0
	for _, p := range dash.Panels {
		if ids[p.ID] {
			t.Errorf("%s: panel id %d used twice", path, p.ID)
		}
		ids[p.ID] = true
		if p.GridPos == nil || p.GridPos.W == 0 || p.GridPos.H == 0 {
			t.Errorf("%s: panel %q has no gridPos", path, p.Title)
		}
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${"+dsVar+"}" {
			t.Errorf("%s: panel %q does not use the data source variable ${%s}", path, p.Title, dsVar)
		}
		if len(p.Targets) == 0 {
			t.Errorf("%s: panel %q has no query", path, p.Title)
		}
		for _, q := range p.Targets {
			queries++
			names := promqlMetrics(q.Expr)
			if len(names) == 0 {
				t.Errorf("%s: panel %q: no metric in %q", path, p.Title, q.Expr)
			}
			for _, m := range names {
				if err := checkMetric(known, m); err != nil {
					t.Errorf("%s: panel %q: %s: %v", path, p.Title, m, err)
				}
			}
		}
	}
	if queries < 10 {
		t.Errorf("%s: %d queries, want the panels of deploy/README.md", path, queries)
	}
}
