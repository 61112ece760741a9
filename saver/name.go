package saver

import "fmt"

// MaxUUIDLen is the longest UUID that names a file: with ".pcap.gz" appended
// it must still fit the 255-byte file name limit of common Linux file
// systems. Real UUIDs (hostname_boottime_%016X) are well under 100 bytes.
const MaxUUIDLen = 255 - len(".pcap.gz")

// UUIDByte reports whether c may appear in a UUID that names a file: an ASCII
// letter or digit, '.', '_' or '-'.
func UUIDByte(c byte) bool {
	return ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') || ('0' <= c && c <= '9') ||
		c == '.' || c == '_' || c == '-'
}

// CheckUUID makes sure a UUID is safe to use as a file name: a Saver writes
// <Dir>/YYYY/MM/DD/<UUID>.pcap.gz, so a "/" or ".." would let whoever
// chose the UUID write anywhere, a leading "." would hide the file from the
// uploader, and a space, a newline or another control byte would end up in
// every tool that lists the files. It accepts 1 to MaxUUIDLen bytes for
// which UUIDByte holds, the first not a dot.
//
// It is the one rule for every UUID source: the eventsocket client applies
// it to each UUID tcp-info sends, the standalone source to its prefix at
// start.
func CheckUUID(u string) error {
	if u == "" || len(u) > MaxUUIDLen {
		return fmt.Errorf("uuid length %d not in [1, %d]", len(u), MaxUUIDLen)
	}
	if u[0] == '.' {
		return fmt.Errorf("uuid %q starts with a dot", u)
	}
	for i := 0; i < len(u); i++ {
		if !UUIDByte(u[i]) {
			return fmt.Errorf("uuid %q has byte %#02x at %d", u, u[i], i)
		}
	}
	return nil
}
