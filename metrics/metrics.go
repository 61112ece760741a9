// Package metrics holds every Prometheus metric of packet-headers.
//
// The original daemon's metric names and labels (all starting with pcap_) are
// kept so that existing dashboards and alerts keep working; the metrics added
// beside them follow the same prefix. Metrics are registered on a Registerer
// passed to New, so tests use their own prometheus.NewRegistry().
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// Metrics is the set of all metrics. Its fields are safe for concurrent use.
type Metrics struct {
	// The original's metrics.
	MissedPackets        *prometheus.CounterVec // {saverstate}
	MissedUUIDs          *prometheus.CounterVec // {saverstate}
	SaversStarted        prometheus.Counter
	SaversStopped        prometheus.Counter
	SaverErrors          *prometheus.CounterVec // {reason}
	SaverCount           *prometheus.GaugeVec   // {state}
	SaverSkipped         prometheus.Counter
	DemuxerBadPacket     prometheus.Counter
	DemuxerGCLatency     prometheus.Histogram
	DemuxerUUIDCount     prometheus.Counter
	DemuxerSaversGCed    prometheus.Counter
	DemuxerSaversActive  prometheus.Gauge
	DemuxerIgnored       prometheus.Counter
	BadEventsFromTCPInfo *prometheus.CounterVec // {reason}
	InterfacesCaptured   prometheus.Gauge

	// Added by this implementation.
	PacketsCaptured     *prometheus.CounterVec // {interface}
	KernelDrops         *prometheus.GaugeVec   // {interface}
	InterfaceDrops      *prometheus.GaugeVec   // {interface}
	BadPackets          *prometheus.CounterVec // {reason}
	FilesPublished      prometheus.Counter
	BytesWritten        prometheus.Counter
	PacketsSaved        prometheus.Counter
	PendingFlows        prometheus.Gauge
	PendingDropped      *prometheus.CounterVec // {reason}
	FlowsShed           *prometheus.CounterVec // {reason}
	EventsocketUp       prometheus.Gauge
	EventsocketConnects prometheus.Counter
	EventsReceived      *prometheus.CounterVec // {event}
	UUIDSourceSockets   prometheus.Counter
	UUIDSourceIssued    prometheus.Counter
	UUIDSourcePoll      prometheus.Histogram
	FileKernelDrops     prometheus.Histogram
	FilesIncomplete     *prometheus.CounterVec // {reason}
}

