package deploy

import (
	"cmp"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	gocmp "github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const (
	daemonSetPath = "deploy/k8s/base/daemonset.yaml"
	proxyDir      = "deploy/k8s/kube-rbac-proxy"

	// As M-Lab's k8s-support: the eventsocket and the UUID prefix file
	// that tcp-info and its neighbours share, each in an emptyDir.
	eventSocketPath = "/var/local/tcpinfoeventsocket/tcpevents.sock"
	prefixFilePath  = "/var/local/uuid/prefix"
	// The init container that writes the prefix file.
	prefixWriter = "set-up-uuid-prefix-file"
)

// container returns the container or init container of pod named name.
func container(pod *corev1.PodSpec, name string) *corev1.Container {
	for _, cs := range [][]corev1.Container{pod.InitContainers, pod.Containers} {
		for i := range cs {
			if cs[i].Name == name {
				return &cs[i]
			}
		}
	}
	return nil
}

// isInit reports whether pod's container name is an init container.
func isInit(pod *corev1.PodSpec, name string) bool {
	return slices.ContainsFunc(pod.InitContainers, func(c corev1.Container) bool { return c.Name == name })
}

// allContainers returns the init containers then the containers of pod.
func allContainers(pod *corev1.PodSpec) []*corev1.Container {
	var out []*corev1.Container
	for _, cs := range [][]corev1.Container{pod.InitContainers, pod.Containers} {
		for i := range cs {
			out = append(out, &cs[i])
		}
	}
	return out
}

// mountOf returns the volume mount of c under which path lies (the
// deepest), or nil.
func mountOf(c *corev1.Container, path string) *corev1.VolumeMount {
	var best *corev1.VolumeMount
	for i, m := range c.VolumeMounts {
		mp := strings.TrimSuffix(m.MountPath, "/")
		if (path == mp || strings.HasPrefix(path, mp+"/")) && (best == nil || len(mp) > len(best.MountPath)) {
			best = &c.VolumeMounts[i]
		}
	}
	return best
}

func volume(pod *corev1.PodSpec, name string) *corev1.Volume {
	for i := range pod.Volumes {
		if pod.Volumes[i].Name == name {
			return &pod.Volumes[i]
		}
	}
	return nil
}

// imageTag returns the tag of an image reference ("" if it has none), and
// whether it is pinned by digest.
func imageTag(image string) (tag string, digest bool) {
	if _, d, ok := strings.Cut(image, "@"); ok {
		return "", strings.HasPrefix(d, "sha256:")
	}
	name := image[strings.LastIndex(image, "/")+1:]
	if _, tag, ok := strings.Cut(name, ":"); ok {
		return tag, false
	}
	return "", false
}

func TestImageTag(t *testing.T) {
	for _, tt := range []struct {
		image, tag string
		digest     bool
	}{
		{"measurementlab/tcp-info:v1.9.0", "v1.9.0", false},
		{"registry:5000/ph", "", false},
		{"registry:5000/ph:v1", "v1", false},
		{"ph@sha256:0123", "", true},
		{"debian", "", false},
	} {
		if tag, digest := imageTag(tt.image); tag != tt.tag || digest != tt.digest {
			t.Errorf("imageTag(%q) = %q, %v; want %q, %v", tt.image, tag, digest, tt.tag, tt.digest)
		}
	}
}

// isLoopback reports whether host:port listens on a loopback address only.
func isLoopback(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return host == "localhost" || ip != nil && ip.IsLoopback()
}

