package kernelsource

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// TCP states, as in linux/tcp_states.h; TCPF_ALL has a bit for each.
const (
	tcpEstablished = 1
	tcpSynSent     = 2
	tcpSynRecv     = 3
	tcpTimeWait    = 6
	tcpClose       = 7
	tcpListen      = 10
	tcpfAll        = 0xFFF
)

// tcpinfoStates is the idiag_states mask of tcp-info's dumps: every state but
// SYN_RECV, TIME_WAIT and CLOSE (makeReq in collector/socket-monitor_linux.go,
// from tcp.AllFlags). That includes SYN_SENT: tcp-info names an outgoing
// connection before it is established.
const tcpinfoStates = tcpfAll &^ (1<<tcpSynRecv | 1<<tcpTimeWait | 1<<tcpClose)

// dumpStates is the mask of our dumps. It leaves LISTEN out of tcp-info's: a
// listening socket has no peer, its remote address is unspecified, and
// tcp-info's exclude filter always rejects it (see excluded), so asking for
// it only makes the kernel walk the listening hash table for nothing. The
// sockets named are the same.
const dumpStates = tcpinfoStates &^ (1 << tcpListen)

// Sizes of the kernel's structures (linux/netlink.h, linux/inet_diag.h).
const (
	sizeofNlMsghdr       = 16
	sizeofInetDiagReqV2  = 56
	sizeofInetDiagMsg    = 72
	offsetInetDiagSockID = 4 // of struct inet_diag_sockid in inet_diag_msg
)

// dumpBufSize is the receive buffer of a dump. The kernel fills each dump
// datagram up to the size of the reader's buffer, at most 32 KiB
// (netlink_recvmsg caps max_recvmsg_len there); a larger buffer never
// truncates a datagram, and about 300 sockets arrive per read.
const dumpBufSize = 64 << 10

// sockMsg is what a sock_diag message says about one socket.
type sockMsg struct {
	family   uint8
	sport    uint16
	dport    uint16
	src, dst [16]byte // IPv4 addresses are in the first 4 bytes
	cookie   uint64
}

// parseInetDiagMsg reads the inet_diag_msg at the start of b (the payload of
// a SOCK_DIAG_BY_FAMILY message; attributes after it are ignored).
func parseInetDiagMsg(b []byte) (sockMsg, error) {
	if len(b) < sizeofInetDiagMsg {
		return sockMsg{}, fmt.Errorf("inet_diag_msg of %d bytes, want %d", len(b), sizeofInetDiagMsg)
	}
	id := b[offsetInetDiagSockID:]
	m := sockMsg{
		family: b[0],
		// Ports are in network byte order, the rest in host order.
		sport: binary.BigEndian.Uint16(id[0:2]),
		dport: binary.BigEndian.Uint16(id[2:4]),
		src:   [16]byte(id[4:20]),
		dst:   [16]byte(id[20:36]),
		// The kernel writes the cookie as two host-order u32, low half
		// first (sock_diag_save_cookie).
		cookie: uint64(binary.NativeEndian.Uint32(id[40:44])) |
			uint64(binary.NativeEndian.Uint32(id[44:48]))<<32,
	}
	return m, nil
}

// forEachMessage calls fn with the type, flags, sequence number and payload
// of each netlink message in the datagram b.
func forEachMessage(b []byte, fn func(typ, flags uint16, seq uint32, payload []byte) error) error {
	for len(b) >= sizeofNlMsghdr {
		l := binary.NativeEndian.Uint32(b[0:4])
		if l < sizeofNlMsghdr || uint64(l) > uint64(len(b)) {
			return fmt.Errorf("netlink message length %d in a datagram of %d bytes", l, len(b))
		}
		typ := binary.NativeEndian.Uint16(b[4:6])
		flags := binary.NativeEndian.Uint16(b[6:8])
		seq := binary.NativeEndian.Uint32(b[8:12])
		if err := fn(typ, flags, seq, b[sizeofNlMsghdr:l]); err != nil {
			return err
		}
		next := (int(l) + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1)
		if next >= len(b) {
			break
		}
		b = b[next:]
	}
	return nil
}

