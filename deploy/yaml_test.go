package deploy

import (
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// parseYAML parses the subset of YAML that the files of this directory use:
// block mappings and sequences (a sequence may sit at its key's
// indentation), plain, single- and double-quoted scalars, literal and
// folded block scalars, comments, and the empty flow collections [] and {}.
// Anything else (anchors, tags, flow collections with content, several
// documents, tabs) is an error rather than a guess, so the manifests stay in
// a subset every YAML reader agrees on.
//
// It exists because no YAML module is a direct requirement of go.mod and the
// deployment files must not add one. Scalars resolve as YAML 1.2's core
// schema would for what matters here: true/false to bool, null and ~ to nil,
// decimal integers to int, everything else (and anything quoted) to string.
func parseYAML(src string) (any, error) {
	p := &yamlParser{lines: strings.Split(src, "\n")}
	ind, _, ok, err := p.peek()
	if err != nil || !ok {
		return nil, err
	}
	v, err := p.node(ind)
	if err != nil {
		return nil, err
	}
	if _, text, ok, err := p.peek(); err != nil {
		return nil, err
	} else if ok {
		return nil, p.errorf("unexpected %q after the document", text)
	}
	return v, nil
}

type yamlParser struct {
	lines []string
	i     int // the next line to read
}

func (p *yamlParser) errorf(format string, args ...any) error {
	return fmt.Errorf("line %d: %s", p.i+1, fmt.Sprintf(format, args...))
}

// peek skips blank and comment lines and returns the next line's
// indentation and text, without consuming it.
func (p *yamlParser) peek() (indent int, text string, ok bool, err error) {
	for ; p.i < len(p.lines); p.i++ {
		line := strings.TrimRight(p.lines[p.i], " \r")
		body := strings.TrimLeft(line, " ")
		if body == "" || body[0] == '#' {
			continue
		}
		if body[0] == '\t' {
			return 0, "", false, p.errorf("tab in indentation")
		}
		if body == "---" || body == "..." || body[0] == '%' {
			return 0, "", false, p.errorf("document markers and directives are not supported")
		}
		return len(line) - len(body), body, true, nil
	}
	return 0, "", false, nil
}

func isSeqItem(text string) bool { return text == "-" || strings.HasPrefix(text, "- ") }

// splitKey splits "key: value" (value may be empty). ok is false if text is
// not a mapping entry.
func splitKey(text string) (key, value string, ok bool) {
	if text == "" || strings.ContainsAny(text[:1], `"'[{&*!|>%@`+"`") {
		return "", "", false
	}
	if i := strings.Index(text, ": "); i > 0 {
		return text[:i], strings.TrimSpace(text[i+2:]), true
	}
	if k, found := strings.CutSuffix(text, ":"); found && k != "" {
		return k, "", true
	}
	return "", "", false
}

// node parses the block node whose first line is at indent.
func (p *yamlParser) node(indent int) (any, error) {
	_, text, _, _ := p.peek()
	if isSeqItem(text) {
		return p.seq(indent)
	}
	return p.mapping(indent)
}

func (p *yamlParser) mapping(indent int) (map[string]any, error) {
	out := map[string]any{}
	for {
		ind, text, ok, err := p.peek()
		if err != nil || !ok || ind < indent {
			return out, err
		}
		if ind > indent {
			return nil, p.errorf("unexpected indentation")
		}
		key, val, isKey := splitKey(text)
		if !isKey {
			return nil, p.errorf("want key: value, got %q", text)
		}
		if _, dup := out[key]; dup {
			return nil, p.errorf("duplicate key %q", key)
		}
		p.i++
		var v any
		switch {
		case val == "" || val[0] == '#':
			// The value is the block below: deeper, or a sequence at
			// the key's own indentation.
			ind2, text2, ok2, err := p.peek()
			if err != nil {
				return nil, err
			}
			if ok2 && (ind2 > indent || ind2 == indent && isSeqItem(text2)) {
				if v, err = p.node(ind2); err != nil {
					return nil, err
				}
			}
		case val[0] == '|' || val[0] == '>':
			if v, err = p.blockScalar(indent, val); err != nil {
				return nil, err
			}
		default:
			if v, err = p.scalar(val); err != nil {
				return nil, err
			}
		}
		out[key] = v
	}
}

func (p *yamlParser) seq(indent int) ([]any, error) {
	out := []any{}
	for {
		ind, text, ok, err := p.peek()
		if err != nil || !ok || ind < indent || ind == indent && !isSeqItem(text) {
			return out, err
		}
		if ind > indent || !isSeqItem(text) {
			return nil, p.errorf("unexpected indentation")
		}
		rest := strings.TrimLeft(text[1:], " ")
		var v any
		switch {
		case rest == "" || rest[0] == '#':
			p.i++
			ind2, _, ok2, err := p.peek()
			if err != nil {
				return nil, err
			}
			if ok2 && ind2 > indent {
				if v, err = p.node(ind2); err != nil {
					return nil, err
				}
			}
		case isSeqItem(rest):
			return nil, p.errorf("nested sequence on one line is not supported")
		default:
			if _, _, isKey := splitKey(rest); isKey {
				// "- key: value": a mapping whose first line starts
				// after the dash. Blank the dash and parse on.
				off := ind + len(text) - len(rest)
				p.lines[p.i] = strings.Repeat(" ", off) + p.lines[p.i][off:]
				if v, err = p.mapping(off); err != nil {
					return nil, err
				}
			} else {
				p.i++
				if v, err = p.scalar(rest); err != nil {
					return nil, err
				}
			}
		}
		out = append(out, v)
	}
}

// blockScalar reads a | or > scalar whose key is at indent.
func (p *yamlParser) blockScalar(indent int, header string) (string, error) {
	style, chomp := header[0], strings.TrimSpace(header[1:])
	if i := strings.Index(chomp, " #"); i >= 0 {
		chomp = strings.TrimSpace(chomp[:i])
	}
	if chomp != "" && chomp != "-" && chomp != "+" {
		return "", p.errorf("block scalar header %q is not supported", header)
	}
	var lines []string
	content := -1
	for ; p.i < len(p.lines); p.i++ {
		line := strings.TrimRight(p.lines[p.i], " \r")
		body := strings.TrimLeft(line, " ")
		ind := len(line) - len(body)
		if body == "" {
			lines = append(lines, "")
			continue
		}
		if ind <= indent {
			break
		}
		if content < 0 {
			content = ind
		}
		if ind < content {
			return "", p.errorf("block scalar line less indented than its first")
		}
		lines = append(lines, line[content:])
	}
	for len(lines) > 0 && lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	var s string
	if style == '|' {
		s = strings.Join(lines, "\n")
	} else {
		// Folding: single newlines become spaces, empty lines newlines.
		var b strings.Builder
		for i, l := range lines {
			switch {
			case i == 0, l != "" && lines[i-1] == "":
			case l == "":
				b.WriteByte('\n')
			default:
				b.WriteByte(' ')
			}
			b.WriteString(l)
		}
		s = b.String()
	}
	if chomp != "-" && s != "" {
		s += "\n"
	}
	return s, nil
}

// scalar resolves a scalar written on one line, with an optional comment.
func (p *yamlParser) scalar(s string) (any, error) {
	switch s[0] {
	case '"':
		end := 1
		for ; end < len(s) && s[end] != '"'; end++ {
			if s[end] == '\\' {
				end++
			}
		}
		if end >= len(s) || !onlyComment(s[end+1:]) {
			return nil, p.errorf("bad double-quoted scalar %s", s)
		}
		v, err := strconv.Unquote(s[:end+1])
		if err != nil {
			return nil, p.errorf("bad double-quoted scalar %s: %v", s, err)
		}
		return v, nil
	case '\'':
		end := 1
		for ; end < len(s); end++ {
			if s[end] == '\'' {
				if end+1 < len(s) && s[end+1] == '\'' {
					end++
					continue
				}
				break
			}
		}
		if end >= len(s) || !onlyComment(s[end+1:]) {
			return nil, p.errorf("bad single-quoted scalar %s", s)
		}
		return strings.ReplaceAll(s[1:end], "''", "'"), nil
	case '&', '*', '!', '%', '@', '`', '|', '>':
		return nil, p.errorf("%q: anchors, aliases, tags and reserved indicators are not supported", s)
	}
	if i := strings.Index(s, " #"); i >= 0 {
		s = strings.TrimSpace(s[:i])
	}
	switch s {
	case "[]":
		return []any{}, nil
	case "{}":
		return map[string]any{}, nil
	case "true", "True", "TRUE":
		return true, nil
	case "false", "False", "FALSE":
		return false, nil
	case "null", "Null", "NULL", "~":
		return nil, nil
	}
	if s[0] == '[' || s[0] == '{' {
		return nil, p.errorf("%q: flow collections with content are not supported", s)
	}
	if strings.Contains(s, ": ") {
		return nil, p.errorf("%q: a plain scalar may not contain \": \"", s)
	}
	if n, err := strconv.Atoi(s); err == nil {
		return n, nil
	}
	return s, nil
}

func onlyComment(s string) bool {
	s = strings.TrimSpace(s)
	return s == "" || s[0] == '#'
}

func TestParseYAML(t *testing.T) {
	tests := []struct {
		name, src string
		want      any
	}{
		{
			name: "k8s style",
			src: `# comment
kind: DaemonSet   # trailing
metadata:
  annotations:
    prometheus.io/port: "9990"
    quoted: 'it''s'
spec:
  hostNetwork: true
  containers:
  - name: a
    args:
    - -x=1
    - chown 1:1 /local && echo '#'
    empty: []
  - name: b
    ports:
      - containerPort: 9991
`,
			want: map[string]any{
				"kind": "DaemonSet",
				"metadata": map[string]any{"annotations": map[string]any{
					"prometheus.io/port": "9990", "quoted": "it's",
				}},
				"spec": map[string]any{
					"hostNetwork": true,
					"containers": []any{
						map[string]any{"name": "a", "args": []any{"-x=1", "chown 1:1 /local && echo '#'"}, "empty": []any{}},
						map[string]any{"name": "b", "ports": []any{map[string]any{"containerPort": 9991}}},
					},
				},
			},
		},
		{
			name: "block scalars",
			src: `a: |
  x
    y
b: >-
  one
  two

  three
c: d
`,
			want: map[string]any{"a": "x\n  y\n", "b": "one two\nthree", "c": "d"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseYAML(tt.src)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("parseYAML (-want +got):\n%s", diff)
			}
		})
	}
	for _, bad := range []string{
		"a: 1\na: 2\n",
		"a:\n\t- b\n",
		"a: [1, 2]\n",
		"a: &x 1\n",
		"a: 1\n  b: 2\n",
		"- a\nb: 1\n",
		"a: b: c\n",
		"---\na: 1\n",
	} {
		if v, err := parseYAML(bad); err == nil {
			t.Errorf("parseYAML(%q) = %v, want an error", bad, v)
		}
	}
}
