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
	c.gather = nil // the held first group stands in for the window
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

// TestCommitterWindow: files that finish within the window of the first are
// one group, made durable by one syncfs.
func TestCommitterWindow(t *testing.T) {
	dir := t.TempDir()
	var fsyncs, syncfss atomic.Int32
	hookSyncs(t, func(int) error { fsyncs.Add(1); return nil }, func(int) error { syncfss.Add(1); return nil })
	c := newCommitter(func(string) error { return nil })
	gathered := false
	c.gather = func() { // the window ends once four files wait
		if gathered {
			return
		}
		gathered = true
		deadline := time.Now().Add(10 * time.Second)
		for {
			c.mu.Lock()
			n := len(c.pending)
			c.mu.Unlock()
			if n == 4 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%d files queued, want 4", n)
				return
			}
			runtime.Gosched()
		}
	}
	var wg sync.WaitGroup
	for i := range 4 {
		f := unnamed(t, dir)
		wg.Go(func() {
			if err := c.publish(f, filepath.Join(dir, "w"+strconv.Itoa(i)), dir); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if syncfss.Load() != 1 || fsyncs.Load() != 0 {
		t.Errorf("syncfs %d, fsync %d; want one syncfs for the group of 4", syncfss.Load(), fsyncs.Load())
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

// BenchmarkCommitter publishes groups of 1.2 KB files, one goroutine, on
// -publishdir (the disk, not tmpfs, to mean anything): without sync, with
// an fsync per file (and its directory), and as one committer group (one
// syncfs, one directory fsync), for groups of 1, 4 and 10 files. It reports
// the process's CPU per file.
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
	c := newCommitter(syncDir)
	for _, size := range []int{1, 4, 10} {
		for _, mode := range []string{"nosync", "fsync-each", "grouped"} {
			b.Run(mode+"/group="+strconv.Itoa(size), func(b *testing.B) {
				// A fresh directory: a file system whose directories
				// are lists makes every name cost more in a large one.
				dir, err := os.MkdirTemp(dir, mode)
				if err != nil {
					b.Fatal(err)
				}
				cpu0 := processCPU(b)
				for range b.N {
					group := make([]*commitReq, size)
					for i := range group {
						f, err := createHidden(dir)
						if err != nil {
							b.Fatal(err)
						}
						if _, err := f.Write(data); err != nil {
							b.Fatal(err)
						}
						p := filepath.Join(dir, strconv.FormatInt(n.Add(1), 10))
						group[i] = &commitReq{f: f, path: p, dir: dir, done: make(chan struct{})}
					}
					switch mode {
					case "grouped":
						c.commit(group)
					default:
						for _, r := range group {
							r.err = linkFile(r.f, r.path, mode == "fsync-each")
							if r.err == nil && mode == "fsync-each" {
								r.err = syncDir(dir)
							}
						}
					}
					for _, r := range group {
						if r.err != nil {
							b.Fatal(r.err)
						}
						r.f.Close()
					}
				}
				b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N*size), "cpu-µs/file")
			})
		}
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
