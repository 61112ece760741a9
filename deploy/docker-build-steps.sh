#!/bin/sh
# The steps of ../Dockerfile, as a script so that deploy_test.go runs the very
# same commands on the test machine (which has no Docker engine) and the image
# and the tests cannot drift apart. Run from anywhere; paths given are used as
# they are.
#
#   docker-build-steps.sh build-deps       apt: what building needs (nothing now)
#   docker-build-steps.sh build OUT        build the daemon (pure Go, static) to OUT
#   docker-build-steps.sh runtime-deps     apt: what the image needs (libcap2-bin, for setcap)
#   docker-build-steps.sh setcap BIN       give BIN the CAP_NET_RAW file capability
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)

apt_install() {
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "$@"
	rm -rf /var/lib/apt/lists/*
}

case "${1:-}" in
build-deps)
	# Nothing: the capture reads the kernel's AF_PACKET ring itself, with
	# no C library, and the golang image has the Go toolchain. The step
	# stays so that the Dockerfile keeps working and has a place for one.
	;;
build)
	[ $# -eq 2 ] || { echo "usage: $0 build OUT" >&2; exit 2; }
	out=$2
	case $out in /*) ;; *) out=$(pwd)/$out ;; esac
	cd "$repo"
	# Without cgo: a static binary that needs no library in the image (the
	# capture talks to the kernel directly). -trimpath keeps the build
	# machine's paths out of the binary.
	CGO_ENABLED=0 go build -trimpath -o "$out" ./cmd/packet-headers
	# The image runs as nobody: the binary must be readable and executable
	# by all.
	chmod 0755 "$out"
	;;
runtime-deps)
	# libcap2-bin has setcap; the binary itself links no library.
	apt_install libcap2-bin
	;;
setcap)
	[ $# -eq 2 ] || { echo "usage: $0 setcap BIN" >&2; exit 2; }
	# As the original image: a file capability, so that the daemon can open
	# packet captures as an unprivileged user (USER nobody) without any
	# other privilege. It takes effect only if the container runtime keeps
	# CAP_NET_RAW in the bounding set and no_new_privs is off (Kubernetes:
	# allowPrivilegeEscalation must not be false).
	setcap cap_net_raw+ep "$2"
	;;
*)
	echo "usage: $0 build-deps | build OUT | runtime-deps | setcap BIN" >&2
	exit 2
	;;
esac
