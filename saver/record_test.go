package saver

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/m-lab/packet-headers/anonymize"
	"github.com/m-lab/packet-headers/internal/replay"
	"github.com/m-lab/packet-headers/metrics"
)

// fakeDrops is a kernel drop counter that returns n and remembers the time
// it was asked about.
type fakeDrops struct {
	n     uint64
	since atomic.Int64
}

func (f *fakeDrops) KernelDropsSince(t int64) uint64 {
	f.since.Store(t)
	return f.n
}

// recordConfig is a Config as the daemon makes it, with every field of the
// record set.
func recordConfig(t *testing.T, dir string, drops uint64) (*Config, *fakeDrops) {
	t.Helper()
	d := &fakeDrops{n: drops}
	return &Config{
		Dir:             dir,
		CaptureDuration: time.Hour,
		Metrics:         metrics.New(prometheus.NewRegistry()),
		Version:         "v1.2.3+abc1234",
		Source:          "tcpinfo",
		Anonymization:   "none",
		Interfaces:      []string{"any"},
		Drops:           d,
	}, d
}

// gzHeader is a gzip member header as parsed from a file's bytes.
type gzHeader struct {
	flags   byte
	mtime   uint32
	name    string
	comment string
	len     int // bytes of the header
}

// parseGzipHeader reads the header of a gzip file by hand (RFC 1952), to see
// its exact bytes.
func parseGzipHeader(t *testing.T, b []byte) gzHeader {
	t.Helper()
	if len(b) < 10 || b[0] != 0x1f || b[1] != 0x8b || b[2] != 8 {
		t.Fatalf("not a gzip file: % x", b[:min(len(b), 10)])
	}
	h := gzHeader{flags: b[3], mtime: uint32(b[4]) | uint32(b[5])<<8 | uint32(b[6])<<16 | uint32(b[7])<<24}
	i := 10
	if h.flags&4 != 0 {
		t.Fatal("FEXTRA set")
	}
	str := func() string {
		j := bytes.IndexByte(b[i:], 0)
		if j < 0 {
			t.Fatal("unterminated header string")
		}
		s := string(b[i : i+j])
		i += j + 1
		return s
	}
	if h.flags&gzipFNAME != 0 {
		h.name = str()
	}
	if h.flags&gzipFCOMMENT != 0 {
		h.comment = str()
	}
	h.len = i
	return h
}

// fileRecord reads a published file's record with Go's compress/gzip, as
// packet-headers inspect and M-Lab's ETL would.
func fileRecord(t *testing.T, path string) (*Record, *gzip.Reader) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	r, err := ParseRecord(zr.Comment)
	if err != nil {
		t.Fatalf("%s: %v (comment %q)", path, err, zr.Comment)
	}
	return r, zr
}

// saveAll pushes every packet before the saver runs, so that it takes them
// in one batch: what it counts as missed does not depend on scheduling.
func saveAll(cfg *Config, uuid string, pkts []replay.Packet, missedPending uint64) *Saver {
	s := NewPool(*cfg).New(uuid, opened, nil)
	s.MissedPending(missedPending)
	for _, p := range pkts {
		s.Push(p.Packet)
	}
	s.Close()
	runNow(s)
	return s
}

// manyPackets is copies of large-ndt.pcap's flow one after the other: a
// pcap stream of more than one chunk (copies >= 4), so that its header is
// written before the flow's end.
func manyPackets(t testing.TB, copies int) []replay.Packet {
	var out []replay.Packet
	var shift int64
	for range copies {
		pkts := readPackets(t, "large-ndt.pcap")
		span := pkts[len(pkts)-1].Time - pkts[0].Time + int64(time.Millisecond)
		for i := range pkts {
			pkts[i].Time += shift
		}
		out = append(out, pkts...)
		shift += span
	}
	return out
}

func without(pkts []replay.Packet, drop ...int) []replay.Packet {
	var out []replay.Packet
	for i, p := range pkts {
		if !slices.Contains(drop, i) {
			out = append(out, p)
		}
	}
	return out
}

