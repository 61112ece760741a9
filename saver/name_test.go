package saver

import (
	"strings"
	"testing"
)

func TestCheckUUID(t *testing.T) {
	tests := []struct {
		uuid    string
		wantErr string // "" for a valid UUID
	}{
		{uuid: "host_1548788619_00000000000084FF"},
		{uuid: "mlab1.lga0t.measurement-lab.org_1588110475_0000000000001E3D"},
		{uuid: "aZ09._-"},
		{uuid: "_000000000000000A"},
		{uuid: strings.Repeat("a", MaxUUIDLen)},
		{uuid: "", wantErr: "uuid length 0 not in [1, 247]"},
		{uuid: strings.Repeat("a", MaxUUIDLen+1), wantErr: "uuid length 248 not in [1, 247]"},
		{uuid: ".hidden_0000000000000001", wantErr: `uuid ".hidden_0000000000000001" starts with a dot`},
		{uuid: "..", wantErr: `uuid ".." starts with a dot`},
		{uuid: "a/b", wantErr: `uuid "a/b" has byte 0x2f at 1`},
		{uuid: "host\n_0000000000000001", wantErr: `uuid "host\n_0000000000000001" has byte 0x0a at 4`},
		{uuid: "a b", wantErr: `uuid "a b" has byte 0x20 at 1`},
		{uuid: "h\u00e9", wantErr: `uuid "hé" has byte 0xc3 at 1`},
		{uuid: "a\x00", wantErr: `uuid "a\x00" has byte 0x00 at 1`},
	}
	for _, tt := range tests {
		t.Run(tt.uuid, func(t *testing.T) {
			err := CheckUUID(tt.uuid)
			got := ""
			if err != nil {
				got = err.Error()
			}
			if got != tt.wantErr {
				t.Errorf("CheckUUID(%q) = %q, want %q", tt.uuid, got, tt.wantErr)
			}
		})
	}
	// The longest UUID that passes names a file of at most 255 bytes.
	if n := len(strings.Repeat("a", MaxUUIDLen) + ".pcap.gz"); n != 255 {
		t.Errorf("longest file name %d bytes, want 255", n)
	}
}

func TestUUIDByte(t *testing.T) {
	var allowed []byte
	for c := range 256 {
		if UUIDByte(byte(c)) {
			allowed = append(allowed, byte(c))
		}
	}
	want := "-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
	if string(allowed) != want {
		t.Errorf("allowed bytes %q, want %q", allowed, want)
	}
}
