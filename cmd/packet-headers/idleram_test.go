package main

import (
	"bytes"
	"context"
	"log/slog"
	"runtime"
	"runtime/metrics"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for a logger and the test to share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func heapFree() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/heap/free:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

var sink [][]byte

// TestReleaseIdleRAM: after a burst of garbage leaves more idle heap than
// -maxidleram, the daemon returns it to the OS and logs that it did.
func TestReleaseIdleRAM(t *testing.T) {
	const maxIdle = 4 * MB
	// 64 MB of garbage: once collected, its pages are idle heap.
	for range 64 {
		sink = append(sink, make([]byte, 1<<20))
	}
	sink = nil
	runtime.GC()
	if free := heapFree(); free <= uint64(maxIdle) {
		t.Skipf("only %d bytes of idle heap after the burst; the runtime returned it already", free)
	}
	var logs syncBuffer
	d := &daemon{cfg: &Config{MaxIdleRAM: maxIdle}, log: slog.New(slog.NewTextHandler(&logs, nil))}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		d.releaseIdleRAM(ctx, 10*time.Millisecond)
		close(done)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), "returning idle memory") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond) // polling for the log line, not timing
	}
	cancel()
	<-done
	if !strings.Contains(logs.String(), "returning idle memory") {
		t.Fatalf("no memory returned; log:\n%s", logs.String())
	}
	if free := heapFree(); free > uint64(maxIdle) {
		t.Errorf("%d bytes of idle heap after releasing, want at most %d", free, maxIdle)
	}
}
