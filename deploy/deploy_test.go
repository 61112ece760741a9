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

// debianCodename is the release of a golang:X-<codename> or
// debian:<codename>[-slim] image.
func debianCodename(image string) string {
	_, tag, _ := strings.Cut(image, ":")
	tag = strings.TrimSuffix(tag, "-slim")
	return tag[strings.LastIndex(tag, "-")+1:]
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
		// Both stages on the same Debian release, so that the libpcap the
		// binary was linked against is the one it runs with; the Go of
		// the build image is go.mod's.
		from := func(s []instruction) string { return strings.Fields(s[0].args)[0] }
		if b, f := debianCodename(from(build)), debianCodename(from(final)); b != f {
			t.Errorf("build stage on Debian %q (%s), final stage on %q (%s): libpcap may differ", b, from(build), f, from(final))
		}
		goVersion := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(readFile(t, "go.mod"))
		if goVersion == nil || !strings.HasPrefix(from(build), "golang:"+goVersion[1]+"-") {
			t.Errorf("build stage FROM %s, want golang:%s-… (go.mod's Go)", from(build), goVersion)
		}
	})

	bin := daemonBinary(t)

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
	p := &program{name: name, bin: bin, flags: map[string]bool{}, checkValues: checkValues}
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

func loadDaemonSet(t *testing.T) map[string]any {
	t.Helper()
	v, err := parseYAML(readFile(t, "deploy/k8s/daemonset.yaml"))
	if err != nil {
		t.Fatalf("deploy/k8s/daemonset.yaml: %v", err)
	}
	m, ok := v.(map[string]any)
	if !ok {
		t.Fatalf("deploy/k8s/daemonset.yaml: not a mapping")
	}
	return m
}

// get follows a path of mapping keys and sequence indexes.
func get(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, _ := v.(map[string]any)
			v = m[k]
		case int:
			s, _ := v.([]any)
			if k >= len(s) {
				return nil
			}
			v = s[k]
		}
	}
	return v
}

