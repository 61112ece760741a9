package saver

import (
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Durable publication in groups.
//
// With Config.Sync, a file's data must reach the disk before it is linked
// under its name, and the name after. An fsync per file costs this VM's
// ext4 about 130-150 µs of CPU and 370 µs of wall time, ten times the file's
// creation, writing and linking (BENCHMARKS.md, "Durability"). The
// committer makes the files that are ready at the same moment durable
// together: one syncfs(2) writes back every dirty file of the file system,
// ours among them, and one fsync per directory makes the names durable. The
// first file to finish waits groupWindow (50 ms) for others to join it, and
// the files that finish while a group is being synced make up the next one;
// at 200 flows a second a group holds about ten files. A lone file is
// synced with its own fsync, which is cheaper than a syncfs of a busy file
// system. The wait delays each file's publication by at most groupWindow,
// nothing against -flowtimeout.
//
// syncfs also writes back the dirty data of other programs on the same file
// system (tcp-info's output, say); that is work the kernel does sooner or
// later anyway, and the daemon pays it only as part of a group.

// groupSyncfsMin is the smallest group synced with one syncfs rather than
// an fsync per file.
const groupSyncfsMin = 3

// groupWindow is how long the first file of a group waits for others.
const groupWindow = 50 * time.Millisecond

// maxGroup bounds a group, so that the first file of a long burst is not
// held while the rest are gathered.
const maxGroup = 256

// syncfs is unix.Syncfs; tests replace it.
var syncfs = unix.Syncfs

// commitReq is one file to make durable and name.
type commitReq struct {
	f    *os.File
	path string // its name
	dir  string // path's directory
	err  error  // the outcome, set before done is closed
	done chan struct{}
}

// committer publishes files in groups; see above. Its zero value is not
// usable: call newCommitter.
type committer struct {
	// syncDir makes the names in a directory durable (and, the first
	// time, the directories above it).
	syncDir func(dir string) error
	// gather lets a group gather before it is committed, without the
	// lock: it sleeps groupWindow (tests replace it).
	gather func()

	mu      sync.Mutex
	pending []*commitReq
	busy    bool // a goroutine is committing groups
}

func newCommitter(syncDir func(string) error) *committer {
	return &committer{syncDir: syncDir, gather: func() { time.Sleep(groupWindow) }}
}

// publish makes f durable, links it under path (in directory dir) and makes
// the name durable; it returns once that is done, or failed. A failure to
// sync the data is a *syncError and nothing is linked.
//
// The first caller to find no group in progress commits groups itself until
// none is pending: no goroutine runs while there is nothing to publish.
func (c *committer) publish(f *os.File, path, dir string) error {
	r := &commitReq{f: f, path: path, dir: dir, done: make(chan struct{})}
	c.mu.Lock()
	c.pending = append(c.pending, r)
	if c.busy {
		c.mu.Unlock()
		<-r.done
		return r.err
	}
	c.busy = true
	for {
		if c.gather != nil {
			c.mu.Unlock()
			c.gather()
			c.mu.Lock()
		}
		n := min(len(c.pending), maxGroup)
		group := c.pending[:n:n]
		c.pending = c.pending[n:]
		if len(c.pending) == 0 {
			c.pending = nil
		}
		c.mu.Unlock()
		c.commit(group)
		c.mu.Lock()
		if len(c.pending) == 0 {
			c.busy = false
			c.mu.Unlock()
			break
		}
	}
	<-r.done
	return r.err
}

// commit publishes one group.
func (c *committer) commit(group []*commitReq) {
	defer func() {
		for _, r := range group {
			close(r.done)
		}
	}()
	// The data.
	synced := false
	if len(group) >= groupSyncfsMin {
		// Any file of the group names the file system.
		synced = syncfs(int(group[0].f.Fd())) == nil
	}
	if !synced {
		// Each file on its own, so that a failure is the file's.
		for _, r := range group {
			if err := fsync(int(r.f.Fd())); err != nil {
				r.err = &syncError{&os.PathError{Op: "fsync", Path: r.path, Err: err}}
			}
		}
	}
	// The names.
	var dirs []string
	for _, r := range group {
		if r.err != nil {
			continue
		}
		if err := linkFile(r.f, r.path, false); err != nil {
			r.err = err
			continue
		}
		if !containsString(dirs, r.dir) {
			dirs = append(dirs, r.dir)
		}
	}
	for _, d := range dirs {
		if err := c.syncDir(d); err != nil {
			for _, r := range group {
				if r.err == nil && r.dir == d {
					r.err = &linkedNotSynced{err}
				}
			}
		}
	}
}

// linkedNotSynced is a file that was linked under its name, but whose
// directory could not be synced: the file is whole, its name may not survive
// a power loss.
type linkedNotSynced struct{ err error }

func (e *linkedNotSynced) Error() string { return e.err.Error() }
func (e *linkedNotSynced) Unwrap() error { return e.err }

func containsString(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}
