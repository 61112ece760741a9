package saver

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// hookSyncs replaces fsync and syncfs for one test.
func hookSyncs(t *testing.T, fs, sfs func(int) error) {
	oldF, oldS := fsync, syncfs
	fsync, syncfs = fs, sfs
	t.Cleanup(func() { fsync, syncfs = oldF, oldS })
}

func unnamed(t *testing.T, dir string) *os.File {
	t.Helper()
	f, err := createHidden(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if _, err := f.Write([]byte("data")); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestCommitterGroups: files that finish while a group is being synced are
// made durable together by one syncfs, and their directory synced once; a
// lone file gets its own fsync.
func TestCommitterGroups(t *testing.T) {
	dir := t.TempDir()
	var fsyncs, syncfss, dirSyncs atomic.Int32
	release := make(chan struct{})
	first := true
	hookSyncs(t, func(fd int) error {
		fsyncs.Add(1)
		if first { // the lone first file: hold its group
			first = false
			<-release
		}
		return nil
	}, func(fd int) error {
		syncfss.Add(1)
		return nil
	})
	c := newCommitter(func(string) error { dirSyncs.Add(1); return nil })
	var wg sync.WaitGroup
	errs := make([]error, 6)
	wg.Go(func() { errs[0] = c.publish(unnamed(t, dir), filepath.Join(dir, "f0"), dir) })
	// Wait until the first group holds the committer, then queue five.
	deadline := time.Now().Add(10 * time.Second)
	for fsyncs.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the first file was not synced")
		}
		runtime.Gosched()
	}
	for i := 1; i < 6; i++ {
		f := unnamed(t, dir)
		wg.Go(func() { errs[i] = c.publish(f, filepath.Join(dir, "f"+strconv.Itoa(i)), dir) })
	}
	for {
		c.mu.Lock()
		n := len(c.pending)
		c.mu.Unlock()
		if n == 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d files queued, want 5", n)
		}
		runtime.Gosched()
	}
	close(release)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("file %d: %v", i, err)
		}
		if _, err := os.Stat(filepath.Join(dir, "f"+strconv.Itoa(i))); err != nil {
			t.Errorf("file %d not linked: %v", i, err)
		}
	}
	if fsyncs.Load() != 1 || syncfss.Load() != 1 || dirSyncs.Load() != 2 {
		t.Errorf("fsyncs %d, syncfs %d, directory syncs %d; want 1, 1 (the group of 5), 2", fsyncs.Load(), syncfss.Load(), dirSyncs.Load())
	}
}

// TestCommitterFailures: when syncfs fails, each file is synced on its own;
// a file whose sync fails is not linked, the others are; a directory that
// cannot be synced is reported for the files linked in it.
func TestCommitterFailures(t *testing.T) {
	dir := t.TempDir()
	bad := unnamed(t, dir)
	hookSyncs(t, func(fd int) error {
		if fd == int(bad.Fd()) {
			return unix.EIO
		}
		return nil
	}, func(int) error { return unix.EIO })
	c := newCommitter(func(string) error { return nil })
	group := []*commitReq{
		{f: unnamed(t, dir), path: filepath.Join(dir, "a"), dir: dir, done: make(chan struct{})},
		{f: bad, path: filepath.Join(dir, "b"), dir: dir, done: make(chan struct{})},
		{f: unnamed(t, dir), path: filepath.Join(dir, "c"), dir: dir, done: make(chan struct{})},
	}
	c.commit(group)
	var se *syncError
	if !errors.As(group[1].err, &se) {
		t.Errorf("failed sync: err %v, want a syncError", group[1].err)
	}
	if _, err := os.Stat(filepath.Join(dir, "b")); err == nil {
		t.Error("a file whose data was not synced was linked")
	}
	for _, r := range []*commitReq{group[0], group[2]} {
		if r.err != nil {
			t.Errorf("%s: %v", r.path, r.err)
		}
		if _, err := os.Stat(r.path); err != nil {
			t.Errorf("%s not linked: %v", r.path, err)
		}
	}
	// The directory cannot be synced.
	c = newCommitter(func(string) error { return unix.EIO })
	r := &commitReq{f: unnamed(t, dir), path: filepath.Join(dir, "d"), dir: dir, done: make(chan struct{})}
	c.commit([]*commitReq{r})
	var lns *linkedNotSynced
	if !errors.As(r.err, &lns) {
		t.Errorf("directory sync failure: err %v, want linkedNotSynced", r.err)
	}
	// An existing name is never replaced.
	r = &commitReq{f: unnamed(t, dir), path: filepath.Join(dir, "a"), dir: dir, done: make(chan struct{})}
	newCommitter(func(string) error { return nil }).commit([]*commitReq{r})
	if !errors.Is(r.err, unix.EEXIST) {
		t.Errorf("linking over an existing file: %v, want EEXIST", r.err)
	}
}

// BenchmarkCommitter publishes 1.2 KB files from 32 goroutines at once
// through the committer, on -publishdir (the disk, not tmpfs, to mean
// anything), against an fsync per file.
func BenchmarkCommitter(b *testing.B) {
	dir := b.TempDir()
	if publishDir != nil && *publishDir != "" {
		d, err := os.MkdirTemp(*publishDir, "committer")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(d) })
		dir = d
	}
	data := make([]byte, 1200)
	var n atomic.Int64 // names stay unique across the benchmark's rounds
	for _, mode := range []string{"nosync", "fsync-each", "grouped"} {
		name, grouped := mode, mode == "grouped"
		b.Run(name, func(b *testing.B) {
			c := newCommitter(syncDir)
			cpu0 := processCPU(b)
			b.SetParallelism(16)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					f, err := createHidden(dir)
					if err != nil {
						b.Fatal(err)
					}
					if _, err := f.Write(data); err != nil {
						b.Fatal(err)
					}
					p := filepath.Join(dir, strconv.FormatInt(n.Add(1), 10)+name)
					switch {
					case grouped:
						err = c.publish(f, p, dir)
					case mode == "nosync":
						err = linkFile(f, p, false)
					default:
						if err = linkFile(f, p, true); err == nil {
							err = syncDir(dir)
						}
					}
					if err != nil {
						b.Fatal(err)
					}
					f.Close()
				}
			})
			b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-µs/file")
		})
	}
}

// processCPU is the process's user and system CPU time so far.
func processCPU(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
