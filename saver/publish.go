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
// 0775 whatever the umask. rel is a relative path like "2024/11/18".
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
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, fileMode)
	if err != nil {
		return nil, &os.PathError{Op: "open O_TMPFILE", Path: dir, Err: err}
	}
	return os.NewFile(uintptr(fd), filepath.Join(dir, "(unnamed)")), nil
}

// linkFile gives the unnamed file f the name path, atomically, and never
// replaces an existing file (linkat fails with EEXIST instead). Linking
// through /proc/self/fd needs no capability, unlike AT_EMPTY_PATH.
func linkFile(f *os.File, path string) error {
	if err := f.Chmod(fileMode); err != nil {
		return err
	}
	src := "/proc/self/fd/" + strconv.Itoa(int(f.Fd()))
	if err := unix.Linkat(unix.AT_FDCWD, src, unix.AT_FDCWD, path, unix.AT_SYMLINK_FOLLOW); err != nil {
		return &os.LinkError{Op: "linkat", Old: src, New: path, Err: err}
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
	if err := linkFile(f, probe); err != nil {
		return err
	}
	return os.Remove(probe)
}