// TestDaemonSet checks the DaemonSet against what the daemon and tcp-info
// need to run in it, laid out as M-Lab runs them.
func TestDaemonSet(t *testing.T) {
	ds := loadDaemonSet(t, daemonSetPath)
	daemon := newProgram(t, "packet-headers", daemonBinary(t), false)
	pod := &ds.Spec.Template.Spec
	errorf := func(t *testing.T, format string, args ...any) {
		t.Helper()
		t.Errorf(daemonSetPath+": "+format, args...)
	}

	if ds.APIVersion != "apps/v1" || ds.Kind != "DaemonSet" {
		errorf(t, "apiVersion %q kind %q, want apps/v1 DaemonSet", ds.APIVersion, ds.Kind)
	}
	if ds.Spec.Selector == nil || len(ds.Spec.Selector.MatchLabels) == 0 {
		errorf(t, "no spec.selector.matchLabels")
	} else {
		for k, v := range ds.Spec.Selector.MatchLabels {
			if ds.Spec.Template.Labels[k] != v {
				errorf(t, "selector %s=%s does not match the template's labels %v", k, v, ds.Spec.Template.Labels)
			}
		}
	}
	if !pod.HostNetwork {
		errorf(t, "hostNetwork must be true: the capture and tcp-info need the host's network namespace")
	}
	if pod.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		errorf(t, "dnsPolicy %q, want ClusterFirstWithHostNet (with hostNetwork, ClusterFirst falls back to the node's resolver)", pod.DNSPolicy)
	}

	ph, ti, writer := container(pod, "packet-headers"), container(pod, "tcp-info"), container(pod, prefixWriter)
	if ph == nil || ti == nil || writer == nil || !isInit(pod, prefixWriter) {
		t.Fatalf("%s: want containers packet-headers and tcp-info and init container %s", daemonSetPath, prefixWriter)
	}

	t.Run("images", func(t *testing.T) {
		for _, c := range allContainers(pod) {
			tag, digest := imageTag(c.Image)
			if !digest && (tag == "" || tag == "latest") {
				errorf(t, "container %s: image %q: want a pinned tag (not latest) or a digest, so that every node runs the same build", c.Name, c.Image)
			}
		}
		if tag, _ := imageTag(ph.Image); !regexp.MustCompile(`^v\d+\.\d+\.\d+$`).MatchString(tag) {
			errorf(t, "packet-headers image %q: want a release tag vX.Y.Z", ph.Image)
		}
	})

	t.Run("volumes", func(t *testing.T) {
		used := map[string]bool{}
		for _, c := range allContainers(pod) {
			for _, m := range c.VolumeMounts {
				used[m.Name] = true
				if volume(pod, m.Name) == nil {
					errorf(t, "container %s mounts volume %q, which is not declared", c.Name, m.Name)
				}
			}
		}
		for _, v := range pod.Volumes {
			if !used[v.Name] {
				errorf(t, "volume %q is mounted by no container", v.Name)
			}
		}
	})

	// shared checks that path is, in each of the containers, on the same
	// volume, of the kind want accepts; rw names the containers that
	// must be able to write it, and the others must mount it read-only.
	shared := func(t *testing.T, what, path string, want func(*corev1.Volume) bool, rw []string, cs ...*corev1.Container) {
		t.Helper()
		name := ""
		for _, c := range cs {
			m := mountOf(c, path)
			if m == nil {
				errorf(t, "container %s does not mount %s, %s", c.Name, filepath.Dir(path), what)
				continue
			}
			if name == "" {
				name = m.Name
			} else if m.Name != name {
				errorf(t, "%s (%s) is on volume %s in one container, %s in %s: not shared", what, path, name, m.Name, c.Name)
			}
			if w := slices.Contains(rw, c.Name); w == m.ReadOnly {
				errorf(t, "container %s mounts %s (%s) with readOnly %v, want %v", c.Name, what, path, m.ReadOnly, !w)
			}
		}
		if v := volume(pod, name); v != nil && !want(v) {
			errorf(t, "%s (%s) is on volume %s, which is not of the kind it needs: %+v", what, path, name, v.VolumeSource)
		}
	}
	isEmptyDir := func(v *corev1.Volume) bool { return v.EmptyDir != nil }
	isHostPath := func(v *corev1.Volume) bool { return v.HostPath != nil }

	t.Run("eventsocket", func(t *testing.T) {
		phSock, _ := flagValue(ph.Args, "tcpinfo.eventsocket")
		tiSock, _ := flagValue(ti.Args, "tcpinfo.eventsocket")
		if phSock != eventSocketPath || tiSock != eventSocketPath {
			errorf(t, "eventsocket of packet-headers %q, of tcp-info %q: want both %s, as M-Lab's", phSock, tiSock, eventSocketPath)
		}
		// tcp-info creates the socket; connecting needs no write access
		// to the directory, but the mount is the pod's own.
		shared(t, "the eventsocket", eventSocketPath, isEmptyDir, []string{"tcp-info", "packet-headers"}, ti, ph)
	})

	t.Run("uuid prefix", func(t *testing.T) {
		// The init container writes the file the two others read.
		written, _ := flagValue(writer.Args, "filename")
		tiPrefix, _ := flagValue(ti.Args, "uuid-prefix-file")
		phPrefix, _ := flagValue(ph.Args, "uuid-prefix-file")
		if written != prefixFilePath || tiPrefix != prefixFilePath || phPrefix != prefixFilePath {
			errorf(t, "%s writes -filename=%q, tcp-info reads %q, packet-headers %q: want all %s", prefixWriter, written, tiPrefix, phPrefix, prefixFilePath)
		}
		shared(t, "the UUID prefix file", prefixFilePath, isEmptyDir, []string{prefixWriter}, writer, ti, ph)
	})

	t.Run("data", func(t *testing.T) {
		dir, _ := flagValue(ph.Args, "datadir")
		out, _ := flagValue(ti.Args, "output")
		if dir == "" || out == "" {
			errorf(t, "packet-headers -datadir=%q, tcp-info -output=%q: want both", dir, out)
			return
		}
		// Both on the node's disk, for the uploader.
		shared(t, "packet-headers' -datadir", dir, isHostPath, []string{"packet-headers"}, ph)
		shared(t, "tcp-info's -output", out, isHostPath, []string{"tcp-info"}, ti)
		if m, n := mountOf(ph, dir), mountOf(ti, out); m != nil && n != nil && m.Name != n.Name {
			errorf(t, "packet-headers writes to volume %s, tcp-info to %s: want one data volume", m.Name, n.Name)
		}
	})

	t.Run("anonymization", func(t *testing.T) {
		phAnon, ok1 := flagValue(ph.Args, "anonymize.ip")
		tiAnon, ok2 := flagValue(ti.Args, "anonymize.ip")
		if !ok1 || !ok2 || phAnon != tiAnon {
			errorf(t, "-anonymize.ip of packet-headers %q, of tcp-info %q: want both set, the same", phAnon, tiAnon)
		}
		if !slices.Contains([]string{"none", "netblock"}, phAnon) {
			errorf(t, "-anonymize.ip=%q: want none or netblock", phAnon)
		}
	})

	t.Run("metrics", func(t *testing.T) {
		for _, c := range []*corev1.Container{ph, ti} {
			if addr, _ := flagValue(c.Args, "prometheusx.listen-address"); !isLoopback(addr) {
				errorf(t, "%s serves metrics on %q: with hostNetwork that is every address of the node; want 127.0.0.1 (kube-rbac-proxy exposes them)", c.Name, addr)
			}
		}
		addr := daemon.value(t, ph.Args, "prometheusx.listen-address")
		if addr != "127.0.0.1:9993" {
			errorf(t, "packet-headers -prometheusx.listen-address=%s, want 127.0.0.1:9993 (M-Lab's port for it)", addr)
		}
		// Prometheus cannot reach 127.0.0.1 of a node: scraping is the
		// overlay's business.
		if ds.Spec.Template.Annotations["prometheus.io/scrape"] == "true" {
			errorf(t, "prometheus.io/scrape is true, but the metrics are on 127.0.0.1 only; the kube-rbac-proxy overlay sets it")
		}
		p := ph.ReadinessProbe
		if p == nil || p.HTTPGet == nil {
			errorf(t, "packet-headers: want a readinessProbe with httpGet on its metrics")
			return
		}
		_, port, _ := net.SplitHostPort(addr)
		if got := net.JoinHostPort(p.HTTPGet.Host, p.HTTPGet.Port.String()); got != addr || p.HTTPGet.Path != "/metrics" {
			errorf(t, "packet-headers readinessProbe gets http://%s%s, want http://%s/metrics (the port is %s)", got, p.HTTPGet.Path, addr, port)
		}
	})

	t.Run("security", func(t *testing.T) {
		psc := pod.SecurityContext
		if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
			errorf(t, "the pod's securityContext must set runAsNonRoot: true and a non-zero runAsUser")
		}
		if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
			errorf(t, "automountServiceAccountToken must be false: no container talks to the API server")
		}
		// What each container may add to nothing: packet-headers opens
		// an AF_PACKET socket; the init container gives the data
		// directory to nobody. Nothing else is root or privileged.
		adds := map[string][]corev1.Capability{
			"packet-headers":     {"NET_RAW"},
			"set-data-dir-perms": {"CHOWN", "FOWNER"},
		}
		for _, c := range allContainers(pod) {
			sc := c.SecurityContext
			if sc == nil || sc.Capabilities == nil {
				errorf(t, "container %s: no securityContext.capabilities: want drop [ALL]", c.Name)
				continue
			}
			if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
				errorf(t, "container %s drops capabilities %v, want [ALL]", c.Name, sc.Capabilities.Drop)
			}
			if !slices.Equal(sc.Capabilities.Add, adds[c.Name]) {
				errorf(t, "container %s adds capabilities %v, want %v", c.Name, sc.Capabilities.Add, adds[c.Name])
			}
			if sc.Privileged != nil && *sc.Privileged {
				errorf(t, "container %s is privileged", c.Name)
			}
			if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
				errorf(t, "container %s: readOnlyRootFilesystem must be true (it writes only to its volumes)", c.Name)
			}
			root := sc.RunAsUser != nil && *sc.RunAsUser == 0
			if root != (c.Name == "set-data-dir-perms") {
				errorf(t, "container %s runs as root: %v; only set-data-dir-perms may", c.Name, root)
			}
			noEscalation := sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation
			if c.Name == "packet-headers" && noEscalation {
				errorf(t, "packet-headers: allowPrivilegeEscalation: false sets no_new_privs, which disables the binary's file capability")
			}
			if c.Name != "packet-headers" && !noEscalation {
				errorf(t, "container %s needs no privilege: set allowPrivilegeEscalation: false", c.Name)
			}
		}
	})

	t.Run("resources", func(t *testing.T) {
		for _, c := range pod.Containers {
			limit, request := c.Resources.Limits.Memory(), c.Resources.Requests.Memory()
			if limit.IsZero() {
				errorf(t, "container %s has no memory limit", c.Name)
			}
			if limit.Cmp(*request) < 0 {
				errorf(t, "container %s requests %s of memory, more than its limit %s", c.Name, request, limit)
			}
		}
	})

	// The memory limit holds what the daemon may use, given its flags.
	t.Run("memory", func(t *testing.T) {
		limit := ph.Resources.Limits.Memory()
		checkMemoryBudget(t, daemonSetPath, daemon, ph.Args, limit.Value())
	})

	if grace := pod.TerminationGracePeriodSeconds; grace == nil || time.Duration(*grace)*time.Second < daemon.duration(t, ph.Args, "sigtermwait")+10*time.Second {
		errorf(t, "terminationGracePeriodSeconds %v leaves less than 10s after -sigtermwait to publish", grace)
	}
}