// New creates all metrics and registers them on reg.
func New(reg prometheus.Registerer) *Metrics {
	f := promauto.With(reg)
	return &Metrics{
		MissedPackets: f.NewCounterVec(prometheus.CounterOpts{
			Name: "pcap_missed_packets_total",
			Help: "Packets captured and thrown away because their saver could not keep up, by the saver's state. Should be zero.",
		}, []string{"saverstate"}),
		MissedUUIDs: f.NewCounterVec(prometheus.CounterOpts{
			Name: "pcap_missed_uuids_total",
			Help: "UUID events that could not be used, by the state of the flow they named. Should be near zero.",
		}, []string{"saverstate"}),
		SaversStarted: f.NewCounter(prometheus.CounterOpts{
			Name: "pcap_saver_starts_total",
			Help: "Flows whose saving has started.",
		}),
		SaversStopped: f.NewCounter(prometheus.CounterOpts{
			Name: "pcap_saver_stops_total",
			Help: "Flows whose saving has ended, successfully or not.",
		}),
		SaverErrors: f.NewCounterVec(prometheus.CounterOpts{
			Name: "pcap_saver_errors_total",
			Help: "Flows not saved completely, by reason.",
		}, []string{"reason"}),
		SaverCount: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "pcap_saver_states",
			Help: "Savers currently in each state.",
		}, []string{"state"}),
		SaverSkipped: f.NewCounter(prometheus.CounterOpts{
			Name: "pcap_saver_skipped_total",
			Help: "Packets and UUID events of new flows refused by load shedding (-maxflows, -maxheap); a refused flow is not remembered, so each of its packets counts.",
		}),
		DemuxerBadPacket: f.NewCounter(prometheus.CounterOpts{
			Name: "pcap_demuxer_bad_packets_total",
			Help: "Captured packets that could not be parsed as TCP over IP.",
		}),
		DemuxerGCLatency: f.NewHistogram(prometheus.HistogramOpts{
			Name:    "pcap_demuxer_gc_latency_seconds",
			Help:    "Duration of each flow-table garbage collection.",
			Buckets: prometheus.ExponentialBuckets(1e-6, 2, 20), // 1 µs to about 1 s
		}),
		DemuxerUUIDCount: f.NewCounter(prometheus.CounterOpts{
			Name: "pcap_demuxer_uuids_total",
			Help: "UUID events the demuxer has received.",
		}),
		DemuxerSaversGCed: f.NewCounter(prometheus.CounterOpts{
			Name: "pcap_demuxer_savers_garbage_collected_total",
			Help: "Flows ended by the demuxer's garbage collection after -flowtimeout without packets.",
		}),
		DemuxerSaversActive: f.NewGauge(prometheus.GaugeOpts{
			Name: "pcap_demuxer_savers_active",
			Help: "Flows in the demuxer's flow table (pending and saving).",
		}),
		DemuxerIgnored: f.NewCounter(prometheus.CounterOpts{
			Name: "pcap_demuxer_ignored_total",
			Help: "Packets ignored because their flow was shed or gave up waiting for a UUID.",
		}),
		BadEventsFromTCPInfo: f.NewCounterVec(prometheus.CounterOpts{
			Name: "pcap_tcpinfohandler_bad_events_total",
			Help: "Eventsocket lines that could not be used, by reason.",
		}, []string{"reason"}),
		InterfacesCaptured: f.NewGauge(prometheus.GaugeOpts{
			Name: "pcap_muxer_interfaces_with_captures",
			Help: "Interfaces being captured (every up interface but loopback and bridge or bond ports, or the named ones).",
		}),

		PacketsCaptured: f.NewCounterVec(prometheus.CounterOpts{
			Name: "pcap_capture_packets_total",
			Help: "Packets read from the capture ring, by capture socket (any: every interface).",
		}, []string{"interface"}),
		KernelDrops: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "pcap_capture_kernel_drops",
			Help: "Packets dropped by the kernel because the capture ring was full since the capture started, by capture socket (any: every interface).",
		}, []string{"interface"}),
		InterfaceDrops: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "pcap_capture_interface_drops",
			Help: "Packets dropped by the interface or driver (its rx_dropped counter) since the capture started, by named interface.",
		}, []string{"interface"}),
		BadPackets: f.NewCounterVec(prometheus.CounterOpts{
			Name: "pcap_capture_bad_packets_total",
			Help: "Captured packets that could not be parsed, by reason.",
		}, []string{"reason"}),
		FilesPublished: f.NewCounter(prometheus.CounterOpts{
			Name: "pcap_saver_files_published_total",
			Help: "Pcap files completely written and published under their final name.",
		}),
		BytesWritten: f.NewCounter(prometheus.CounterOpts{
			Name: "pcap_saver_bytes_written_total",
			Help: "Compressed bytes written to pcap files.",
		}),
		PacketsSaved: f.NewCounter(prometheus.CounterOpts{
			Name: "pcap_saver_packets_total",
			Help: "Packet records written to pcap files.",
		}),
		PendingFlows: f.NewGauge(prometheus.GaugeOpts{
			Name: "pcap_demuxer_pending_flows",
			Help: "Flows seen on the wire that are still waiting for their UUID.",
		}),
		PendingDropped: f.NewCounterVec(prometheus.CounterOpts{
			Name: "pcap_demuxer_pending_dropped_total",
			Help: "Flows dropped without a UUID, by reason (uuidtimeout, limit).",
		}, []string{"reason"}),
		FlowsShed: f.NewCounterVec(prometheus.CounterOpts{
			Name: "pcap_demuxer_flows_shed_total",
			Help: "Packets of new flows refused by a load limit, by limit (maxflows, maxheap); each packet of a refused flow counts.",
		}, []string{"limit"}),
		EventsocketUp: f.NewGauge(prometheus.GaugeOpts{
			Name: "pcap_eventsocket_connected",
			Help: "1 while connected to tcp-info's eventsocket, else 0.",
		}),
		EventsocketConnects: f.NewCounter(prometheus.CounterOpts{
			Name: "pcap_eventsocket_connects_total",
			Help: "Successful connections to tcp-info's eventsocket (more than one means reconnects).",
		}),
		EventsReceived: f.NewCounterVec(prometheus.CounterOpts{
			Name: "pcap_eventsocket_events_total",
			Help: "Valid events received from the UUID source, by event (open, close).",
		}, []string{"event"}),
		UUIDSourceSockets: f.NewCounter(prometheus.CounterOpts{
			Name: "pcap_uuidsource_sockets_seen_total",
			Help: "New TCP sockets seen by the built-in kernel UUID source.",
		}),
		UUIDSourceIssued: f.NewCounter(prometheus.CounterOpts{
			Name: "pcap_uuidsource_uuids_issued_total",
			Help: "UUIDs issued by the built-in kernel UUID source.",
		}),
		UUIDSourcePoll: f.NewHistogram(prometheus.HistogramOpts{
			Name:    "pcap_uuidsource_poll_duration_seconds",
			Help:    "Duration of one kernel socket dump by the built-in UUID source.",
			Buckets: prometheus.ExponentialBuckets(1e-5, 2, 16), // 10 µs to about 0.3 s
		}),
		FileKernelDrops: f.NewHistogram(prometheus.HistogramOpts{
			Name:    "pcap_saver_file_kernel_drops",
			Help:    "kernel_drops of each file published: packets the kernel dropped on the capture sockets between the flow's first packet and the file's publication (an upper bound of what the flow lost; per socket, not per flow).",
			Buckets: []float64{0, 1, 10, 100, 1e3, 1e4, 1e5, 1e6},
		}),
		FilesIncomplete: f.NewCounterVec(prometheus.CounterOpts{
			Name: "pcap_saver_files_incomplete_total",
			Help: "Files published without the whole flow, by reason, as their capture record says (truncated, pending, backlog, kerneldrops, nosyn, nofinrst); a file counts once for each of its reasons.",
		}, []string{"reason"}),
	}
}