func TestRecordFields(t *testing.T) {
	for _, stream := range []bool{false, true} {
		t.Run(map[bool]string{false: "buffered", true: "stream"}[stream], func(t *testing.T) {
			dir := t.TempDir()
			cfg, drops := recordConfig(t, dir, 3)
			cfg.Stream = stream
			pkts := readPackets(t, "v4.pcap")
			saveAll(cfg, testUUID, pkts, 0)
			path := DatePath(dir, testUUID, opened)
			got, zr := fileRecord(t, path)
			kd := uint64(3)
			want := &Record{
				UUID:          testUUID,
				Version:       "v1.2.3+abc1234",
				Source:        "tcpinfo",
				Anonymization: "none",
				Interfaces:    []string{"any"},
				FirstPacket:   "2019-10-25T18:38:50.785821000Z",
				LastPacket:    "2019-10-25T18:38:51.033125000Z",
				Packets:       12,
				KernelDrops:   &kd,
				SYNSeen:       true,
				FINOrRSTSeen:  true,
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("record (-want +got):\n%s", diff)
			}
			if zr.Name != testUUID+".pcap" {
				t.Errorf("FNAME %q, want %q", zr.Name, testUUID+".pcap")
			}
			if !zr.ModTime.Equal(time.Unix(pkts[0].Time/1e9, 0)) {
				t.Errorf("MTIME %v, want the first packet's second %v", zr.ModTime, time.Unix(pkts[0].Time/1e9, 0))
			}
			// kernel_drops is asked from the flow's first packet on.
			if got := drops.since.Load(); got != pkts[0].Time {
				t.Errorf("kernel drops asked since %d, want the first packet's time %d", got, pkts[0].Time)
			}
			// The record is one line of JSON, exactly (a file of one
			// chunk has no room reserved).
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			h := parseGzipHeader(t, b)
			if strings.ContainsAny(h.comment, "\n ") || !json.Valid([]byte(h.comment)) {
				t.Errorf("comment is not one line of compact JSON: %q", h.comment)
			}
			// Whole but for the socket's kernel drops.
			if !slices.Equal(got.Incomplete(), []string{"kerneldrops"}) {
				t.Errorf("Incomplete() = %v, want [kerneldrops]", got.Incomplete())
			}
			// The record's times parse as RFC 3339.
			for _, ts := range []string{got.FirstPacket, got.LastPacket} {
				if _, err := time.Parse(time.RFC3339Nano, ts); err != nil {
					t.Error(err)
				}
			}
		})
	}
}

// TestRecordKeys pins the record's JSON keys: what researchers' tools parse.
func TestRecordKeys(t *testing.T) {
	dir := t.TempDir()
	cfg, _ := recordConfig(t, dir, 0)
	cfg.MaxBacklog = 5
	pkts := readPackets(t, "v4.pcap")
	saveAll(cfg, testUUID, pkts, 4)
	_, zr := fileRecord(t, DatePath(dir, testUUID, opened))
	var m map[string]json.RawMessage
	if err := json.Unmarshal([]byte(zr.Comment), &m); err != nil {
		t.Fatal(err)
	}
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	want := []string{"anonymization", "fin_or_rst_seen", "first_packet", "interfaces", "kernel_drops", "last_packet",
		"missed_packets", "packets", "source", "syn_seen", "truncated", "uuid", "version"}
	if diff := cmp.Diff(want, keys); diff != "" {
		t.Errorf("keys (-want +got):\n%s", diff)
	}
	if got := string(m["missed_packets"]); got != `{"pending":4,"backlog":7}` {
		t.Errorf("missed_packets %s", got)
	}
}