// TestKubeRBACProxy checks the overlay that puts kube-rbac-proxy in front of
// packet-headers' metrics: the DaemonSet it makes (merged here as kustomize
// merges it, and by kubectl kustomize itself where installed) and the RBAC
// objects it needs.
func TestKubeRBACProxy(t *testing.T) {
	base := loadKustomization(t, "deploy/k8s/base")
	if !slices.Equal(base.Resources, []string{filepath.Base(daemonSetPath)}) {
		t.Errorf("deploy/k8s/base/kustomization.yaml: resources %q, want only %s", base.Resources, filepath.Base(daemonSetPath))
	}
	k := loadKustomization(t, proxyDir)
	if !slices.Contains(k.Resources, "../base") || len(k.Patches) != 1 {
		t.Fatalf("%s/kustomization.yaml: want ../base among its resources and one patch, got %q and %v", proxyDir, k.Resources, k.Patches)
	}
	patch := loadDaemonSet(t, filepath.Join(proxyDir, k.Patches[0].Path))
	rbac := &manifests{}
	for _, r := range k.Resources {
		if r == "../base" {
			continue
		}
		m := loadManifests(t, filepath.Join(proxyDir, r))
		rbac.ServiceAccounts = append(rbac.ServiceAccounts, m.ServiceAccounts...)
		rbac.ClusterRoles = append(rbac.ClusterRoles, m.ClusterRoles...)
		rbac.ClusterRoleBindings = append(rbac.ClusterRoleBindings, m.ClusterRoleBindings...)
		if len(m.DaemonSets) > 0 {
			t.Errorf("%s/%s: a DaemonSet beside the base's", proxyDir, r)
		}
	}

	baseDS := loadDaemonSet(t, daemonSetPath)
	if patch.Name != baseDS.Name {
		t.Errorf("the patch is of DaemonSet %q, the base's is %q", patch.Name, baseDS.Name)
	}
	ds, err := mergeProxyPatch(baseDS, patch)
	if err != nil {
		t.Fatalf("%s/%s: %v", proxyDir, k.Patches[0].Path, err)
	}
	checkProxied(t, "base + patch", baseDS, ds, rbac, k.Namespace)

	t.Run("kubectl kustomize", func(t *testing.T) {
		kubectl, err := exec.LookPath("kubectl")
		if err != nil {
			t.Skip("kubectl not installed; the overlay was checked by merging the patch here")
		}
		out, err := exec.Command(kubectl, "kustomize", filepath.Join(root, proxyDir)).Output()
		if err != nil {
			t.Fatalf("kubectl kustomize %s: %v\n%s", proxyDir, err, exitStderr(err))
		}
		m, err := decodeManifests(out)
		if err != nil {
			t.Fatalf("kubectl kustomize %s: %v", proxyDir, err)
		}
		if len(m.DaemonSets) != 1 {
			t.Fatalf("kubectl kustomize %s: %d DaemonSets, want 1", proxyDir, len(m.DaemonSets))
		}
		kds := m.DaemonSets[0]
		if kds.Namespace != k.Namespace {
			t.Errorf("kubectl kustomize %s: DaemonSet in namespace %q, want the kustomization's %q", proxyDir, kds.Namespace, k.Namespace)
		}
		checkProxied(t, "kubectl kustomize", baseDS, kds, m, k.Namespace)
		// The merge above is the one kustomize makes.
		kds.Namespace = ""
		byName := func(a, b corev1.Container) int { return strings.Compare(a.Name, b.Name) }
		slices.SortFunc(kds.Spec.Template.Spec.Containers, byName)
		slices.SortFunc(ds.Spec.Template.Spec.Containers, byName)
		if diff := gocmp.Diff(ds, kds); diff != "" {
			t.Errorf("mergeProxyPatch and kubectl kustomize differ (-merge +kustomize):\n%s", diff)
		}
	})
}

