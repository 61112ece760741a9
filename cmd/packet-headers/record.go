package main

import (
	"log/slog"
	"slices"
	"strings"

	"github.com/m-lab/packet-headers/capture"
	phmetrics "github.com/m-lab/packet-headers/metrics"
	"github.com/m-lab/packet-headers/saver"
)

// saverConfig is the savers' configuration: where and how files are
// written, and the daemon's part of each file's capture record (its
// version, UUID source, anonymization and capture interfaces, and the
// capture's kernel drop counter).
func saverConfig(cfg *Config, dir string, anon saver.Anonymizer, drops saver.DropCounter, m *phmetrics.Metrics, log *slog.Logger) *saver.Config {
	source := "standalone"
	if cfg.EventSocket != "" {
		source = "tcpinfo"
	}
	interfaces := []string{capture.AnyInterface}
	if len(cfg.Interfaces) > 0 {
		interfaces = slices.Clone(cfg.Interfaces)
	}
	return &saver.Config{
		Dir:             dir,
		CaptureDuration: cfg.CaptureDuration,
		Stream:          cfg.Stream,
		Level:           cfg.GzipLevel,
		Sync:            cfg.Fsync,
		Anon:            anon,
		Metrics:         m,
		Log:             log,
		Version:         recordVersion(),
		Source:          source,
		Anonymization:   cfg.AnonymizeIP.String(),
		Interfaces:      interfaces,
		Drops:           drops,
	}
}

// recordVersion is the version in the capture records: "v1.2.3+abc1234"
// (the release, and the commit as -version prints it), or the version alone
// when it names the commit already (git describe's "v1.2.3-4-gabc1234").
func recordVersion() string {
	c := commit()
	if strings.Contains(version, c) {
		return version
	}
	return version + "+" + c
}