// TestRecordUnderNetblock: with -anonymize.ip=netblock the record holds no
// address, neither the flow's nor an anonymized one.
func TestRecordUnderNetblock(t *testing.T) {
	dir := t.TempDir()
	cfg, _ := recordConfig(t, dir, 0)
	cfg.Anonymization = "netblock"
	local := netip.MustParseAddr("172.17.0.2")
	a := anonymize.New(anonymize.Netblock, []netip.Addr{local})
	cfg.Anon = a
	pkts := readPackets(t, "v4.pcap")
	saveAll(cfg, testUUID, pkts, 0)
	path := DatePath(dir, testUUID, opened)
	rec, zr := fileRecord(t, path)
	if rec.Anonymization != "netblock" {
		t.Errorf("anonymization %q", rec.Anonymization)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	head := string(b[:parseGzipHeader(t, b).len])
	remote := netip.MustParseAddr("91.189.88.149")
	for _, addr := range []netip.Addr{remote, a.Addr(remote), local} {
		for _, form := range []string{addr.String(), string(addr.AsSlice())} {
			if strings.Contains(head, form) {
				t.Errorf("header holds address %v: %q", addr, head)
			}
		}
	}
	// The pcap records are anonymized: the remote address is cut to /24.
	recs := readBack(t, path).Records
	if !bytes.Contains(recs[0].Data, []byte{91, 189, 88, 0}) || bytes.Contains(recs[0].Data, remote.AsSlice()) {
		t.Errorf("first record not anonymized: % x", recs[0].Data)
	}
	if zr.Name != testUUID+".pcap" {
		t.Errorf("FNAME %q", zr.Name)
	}
}

func TestRecordCaptureDurationCut(t *testing.T) {
	for _, stream := range []bool{false, true} {
		dir := t.TempDir()
		cfg, _ := recordConfig(t, dir, 0)
		cfg.Stream = stream
		pkts := readPackets(t, "large-ndt.pcap")
		dur := time.Duration(pkts[len(pkts)/2].Time - pkts[0].Time)
		cfg.CaptureDuration = dur
		var kept int
		for _, p := range pkts {
			if p.Time-pkts[0].Time < int64(dur) {
				kept++
			}
		}
		saveAll(cfg, testUUID, pkts, 0)
		rec, _ := fileRecord(t, DatePath(dir, testUUID, opened))
		if !rec.Truncated || rec.Packets != uint64(kept) || rec.MissedPackets.Duration != uint64(len(pkts)-kept) {
			t.Errorf("stream=%v: truncated %v, packets %d, missed %+v; want true, %d, duration %d",
				stream, rec.Truncated, rec.Packets, rec.MissedPackets, kept, len(pkts)-kept)
		}
		if want := FormatRecordTime(pkts[kept-1].Time); rec.LastPacket != want {
			t.Errorf("last_packet %s, want %s", rec.LastPacket, want)
		}
		if !slices.Contains(rec.Incomplete(), "truncated") {
			t.Errorf("Incomplete() = %v", rec.Incomplete())
		}
		if n := testutil.ToFloat64(cfg.Metrics.FilesIncomplete.WithLabelValues("truncated")); n != 1 {
			t.Errorf("files incomplete{truncated} = %v", n)
		}
	}
}

// TestRecordTruncatedByTheClock: a flow whose capture duration ends by the
// clock is truncated unless its connection was seen to end (a RST, or a FIN
// from each side).
func TestRecordTruncatedByTheClock(t *testing.T) {
	v4 := func(t *testing.T) []replay.Packet { return readPackets(t, "v4.pcap") }
	for _, tt := range []struct {
		name      string
		pkts      func(t *testing.T) []replay.Packet
		truncated bool
		finOrRST  bool
	}{
		// v4.pcap: SYN, SYN-ACK, ACK, data, FIN (client), ACK, data, RST
		// (client), FIN (server), RST, ACK, RST.
		{"closed by FINs", func(t *testing.T) []replay.Packet { return without(v4(t), 7, 9, 11) }, false, true},
		{"closed by RST", func(t *testing.T) []replay.Packet { return v4(t)[:8] }, false, true},
		{"one FIN only", func(t *testing.T) []replay.Packet { return v4(t)[:5] }, true, true},
		{"open", func(t *testing.T) []replay.Packet { return v4(t)[:4] }, true, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				dir := t.TempDir()
				cfg, _ := recordConfig(t, dir, 0)
				cfg.CaptureDuration = 10 * time.Second
				s := NewPool(*cfg).New(testUUID, opened, nil)
				var wg sync.WaitGroup
				s.Start(&wg)
				for _, p := range tt.pkts(t) {
					s.Push(p.Packet)
				}
				synctest.Wait()
				time.Sleep(10 * time.Second) // synctest's clock
				wg.Wait()
				rec, _ := fileRecord(t, DatePath(dir, testUUID, opened))
				if rec.Truncated != tt.truncated || rec.FINOrRSTSeen != tt.finOrRST || rec.MissedPackets.Duration != 0 {
					t.Errorf("truncated %v fin_or_rst %v missed %+v, want %v %v none", rec.Truncated, rec.FINOrRSTSeen, rec.MissedPackets, tt.truncated, tt.finOrRST)
				}
				s.Close()
			})
		})
	}
}

func TestRecordNoSYN(t *testing.T) {
	dir := t.TempDir()
	cfg, _ := recordConfig(t, dir, 0)
	saveAll(cfg, testUUID, readPackets(t, "v4.pcap")[2:], 0)
	rec, _ := fileRecord(t, DatePath(dir, testUUID, opened))
	if rec.SYNSeen || !slices.Equal(rec.Incomplete(), []string{"nosyn"}) {
		t.Errorf("syn_seen %v, Incomplete() %v", rec.SYNSeen, rec.Incomplete())
	}
}

