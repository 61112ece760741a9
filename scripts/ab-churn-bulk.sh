#!/bin/bash
# Interleaved A/B of two daemon binaries, churn and bulk, 5 runs each, beside
# tcp-info, data directory on the disk; results in /tmp/ab. Build the bench
# binaries first (make bench-live builds them into bin/bench), and the
# "before" daemon from another checkout.
# Usage: BEFORE=/tmp/before/bin/packet-headers scripts/ab-churn-bulk.sh
cd "$(dirname "$0")/.."
mkdir -p /tmp/ab /var/tmp/phb
B=bin/bench
for i in 1 2 3 4 5; do
  for v in before after; do
    if [ $v = before ]; then D=${BEFORE:?}; X=""; else D=$B/packet-headers; X="-daemonflag=-fsync=false"; fi
    $B/phbench -mode=churn -rate=200 -count=2000 -hold=100ms -runs=1 -datadir=/var/tmp/phb -daemon=$D -tcpinfo=$B/tcp-info -load=$B/phload $X -out=/tmp/ab/churn-$v-$i.json > /tmp/ab/churn-$v-$i.txt 2>&1
  done
done
for i in 1 2 3 4 5; do
  for v in before after; do
    if [ $v = before ]; then D=${BEFORE:?}; X=""; else D=$B/packet-headers; X="-daemonflag=-fsync=false"; fi
    $B/phbench -mode=bulk -streams=4 -duration=10s -offloads=off -runs=1 -datadir=/var/tmp/phb -daemon=$D -tcpinfo=$B/tcp-info -load=$B/phload $X -out=/tmp/ab/bulk-$v-$i.json > /tmp/ab/bulk-$v-$i.txt 2>&1
  done
done
echo done > /tmp/ab/DONE
