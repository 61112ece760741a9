# packet-headers: `make run` starts the daemon on this host, `make test` runs
# every check CI runs. Both install their system packages first.
GO ?= go
BIN := bin/packet-headers
DATADIR ?= ./data

.PHONY: all build deps test lint bench bench-live run clean

all: build

deps:
	@./scripts/install-deps.sh

build: deps
	$(GO) build -o $(BIN) ./cmd/packet-headers

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
