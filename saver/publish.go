package saver

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Files and directories get the original's modes, set explicitly so that the
// process umask does not change what the uploader sees.
const (
	dirMode  = 0o775
	fileMode = 0o664
)

// DatePath returns the path of a flow's file: <dir>/YYYY/MM/DD/<uuid>.pcap.gz,
// the date being t in UTC.
func DatePath(dir, uuid string, t time.Time) string {
	return filepath.Join(dir, dateDir(t), uuid+".pcap.gz")
}

func dateDir(t time.Time) string { return t.UTC().Format("2006/01/02") }

// makeDirs creates root/<rel>, level by level, each created level with mode
// 0775 whatever the umask. rel is a relative path like "2024/11/18". (With
// Config.Sync, the new levels are made durable by syncParents once a file is
// published in them.)
func makeDirs(root, rel string) error {
	p := root
	for _, part := range strings.Split(rel, "/") {
		p = filepath.Join(p, part)
		err := os.Mkdir(p, dirMode)
		switch {
		case err == nil:
			if err := os.Chmod(p, dirMode); err != nil {
				return err
			}
		case errors.Is(err, fs.ErrExist):
		default:
			return err
		}
	}
	return nil
}

// createHidden opens an unnamed file in dir (Linux O_TMPFILE). Nothing of it is
// visible under dir until linkFile gives it a name, and if the process dies
// first the kernel frees it: no crash can leave a partial file for the
// uploader, which watches the tree and also sweeps old files (a hidden
// temporary name would not survive that sweep).
func createHidden(dir string) (*os.File, error) {
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, fileMode)
	if err != nil {
		return nil, &os.PathError{Op: "open O_TMPFILE", Path: dir, Err: err}
	}
	return os.NewFile(uintptr(fd), filepath.Join(dir, "(unnamed)")), nil
}

// linkFile gives the unnamed file f the name path, atomically, and never
// replaces an existing file (linkat fails with EEXIST instead). Linking
// through /proc/self/fd needs no capability, unlike AT_EMPTY_PATH.
//
// With sync, f's data and inode are synced (fsync) before the link, so that
// whatever survives a power loss under the name is the whole file; a failed
// sync is a *syncError and nothing is linked. Without it, the name can reach
// the disk before the data does (ext4 and XFS allocate and write the blocks
// of a new file up to tens of seconds later): a power loss can then leave an
// empty or partial file under its final name, which an uploader cannot tell
// from a good one. The name itself is made durable by syncDir on path's
// directory, after the link.
func linkFile(f *os.File, path string, sync bool) error {
	if err := f.Chmod(fileMode); err != nil {
		return err
	}
	if sync {
		if err := fsync(int(f.Fd())); err != nil {
			return &syncError{&os.PathError{Op: "fsync", Path: path, Err: err}}
		}
	}
	src := "/proc/self/fd/" + strconv.Itoa(int(f.Fd()))
	if err := unix.Linkat(unix.AT_FDCWD, src, unix.AT_FDCWD, path, unix.AT_SYMLINK_FOLLOW); err != nil {
		return &os.LinkError{Op: "linkat", Old: src, New: path, Err: err}
	}
	return nil
}

// fsync is unix.Fsync; tests replace it to see what is synced when, and to
// make it fail.
var fsync = unix.Fsync

// syncError is a failed fsync: the data may not be on the disk.
type syncError struct{ err error }

func (e *syncError) Error() string { return e.err.Error() }
func (e *syncError) Unwrap() error { return e.err }

// syncDir makes the entries of directory dir durable (fsync on the
// directory). A file system that cannot sync a directory (EINVAL, as some
// FUSE and network file systems answer) is taken to need no such sync: its
// entries are as durable as it makes them.
func syncDir(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: dir, Err: err}
	}
	err = fsync(fd)
	if cerr := unix.Close(fd); err == nil {
		err = cerr
	}
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTSUP) {
		return &syncError{&os.PathError{Op: "fsync", Path: dir, Err: err}}
	}
	return nil
}

// syncParents syncs the levels directories above dir, so that dir's own
// name, and those of the levels between, are durable: the date directories
// a saver may have just created (makeDirs), or that another saver created
// and has not yet synced.
func syncParents(dir string, levels int) error {
	for range levels {
		dir = filepath.Dir(dir)
		if err := syncDir(dir); err != nil {
			return err
		}
	}
	return nil
}

// CheckDir verifies that files can be published under dir: that it exists or
// can be created, is a directory, and supports unnamed files and linking. The
// daemon calls it before starting so that a bad -datadir is an error at start,
// not a counter that climbs.
func CheckDir(dir string) error {
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return err
	}
	f, err := createHidden(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.Write([]byte("probe")); err != nil {
		return fmt.Errorf("write probe file: %w", err)
	}
	// Link the probe to prove linkat works here, then remove it at once.
	probe := filepath.Join(dir, ".packet-headers-probe-"+strconv.Itoa(os.Getpid()))
	if err := linkFile(f, probe, false); err != nil {
		return err
	}
	return os.Remove(probe)
}