func TestRecordMetrics(t *testing.T) {
	dir := t.TempDir()
	cfg, _ := recordConfig(t, dir, 42)
	cfg.MaxBacklog = 8
	saveAll(cfg, testUUID, readPackets(t, "v4.pcap")[2:], 1) // 2 over the backlog, no SYN
	m := cfg.Metrics
	for reason, want := range map[string]float64{"truncated": 0, "pending": 1, "backlog": 1, "kerneldrops": 1, "nosyn": 1, "nofinrst": 0} {
		if n := testutil.ToFloat64(m.FilesIncomplete.WithLabelValues(reason)); n != want {
			t.Errorf("pcap_saver_files_incomplete_total{reason=%q} = %v, want %v", reason, n, want)
		}
	}
	var h dto.Metric
	if err := m.FileKernelDrops.Write(&h); err != nil {
		t.Fatal(err)
	}
	if h.Histogram.GetSampleCount() != 1 || h.Histogram.GetSampleSum() != 42 {
		t.Errorf("kernel drops histogram: %d samples, sum %v; want 1, 42", h.Histogram.GetSampleCount(), h.Histogram.GetSampleSum())
	}
	// Every reason's series exists from the start, at zero.
	if n := testutil.CollectAndCount(m.FilesIncomplete); n != len(IncompleteReasons) {
		t.Errorf("%d series of pcap_saver_files_incomplete_total, want %d", n, len(IncompleteReasons))
	}
}

// save writes pkts with cfg (a copy of base with stream and noRecord set)
// and returns the file's bytes.
func save(t *testing.T, base func(dir string) *Config, stream, noRecord bool, pkts []replay.Packet) []byte {
	t.Helper()
	dir := t.TempDir()
	cfg := base(dir)
	cfg.Stream, cfg.noRecord = stream, noRecord
	saveAll(cfg, testUUID, pkts, 0)
	if n := testutil.ToFloat64(cfg.Metrics.FilesPublished); n != 1 {
		t.Fatalf("stream=%v noRecord=%v: %v files published", stream, noRecord, n)
	}
	b, err := os.ReadFile(DatePath(dir, testUUID, opened))
	if err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(cfg.Metrics.BytesWritten); got != float64(len(b)) {
		t.Errorf("stream=%v noRecord=%v: bytes written %v, file %d bytes", stream, noRecord, got, len(b))
	}
	return b
}

func gunzipGo(t *testing.T, b []byte) []byte {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	out, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestRecordStreamAndBufferedIdentical: the two modes write the same bytes,
// the header with its record included, whether the record is written at the
// end (one chunk), into the room reserved in a header written early, or,
// too long for that room, behind a header of its own size; and the record
// changes nothing after the header: the deflate stream and its trailer are
// those of a file without a record.
func TestRecordStreamAndBufferedIdentical(t *testing.T) {
	for _, tt := range []struct {
		name     string
		pkts     func(t *testing.T) []replay.Packet
		drops    uint64
		backlog  int // MaxBacklog
		duration time.Duration
		reserved bool // the header is written before the end (with room reserved)
		fits     bool // the record fits the room
	}{
		{name: "one chunk", pkts: func(t *testing.T) []replay.Packet { return readPackets(t, "v4.pcap") }},
		{name: "one chunk, large", pkts: func(t *testing.T) []replay.Packet { return readPackets(t, "large-ndt.pcap") }},
		{name: "chunks", pkts: func(t *testing.T) []replay.Packet { return manyPackets(t, 4) }, drops: 99, reserved: true, fits: true},
		{name: "chunks, cut", pkts: func(t *testing.T) []replay.Packet { return manyPackets(t, 8) }, duration: 120 * time.Second, reserved: true},
		{name: "chunks, record too long for its room", pkts: func(t *testing.T) []replay.Packet { return manyPackets(t, 4) }, drops: 1 << 60, backlog: 2000, reserved: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			base := func(dir string) *Config {
				cfg, _ := recordConfig(t, dir, tt.drops)
				if tt.duration > 0 {
					cfg.CaptureDuration = tt.duration
				}
				cfg.MaxBacklog = tt.backlog
				return cfg
			}
			buffered := save(t, base, false, false, tt.pkts(t))
			stream := save(t, base, true, false, tt.pkts(t))
			plain := save(t, base, false, true, tt.pkts(t))
			if !bytes.Equal(buffered, stream) {
				t.Fatalf("buffered (%d bytes) and stream (%d bytes) files differ", len(buffered), len(stream))
			}
			// Buffered, spilled to its file after the first bytes.
			old := spillSize
			spillSize = 1
			spilled := save(t, base, false, false, tt.pkts(t))
			spillSize = old
			if !bytes.Equal(spilled, stream) {
				t.Fatalf("buffered and spilled (%d bytes) and stream (%d bytes) files differ", len(spilled), len(stream))
			}
			if !bytes.Equal(plain, save(t, base, true, true, tt.pkts(t))) {
				t.Fatal("without a record, buffered and stream files differ")
			}
			h := parseGzipHeader(t, buffered)
			if h.flags != gzipFNAME|gzipFCOMMENT || h.name != testUUID+".pcap" {
				t.Errorf("flags %#x name %q", h.flags, h.name)
			}
			if !bytes.Equal(plain[:10], plainGzipHeader[:]) {
				t.Errorf("file without a record starts % x", plain[:10])
			}
			if !bytes.Equal(buffered[h.len:], plain[10:]) {
				t.Error("the deflate stream after the header differs from the file's without a record")
			}
			if !bytes.Equal(gunzipGo(t, buffered), gunzipGo(t, plain)) {
				t.Error("the pcap streams differ")
			}
			padded := strings.HasSuffix(h.comment, " ")
			if padded != (tt.reserved && tt.fits) {
				t.Errorf("comment padded %v, want %v: %q", padded, tt.reserved && tt.fits, h.comment)
			}
			rec, err := ParseRecord(h.comment)
			if err != nil {
				t.Fatal(err)
			}
			if want := reservedFor(t, rec, tt.drops); tt.reserved && tt.fits && len(h.comment) != want {
				t.Errorf("room of %d bytes, want %d", len(h.comment), want)
			}
			if tt.duration > 0 && !rec.Truncated {
				t.Error("cut file not truncated")
			}
		})
	}
}

