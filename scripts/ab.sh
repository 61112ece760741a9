#!/bin/bash
# Interleaved A/B runs of daemon binaries in the live benchmark, beside
# tcp-info: one run of each binary in turn, N rounds, one summary line per
# run; each run's whole report is kept in /tmp/ab/<mode>-<binary>-<round>.txt.
# Build the bench binaries first (make bench-live builds them into bin/bench).
#
# Usage: scripts/ab.sh MODE N DATADIR BINARY...
#   MODE    churn (200 connections/s x 2,000) or bulk (4 streams, 10 s,
#           unpaced, offloads off); extra phbench flags in PHBENCH_ARGS
#   DATADIR a directory, or "fresh": a new top-level directory for each run,
#           removed after it. On a journal-less ext4 (as this VM's), creating
#           an inode costs more for every inode of its block group deleted in
#           the last 5-35 s, so runs in one directory, each deleting its
#           files, slow each other down (BENCHMARKS.md, issue 14); a new
#           top-level directory gets a block group of its own.
set -u
cd "$(dirname "$0")/.."
mode=$1 n=$2 dir=$3
shift 3
case $mode in
churn) load="-mode=churn -rate=200 -count=2000 -hold=100ms" ;;
bulk) load="-mode=bulk -streams=4 -duration=10s -offloads=off" ;;
*) echo "usage: $0 churn|bulk N DATADIR|fresh BINARY..." >&2; exit 2 ;;
esac
B=bin/bench
mkdir -p /tmp/ab
for i in $(seq 1 "$n"); do
  for bin in "$@"; do
    name=$(basename "$bin")
    d=$dir
    if [ "$dir" = fresh ]; then d=/phb-$name-$i-$$; fi
    mkdir -p "$d"
    out=/tmp/ab/$mode-$name-$i.txt
    # shellcheck disable=SC2086
    $B/phbench -runs=1 $load -datadir="$d" -daemon="$bin" -tcpinfo=$B/tcp-info -load=$B/phload ${PHBENCH_ARGS:-} > "$out" 2>&1
    if [ "$dir" = fresh ]; then rm -rf "$d"; fi
    printf '%s %s run %d: ' "$mode" "$name" "$i"
    awk '
      /daemon CPU \/ packet  /{p=$6} /daemon CPU \/ flow  /{f=$6}
      /^ +complete flows/{c=$3} /daemon peak RSS/{r=$6} /kernel drops/{k=$3}
      /publish floor CPU \/ file, no fsync/{fl=$9} /publish floor CPU \/ file, fsync/{ff=$8}
      /floor tcpdump CPU \/ packet/{t=$7} /daemon \/ floor CPU/{x=$6}
      /load average 1m \(start\)/{la=$5}
      END{printf "CPU/packet %s us, CPU/flow %s us, complete %s, kernel drops %s, peak RSS %s MB, publish floor %s/%s us (fsync), tcpdump %s us/packet (%sx), load %s\n", p, f, c, k, r, fl, ff, t, x, la}' "$out"
  done
done
