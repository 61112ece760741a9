package saver

import (
	"bytes"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/m-lab/packet-headers/internal/replay"
)

var publishDir = flag.String("publishdir", "/var/tmp", "BenchmarkPublish: the directory under which files are published; it should be on the data directory's file system (not tmpfs)")

// BenchmarkPublish publishes small files (1.2 KB, about the size of a short
// flow's compressed file) in one date directory, the way a saver does:
// unnamed file, write, link, close. It reports the CPU time (user and system,
// of the whole process) and the wall time per file, without syncing, with
// the file synced before the link, and with the directory synced after it
// too (what -fsync does). Run it on the disk the data directory is on:
//
//	go test -run '^$' -bench BenchmarkPublish -benchtime 1000x -count 5 ./saver -publishdir /var/tmp
func BenchmarkPublish(b *testing.B) {
	data := make([]byte, 1200)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(r.Uint32()) // incompressible, like gzip output
	}
	for _, m := range []struct {
		name           string
		syncFile, link bool // link: what Config.Sync does (the file, then the directory)
	}{
		{name: "nosync"},
		{name: "filesync", syncFile: true},
		{name: "fsync", link: true},
	} {
		b.Run(m.name, func(b *testing.B) {
			root, err := os.MkdirTemp(*publishDir, "packet-headers-bench-")
			if err != nil {
				b.Fatal(err)
			}
			defer func() {
				if err := os.RemoveAll(root); err != nil {
					b.Error(err)
				}
			}()
			const rel = "2024/11/18"
			if err := makeDirs(root, rel); err != nil {
				b.Fatal(err)
			}
			dir := filepath.Join(root, rel)
			cfg := &Pool{Config: Config{Dir: root, Sync: m.link}}
			var before, after unix.Rusage
			if err := unix.Getrusage(unix.RUSAGE_SELF, &before); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for i := range b.N {
				f, err := createHidden(dir)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := f.Write(data); err != nil {
					b.Fatal(err)
				}
				if m.syncFile {
					if err := f.Sync(); err != nil {
						b.Fatal(err)
					}
				}
				if err := linkFile(f, filepath.Join(dir, fmt.Sprintf("host_1548788619_%016X.pcap.gz", i)), m.link); err != nil {
					b.Fatal(err)
				}
				if m.link {
					if err := cfg.syncDirs(dir, rel); err != nil {
						b.Fatal(err)
					}
				}
				if err := f.Close(); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if err := unix.Getrusage(unix.RUSAGE_SELF, &after); err != nil {
				b.Fatal(err)
			}
			cpu := time.Duration(after.Utime.Nano() - before.Utime.Nano() + after.Stime.Nano() - before.Stime.Nano())
			b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-us/file")
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N), "wall-us/file")
			// Every file is there, whole.
			got, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("host_1548788619_%016X.pcap.gz", b.N-1)))
			if err != nil || !bytes.Equal(got, data) {
				b.Fatalf("last file: %d bytes, %v", len(got), err)
			}
		})
	}
}

// syncEvent is one fsync seen by recordSyncs: what was synced and whether
// the flow's final file name existed at that moment.
type syncEvent struct {
	Target    string // the directory synced, or "file" for a regular file
	NameExist bool
}

// recordSyncs replaces fsync for the test with one that records each call
// (and then syncs, or returns fail(isDir) if that is not nil).
func recordSyncs(t *testing.T, final func() string, fail func(isDir bool) error) *[]syncEvent {
	t.Helper()
	var events []syncEvent
	old := fsync
	t.Cleanup(func() { fsync = old })
	fsync = func(fd int) error {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			t.Errorf("fstat: %v", err)
			return err
		}
		isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
		target := "file"
		if isDir {
			p, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
			if err != nil {
				t.Errorf("readlink: %v", err)
			}
			target = p
		}
		_, err := os.Lstat(final())
		events = append(events, syncEvent{target, err == nil})
		if fail != nil {
			if err := fail(isDir); err != nil {
				return err
			}
		}
		return old(fd)
	}
	return &events
}

// saveFlow runs one saver for uuid over pkts and closes it.
func saveFlow(pool *Pool, uuid string, pkts []replay.Packet) {
	s := pool.New(uuid, opened, nil)
	var wg sync.WaitGroup
	s.Start(&wg)
	for _, p := range pkts {
		s.Push(p.Packet)
	}
	s.Close()
	wg.Wait()
}

