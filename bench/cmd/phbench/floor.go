package main

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The publish floor: what the file system alone charges for each flow's
// file. Once the daemon has stopped, phbench publishes copies of the run's
// median file into the same date directory the way the saver does
// (saver/publish.go: an unnamed O_TMPFILE file, one write, fchmod, linkat
// through /proc/self/fd, close; with -fsync, an fsync of the file before the
// link and of the directory after it) and measures the CPU of the thread
// doing it, with and without the syncs. The daemon's CPU per flow is then
// reported as a multiple of it: what it spends beyond the least any program
// writing one file per flow there would.
const (
	// floorFiles is how many files are published in each mode.
	floorFiles = 500
	// floorBytes bounds what each mode writes in all (a bulk run's files
	// are tens of MB): fewer files are published when they are large.
	floorBytes = 256 << 20
	// floorBatchBytes bounds what exists at once: files are removed, after
	// the measured part, every batch.
	floorBatchBytes = 32 << 20
)

// publishFloor is the publish floor of one run.
type publishFloor struct {
	Dir       string `json:"dir"`        // the date directory published in
	FileBytes int    `json:"file_bytes"` // the median file's size, written to each
	Files     int    `json:"files"`      // files published in each mode
	// CPU (user and system, of the publishing thread) and wall time per
	// file, µs, without syncs (-fsync=false) and with them (-fsync).
	NoSyncCPU  float64 `json:"nosync_cpu_us"`
	SyncCPU    float64 `json:"fsync_cpu_us"`
	NoSyncWall float64 `json:"nosync_wall_us"`
	SyncWall   float64 `json:"fsync_wall_us"`
}

// measurePublishFloor measures the publish floor on the daemon's files under
// dataDir; nil if the daemon published none. Every file it makes is removed.
func measurePublishFloor(dataDir string) (*publishFloor, error) {
	files, err := listFiles(dataDir)
	if err != nil {
		return nil, err
	}
	median, size, err := medianFile(files)
	if err != nil || median == "" {
		return nil, err
	}
	data, err := os.ReadFile(median)
	if err != nil {
		return nil, err
	}
	if len(data) != int(size) {
		return nil, fmt.Errorf("%s: %d bytes, had %d", median, len(data), size)
	}
	fl := &publishFloor{Dir: filepath.Dir(median), FileBytes: len(data)}
	perFile := max(len(data), 1)
	fl.Files = min(floorFiles, max(1, floorBytes/perFile))
	batch := min(fl.Files, max(1, floorBatchBytes/perFile))

	// Measured on one thread, whose CPU clock counts only this work (and
	// the kernel's on its behalf), not the rest of phbench.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var cpu, wall [2]time.Duration // [0] no sync, [1] fsync
	seq := 0
	for done := 0; done < fl.Files; done += batch {
		n := min(batch, fl.Files-done)
		var made []string
		// The two modes take turns going first, so that neither is
		// always measured on a warmer cache.
		for k := range 2 {
			sync := (k+done/batch)%2 == 1
			var names []string
			for range n {
				seq++
				// As long as the daemon's names (a UUID's 16 hex digits),
				// and never one of them.
				names = append(names, filepath.Join(fl.Dir, fmt.Sprintf("%s_floor%011X.pcap.gz", uuidPrefix, seq)))
			}
			c, w, err := publishFiles(fl.Dir, names, data, sync)
			made = append(made, names...)
			if err != nil {
				return nil, errors.Join(err, removeAll(made))
			}
			i := 0
			if sync {
				i = 1
			}
			cpu[i] += c
			wall[i] += w
		}
		if err := removeAll(made); err != nil {
			return nil, err
		}
	}
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 / float64(fl.Files) }
	fl.NoSyncCPU, fl.SyncCPU = us(cpu[0]), us(cpu[1])
	fl.NoSyncWall, fl.SyncWall = us(wall[0]), us(wall[1])
	return fl, nil
}

// medianFile returns the path and size of the median file by size (of an
// even number, the smaller of the two in the middle: a real file).
func medianFile(files map[string]string) (string, int64, error) {
	type sized struct {
		path string
		size int64
	}
	var all []sized
	for _, p := range files {
		fi, err := os.Stat(p)
		if err != nil {
			return "", 0, err
		}
		all = append(all, sized{p, fi.Size()})
	}
	if len(all) == 0 {
		return "", 0, nil
	}
	slices.SortFunc(all, func(a, b sized) int {
		return cmp.Or(cmp.Compare(a.size, b.size), strings.Compare(a.path, b.path))
	})
	m := all[(len(all)-1)/2]
	return m.path, m.size, nil
}

// publishFiles publishes data under each of paths, in dir, and returns the
// calling thread's CPU time and the wall time it took. The caller has locked
// the goroutine to its thread.
func publishFiles(dir string, paths []string, data []byte, sync bool) (cpu, wall time.Duration, err error) {
	c0, err := threadCPU()
	if err != nil {
		return 0, 0, err
	}
	w0 := time.Now()
	for _, p := range paths {
		if err := publishFile(dir, p, data, sync); err != nil {
			return 0, 0, err
		}
	}
	wall = time.Since(w0)
	c1, err := threadCPU()
	return c1 - c0, wall, err
}

// publishFile is the saver's publication of one file, in system calls: an
// unnamed file in dir, data written, its mode set, (synced,) linked under
// path, (dir synced,) closed.
func publishFile(dir, path string, data []byte, sync bool) error {
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, 0o664)
	if err != nil {
		return &os.PathError{Op: "open O_TMPFILE", Path: dir, Err: err}
	}
	err = publishFD(fd, dir, path, data, sync)
	if cerr := unix.Close(fd); err == nil && cerr != nil {
		err = &os.PathError{Op: "close", Path: path, Err: cerr}
	}
	return err
}

func publishFD(fd int, dir, path string, data []byte, sync bool) error {
	for b := data; len(b) > 0; {
		n, err := unix.Write(fd, b)
		if err != nil {
			return &os.PathError{Op: "write", Path: path, Err: err}
		}
		b = b[n:]
	}
	if err := unix.Fchmod(fd, 0o664); err != nil {
		return &os.PathError{Op: "fchmod", Path: path, Err: err}
	}
	if sync {
		if err := unix.Fsync(fd); err != nil {
			return &os.PathError{Op: "fsync", Path: path, Err: err}
		}
	}
	src := "/proc/self/fd/" + strconv.Itoa(fd)
	if err := unix.Linkat(unix.AT_FDCWD, src, unix.AT_FDCWD, path, unix.AT_SYMLINK_FOLLOW); err != nil {
		return &os.LinkError{Op: "linkat", Old: src, New: path, Err: err}
	}
	if !sync {
		return nil
	}
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: dir, Err: err}
	}
	err = unix.Fsync(dfd)
	unix.Close(dfd)
	// As the saver: a file system that cannot sync a directory needs no
	// such sync.
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTSUP) {
		return &os.PathError{Op: "fsync", Path: dir, Err: err}
	}
	return nil
}

// threadCPU is the calling thread's CPU time, user and system.
func threadCPU() (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return 0, fmt.Errorf("clock_gettime: %w", err)
	}
	return time.Duration(ts.Nano()), nil
}

// removeAll removes the files that exist among paths.
func removeAll(paths []string) error {
	var errs []error
	for _, p := range paths {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
