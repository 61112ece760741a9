package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/m-lab/packet-headers/internal/netns"
)

// Flow is one connection the server accepted, as phbench reads it from the
// -flows file: the socket cookie is what tcp-info (and the standalone
// source) name the flow by, <prefix>_<%016X cookie>, so phbench knows each
// flow's expected file name and 4-tuple.
type Flow struct {
	Client string `json:"client"` // client address:port
	Server string `json:"server"` // server address:port
	Cookie uint64 `json:"cookie"`
}

// server answers the benchmark's connections; see the package comment for
// the protocol. It is safe for concurrent use by its connection goroutines.
type server struct {
	req  int
	resp []byte

	mu    sync.Mutex
	flows []Flow
	conns map[net.Conn]struct{}
	errs  int
	wg    sync.WaitGroup
}

// runServe listens on every -listen address until ctx is done (phbench
// sends SIGTERM once the client has finished) or -maxlife passes, then
// closes what is left and writes the accepted flows to -flows.
func runServe(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	listen := fs.String("listen", "", "comma-separated addresses to listen on")
	req := fs.Int("req", 0, "bytes to read before answering")
	resp := fs.Int("resp", 0, "bytes to answer")
	flowsPath := fs.String("flows", "", "file to write the accepted flows to (JSON) at exit")
	maxLife := fs.Duration("maxlife", time.Hour, "exit after this long whatever happens")
	maxConns := fs.Int("maxconns", 20000, "most connections open at once (descriptors are reserved for them)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *listen == "" || *flowsPath == "" || *req < 0 || *resp < 0 {
		return errors.New("-listen and -flows are required; -req and -resp must not be negative")
	}
	if err := raiseNoFile(*maxConns + 64); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *maxLife)
	defer cancel()

	s := &server{req: *req, resp: payload(*resp), conns: map[net.Conn]struct{}{}}
	var lns []net.Listener
	for _, a := range strings.Split(*listen, ",") {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return err
		}
		lns = append(lns, ln)
	}
	var accepting sync.WaitGroup
	for _, ln := range lns {
		accepting.Go(func() { s.accept(ln) })
	}
	fmt.Fprintln(stdout, "ready")

	<-ctx.Done()
	// Listeners first, so that no connection is added while the live ones
	// are closed.
	for _, ln := range lns {
		ln.Close()
	}
	accepting.Wait()
	s.mu.Lock()
	open := len(s.conns)
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()

	b, err := json.Marshal(s.flows)
	if err != nil {
		return err
	}
	if err := os.WriteFile(*flowsPath, b, 0o644); err != nil {
		return err
	}
	res, err := json.Marshal(map[string]int{"accepted": len(s.flows), "errors": s.errs, "open_at_exit": open})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "result %s\n", res)
	return nil
}

// accept runs until ln is closed.
func (s *server) accept(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			// Out of descriptors or a connection reset before accept:
			// count it and go on; the client reports its side.
			s.mu.Lock()
			s.errs++
			s.mu.Unlock()
			time.Sleep(10 * time.Millisecond) // back off as net/http does on temporary errors
			continue
		}
		cookie, err := netns.Cookie(c)
		s.mu.Lock()
		if err != nil {
			s.errs++
		}
		s.flows = append(s.flows, Flow{Client: c.RemoteAddr().String(), Server: c.LocalAddr().String(), Cookie: cookie})
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Go(func() { s.serve(c) })
	}
}

// serve answers one connection: read -req bytes, write -resp bytes, read
// until the client closes, close.
func (s *server) serve(c net.Conn) {
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	if err := c.SetDeadline(time.Now().Add(connLifetime)); err != nil {
		s.fail()
		return
	}
	if s.req > 0 {
		if _, err := io.ReadFull(c, make([]byte, s.req)); err != nil {
			s.fail()
			return
		}
	}
	if len(s.resp) > 0 {
		if _, err := c.Write(s.resp); err != nil {
			s.fail()
			return
		}
	}
	if _, err := io.Copy(io.Discard, c); err != nil && !errors.Is(err, net.ErrClosed) {
		s.fail()
	}
}

func (s *server) fail() {
	s.mu.Lock()
	s.errs++
	s.mu.Unlock()
}