// TestSyncOrder checks what Config.Sync syncs, and when: the file before it
// has its name, then its directory once it has, and the first time the date
// directories above; nothing at all without Sync.
func TestSyncOrder(t *testing.T) {
	const uuid2 = "host_1548788619_00000000000084FE"
	for _, stream := range []bool{false, true} {
		t.Run(map[bool]string{false: "buffered", true: "stream"}[stream], func(t *testing.T) {
			dir := t.TempDir()
			cfg := newConfig(t, dir)
			cfg.Stream = stream
			cfg.Sync = true
			name := DatePath(dir, testUUID, opened)
			events := recordSyncs(t, func() string { return name }, nil)

			pool := NewPool(*cfg)
			saveFlow(pool, testUUID, readPackets(t, "v4.pcap"))
			date := filepath.Dir(name)
			want := []syncEvent{
				{"file", false}, // the data, before the name exists
				{date, true},    // the name
				{filepath.Join(dir, "2024", "11"), true},
				{filepath.Join(dir, "2024"), true},
				{dir, true},
			}
			if diff := cmp.Diff(want, *events); diff != "" {
				t.Errorf("first file: syncs (-want +got):\n%s", diff)
			}
			// A second file in the same directory: its data and its
			// name only.
			*events = nil
			name = DatePath(dir, uuid2, opened)
			saveFlow(pool, uuid2, readPackets(t, "v4.pcap"))
			want = []syncEvent{{"file", false}, {date, true}}
			if diff := cmp.Diff(want, *events); diff != "" {
				t.Errorf("second file: syncs (-want +got):\n%s", diff)
			}
			if n := testutil.ToFloat64(cfg.Metrics.FilesPublished); n != 2 {
				t.Errorf("files published = %v, want 2", n)
			}
			for _, u := range []string{testUUID, uuid2} {
				if got := readBack(t, DatePath(dir, u, opened)); len(got.Records) == 0 {
					t.Errorf("%s: no records", u)
				}
			}
		})
	}
	t.Run("no sync", func(t *testing.T) {
		dir := t.TempDir()
		cfg := newConfig(t, dir)
		events := recordSyncs(t, func() string { return DatePath(dir, testUUID, opened) }, nil)
		saveFlow(NewPool(*cfg), testUUID, readPackets(t, "v4.pcap"))
		if len(*events) != 0 {
			t.Errorf("syncs without Config.Sync: %v", *events)
		}
		if n := testutil.ToFloat64(cfg.Metrics.FilesPublished); n != 1 {
			t.Errorf("files published = %v, want 1", n)
		}
	})
}

// TestSyncErrors: a file whose data cannot be synced is not published, and
// is counted as a write error; one whose directory cannot be synced is
// whole under its name, which cannot be taken back, but counted as a write
// error, not published; a file system that cannot sync directories at all
// (EINVAL) publishes as usual.
func TestSyncErrors(t *testing.T) {
	tests := []struct {
		name      string
		fail      func(isDir bool) error
		wantFile  bool
		published float64
		writeErrs float64
	}{
		{"file sync fails", func(isDir bool) error {
			if !isDir {
				return unix.EIO
			}
			return nil
		}, false, 0, 1},
		{"directory sync fails", func(isDir bool) error {
			if isDir {
				return unix.EIO
			}
			return nil
		}, true, 0, 1},
		{"directories cannot be synced", func(isDir bool) error {
			if isDir {
				return unix.EINVAL
			}
			return nil
		}, true, 1, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := newConfig(t, dir)
			cfg.Sync = true
			name := DatePath(dir, testUUID, opened)
			recordSyncs(t, func() string { return name }, tt.fail)
			saveFlow(NewPool(*cfg), testUUID, readPackets(t, "v4.pcap"))
			if got := testutil.ToFloat64(cfg.Metrics.FilesPublished); got != tt.published {
				t.Errorf("files published = %v, want %v", got, tt.published)
			}
			if got := testutil.ToFloat64(cfg.Metrics.SaverErrors.WithLabelValues("write")); got != tt.writeErrs {
				t.Errorf("errors{write} = %v, want %v", got, tt.writeErrs)
			}
			_, err := os.Stat(name)
			if exists := err == nil; exists != tt.wantFile {
				t.Errorf("file exists = %v (%v), want %v", exists, err, tt.wantFile)
			}
			if tt.wantFile {
				if got := readBack(t, name); len(got.Records) == 0 {
					t.Error("published file has no records")
				}
			}
		})
	}
}

// BenchmarkRewrite measures the copy that a record too long for the room
// reserved for it costs (Saver.rewrite, stream mode): a long file's unnamed
// file copied behind a new header, in the kernel. Its size is -rewritemb.
//
//	go test -run '^$' -bench BenchmarkRewrite -benchtime 20x -count 5 ./saver -publishdir /var/tmp
func BenchmarkRewrite(b *testing.B) {
	dir, err := os.MkdirTemp(*publishDir, "rewrite")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	data := make([]byte, *rewriteMB<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		b.StopTimer()
		f, err := createHidden(dir)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := f.Write(data); err != nil {
			b.Fatal(err)
		}
		s := &Saver{file: f, dirPath: dir, w: &pcapWriter{head: make([]byte, 300), out: &countingWriter{w: f, n: int64(len(data))}}}
		b.StartTimer()
		if err := s.rewrite(make([]byte, 320)); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if fi, err := s.file.Stat(); err != nil || fi.Size() != int64(len(data)+20) {
			b.Fatalf("rewritten file: %v, %v", fi.Size(), err)
		}
		s.file.Close()
		b.StartTimer()
	}
}

var rewriteMB = flag.Int("rewritemb", 64, "BenchmarkRewrite: the size of the file rewritten, in MiB")
