package main

import (
	"io"
	"testing"
)

// TestFsyncFlag: -fsync is on by default and can be turned off on the
// command line or with FSYNC, the command line winning.
func TestFsyncFlag(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want bool
	}{
		{"default", nil, nil, true},
		{"flag off", []string{"-fsync=false"}, nil, false},
		{"env off", nil, map[string]string{"FSYNC": "false"}, false},
		{"flag wins", []string{"-fsync=true"}, map[string]string{"FSYNC": "false"}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := envOf(tt.env)
			c, err := parseConfig(tt.args, io.Discard, env)
			if err != nil {
				t.Fatal(err)
			}
			if c.Fsync != tt.want {
				t.Errorf("Fsync = %v, want %v", c.Fsync, tt.want)
			}
		})
	}
	env := envOf(map[string]string{"FSYNC": "sometimes"})
	if _, err := parseConfig(nil, io.Discard, env); err == nil {
		t.Error("FSYNC=sometimes: no error")
	}
}
