package deploy

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// The YAML files of this directory are decoded into the types their
// readers use (Kubernetes' API types, or a struct of the fields Prometheus
// and kustomize read) with sigs.k8s.io/yaml's strict mode: a field the type
// does not have (a misspelling), a value of the wrong type or a duplicate
// key fails the test, as it would fail kubectl apply --validate=strict.

// decodeStrict decodes one YAML document into out, refusing unknown fields,
// values of the wrong type and duplicate keys.
//
// yaml.UnmarshalStrict decodes with encoding/json, which matches a key to a
// field whatever its case: "readonly" would set ReadOnly. The API server
// matches case-sensitively, and ignores (or with strict validation,
// refuses) "readonly", so the document is decoded a second time with
// sigs.k8s.io/json, the API machinery's own case-sensitive strict decoder.
func decodeStrict(doc []byte, out any) error {
	if err := yaml.UnmarshalStrict(doc, out); err != nil {
		return err
	}
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	again := reflect.New(reflect.TypeOf(out).Elem()).Interface()
	strict, err := sigsjson.UnmarshalStrict(j, again, sigsjson.DisallowDuplicateFields, sigsjson.DisallowUnknownFields)
	if err != nil {
		return err
	}
	return errors.Join(strict...)
}

var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*$`)

// splitDocuments splits a YAML stream into its documents, leaving out those
// that hold nothing but comments.
func splitDocuments(src []byte) [][]byte {
	var docs [][]byte
	for _, d := range docSeparator.Split(string(src), -1) {
		for line := range strings.Lines(d) {
			if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
				docs = append(docs, []byte(d))
				break
			}
		}
	}
	return docs
}

// manifests holds the Kubernetes objects of one or more files, by kind.
type manifests struct {
	DaemonSets          []*appsv1.DaemonSet
	ServiceAccounts     []*corev1.ServiceAccount
	ClusterRoles        []*rbacv1.ClusterRole
	ClusterRoleBindings []*rbacv1.ClusterRoleBinding
}

// decodeManifests decodes every document of a YAML stream strictly into the
// API type its apiVersion and kind name. A kind this directory does not use
// is an error, so that nothing goes unchecked.
func decodeManifests(src []byte) (*manifests, error) {
	m := &manifests{}
	for i, doc := range splitDocuments(src) {
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &tm); err != nil {
			return nil, fmt.Errorf("document %d: %w", i+1, err)
		}
		var err error
		switch gvk := tm.APIVersion + " " + tm.Kind; gvk {
		case "apps/v1 DaemonSet":
			m.DaemonSets = append(m.DaemonSets, decodeInto[appsv1.DaemonSet](doc, &err))
		case "v1 ServiceAccount":
			m.ServiceAccounts = append(m.ServiceAccounts, decodeInto[corev1.ServiceAccount](doc, &err))
		case "rbac.authorization.k8s.io/v1 ClusterRole":
			m.ClusterRoles = append(m.ClusterRoles, decodeInto[rbacv1.ClusterRole](doc, &err))
		case "rbac.authorization.k8s.io/v1 ClusterRoleBinding":
			m.ClusterRoleBindings = append(m.ClusterRoleBindings, decodeInto[rbacv1.ClusterRoleBinding](doc, &err))
		default:
			return nil, fmt.Errorf("document %d: apiVersion %q kind %q: not a type these tests know", i+1, tm.APIVersion, tm.Kind)
		}
		if err != nil {
			return nil, fmt.Errorf("document %d (%s %s): %w", i+1, tm.Kind, tm.APIVersion, err)
		}
	}
	return m, nil
}

func decodeInto[T any](doc []byte, err *error) *T {
	v := new(T)
	*err = decodeStrict(doc, v)
	return v
}

// loadManifests decodes a file of this repository (a path from its root).
func loadManifests(t *testing.T, path string) *manifests {
	t.Helper()
	m, err := decodeManifests([]byte(readFile(t, path)))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return m
}

// loadDaemonSet decodes a file that holds one DaemonSet and nothing else.
func loadDaemonSet(t *testing.T, path string) *appsv1.DaemonSet {
	t.Helper()
	m := loadManifests(t, path)
	if len(m.DaemonSets) != 1 || len(m.ServiceAccounts)+len(m.ClusterRoles)+len(m.ClusterRoleBindings) != 0 {
		t.Fatalf("%s: want one DaemonSet and nothing else, got %d DaemonSets and %d other objects", path,
			len(m.DaemonSets), len(m.ServiceAccounts)+len(m.ClusterRoles)+len(m.ClusterRoleBindings))
	}
	return m.DaemonSets[0]
}

// kustomization is the part of kustomize's Kustomization these files use;
// strict decoding refuses any other field.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Namespace  string   `json:"namespace,omitempty"`
	Resources  []string `json:"resources,omitempty"`
	Patches    []struct {
		Path string `json:"path"`
	} `json:"patches,omitempty"`
}

// loadKustomization decodes dir/kustomization.yaml (dir from the
// repository's root) and checks that what it names exists.
func loadKustomization(t *testing.T, dir string) *kustomization {
	t.Helper()
	path := filepath.Join(dir, "kustomization.yaml")
	var k kustomization
	if err := decodeStrict([]byte(readFile(t, path)), &k); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		t.Errorf("%s: apiVersion %q kind %q, want kustomize.config.k8s.io/v1beta1 Kustomization", path, k.APIVersion, k.Kind)
	}
	for _, r := range k.Resources {
		if _, err := os.Stat(filepath.Join(root, dir, r)); err != nil {
			t.Errorf("%s: resource %s: %v", path, r, err)
		}
	}
	for _, p := range k.Patches {
		if _, err := os.Stat(filepath.Join(root, dir, p.Path)); err != nil {
			t.Errorf("%s: patch %s: %v", path, p.Path, err)
		}
	}
	return &k
}

// ruleFile is a Prometheus rule file, with the fields Prometheus 2.x and 3.x
// read (rulefmt.RuleGroups); strict decoding refuses any other.
type ruleFile struct {
	Groups []struct {
		Name     string `json:"name"`
		Interval string `json:"interval,omitempty"`
		Limit    int    `json:"limit,omitempty"`
		Rules    []struct {
			Alert         string            `json:"alert,omitempty"`
			Record        string            `json:"record,omitempty"`
			Expr          string            `json:"expr"`
			For           string            `json:"for,omitempty"`
			KeepFiringFor string            `json:"keep_firing_for,omitempty"`
			Labels        map[string]string `json:"labels,omitempty"`
			Annotations   map[string]string `json:"annotations,omitempty"`
		} `json:"rules"`
	} `json:"groups"`
}

// TestStrictDecoding checks that the decoding the other tests rely on
// refuses what a YAML reader without a schema would let through: each
// mutant of a real file differs from it in one misspelled field, one
// mistyped value or one duplicate key, and must fail to decode.
func TestStrictDecoding(t *testing.T) {
	ds := readFile(t, daemonSetPath)
	rules := readFile(t, "deploy/prometheus/alerts.yml")
	kust := readFile(t, "deploy/k8s/kube-rbac-proxy/kustomization.yaml")
	rbac := readFile(t, "deploy/k8s/kube-rbac-proxy/rbac.yaml")
	decodeDS := func(s string) error { _, err := decodeManifests([]byte(s)); return err }
	decodeRules := func(s string) error { return decodeStrict([]byte(s), new(ruleFile)) }
	decodeKust := func(s string) error { return decodeStrict([]byte(s), new(kustomization)) }

	for _, tt := range []struct {
		name      string
		src       string
		decode    func(string) error
		old, new  string
		wantInErr string
	}{
		{"misspelled pod field", ds, decodeDS, "      hostNetwork: true\n", "      hostNetwrok: true\n", "hostNetwrok"},
		{"misspelled container field", ds, decodeDS, "        readinessProbe:\n", "        readynessProbe:\n", "readynessProbe"},
		{"misspelled field in a list item", ds, decodeDS, "      - name: uuid-prefix\n        emptyDir: {}\n", "      - name: uuid-prefix\n        emptyDirectory: {}\n", "emptyDirectory"},
		{"field name in the wrong case", ds, decodeDS, "          readOnly: true\n      volumes:\n", "          readonly: true\n      volumes:\n", "readonly"},
		{"field at the wrong level", ds, decodeDS, "      dnsPolicy: ClusterFirstWithHostNet\n", "      dnsPolicy: ClusterFirstWithHostNet\n      imagePullPolicy: Always\n", "imagePullPolicy"},
		{"bad quantity", ds, decodeDS, "            memory: 3Gi\n", "            memory: 3 gigs\n", "quantities must match"},
		{"string for a bool", ds, decodeDS, "        runAsNonRoot: true\n", "        runAsNonRoot: yes please\n", "runAsNonRoot"},
		{"duplicate key", ds, decodeDS, "      hostNetwork: true\n", "      hostNetwork: true\n      hostNetwork: false\n", "hostNetwork"},
		{"unknown kind", rbac, decodeDS, "apiVersion: v1\nkind: ServiceAccount\n", "apiVersion: v1\nkind: ServiceAcount\n", "ServiceAcount"},
		{"misspelled RBAC field", rbac, decodeDS, "  - tokenreviews\n", "  - tokenreviews\n  verb:\n  - get\n", "verb"},
		{"misspelled rule field", rules, decodeRules, "    annotations:\n      summary: packet-headers on {{ $labels.instance }} captures", "    anotations:\n      summary: packet-headers on {{ $labels.instance }} captures", "anotations"},
		{"misspelled kustomization field", kust, decodeKust, "\npatches:\n", "\npatchesStrategicMerge:\n", "patchesStrategicMerge"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.decode(tt.src); err != nil {
				t.Fatalf("the file itself does not decode: %v", err)
			}
			if n := strings.Count(tt.src, tt.old); n != 1 {
				t.Fatalf("%q occurs %d times in the file, want once: update this test", tt.old, n)
			}
			err := tt.decode(strings.Replace(tt.src, tt.old, tt.new, 1))
			if err == nil {
				t.Fatalf("replacing %q by %q: decoded without error", tt.old, tt.new)
			}
			if !strings.Contains(err.Error(), tt.wantInErr) {
				t.Errorf("error %q does not mention %q", err, tt.wantInErr)
			}
		})
	}
}

func TestSplitDocuments(t *testing.T) {
	src := "# only a comment\n---\na: 1\n--- \n# c\nb: 2\n---\n\n"
	got := splitDocuments([]byte(src))
	want := []string{"\na: 1\n", "\n# c\nb: 2\n"}
	if len(got) != len(want) {
		t.Fatalf("splitDocuments(%q) = %q, want %q", src, got, want)
	}
	for i := range want {
		if !bytes.Equal(got[i], []byte(want[i])) {
			t.Errorf("document %d = %q, want %q", i, got[i], want[i])
		}
	}
}
