# packet-headers: `make run` starts the daemon on this host, `make test` runs
# every check CI runs. Both install their system packages first.
GO ?= go
BIN := bin/packet-headers
DATADIR ?= ./data

.PHONY: all build deps test lint bench bench-live run clean

all: build

deps:
	@./scripts/install-deps.sh

# The version and commit that -version prints and git_short_commit exports
# (M-Lab's builds set prometheusx.GitShortCommit the same way).
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT ?= $(shell git rev-parse --short HEAD 2>/dev/null)
LDFLAGS := -X main.version=$(VERSION) $(if $(COMMIT),-X github.com/m-lab/go/prometheusx.GitShortCommit=$(COMMIT))

build: deps
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/packet-headers

lint: deps
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) vet ./...

# The tests (with the race detector), then each benchmark once so that they
# keep compiling and running.
test: lint
	$(GO) test -race -count=1 ./...
	$(GO) test -run='^$$' -bench=. -benchtime=1x ./...

bench: deps
	$(GO) test -run='^$$' -bench=. -benchmem ./...

# Standalone on every interface of this host, files under $(DATADIR).
run: build
	@echo "packet-headers: writing one file per TCP flow to $(abspath $(DATADIR))/YYYY/MM/DD/<UUID>.pcap.gz; metrics on :9990/metrics; Ctrl-C stops"
	./$(BIN) -datadir $(DATADIR) $(ARGS)

clean:
	rm -rf bin

# The live benchmark (root: it makes network namespaces and captures): churn
# 200/s x 2,000, bulk 4 streams for 10 s with offloads off, and 10,000
# concurrent flows, each $(BENCH_RUNS) times; a table per mode on stdout and
# JSON in $(BENCH_OUT). Churn and bulk run beside tcp-info; the concurrent
# runs use the built-in source, since tcp-info needs two descriptors per open
# connection and the usual 20,000-descriptor limit does not hold 10,000
# (BENCH_CONCURRENT_SOURCE=tcpinfo where it does). The daemon's files go to
# tmpfs by default so that the host's file system does not swamp the
# daemon's own cost (see bench/README.md). More flags: BENCH_ARGS=...
BENCH_OUT ?= bin/bench
BENCH_RUNS ?= 3
BENCH_DATADIR ?= $(shell test -d /dev/shm && echo /dev/shm)
BENCH_CONCURRENT_SOURCE ?= standalone
BENCH_FLAGS = -runs=$(BENCH_RUNS) -datadir=$(BENCH_DATADIR) -daemon=$(BENCH_OUT)/packet-headers \
	-tcpinfo=$(BENCH_OUT)/tcp-info -load=$(BENCH_OUT)/phload $(BENCH_ARGS)
bench-live: deps
	@mkdir -p $(BENCH_OUT)
	$(GO) build -o $(BENCH_OUT)/packet-headers ./cmd/packet-headers
	$(GO) build -o $(BENCH_OUT)/tcp-info github.com/m-lab/tcp-info
	$(GO) build -o $(BENCH_OUT)/phload ./bench/cmd/phload
	$(GO) build -o $(BENCH_OUT)/phbench ./bench/cmd/phbench
	$(BENCH_OUT)/phbench -mode=churn -rate=200 -count=2000 -hold=100ms -out=$(BENCH_OUT)/churn.json $(BENCH_FLAGS)
	$(BENCH_OUT)/phbench -mode=bulk -streams=4 -duration=10s -offloads=off -out=$(BENCH_OUT)/bulk.json $(BENCH_FLAGS)
	$(BENCH_OUT)/phbench -mode=concurrent -count=10000 -source=$(BENCH_CONCURRENT_SOURCE) -out=$(BENCH_OUT)/concurrent.json $(BENCH_FLAGS)