// errDumpDone ends forEachMessage at NLMSG_DONE.
var errDumpDone = errors.New("dump done")

// dumper dumps TCP sockets over a NETLINK_SOCK_DIAG socket. It is not safe
// for concurrent use.
type dumper struct {
	fd  int
	seq uint32
	req [sizeofNlMsghdr + sizeofInetDiagReqV2]byte
	buf []byte
}

// openDumper opens the dump socket, in the network namespace of the calling
// thread.
func openDumper() (*dumper, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag socket: %w", err)
	}
	// Connected to the kernel, the socket takes unicasts from no one else
	// (netlink_getsockbyportid refuses other senders).
	if err := unix.Connect(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sock_diag connect: %w", err)
	}
	return &dumper{fd: fd, buf: make([]byte, dumpBufSize)}, nil
}

func (d *dumper) close() error { return unix.Close(d.fd) }

// dump asks for the TCP sockets of family in dumpStates and calls fn with
// each one's message, in the order the kernel sends them. If it fails, fn
// may have been called for some of the sockets.
func (d *dumper) dump(family uint8, fn func(sockMsg)) error {
	d.seq++
	seq := d.seq
	r := d.req[:]
	clear(r)
	binary.NativeEndian.PutUint32(r[0:4], uint32(len(r)))
	binary.NativeEndian.PutUint16(r[4:6], unix.SOCK_DIAG_BY_FAMILY)
	binary.NativeEndian.PutUint16(r[6:8], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	binary.NativeEndian.PutUint32(r[8:12], seq)
	q := r[sizeofNlMsghdr:] // struct inet_diag_req_v2; no extensions asked
	q[0] = family
	q[1] = unix.IPPROTO_TCP
	binary.NativeEndian.PutUint32(q[4:8], dumpStates)
	if _, err := unix.Write(d.fd, r); err != nil {
		return fmt.Errorf("send dump request: %w", err)
	}
	for {
		n, err := unix.Read(d.fd, d.buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("read dump: %w", err)
		}
		err = forEachMessage(d.buf[:n], func(typ, _ uint16, mseq uint32, p []byte) error {
			if mseq != seq {
				// A reply to an earlier dump that failed part way.
				return nil
			}
			switch typ {
			case unix.NLMSG_DONE:
				return errDumpDone
			case unix.NLMSG_ERROR:
				if len(p) < 4 {
					return errors.New("short NLMSG_ERROR")
				}
				if e := int32(binary.NativeEndian.Uint32(p)); e < 0 {
					return fmt.Errorf("dump: %w", unix.Errno(-e))
				}
			case unix.SOCK_DIAG_BY_FAMILY:
				m, err := parseInetDiagMsg(p)
				if err != nil {
					return err
				}
				fn(m)
			}
			return nil
		})
		if err == errDumpDone {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// Socket-destroy multicast groups of NETLINK_SOCK_DIAG (linux/sock_diag.h).
// Binding to groups takes nl_groups as a bit mask: group g is bit g-1.
const destroyGroups = 1<<(unix.SKNLGRP_INET_TCP_DESTROY-1) | 1<<(unix.SKNLGRP_INET6_TCP_DESTROY-1)

// destroyRcvBuf is the receive buffer asked for the destroy socket. A
// notification takes about 1 KiB of buffer (skb overhead included), so 4 MiB
// holds a few thousand: a burst of closing connections while Run is busy
// sending Opens.
const destroyRcvBuf = 4 << 20

// openDestroy subscribes to the kernel's TCP socket-destroy notifications,
// in the network namespace of the calling thread. The kernel allows it
// without privilege; an LSM or seccomp policy may answer EPERM. The file is
// non-blocking, so that closing it ends a pending Read.
func openDestroy() (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return -1, fmt.Errorf("sock_diag socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: destroyGroups}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("subscribe to tcp destroy notifications: %w", err)
	}
	// SO_RCVBUFFORCE passes the rmem_max limit but needs CAP_NET_ADMIN;
	// without it SO_RCVBUF gets what rmem_max allows.
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, destroyRcvBuf) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, destroyRcvBuf)
	}
	return fd, nil
}