// reservedFor is the length of the room reserveHeader reserves for rec: the
// record with its packets and kernel drops at their reserved widths (drops
// is what the kernel drop counter said when the room was reserved), no
// reasons for missed packets but pending, and the flags that can still
// change false.
func reservedFor(t *testing.T, rec *Record, drops uint64) int {
	z := *rec
	z.LastPacket = z.FirstPacket
	z.Packets, z.MissedPackets = reservePackets, Missed{Pending: rec.MissedPackets.Pending}
	z.Truncated, z.FINOrRSTSeen = false, false
	if z.KernelDrops != nil {
		n := max(99, drops*10+9)
		z.KernelDrops = &n
	}
	b, err := z.marshal()
	if err != nil {
		t.Fatal(err)
	}
	return len(b)
}

// TestRecordSizeAdded: the record and the name add less than 400 bytes to a
// file, with a production UUID and the daemon's settings: to a small file,
// whose header is written at the end, and to a long one (several chunks),
// whose header reserves room for the record before the flow ends.
func TestRecordSizeAdded(t *testing.T) {
	const uuid = "ndt-4c6fb_1625899199_000000000121C1A0" // as M-Lab's production files
	for _, tt := range []struct {
		name string
		pkts func(t *testing.T) []replay.Packet
	}{
		{"one chunk", func(t *testing.T) []replay.Packet { return readPackets(t, "v4.pcap") }},
		{"chunks", func(t *testing.T) []replay.Packet { return manyPackets(t, 4) }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sizes := map[bool]int{}
			var head gzHeader
			for _, noRecord := range []bool{false, true} {
				dir := t.TempDir()
				cfg, _ := recordConfig(t, dir, 0)
				cfg.Anonymization = "netblock"
				cfg.noRecord = noRecord
				saveAll(cfg, uuid, tt.pkts(t), 0)
				b, err := os.ReadFile(DatePath(dir, uuid, opened))
				if err != nil {
					t.Fatal(err)
				}
				sizes[noRecord] = len(b)
				if !noRecord {
					head = parseGzipHeader(t, b)
				}
			}
			added := sizes[false] - sizes[true]
			t.Logf("record and name add %d bytes (%d -> %d): %q", added, sizes[true], sizes[false], head.comment)
			if added >= 400 || added <= 2*len(uuid) {
				t.Errorf("record and name add %d bytes, want under 400", added)
			}
		})
	}
}

