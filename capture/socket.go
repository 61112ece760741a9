package capture

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The layout of the kernel's TPACKET_V3 ring (linux/if_packet.h).
const (
	// struct tpacket_block_desc: version, offset_to_priv, then
	// struct tpacket_hdr_v1.
	blkStatus  = 8
	blkNumPkts = 12
	blkFirst   = 16
	// struct tpacket3_hdr.
	pktNext    = 0
	pktSec     = 4
	pktNsec    = 8
	pktSnaplen = 12
	pktLen     = 16
	pktStatus  = 20
	pktMac     = 24
	pktNet     = 26
	pktVLANTCI = 32
	pktTPID    = 36
	// struct sockaddr_ll follows the header at TPACKET_ALIGN(48).
	pktSLL     = 48
	sllIfindex = pktSLL + 4
	sllHatype  = pktSLL + 8

	// frameSize only sets the kernel's frame count bookkeeping: TPACKET_V3
	// packs packets of any size into a block one after another.
	frameSize = 2048
	// maxBlockSize is the largest ring block. The kernel hands a block to
	// user space whole, when it is full or when the block timeout expires,
	// so smaller blocks mean less waiting under moderate load and less
	// ring left unused by a block retired with a few packets in it.
	maxBlockSize = 128 << 10
	// minBlocks is the fewest blocks a ring is cut into.
	minBlocks = 8
)

// ringSource is where an Interface reads packets from: a packet socket and
// its receive ring. Only the goroutine that runs the Interface calls it.
// Tests substitute a fake one.
type ringSource interface {
	// fd returns the descriptor to poll for readable ring blocks.
	fd() int
	// block returns the ring block at index i and the number of blocks.
	block(i int) []byte
	blocks() int
	// release hands block i back to the kernel.
	release(i int)
	// stats returns the packets dropped by the kernel since the previous
	// call (the kernel resets its counters when they are read).
	stats() (drops uint64, err error)
	// setFilter replaces the socket filter.
	setFilter(prog []unix.SockFilter) error
	// sockErr returns and clears the socket's pending error.
	sockErr() error
	// close unmaps the ring and closes the socket.
	close() error
}

// packetSocket is an AF_PACKET socket with a TPACKET_V3 receive ring mapped
// into this process: the kernel writes each packet into the ring once, and
// the capture goroutine parses it in place, with no system call and no copy
// per packet.
type packetSocket struct {
	sock      int
	ring      []byte
	blockSize int
	nblocks   int
}

// ringGeometry cuts a ring of about size bytes into blocks.
func ringGeometry(size int) (blockSize, nblocks int) {
	page := os.Getpagesize()
	blockSize = maxBlockSize
	for blockSize > page && size/blockSize < minBlocks {
		blockSize /= 2
	}
	nblocks = max(size/blockSize, minBlocks)
	return blockSize, nblocks
}

// openPacketSocket opens a packet socket on the interface with index
// ifindex (0: every interface), with the filter prog attached before any
// packet can arrive, a ring of about bufSize bytes whose blocks are handed
// over at the latest blockTimeout after their first packet, and snaplen
// enforced by prog's accepting return value.
func openPacketSocket(ifindex, bufSize int, blockTimeout time.Duration, prog []unix.SockFilter) (_ *packetSocket, err error) {
	// Protocol 0: the socket receives nothing until it is bound below,
	// after the filter and the ring are in place.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
			return nil, fmt.Errorf("open packet socket: %w (capturing needs CAP_NET_RAW)", err)
		}
		return nil, fmt.Errorf("open packet socket: %w", err)
	}
	s := &packetSocket{sock: fd}
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_VERSION, unix.TPACKET_V3); err != nil {
		return nil, fmt.Errorf("set TPACKET_V3: %w", err)
	}
	if err := s.setFilter(prog); err != nil {
		return nil, err
	}
	s.blockSize, s.nblocks = ringGeometry(bufSize)
	req := unix.TpacketReq3{
		Block_size:     uint32(s.blockSize),
		Block_nr:       uint32(s.nblocks),
		Frame_size:     frameSize,
		Frame_nr:       uint32(s.blockSize / frameSize * s.nblocks),
		Retire_blk_tov: uint32(max(blockTimeout.Milliseconds(), 1)),
	}
	if err := unix.SetsockoptTpacketReq3(fd, unix.SOL_PACKET, unix.PACKET_RX_RING, &req); err != nil {
		return nil, fmt.Errorf("set up a %d-byte capture ring: %w", s.blockSize*s.nblocks, err)
	}
	s.ring, err = unix.Mmap(fd, 0, s.blockSize*s.nblocks, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map the capture ring: %w", err)
	}
	sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifindex}
	if err := unix.Bind(fd, sa); err != nil {
		return nil, fmt.Errorf("bind packet socket: %w", err)
	}
	return s, nil
}

func htons(v uint16) uint16 { return bits.ReverseBytes16(v) }

func (s *packetSocket) fd() int { return s.sock }

func (s *packetSocket) block(i int) []byte {
	return s.ring[i*s.blockSize : (i+1)*s.blockSize : (i+1)*s.blockSize]
}

func (s *packetSocket) blocks() int { return s.nblocks }

func (s *packetSocket) release(i int) { releaseBlock(s.block(i)) }

func (s *packetSocket) stats() (uint64, error) {
	st, err := unix.GetsockoptTpacketStatsV3(s.sock, unix.SOL_PACKET, unix.PACKET_STATISTICS)
	if err != nil {
		return 0, fmt.Errorf("read capture statistics: %w", err)
	}
	return uint64(st.Drops), nil
}

func (s *packetSocket) setFilter(prog []unix.SockFilter) error {
	if len(prog) == 0 {
		return errors.New("empty socket filter")
	}
	fp := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	if err := unix.SetsockoptSockFprog(s.sock, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &fp); err != nil {
		return fmt.Errorf("attach socket filter (%d instructions): %w", len(prog), err)
	}
	return nil
}

func (s *packetSocket) sockErr() error {
	n, err := unix.GetsockoptInt(s.sock, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return err
	}
	if n != 0 {
		return unix.Errno(n)
	}
	return nil
}

func (s *packetSocket) close() error {
	var errs []error
	if s.ring != nil {
		errs = append(errs, unix.Munmap(s.ring))
		s.ring = nil
	}
	if s.sock >= 0 {
		errs = append(errs, unix.Close(s.sock))
		s.sock = -1
	}
	return errors.Join(errs...)
}

// blockReady reports whether the kernel has handed block b to user space.
func blockReady(b []byte) bool {
	return atomic.LoadUint32((*uint32)(unsafe.Pointer(&b[blkStatus])))&unix.TP_STATUS_USER != 0
}

// releaseBlock hands block b back to the kernel.
func releaseBlock(b []byte) {
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&b[blkStatus])), unix.TP_STATUS_KERNEL)
}

// ne32 and ne16 read the ring's fields, which are in host byte order.
func ne32(b []byte, off int) uint32 { return binary.NativeEndian.Uint32(b[off:]) }
func ne16(b []byte, off int) uint16 { return binary.NativeEndian.Uint16(b[off:]) }