// mergeProxyPatch merges the kube-rbac-proxy patch into the base as a
// strategic merge patch does with what the patch holds: annotations added,
// containers added (matched by name, and the patch must not change the
// base's), the pod's service account set. A field of any other kind in the
// patch is an error, so that nothing in it escapes the checks.
func mergeProxyPatch(base, patch *appsv1.DaemonSet) (*appsv1.DaemonSet, error) {
	ds := base.DeepCopy()
	p := patch.DeepCopy()
	tmpl, ptmpl := &ds.Spec.Template, &p.Spec.Template
	if tmpl.Annotations == nil {
		tmpl.Annotations = map[string]string{}
	}
	for k, v := range ptmpl.Annotations {
		tmpl.Annotations[k] = v
	}
	for _, c := range ptmpl.Spec.Containers {
		if container(&tmpl.Spec, c.Name) != nil {
			return nil, fmt.Errorf("the patch changes the base's container %s", c.Name)
		}
		tmpl.Spec.Containers = append(tmpl.Spec.Containers, c)
	}
	tmpl.Spec.ServiceAccountName = ptmpl.Spec.ServiceAccountName
	tmpl.Spec.AutomountServiceAccountToken = ptmpl.Spec.AutomountServiceAccountToken
	// What is left of the patch must be what names the object.
	ptmpl.Annotations, ptmpl.Spec.Containers = nil, nil
	ptmpl.Spec.ServiceAccountName, ptmpl.Spec.AutomountServiceAccountToken = "", nil
	rest := appsv1.DaemonSet{TypeMeta: p.TypeMeta, ObjectMeta: metav1.ObjectMeta{Name: p.Name}}
	if diff := gocmp.Diff(rest, *p); diff != "" {
		return nil, fmt.Errorf("the patch sets fields this test does not merge (-want +got):\n%s", diff)
	}
	return ds, nil
}