// TestRecordReaders: tcpdump, Python's gzip module, gunzip -N and Go's
// gzip and pcapgo read a file with its record, and see the same pcap stream
// as without it.
func TestRecordReaders(t *testing.T) {
	base := func(dir string) *Config { c, _ := recordConfig(t, dir, 0); return c }
	for _, name := range []string{"v4.pcap", "chunks"} {
		t.Run(name, func(t *testing.T) {
			pkts := func() []replay.Packet {
				if name == "chunks" {
					return manyPackets(t, 4)
				}
				return readPackets(t, name)
			}
			n := len(pkts())
			dir := t.TempDir()
			cfg := base(dir)
			saveAll(cfg, testUUID, pkts(), 0)
			path := DatePath(dir, testUUID, opened)
			want := gunzipGo(t, save(t, base, false, true, pkts()))
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if got := gunzipGo(t, b); !bytes.Equal(got, want) {
				t.Error("Go's gzip: pcap stream differs from the file's without a record")
			}
			// gopacket's pcapgo, behind Go's gzip (readBack checks caplen
			// against snaplen and length, as the ETL does).
			if got := len(readBack(t, path).Records); got != n {
				t.Errorf("pcapgo read %d records, want %d", got, n)
			}
			t.Run("python", func(t *testing.T) {
				py, err := exec.LookPath("python3")
				if err != nil {
					t.Skip("python3 is not installed")
				}
				out, err := exec.Command(py, "-c", "import gzip, sys; sys.stdout.buffer.write(gzip.open(sys.argv[1]).read())", path).Output()
				if err != nil {
					t.Fatalf("python3: %v", err)
				}
				if !bytes.Equal(out, want) {
					t.Errorf("Python's gzip: %d bytes, differ from the %d of the pcap stream", len(out), len(want))
				}
			})
			t.Run("tcpdump", func(t *testing.T) {
				tcpdump, err := exec.LookPath("tcpdump")
				if err != nil {
					t.Skip("tcpdump is not installed (scripts/install-deps.sh installs it)")
				}
				cmd := exec.Command("sh", "-c", `zcat "$1" | "$2" -nr -`, "sh", path, tcpdump)
				var stderr bytes.Buffer
				cmd.Stderr = &stderr
				out, err := cmd.Output()
				if err != nil {
					t.Fatalf("tcpdump: %v\n%s", err, stderr.Bytes())
				}
				if lines := bytes.Count(out, []byte("\n")); lines != n {
					t.Errorf("tcpdump printed %d packets, want %d\n%s", lines, n, stderr.Bytes())
				}
			})
			t.Run("gunzip -N", func(t *testing.T) {
				if _, err := exec.LookPath("gunzip"); err != nil {
					t.Skip("gunzip is not installed")
				}
				tmp := t.TempDir()
				gz := filepath.Join(tmp, "renamed.gz")
				if err := os.WriteFile(gz, b, 0o644); err != nil {
					t.Fatal(err)
				}
				if out, err := exec.Command("gunzip", "-N", gz).CombinedOutput(); err != nil {
					t.Fatalf("gunzip -N: %v %s", err, out)
				}
				restored := filepath.Join(tmp, testUUID+".pcap")
				got, err := os.ReadFile(restored)
				if err != nil {
					t.Fatalf("gunzip -N did not restore the name: %v", err)
				}
				if !bytes.Equal(got, want) {
					t.Error("gunzip -N: content differs")
				}
				fi, err := os.Stat(restored)
				if err != nil {
					t.Fatal(err)
				}
				if first := time.Unix(pkts()[0].Time/1e9, 0); !fi.ModTime().Equal(first) {
					t.Errorf("gunzip -N restored mtime %v, want the first packet's %v", fi.ModTime(), first)
				}
			})
		})
	}
}

// TestRecordNonASCII: names outside ASCII are escaped, so that the comment
// is ISO 8859-1 as gzip wants, and read back unchanged.
func TestRecordNonASCII(t *testing.T) {
	dir := t.TempDir()
	cfg, _ := recordConfig(t, dir, 0)
	cfg.Interfaces = []string{"eth0", "wlæn€𝄞"}
	cfg.Version = "v1\x00\n"
	saveAll(cfg, testUUID, readPackets(t, "v4.pcap"), 0)
	b, err := os.ReadFile(DatePath(dir, testUUID, opened))
	if err != nil {
		t.Fatal(err)
	}
	h := parseGzipHeader(t, b)
	for i := 0; i < len(h.comment); i++ {
		if c := h.comment[i]; c < 0x20 || c >= 0x7f {
			t.Fatalf("comment byte %#x at %d: %q", c, i, h.comment)
		}
	}
	rec, _ := fileRecord(t, DatePath(dir, testUUID, opened))
	if !slices.Equal(rec.Interfaces, cfg.Interfaces) || rec.Version != cfg.Version {
		t.Errorf("read back %q %q, want %q %q", rec.Interfaces, rec.Version, cfg.Interfaces, cfg.Version)
	}
}