func stringList(v any) []string {
	var out []string
	s, _ := v.([]any)
	for _, e := range s {
		str, ok := e.(string)
		if !ok {
			str = fmt.Sprint(e) // reported by the caller as not a flag
		}
		out = append(out, str)
	}
	return out
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
		ds := loadDaemonSet(t)
		programs := map[string]*program{"packet-headers": daemon, "tcp-info": tcpinfo}
		containers, _ := get(ds, "spec", "template", "spec", "containers").([]any)
		seen := map[string]bool{}
		for i := range containers {
			name, _ := get(containers, i, "name").(string)
			p, ok := programs[name]
			if !ok {
				t.Errorf("daemonset.yaml: container %q: no flag list to check its args against", name)
				continue
			}
			seen[name] = true
			if cmd := get(containers, i, "command"); cmd != nil {
				t.Errorf("daemonset.yaml: container %q sets command: the image's entrypoint is the daemon", name)
			}
			p.checkArgs(t, "daemonset.yaml container "+name, stringList(get(containers, i, "args")))
		}
		for name := range programs {
			if !seen[name] {
				t.Errorf("daemonset.yaml: no container %q", name)
			}
		}
		// The tcp-info image is the one the end-to-end tests run against.
		for i := range containers {
			if get(containers, i, "name") == "tcp-info" {
				image, _ := get(containers, i, "image").(string)
				if want := "measurementlab/tcp-info:" + goModVersion(t, "github.com/m-lab/tcp-info"); image != want {
					t.Errorf("daemonset.yaml: tcp-info image %q, want %q (go.mod's tcp-info, which the end-to-end tests use)", image, want)
				}
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

// TestDaemonSet checks the DaemonSet's structure: what the daemon needs to
// run in it.
func TestDaemonSet(t *testing.T) {
	ds := loadDaemonSet(t)
	if get(ds, "apiVersion") != "apps/v1" || get(ds, "kind") != "DaemonSet" {
		t.Errorf("daemonset.yaml: apiVersion %v kind %v, want apps/v1 DaemonSet", get(ds, "apiVersion"), get(ds, "kind"))
	}
	pod := get(ds, "spec", "template", "spec")
	if get(pod, "hostNetwork") != true {
		t.Error("daemonset.yaml: hostNetwork must be true: the capture and tcp-info need the host's network namespace")
	}
	labels, _ := get(ds, "spec", "template", "metadata", "labels").(map[string]any)
	sel, _ := get(ds, "spec", "selector", "matchLabels").(map[string]any)
	if len(sel) == 0 {
		t.Error("daemonset.yaml: no spec.selector.matchLabels")
	}
	for k, v := range sel {
		if labels[k] != v {
			t.Errorf("daemonset.yaml: selector %s=%v does not match the template's labels %v", k, v, labels)
		}
	}
	annotations, _ := get(ds, "spec", "template", "metadata", "annotations").(map[string]any)
	for k, v := range annotations {
		if _, ok := v.(string); !ok {
			t.Errorf("daemonset.yaml: annotation %s: %v is not a string (quote it)", k, v)
		}
	}
	if annotations["prometheus.io/scrape"] != "true" {
		t.Errorf("daemonset.yaml: prometheus.io/scrape annotation %v, want \"true\"", annotations["prometheus.io/scrape"])
	}

	volumes := map[string]any{}
	vs, _ := get(pod, "volumes").([]any)
	for i := range vs {
		name, _ := get(vs, i, "name").(string)
		volumes[name] = vs[i]
	}
	if p := get(volumes["uuid-prefix"], "hostPath", "path"); p != "/var/local/uuid" {
		t.Errorf("daemonset.yaml: uuid-prefix volume hostPath %v, want /var/local/uuid", p)
	}

	containers := map[string]any{}
	for _, key := range []string{"initContainers", "containers"} {
		cs, _ := get(pod, key).([]any)
		for i := range cs {
			c := cs[i]
			name, _ := get(c, "name").(string)
			if key == "containers" {
				containers[name] = c
				if get(c, "resources", "limits", "memory") == nil {
					t.Errorf("daemonset.yaml: container %s has no memory limit", name)
				}
			}
			mounts, _ := get(c, "volumeMounts").([]any)
			for j := range mounts {
				if v := get(mounts, j, "name").(string); volumes[v] == nil {
					t.Errorf("daemonset.yaml: container %s mounts volume %q, which is not declared", name, v)
				}
			}
		}
	}
	ph := containers["packet-headers"]
	if !slices.Contains(stringList(get(ph, "securityContext", "capabilities", "add")), "NET_RAW") {
		t.Error("daemonset.yaml: packet-headers needs capability NET_RAW")
	}
	if get(ph, "securityContext", "allowPrivilegeEscalation") == false {
		t.Error("daemonset.yaml: packet-headers: allowPrivilegeEscalation: false sets no_new_privs, which disables the binary's file capability")
	}
	if get(ph, "ports", 0, "containerPort") != 9990 {
		t.Errorf("daemonset.yaml: packet-headers container port %v, want 9990", get(ph, "ports", 0, "containerPort"))
	}
	if fmt.Sprint(annotations["prometheus.io/port"]) != fmt.Sprint(get(ph, "ports", 0, "containerPort")) {
		t.Errorf("daemonset.yaml: prometheus.io/port %v is not packet-headers' port", annotations["prometheus.io/port"])
	}
	phArgs, tiArgs := stringList(get(ph, "args")), stringList(get(containers["tcp-info"], "args"))
	phSock, _ := flagValue(phArgs, "tcpinfo.eventsocket")
	tiSock, _ := flagValue(tiArgs, "tcpinfo.eventsocket")
	if phSock == "" || phSock != tiSock {
		t.Errorf("daemonset.yaml: eventsocket of packet-headers %q, of tcp-info %q: want the same", phSock, tiSock)
	}
	// The socket and the data are on a volume both containers mount.
	for _, c := range []string{"packet-headers", "tcp-info"} {
		if !mountedIn(containers[c], filepath.Dir(phSock)) {
			t.Errorf("daemonset.yaml: %s does not mount %s, the eventsocket's directory", c, filepath.Dir(phSock))
		}
	}
	if prefix, _ := flagValue(tiArgs, "uuid-prefix-file"); !mountedIn(containers["tcp-info"], filepath.Dir(prefix)) {
		t.Errorf("daemonset.yaml: tcp-info does not mount the directory of -uuid-prefix-file=%s", prefix)
	}
	if dir, _ := flagValue(phArgs, "datadir"); !mountedIn(ph, dir) {
		t.Errorf("daemonset.yaml: packet-headers does not mount its -datadir=%s", dir)
	}
	if grace, _ := get(pod, "terminationGracePeriodSeconds").(int); time.Duration(grace)*time.Second < sigtermWait(t, phArgs)+10*time.Second {
		t.Errorf("daemonset.yaml: terminationGracePeriodSeconds %d leaves less than 10s after -sigtermwait to publish", grace)
	}
}

// mountedIn reports whether dir is at or under a volume mount of container c.
func mountedIn(c any, dir string) bool {
	mounts, _ := get(c, "volumeMounts").([]any)
	for i := range mounts {
		mp, _ := get(mounts, i, "mountPath").(string)
		if mp != "" && (dir == mp || strings.HasPrefix(dir, strings.TrimSuffix(mp, "/")+"/")) {
			return true
		}
	}
	return false
}

// sigtermWait is the -sigtermwait of args, or its default.
func sigtermWait(t *testing.T, args []string) time.Duration {
	t.Helper()
	v, ok := flagValue(args, "sigtermwait")
	if !ok {
		out, _ := exec.Command(daemonBinary(t), "-help").CombinedOutput()
		m := regexp.MustCompile(`(?s)-sigtermwait duration\n[^\n]*\(default ([^)]+)\)`).FindStringSubmatch(string(out))
		if m == nil {
			t.Fatalf("no default of -sigtermwait in -help")
		}
		v = m[1]
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		t.Fatalf("-sigtermwait=%s: %v", v, err)
	}
	return d
}

// TestSystemdUnit checks the unit's settings against what the daemon needs,
// and has systemd-analyze verify it.
func TestSystemdUnit(t *testing.T) {
	const path = "deploy/systemd/packet-headers.service"
	unit := readFile(t, path)
	cmds := systemdExecStart(unit)
	if len(cmds) != 1 {
		t.Fatalf("%s: want one ExecStart=, got %q", path, cmds)
	}
	args := cmds[0][1:]

	has := func(key, want string) bool {
		for _, v := range unitValues(unit, key) {
			if slices.Contains(strings.Fields(v), want) {
				return true
			}
		}
		return false
	}
	if !has("AmbientCapabilities", "CAP_NET_RAW") {
		t.Errorf("%s: AmbientCapabilities= must give CAP_NET_RAW", path)
	}
	for _, c := range unitValues(unit, "AmbientCapabilities") {
		for _, c := range strings.Fields(c) {
			if !has("CapabilityBoundingSet", c) {
				t.Errorf("%s: ambient %s is not in CapabilityBoundingSet=, which would drop it", path, c)
			}
		}
	}
	if dir, ok := flagValue(args, "datadir"); !ok || !has("ReadWritePaths", dir) {
		t.Errorf("%s: -datadir=%s is not in ReadWritePaths= (ProtectSystem=strict makes everything else read-only)", path, dir)
	}
	if user := unitValues(unit, "User"); len(user) == 1 {
		sysusers := readFile(t, "deploy/systemd/packet-headers.sysusers")
		if !regexp.MustCompile(`(?m)^u ` + regexp.QuoteMeta(user[0]) + ` `).MatchString(sysusers) {
			t.Errorf("%s: User=%s is not created by packet-headers.sysusers", path, user[0])
		}
	}
	stop := unitValues(unit, "TimeoutStopSec")
	if len(stop) != 1 {
		t.Errorf("%s: want one TimeoutStopSec=, got %q", path, stop)
	} else if d, err := time.ParseDuration(stop[0]); err != nil {
		t.Errorf("%s: TimeoutStopSec=%s: %v", path, stop[0], err)
	} else if d < sigtermWait(t, args)+10*time.Second {
		t.Errorf("%s: TimeoutStopSec=%s leaves less than 10s after -sigtermwait to publish", path, stop[0])
	}

	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed (Debian: systemd); not verifying the unit")
	}
	// verify insists that the executable exists: point it at the build.
	dir := t.TempDir()
	copyPath := filepath.Join(dir, "packet-headers.service")
	if err := os.WriteFile(copyPath, []byte(strings.ReplaceAll(unit, cmds[0][0], daemonBinary(t))), 0o644); err != nil {
		t.Fatal(err)
	}
	out, _ := exec.Command(analyze, "verify", copyPath).CombinedOutput()
	// Only what it says about this unit: in a container it may also
	// complain about the machine.
	for line := range strings.Lines(string(out)) {
		if strings.Contains(line, "packet-headers.service") {
			t.Errorf("systemd-analyze verify %s: %s", path, strings.TrimSpace(line))
		}
	}
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
		v, err := parseYAML(readFile(t, "deploy/prometheus/alerts.yml"))
		if err != nil {
			t.Fatalf("alerts.yml: %v", err)
		}
		groups, _ := get(v, "groups").([]any)
		n := 0
		for g := range groups {
			rules, _ := get(groups, g, "rules").([]any)
			for r := range rules {
				expr, _ := get(rules, r, "expr").(string)
				alert, _ := get(rules, r, "alert").(string)
				n++
				names := promqlMetrics(expr)
				if len(names) == 0 {
					t.Errorf("alerts.yml %s: no metric found in %q", alert, expr)
				}
				for _, m := range names {
					if err := checkMetric(known, m); err != nil {
						t.Errorf("alerts.yml %s: %s: %v", alert, m, err)
					}
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