func exitStderr(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}

// checkProxied checks a DaemonSet with the kube-rbac-proxy sidecar, and
// the RBAC objects beside it.
func checkProxied(t *testing.T, where string, base, ds *appsv1.DaemonSet, rbac *manifests, namespace string) {
	t.Helper()
	errorf := func(format string, args ...any) {
		t.Helper()
		t.Errorf(where+": "+format, args...)
	}
	pod := &ds.Spec.Template.Spec
	for _, c := range allContainers(&base.Spec.Template.Spec) {
		if got := container(pod, c.Name); got == nil || fmt.Sprint(got.Args) != fmt.Sprint(c.Args) {
			errorf("the base's container %s is missing or changed", c.Name)
		}
	}
	proxy := container(pod, "kube-rbac-proxy")
	ph := container(pod, "packet-headers")
	if proxy == nil || ph == nil || isInit(pod, proxy.Name) {
		t.Fatalf("%s: want containers kube-rbac-proxy and packet-headers", where)
	}
	if tag, digest := imageTag(proxy.Image); !digest && (tag == "" || tag == "latest") {
		errorf("kube-rbac-proxy image %q: want a pinned tag", proxy.Image)
	}
	metrics, _ := flagValue(ph.Args, "prometheusx.listen-address")
	if up, _ := flagValue(proxy.Args, "upstream"); up != "http://"+metrics+"/" {
		errorf("kube-rbac-proxy --upstream=%s, want http://%s/ (packet-headers' -prometheusx.listen-address)", up, metrics)
	}
	listen, _ := flagValue(proxy.Args, "secure-listen-address")
	host, port, err := net.SplitHostPort(listen)
	if err != nil || host != "$(IP)" {
		errorf("kube-rbac-proxy --secure-listen-address=%s: want $(IP):port, the node's address", listen)
	}
	ipFromPod := false
	for _, e := range proxy.Env {
		if e.Name == "IP" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.podIP" {
			ipFromPod = true
		}
	}
	if !ipFromPod {
		errorf("kube-rbac-proxy: no env IP from status.podIP for --secure-listen-address")
	}
	if len(proxy.Ports) != 1 || strconv.Itoa(int(proxy.Ports[0].ContainerPort)) != port {
		errorf("kube-rbac-proxy ports %v, want the one of --secure-listen-address, %s", proxy.Ports, port)
	}
	ann := ds.Spec.Template.Annotations
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/scheme"] != "https" || ann["prometheus.io/port"] != port {
		errorf("annotations %v: want prometheus.io/scrape \"true\", scheme https and port %s (the proxy's)", ann, port)
	}
	path := cmp.Or(ann["prometheus.io/path"], "/metrics")
	if allow, _ := flagValue(proxy.Args, "allow-paths"); !slices.Contains(strings.Split(allow, ","), path) {
		errorf("kube-rbac-proxy --allow-paths=%s does not allow %s, the scraped path", allow, path)
	}
	if sc := proxy.SecurityContext; sc == nil || sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) ||
		len(sc.Capabilities.Add) > 0 || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.RunAsUser != nil {
		errorf("kube-rbac-proxy: want capabilities drop [ALL], none added, allowPrivilegeEscalation false, the pod's (non-root) user")
	}
	if pod.AutomountServiceAccountToken == nil || !*pod.AutomountServiceAccountToken {
		errorf("automountServiceAccountToken must be true: the proxy authenticates its clients with the API server")
	}

	// The proxy's account may review tokens and access; a role lets
	// scrapers get the path.
	if len(rbac.ServiceAccounts) != 1 || pod.ServiceAccountName != rbac.ServiceAccounts[0].Name {
		errorf("serviceAccountName %q: want the one ServiceAccount of the overlay", pod.ServiceAccountName)
		return
	}
	sa := rbac.ServiceAccounts[0]
	grants := func(roleName string) (reviews, metricsGet bool) {
		review := map[string]bool{}
		for _, r := range rbac.ClusterRoles {
			if r.Name != roleName {
				continue
			}
			for _, rule := range r.Rules {
				for _, res := range rule.Resources {
					if slices.Contains(rule.Verbs, "create") {
						review[res] = true
					}
				}
				if slices.Contains(rule.NonResourceURLs, path) && slices.Contains(rule.Verbs, "get") {
					metricsGet = true
				}
			}
		}
		return review["tokenreviews"] && review["subjectaccessreviews"], metricsGet
	}
	bound := false
	for _, b := range rbac.ClusterRoleBindings {
		for _, s := range b.Subjects {
			if s.Kind == "ServiceAccount" && s.Name == sa.Name && s.Namespace == cmp.Or(sa.Namespace, namespace) && b.RoleRef.Kind == "ClusterRole" {
				if ok, _ := grants(b.RoleRef.Name); ok {
					bound = true
				}
			}
		}
	}
	if !bound {
		errorf("no ClusterRoleBinding gives ServiceAccount %s/%s a ClusterRole that may create tokenreviews and subjectaccessreviews", cmp.Or(sa.Namespace, namespace), sa.Name)
	}
	reader := false
	for _, r := range rbac.ClusterRoles {
		if _, ok := grants(r.Name); ok {
			reader = true
		}
	}
	if !reader {
		errorf("no ClusterRole may get %s, for scrapers to be bound to", path)
	}
}