// TestParseRecordOldFiles: files written before the record (the original's,
// in testdata/production) have none, and say so.
func TestParseRecordOldFiles(t *testing.T) {
	paths, err := filepath.Glob(filepath.Join("..", "testdata", "production", "*.pcap.gz"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no production files: %v", err)
	}
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		zr, err := gzip.NewReader(f)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseRecord(zr.Comment); !errors.Is(err, ErrNoRecord) {
			t.Errorf("%s: ParseRecord = %v, want ErrNoRecord", p, err)
		}
		f.Close()
	}
	for _, c := range []string{`{"uuid":""}`, `{}`, ``} {
		if _, err := ParseRecord(c); !errors.Is(err, ErrNoRecord) {
			t.Errorf("ParseRecord(%q) = %v, want ErrNoRecord", c, err)
		}
	}
	if _, err := ParseRecord("not json"); err == nil || errors.Is(err, ErrNoRecord) {
		t.Errorf("ParseRecord(not json) = %v, want a JSON error", err)
	}
	// Fields of later versions are ignored.
	r, err := ParseRecord(`{"uuid":"u","packets":3,"later":{"x":1}}`)
	if err != nil || r.Packets != 3 {
		t.Errorf("ParseRecord with an unknown field = %+v, %v", r, err)
	}
}

func TestIncompleteReasons(t *testing.T) {
	one := uint64(1)
	zero := uint64(0)
	for _, tt := range []struct {
		r    Record
		want []string
	}{
		{Record{SYNSeen: true, FINOrRSTSeen: true, KernelDrops: &zero}, nil},
		{Record{SYNSeen: true, FINOrRSTSeen: true}, nil}, // kernel drops unknown
		{Record{SYNSeen: true, Truncated: true}, []string{"truncated"}},
		{Record{SYNSeen: true, MissedPackets: Missed{Duration: 1}}, []string{"truncated"}},
		{Record{SYNSeen: true}, []string{"nofinrst"}},
		{Record{FINOrRSTSeen: true, MissedPackets: Missed{Pending: 1, Backlog: 2}, KernelDrops: &one},
			[]string{"pending", "backlog", "kerneldrops", "nosyn"}},
	} {
		if got := tt.r.Incomplete(); !slices.Equal(got, tt.want) {
			t.Errorf("%+v: Incomplete() = %v, want %v", tt.r, got, tt.want)
		}
		for _, w := range tt.r.Incomplete() {
			if !slices.Contains(IncompleteReasons, w) {
				t.Errorf("reason %q not in IncompleteReasons", w)
			}
		}
	}
}

func ExampleRecord() {
	r := Record{UUID: "host_1548788619_00000000000084FF", Version: "v1.2.3+abc1234", Source: "tcpinfo",
		Anonymization: "netblock", Interfaces: []string{"any"},
		FirstPacket: FormatRecordTime(1700000000123456789), LastPacket: FormatRecordTime(1700000004000000000),
		Packets: 40, SYNSeen: true, FINOrRSTSeen: true}
	b, _ := r.marshal()
	fmt.Println(string(b))
	// Output:
	// {"uuid":"host_1548788619_00000000000084FF","version":"v1.2.3+abc1234","source":"tcpinfo","anonymization":"netblock","interfaces":["any"],"first_packet":"2023-11-14T22:13:20.123456789Z","last_packet":"2023-11-14T22:13:24.000000000Z","packets":40,"missed_packets":{},"truncated":false,"kernel_drops":null,"syn_seen":true,"fin_or_rst_seen":true}
}

