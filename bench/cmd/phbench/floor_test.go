package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// TestPublishFloor measures the floor on a data directory of three files:
// it writes the median one's size, publishes in the date directory, and
// leaves the directory as it was.
func TestPublishFloor(t *testing.T) {
	data := t.TempDir()
	day := filepath.Join(data, "2026", "11", "26")
	if err := os.MkdirAll(day, 0o755); err != nil {
		t.Fatal(err)
	}
	for i, size := range []int{100, 3000, 700} {
		p := filepath.Join(day, fmt.Sprintf("%s_%016X.pcap.gz", uuidPrefix, i))
		if err := os.WriteFile(p, make([]byte, size), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	before := dirNames(t, day)
	fl, err := measurePublishFloor(data)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EISDIR) {
		t.Skipf("no O_TMPFILE on the test's file system: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if fl.Dir != day || fl.FileBytes != 700 || fl.Files != floorFiles {
		t.Errorf("floor %+v: want dir %s, 700 bytes, %d files", fl, day, floorFiles)
	}
	if fl.NoSyncCPU <= 0 || fl.SyncCPU <= 0 || fl.NoSyncWall <= 0 || fl.SyncWall <= 0 {
		t.Errorf("floor %+v: want every time positive", fl)
	}
	if after := dirNames(t, day); !slices.Equal(before, after) {
		t.Errorf("directory after the floor: %v, before: %v", after, before)
	}
}

// dirNames lists a directory's names.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

func TestPublishFloorNoFiles(t *testing.T) {
	fl, err := measurePublishFloor(t.TempDir())
	if fl != nil || err != nil {
		t.Errorf("no files: %+v, %v; want nil, nil", fl, err)
	}
}
