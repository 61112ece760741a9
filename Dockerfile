# packet-headers image: the daemon as an unprivileged user (nobody) that can
# capture packets through a file capability (CAP_NET_RAW), as the original.
#
#   docker build -t packet-headers .
#   docker run --network=host --cap-drop=ALL --cap-add=NET_RAW \
#     -v /var/spool/packet-headers:/var/spool/packet-headers \
#     -v /var/local/tcpinfo:/var/local/tcpinfo \
#     packet-headers -tcpinfo.eventsocket=/var/local/tcpinfo/eventsocket.sock
#
# The host directories must be writable by nobody (uid 65534). Every build
# step is in deploy/docker-build-steps.sh, which deploy/deploy_test.go runs on
# the test machine, so keep the steps there rather than here.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY deploy/docker-build-steps.sh deploy/
RUN ./deploy/docker-build-steps.sh build-deps
# Modules first: this layer stays cached until go.mod or go.sum change.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN ./deploy/docker-build-steps.sh build /packet-headers

FROM debian:bookworm-slim
WORKDIR /build
COPY deploy/docker-build-steps.sh deploy/
RUN ./deploy/docker-build-steps.sh runtime-deps
COPY --from=build /packet-headers /packet-headers
RUN ./deploy/docker-build-steps.sh setcap /packet-headers \
 && install -d -o nobody -g nogroup -m 2775 /var/spool/packet-headers \
 && rm -r /build
WORKDIR /
# The default data directory; a -datadir argument wins. Files are written as
# /var/spool/packet-headers/YYYY/MM/DD/<UUID>.pcap.gz.
ENV DATADIR=/var/spool/packet-headers
EXPOSE 9990
USER nobody
ENTRYPOINT ["/packet-headers"]