// BenchmarkSmallFiles publishes small flows (35 packets of large-ndt.pcap,
// about 1.2 KB compressed), each iteration one file with the capture record
// and one without, in alternating order so that both see the same load, and
// reports the wall time and the bytes per file of each: what the record
// costs (a JSON line, a longer header) beside the rest of a file's life.
// Run it on the data directory's file system (see BenchmarkPublish):
//
//	go test -run '^$' -bench BenchmarkSmallFiles -count 5 ./saver -publishdir /var/tmp
func BenchmarkSmallFiles(b *testing.B) {
	pkts := readPackets(b, "large-ndt.pcap")[:35]
	for _, stream := range []bool{false, true} {
		b.Run(map[bool]string{false: "buffered", true: "stream"}[stream], func(b *testing.B) {
			root, err := os.MkdirTemp(*publishDir, "packet-headers-bench-")
			if err != nil {
				b.Fatal(err)
			}
			defer func() {
				if err := os.RemoveAll(root); err != nil {
					b.Error(err)
				}
			}()
			var cfgs [2]*Config // with the record, without
			for v := range cfgs {
				cfgs[v] = &Config{
					Dir: root, CaptureDuration: time.Hour, Stream: stream, noRecord: v == 1,
					Metrics: metrics.New(prometheus.NewRegistry()),
					Version: "v1.2.3+abc1234", Source: "tcpinfo", Anonymization: "netblock", Interfaces: []string{"any"},
					Drops: &fakeDrops{},
				}
			}
			var took [2]time.Duration
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				for k := range 2 {
					v := (i + k) % 2
					start := time.Now()
					s := NewPool(*cfgs[v]).New(fmt.Sprintf("ndt-4c6fb_1625899199_%016X", 2*i+v), opened, nil)
					for _, p := range pkts {
						s.Push(p.Packet)
					}
					s.Close()
					runNow(s)
					took[v] += time.Since(start)
				}
			}
			b.StopTimer()
			for v, name := range []string{"record", "norecord"} {
				if got := testutil.ToFloat64(cfgs[v].Metrics.FilesPublished); got != float64(b.N) {
					b.Fatalf("%s: published %v of %d files", name, got, b.N)
				}
				b.ReportMetric(float64(took[v].Nanoseconds())/float64(b.N), "ns/file-"+name)
				b.ReportMetric(testutil.ToFloat64(cfgs[v].Metrics.BytesWritten)/float64(b.N), "bytes/file-"+name)
			}
		})
	}
}

// BenchmarkRecordHeader is the record's own work for one file, alone: the
// record, its JSON line and the gzip header around it.
func BenchmarkRecordHeader(b *testing.B) {
	cfg := &Config{
		Metrics: metrics.New(prometheus.NewRegistry()),
		Version: "v1.2.3+abc1234", Source: "tcpinfo", Anonymization: "netblock", Interfaces: []string{"any"},
		Drops: &fakeDrops{},
	}
	s := NewPool(*cfg).New("ndt-4c6fb_1625899199_000000000121C1A0", opened, nil)
	s.w = newPCAPWriter(io.Discard, 94, 1, s.reserveHeader)
	s.first, s.last = 1700000000123456789, 1700000004000000000
	b.ReportAllocs()
	for b.Loop() {
		rec := s.record(endClose, 0)
		comment, err := rec.marshal()
		if err != nil {
			b.Fatal(err)
		}
		_ = gzipHeader(s.mtime(), s.gzipName(), comment, len(comment))
	}
}

// TestRecordJSONAsEncodingJSON: the hand-written JSON is encoding/json's for
// ASCII values (which it does not HTML-escape), and reads back the same for
// any value.
func TestRecordJSONAsEncodingJSON(t *testing.T) {
	kd := uint64(18446744073709551615)
	for _, r := range []Record{
		{},
		{UUID: "host_1548788619_00000000000084FF", Version: "v1.2.3+abc1234", Source: "standalone", Anonymization: "none",
			Interfaces: []string{"any"}, FirstPacket: FormatRecordTime(0), LastPacket: FormatRecordTime(1 << 62),
			Packets: 1 << 40, MissedPackets: Missed{Duration: 1, Backlog: 3}, Truncated: true, KernelDrops: &kd, SYNSeen: true},
		{Interfaces: []string{"eth0", "eth1"}, MissedPackets: Missed{Pending: 2}, FINOrRSTSeen: true},
		{Version: "quote\" backslash\\ tab\t nl\n cr\r nul\x00 del\x7f", MissedPackets: Missed{Duration: 1, Pending: 2, Backlog: 3}},
	} {
		got, err := r.marshal()
		if err != nil {
			t.Fatal(err)
		}
		if r.Interfaces == nil {
			r.Interfaces = []string{}
		}
		want, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != string(want) {
			t.Errorf("\n got %s\nwant %s", got, want)
		}
	}
	for _, s := range []string{"wlæn€𝄞", "bad \xff utf-8", "\u2028"} {
		r := Record{UUID: "u", Version: s}
		b, err := r.marshal()
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range b {
			if c >= 0x80 {
				t.Errorf("%q: non-ASCII byte in %s", s, b)
			}
		}
		back, err := ParseRecord(string(b))
		if err != nil {
			t.Fatal(err)
		}
		if want := strings.ToValidUTF8(s, "\uFFFD"); back.Version != want {
			t.Errorf("%q read back as %q", s, back.Version)
		}
	}
}
